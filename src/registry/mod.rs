//! Pushing docker-archives to OCI registries over the distribution API.
//!
//! The HTTP side is our own small client on reqwest (the one oci-client uses) rather than
//! oci-client's push helpers: those treat a 202 answer to a mount as an error, do not retry,
//! and do not report the `Docker-Content-Digest` of a pushed manifest. The manifest types
//! and media types are oci-client's.
//!
//! The parts, by job: [`RegistryConfig`] (here) is what the command layer resolved from
//! flags and `nixctr.toml`; `push.rs` holds a [`PushSession`] per registry host, which owns
//! the connection, the blob cache and the compressions and runs pushes (`push/tags.rs`: which
//! tags exist, several tags on one manifest); `api.rs` the
//! distribution endpoints on top of `client.rs`, the transport; `upload.rs` blob uploads
//! (whole or in chunks, resumed where cut off); `manifest.rs` the manifest
//! and index bytes; `blobs.rs` layer compression; `cache.rs` what earlier pushes left where;
//! `auth.rs` credentials; `reference.rs` image references; `probe.rs` the steps of a login,
//! one by one, for `nixctr doctor`; `push/referrers.rs` what sits beside an image
//! (OCI referrers and cosign signatures).

mod api;
pub(crate) mod auth;
mod blobs;
pub(crate) mod cache;
mod client;
mod manifest;
mod phases;
mod probe;
mod push;
pub(crate) mod reference;
mod upload;

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

// pub: used by tests/it/push.rs
pub use auth::{Credentials, Secret};
pub use manifest::{Compression, ManifestFormat};
pub use phases::PushPhases;
pub(crate) use push::referrers;
pub use push::{Destination, ExistingTags, PushOutcome, PushSession};
pub use reference::Reference;
pub use upload::{parse_chunk_size, UploadStats};

/// What settings resolved for talking to registries (flags + nixctr.toml + stdin password).
// pub: used by tests/it/push.rs
#[derive(Debug, Clone, Default)]
pub struct RegistryConfig {
    pub format: ManifestFormat,
    pub compression: Compression,
    /// `--insecure`: no certificate check, and plain http allowed, for every registry.
    pub insecure: bool,
    /// `insecure-registries` of nixctr.toml (`host` or `host:port`): the same, for those.
    pub insecure_registries: Vec<String>,
    pub ca_cert: Option<PathBuf>,
    /// From `--password-stdin`, already read by the caller; `None` looks them up per host.
    pub credentials: Option<Credentials>,
    /// Blob transfers at once, per session (`Default` leaves 0, which `check` refuses).
    pub jobs: usize,
    /// The blob cache file; `None` disables it. Callers pass `BlobCache::default_path()`.
    /// Chunk sizes that passed are remembered beside it, in `uploads.json`.
    pub blob_cache: Option<PathBuf>,
    /// `--chunk-size`: blobs go up in chunks of this size, to every registry.
    pub chunk_size: Option<u64>,
    /// `chunk-size` of `[registries."host[:port]"]` in nixctr.toml, by that key.
    pub chunk_sizes: BTreeMap<String, u64>,
}

impl RegistryConfig {
    /// Refuses what cannot work, before any work is done.
    pub fn check(&self) -> Result<()> {
        if self.compression == Compression::Zstd && self.format == ManifestFormat::Docker {
            bail!(manifest::ZSTD_NEEDS_OCI);
        }
        if self.jobs == 0 {
            bail!("--jobs 0: give at least 1");
        }
        let sizes = self.chunk_size.iter().chain(self.chunk_sizes.values());
        if let Some(bad) = sizes.copied().find(|s| !(upload::MIN_CHUNK..=upload::MAX_CHUNK).contains(s)) {
            bail!("chunk size {bad}: give a size from 64 KiB to 1 GiB");
        }
        Ok(())
    }

    /// How to reach `registry` (`host[:port]`): TLS, plain http, credentials.
    fn target(&self, registry: &str) -> Result<Target> {
        let hostname = reference::host_only(registry);
        let listed = self.insecure_registries.iter().any(|r| r == registry || r == hostname);
        let insecure = self.insecure || listed;
        let (credentials, credential_notes) = match &self.credentials {
            Some(c) => (Some(c.clone()), Vec::new()),
            None => {
                let found = auth::Lookup::from_env().find(registry)?;
                (found.credentials, found.notes)
            }
        };
        let chunk_size =
            self.chunk_size.or_else(|| self.chunk_sizes.get(registry).or(self.chunk_sizes.get(hostname)).copied());
        Ok(Target {
            chunk_size,
            registry: registry.to_string(),
            api_host: reference::api_host(registry).to_string(),
            insecure,
            plain_http_allowed: insecure || is_loopback(hostname),
            ca_cert: self.ca_cert.clone(),
            credentials,
            credential_notes,
        })
    }
}

/// How to reach and log in to one registry host, resolved from a [`RegistryConfig`].
#[derive(Debug, Clone)]
struct Target {
    /// `host[:port]` as the user wrote it (and as auth files and the blob cache key it).
    registry: String,
    /// Where requests go (Docker Hub's API lives elsewhere than its name).
    api_host: String,
    /// No certificate check, and plain http allowed.
    insecure: bool,
    /// Plain http allowed: loopback addresses and insecure registries.
    plain_http_allowed: bool,
    ca_cert: Option<PathBuf>,
    credentials: Option<Credentials>,
    /// Credential sources passed over, and why (shown when the registry wants credentials).
    credential_notes: Vec<String>,
    /// Blobs go up in chunks of this size (set outright, not probed).
    chunk_size: Option<u64>,
}

/// `localhost`, 127.0.0.0/8 and ::1: plain http there stays on the machine.
fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `sha256:0123456789ab`, for messages. Digests may come from the user-writable blob cache,
/// so this cuts at a character boundary whatever the string holds.
fn short(digest: &str) -> &str {
    match digest.char_indices().nth(19) {
        Some((end, _)) => &digest[..end],
        None => digest,
    }
}

/// `sha256:` and 64 lowercase hex digits: the only digests nixctr computes, and the only
/// ones it puts into a URL.
fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.8.9.1", "::1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "localhost.example", "::2"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn short_never_panics() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(short(&digest), "sha256:abababababab");
        assert_eq!(short("sha256:ab"), "sha256:ab");
        assert_eq!(short(""), "");
        // Multi-byte characters where a byte cut at 19 would split one.
        let hostile = format!("sha256:{}", "é".repeat(40));
        assert_eq!(short(&hostile), format!("sha256:{}", "é".repeat(12)));
        for s in ["sha256:0123456789a😀😀", "😀".repeat(30).as_str(), "\u{0}\u{ffff}"] {
            assert!(s.starts_with(short(s)));
        }
    }

    #[test]
    fn digests_are_checked_before_use() {
        assert!(is_digest(&format!("sha256:{}", "0f".repeat(32))));
        assert!(!is_digest(&format!("sha256:{}", "0F".repeat(32))));
        assert!(!is_digest("sha256:00"));
        assert!(!is_digest(&format!("sha512:{}", "0f".repeat(32))));
        assert!(!is_digest(&format!("sha256:{}/../x", "0f".repeat(30))));
    }

    #[test]
    fn config_check_refuses_what_cannot_work() {
        let ok = RegistryConfig { jobs: 4, ..RegistryConfig::default() };
        assert!(ok.check().is_ok());
        let zstd_docker =
            RegistryConfig { compression: Compression::Zstd, format: ManifestFormat::Docker, ..ok.clone() };
        assert!(zstd_docker.check().unwrap_err().to_string().contains("--compression zstd needs --format oci"));
        assert_eq!(
            RegistryConfig { jobs: 0, ..ok.clone() }.check().unwrap_err().to_string(),
            "--jobs 0: give at least 1"
        );
    }

    #[test]
    fn insecure_registries_match_host_or_host_port() {
        let config = RegistryConfig {
            insecure_registries: vec!["reg.example".into(), "other.example:5000".into()],
            credentials: Some(Credentials { username: "u".into(), password: Secret::new("p"), source: "t".into() }),
            jobs: 1,
            ..RegistryConfig::default()
        };
        assert!(config.target("reg.example:443").unwrap().insecure);
        assert!(config.target("other.example:5000").unwrap().plain_http_allowed);
        assert!(!config.target("other.example:6000").unwrap().insecure);
        let local = config.target("127.0.0.1:5000").unwrap();
        assert!(!local.insecure && local.plain_http_allowed);
        assert_eq!(config.target("docker.io").unwrap().api_host, "registry-1.docker.io");
    }

    #[test]
    fn chunk_sizes_by_flag_then_host_port_then_host() {
        let mut config = RegistryConfig {
            chunk_sizes: [("reg.example".to_string(), 1 << 20), ("reg.example:5000".to_string(), 2 << 20)].into(),
            credentials: Some(Credentials { username: "u".into(), password: Secret::new("p"), source: "t".into() }),
            jobs: 1,
            ..RegistryConfig::default()
        };
        assert_eq!(config.target("reg.example:5000").unwrap().chunk_size, Some(2 << 20));
        assert_eq!(config.target("reg.example:6000").unwrap().chunk_size, Some(1 << 20));
        assert_eq!(config.target("other.example").unwrap().chunk_size, None);
        config.chunk_size = Some(8 << 20);
        assert_eq!(config.target("reg.example:5000").unwrap().chunk_size, Some(8 << 20));
        config.chunk_size = Some(0);
        assert!(config.check().unwrap_err().to_string().contains("give a size from 64 KiB to 1 GiB"));
    }
}
