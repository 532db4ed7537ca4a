//! Signing as cosign does, with a key on this machine: ECDSA P-256 / SHA-256 signatures
//! over cosign's "simple signing" payload (what `cosign verify --key` checks), and DSSE
//! envelopes over in-toto statements (what `cosign verify-attestation` checks). The key is
//! a secret: read once from a file only its owner may read, checked before anything is
//! built, and never shown. Verification takes the public key as cosign writes it
//! (`cosign.pub`, a PEM SubjectPublicKeyInfo).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

/// The media type of cosign's signature payload, as its layer says it.
pub(crate) const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The layer annotation holding the base64 signature.
pub(crate) const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// `critical.type` of the payload.
const SIGNATURE_TYPE: &str = "cosign container image signature";
/// The payload type of a DSSE envelope holding an in-toto statement.
pub(crate) const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// A DSSE envelope, as cosign's attestation layers are typed.
pub(crate) const DSSE_MEDIA_TYPE: &str = "application/vnd.dsse.envelope.v1+json";

/// The DER header of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1, a 65-byte
/// uncompressed point in the BIT STRING that follows).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce,
    0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// A signing key. Its `Debug` shows nothing of it.
pub(crate) struct Signer {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// Reads the PKCS#8 PEM key at `path`: refused when group or others may read the file,
    /// or when it is not an unencrypted ECDSA P-256 key. Errors name the file, never its text.
    pub(crate) fn from_file(path: &Path) -> Result<Signer> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display();
        let meta = std::fs::metadata(path).with_context(|| format!("cannot read the sign key {shown}"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!("the sign key {shown} may be read by group or others (mode {mode:03o}): run `chmod 600 {shown}`");
        }
        let text = std::fs::read(path).with_context(|| format!("cannot read the sign key {shown}"))?;
        Signer::from_pem(&text).with_context(|| format!("the sign key {shown}"))
    }

    /// An unencrypted PKCS#8 PEM ECDSA P-256 key.
    pub(crate) fn from_pem(text: &[u8]) -> Result<Signer> {
        const CONVERT: &str = "openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pk8";
        let (label, der) = pem(text).map_err(|e| anyhow!("is not a PEM file ({e})"))?;
        match label.as_str() {
            "PRIVATE KEY" => {}
            "EC PRIVATE KEY" => bail!("is a SEC1 EC key, not PKCS#8: convert it with `{CONVERT}`"),
            l if l.starts_with("ENCRYPTED") => {
                bail!("is encrypted ({l}): give an unencrypted PKCS#8 P-256 key (`{CONVERT}`)")
            }
            l => bail!("holds a {l:?}, not a PKCS#8 private key (\"PRIVATE KEY\")"),
        }
        let rng = SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng)
            .map_err(|_| anyhow!("is not an ECDSA P-256 key (cosign keys are; make one with `openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256`)"))?;
        Ok(Signer { pair, rng })
    }

    /// The ASN.1 DER signature of `message` (SHA-256 hashed).
    pub(crate) fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let signed = self.pair.sign(&self.rng, message).map_err(|_| anyhow!("signing failed"))?;
        Ok(signed.as_ref().to_vec())
    }

    /// The matching public key.
    pub(crate) fn public_key(&self) -> PublicKey {
        PublicKey { point: self.pair.public_key().as_ref().to_vec() }
    }

    /// A DSSE envelope of `payload`, signed over its pre-authentication encoding.
    pub(crate) fn envelope(&self, payload_type: &str, payload: &[u8]) -> Result<Vec<u8>> {
        let signature = self.sign(&pae(payload_type, payload))?;
        let envelope = Envelope {
            payload_type: payload_type.to_string(),
            payload: b64(payload),
            signatures: vec![EnvelopeSignature { keyid: String::new(), sig: b64(&signature) }],
        };
        Ok(serde_json::to_vec(&envelope)?)
    }
}

/// A public key to verify with: an uncompressed P-256 point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PublicKey {
    point: Vec<u8>,
}

impl PublicKey {
    /// cosign's `cosign.pub`: a PEM SubjectPublicKeyInfo of a P-256 key.
    pub(crate) fn from_pem(text: &[u8]) -> Result<PublicKey> {
        let (label, der) = pem(text).map_err(|e| anyhow!("is not a PEM file ({e})"))?;
        if label != "PUBLIC KEY" {
            bail!("holds a {label:?}, not a public key (\"PUBLIC KEY\", as cosign.pub)");
        }
        match der.strip_prefix(&P256_SPKI_PREFIX[..]) {
            Some(point) if point.len() == 65 && point[0] == 4 => Ok(PublicKey { point: point.to_vec() }),
            _ => bail!("is not an ECDSA P-256 public key"),
        }
    }

    pub(crate) fn from_file(path: &Path) -> Result<PublicKey> {
        let text = std::fs::read(path).with_context(|| format!("cannot read the key {}", path.display()))?;
        PublicKey::from_pem(&text).with_context(|| format!("the key {}", path.display()))
    }

    /// Whether `signature` (ASN.1 DER) signs `message`.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, &self.point).verify(message, signature).is_ok()
    }

    /// Whether a base64 signature signs `message`.
    pub(crate) fn verifies_b64(&self, message: &[u8], signature: &str) -> bool {
        base64::engine::general_purpose::STANDARD.decode(signature.trim()).is_ok_and(|sig| self.verifies(message, &sig))
    }

    /// The in-toto statement a DSSE envelope signed with this key carries, if it does.
    pub(crate) fn open_envelope(&self, envelope: &[u8]) -> Result<Vec<u8>> {
        let envelope: Envelope = serde_json::from_slice(envelope).context("not a DSSE envelope")?;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&envelope.payload)
            .context("the DSSE payload is not base64")?;
        let message = pae(&envelope.payload_type, &payload);
        if !envelope.signatures.iter().any(|s| self.verifies_b64(&message, &s.sig)) {
            bail!("no signature of the envelope verifies with the key");
        }
        Ok(payload)
    }
}

/// A DSSE envelope (https://github.com/secure-systems-lab/dsse).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    payload_type: String,
    payload: String,
    signatures: Vec<EnvelopeSignature>,
}

#[derive(Serialize, Deserialize)]
struct EnvelopeSignature {
    #[serde(default)]
    keyid: String,
    sig: String,
}

/// DSSE's pre-authentication encoding: what is signed.
pub(crate) fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), payload.len()).into_bytes();
    out.extend_from_slice(payload);
    out
}

/// cosign's simple signing payload for the manifest `digest` of `repository`
/// (`host[:port]/path`, no tag).
pub(crate) fn simple_signing_payload(repository: &str, digest: &str) -> Vec<u8> {
    let payload = serde_json::json!({
        "critical": {
            "identity": { "docker-reference": repository },
            "image": { "docker-manifest-digest": digest },
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    });
    // A `Value` map is ordered by key: the bytes are the same for the same image.
    serde_json::to_vec(&payload).unwrap_or_default()
}

/// What a simple signing payload signs: the manifest digest, when the payload is one.
pub(crate) fn signed_digest(payload: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let critical = value.get("critical")?;
    if critical.get("type")?.as_str()? != SIGNATURE_TYPE {
        return None;
    }
    Some(critical.get("image")?.get("docker-manifest-digest")?.as_str()?.to_string())
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The label and the decoded body of the first PEM block of `text`.
fn pem(text: &[u8]) -> std::result::Result<(String, Vec<u8>), &'static str> {
    let text = std::str::from_utf8(text).map_err(|_| "not text")?;
    let mut lines = text.lines().map(str::trim).skip_while(|l| !l.starts_with("-----BEGIN "));
    let begin = lines.next().ok_or("no -----BEGIN line")?;
    let label = begin.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")).ok_or("a bad BEGIN line")?;
    let end = format!("-----END {label}-----");
    let mut body = String::new();
    let mut ended = false;
    for line in lines {
        if line == end {
            ended = true;
            break;
        }
        // Encrypted PEM of old openssl has headers; its body cannot be read here anyway.
        if line.contains(':') {
            return Err("it has PEM headers (an encrypted key?)");
        }
        body.push_str(line);
    }
    if !ended {
        return Err("no -----END line");
    }
    let der = base64::engine::general_purpose::STANDARD.decode(body).map_err(|_| "its body is not base64")?;
    Ok((label.to_string(), der))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_signer() -> Signer {
        let rng = SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).expect("key");
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(doc.as_ref())
        );
        Signer::from_pem(pem.as_bytes()).expect("a P-256 PKCS#8 key")
    }

    fn spki_pem(key: &PublicKey) -> String {
        let mut der = P256_SPKI_PREFIX.to_vec();
        der.extend_from_slice(&key.point);
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", b64(&der))
    }

    #[test]
    fn signatures_verify_with_the_public_key_only() {
        let signer = test_signer();
        let public = PublicKey::from_pem(spki_pem(&signer.public_key()).as_bytes()).expect("spki");
        let payload = simple_signing_payload("127.0.0.1:5000/team/app", "sha256:ab");
        let sig = signer.sign(&payload).expect("sign");
        assert!(public.verifies(&payload, &sig));
        assert!(!public.verifies(b"other", &sig));
        assert!(!test_signer().public_key().verifies(&payload, &sig), "another key");
        assert_eq!(signed_digest(&payload).as_deref(), Some("sha256:ab"));
    }

    #[test]
    fn the_payload_is_cosigns() {
        let payload = simple_signing_payload("r:5000/a", "sha256:00");
        assert_eq!(
            String::from_utf8(payload).expect("utf-8"),
            r#"{"critical":{"identity":{"docker-reference":"r:5000/a"},"image":{"docker-manifest-digest":"sha256:00"},"type":"cosign container image signature"},"optional":null}"#
        );
    }

    #[test]
    fn envelopes_sign_the_pae() {
        assert_eq!(pae("a/b", b"hi"), b"DSSEv1 3 a/b 2 hi".to_vec());
        let signer = test_signer();
        let envelope = signer.envelope(IN_TOTO_PAYLOAD_TYPE, b"{}").expect("envelope");
        assert_eq!(signer.public_key().open_envelope(&envelope).expect("verifies"), b"{}".to_vec());
        assert!(test_signer().public_key().open_envelope(&envelope).is_err());
    }

    #[test]
    fn wrong_keys_are_refused_without_showing_them() {
        let sec1 = "-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0c2VjcmV0\n-----END EC PRIVATE KEY-----\n";
        let err = format!("{:#}", Signer::from_pem(sec1.as_bytes()).unwrap_err());
        assert!(err.contains("openssl pkcs8") && !err.contains("c2VjcmV0"), "{err}");
        let junk = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0c2VjcmV0\n-----END PRIVATE KEY-----\n";
        let err = format!("{:#}", Signer::from_pem(junk.as_bytes()).unwrap_err());
        assert!(err.contains("not an ECDSA P-256 key") && !err.contains("c2VjcmV0"), "{err}");
        assert!(Signer::from_pem(b"hello").is_err());
        assert!(PublicKey::from_pem(sec1.as_bytes()).is_err());
    }
}
