//! TLS for the two outside systems that speak it, engines (bollard) and registries (reqwest):
//! both use rustls with one crypto provider for the whole process, ring. With two providers
//! compiled in, rustls cannot pick one by itself and panics; reqwest is built without one and
//! asks for the process default.

/// Makes ring the process's rustls crypto provider. Called wherever a TLS client is made; after
/// the first call it does nothing.
pub(crate) fn install_crypto_provider() {
    // Err: a provider is installed already (by an earlier call), which is the one wanted.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
