//! What sits beside a pushed image in its repository: OCI 1.1 referrers (artifact manifests
//! whose `subject` is the image, such as provenance and SBOMs) and cosign's signatures.
//!
//! A registry with the referrers API (`GET /v2/NAME/referrers/DIGEST`) lists referrers
//! itself. One without (CNCF distribution 2.8, say) gets the distribution spec's fallback:
//! an image index under the tag `sha256-HEX` of the subject, which nixctr reads, merges its
//! new entries into and puts back. Signatures go where every cosign version looks: one
//! manifest under the tag `sha256-HEX.sig`, one layer per signature (the payload, with the
//! base64 signature in an annotation), a new signature appended to those there unless an
//! equal one is there already. That manifest also names the image as its `subject`, so
//! referrers list it too.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Context, Result};
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::PushSession;
use crate::registry::api::manifest_type_refused;
use crate::registry::client::Rejected;
use crate::registry::manifest::ACCEPTED_MANIFEST_TYPES;
use crate::registry::upload::UploadBody;
use crate::registry::{is_digest, short, Reference};

pub(crate) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(crate) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The config of an artifact with no config of its own, and its one content, `{}`.
pub(crate) const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The artifact type of cosign's signature manifest (its OCI 1.1 mode uses the same).
pub(crate) const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const SIMPLE_SIGNING_MEDIA_TYPE: &str = crate::sign::SIMPLE_SIGNING_MEDIA_TYPE;
const SIGNATURE_ANNOTATION: &str = crate::sign::SIGNATURE_ANNOTATION;
/// The most of a manifest or attachment read back.
const READ_LIMIT: usize = 4 << 20;

/// An OCI content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

impl Descriptor {
    fn of(media_type: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media_type.to_string(),
            digest: sha256(bytes),
            size: bytes.len() as u64,
            artifact_type: None,
            annotations: BTreeMap::new(),
            platform: None,
            data: None,
        }
    }

    /// The descriptor a `subject` field holds: the bare identity of the manifest.
    fn bare(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest.clone(),
            size: self.size,
            artifact_type: None,
            annotations: BTreeMap::new(),
            platform: None,
            data: None,
        }
    }

    /// `linux/arm64` of an index entry, when it says one.
    pub(crate) fn platform_name(&self) -> Option<String> {
        let p = self.platform.as_ref()?;
        let (os, arch) = (p.get("os")?.as_str()?, p.get("architecture")?.as_str()?);
        Some(match p.get("variant").and_then(|v| v.as_str()) {
            Some(variant) => format!("{os}/{arch}/{variant}"),
            None => format!("{os}/{arch}"),
        })
    }
}

/// An image manifest, as far as referrers read and write it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

/// An image index: the referrers API's answer, the fallback tag's content, or a
/// multi-platform image.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// A payload to attach to an image as an artifact of its own.
#[derive(Debug, Clone)]
pub(crate) struct Artifact {
    /// What it is (`application/vnd.in-toto+json`), as referrers list it.
    pub artifact_type: String,
    pub layer_media_type: String,
    pub payload: Vec<u8>,
    /// On the manifest, so that referrers list them too (`in-toto.io/predicate-type`).
    pub annotations: BTreeMap<String, String>,
}

/// What referrers an image has, and how the registry keeps them.
#[derive(Debug, Clone)]
pub(crate) struct Referrers {
    /// The registry answers the referrers API (else: the fallback tag).
    pub api: bool,
    pub manifests: Vec<Descriptor>,
}

impl Referrers {
    /// Whether an artifact of this type with these annotations is attached already.
    pub(crate) fn has(&self, artifact: &Artifact) -> bool {
        self.manifests.iter().any(|m| {
            m.artifact_type.as_deref() == Some(artifact.artifact_type.as_str())
                && artifact.annotations.iter().all(|(k, v)| m.annotations.get(k) == Some(v))
        })
    }
}

/// One signature of a `.sig` manifest: the payload and its base64 signature.
#[derive(Debug, Clone)]
pub(crate) struct Signature {
    pub payload: Vec<u8>,
    pub base64: String,
}

impl PushSession {
    /// The manifest `digest` of `reference`'s repository, and, for an index, each of its
    /// images (those naming a platform).
    pub(crate) async fn subjects(&self, reference: &Reference, digest: &str) -> Result<(Descriptor, Vec<Descriptor>)> {
        let Some((media_type, bytes)) = self.read_manifest(reference, digest).await? else {
            bail!("{}@{digest} is not in the registry", repository_of(reference));
        };
        let mut top = Descriptor::of(&media_type, &bytes);
        if top.digest != digest {
            bail!("registry {} answered {} for the manifest {}", self.registry, short(&top.digest), short(digest));
        }
        top.media_type = media_type.clone();
        let mut images = Vec::new();
        if media_type == OCI_INDEX || media_type == oci_client::manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE {
            let index: Index = serde_json::from_slice(&bytes).context("the image index is not valid JSON")?;
            images = index.manifests.into_iter().filter(|m| m.platform.is_some() && is_digest(&m.digest)).collect();
        }
        Ok((top, images))
    }

    /// The referrers of `subject`: the registry's answer to the referrers API, or what
    /// the fallback tag lists where it has none.
    pub(crate) async fn referrers(&self, reference: &Reference, subject: &str) -> Result<Referrers> {
        let repo = reference.repository();
        self.reading(reference).await?;
        let client = self.client().await?;
        let what = format!("GET referrers of {}", short(subject));
        let answer = client
            .send(&what, |http, base| {
                http.get(format!("{base}/v2/{repo}/referrers/{subject}")).header(ACCEPT, OCI_INDEX)
            })
            .await?;
        let status = answer.status();
        let is_index =
            answer.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| t.starts_with(OCI_INDEX));
        if status.is_success() && is_index {
            let body = read_body(answer, &what, client.registry()).await?;
            let index: Index = serde_json::from_slice(&body).with_context(|| format!("{what}: not an image index"))?;
            return Ok(Referrers { api: true, manifests: index.manifests });
        }
        // 404 (or any other answer that is not an index): no referrers API, as the
        // distribution spec says; a server error is not an answer.
        if status.is_server_error() {
            return Err(client.rejected(answer, &what).await.into());
        }
        let manifests = self.fallback_index(reference, subject).await?.map(|i| i.manifests).unwrap_or_default();
        Ok(Referrers { api: false, manifests })
    }

    /// Pushes `artifact` with `subject` as its subject, by digest, and lists it in the
    /// fallback tag when the registry has no referrers API. Returns its descriptor.
    pub(crate) async fn attach(
        &self,
        reference: &Reference,
        subject: &Descriptor,
        artifact: &Artifact,
        api: bool,
    ) -> Result<Descriptor> {
        self.login_for(reference).await?;
        self.put_blob(reference, EMPTY_MEDIA_TYPE, b"{}").await?;
        let layer = self.put_blob(reference, &artifact.layer_media_type, &artifact.payload).await?;
        let mut config = Descriptor::of(EMPTY_MEDIA_TYPE, b"{}");
        config.data = Some("e30=".to_string());
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            artifact_type: Some(artifact.artifact_type.clone()),
            config,
            layers: vec![layer],
            subject: Some(subject.bare()),
            annotations: artifact.annotations.clone(),
        };
        let descriptor = self.put_referrer(reference, &manifest, None).await?;
        if !api {
            self.list_in_fallback(reference, &subject.digest, &descriptor, None).await?;
        }
        Ok(descriptor)
    }

    /// Adds `signature` of `subject` to its `.sig` manifest, unless `already` says one of
    /// those there is equal (same payload, and a signature by the same key). `Ok(false)`:
    /// it was there.
    pub(crate) async fn add_signature(
        &self,
        reference: &Reference,
        subject: &Descriptor,
        signature: &Signature,
        already: impl Fn(&Signature) -> bool,
        api: bool,
    ) -> Result<bool> {
        self.login_for(reference).await?;
        let tag = format!("{}.sig", fallback_tag(&subject.digest)?);
        let mut layers = match self.read_manifest(reference, &tag).await? {
            Some((_, bytes)) => {
                serde_json::from_slice::<Manifest>(&bytes)
                    .with_context(|| format!("{tag}: not an image manifest"))?
                    .layers
            }
            None => Vec::new(),
        };
        for layer in layers.iter().filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE) {
            if layer.digest != sha256(&signature.payload) {
                continue;
            }
            let Some(base64) = layer.annotations.get(SIGNATURE_ANNOTATION) else { continue };
            if already(&Signature { payload: signature.payload.clone(), base64: base64.clone() }) {
                return Ok(false);
            }
        }
        let mut layer = self.put_blob(reference, SIMPLE_SIGNING_MEDIA_TYPE, &signature.payload).await?;
        layer.annotations.insert(SIGNATURE_ANNOTATION.to_string(), signature.base64.clone());
        layers.push(layer);
        // The config go-containerregistry writes for cosign's signature image.
        let diff_ids: Vec<&str> = layers.iter().map(|l| l.digest.as_str()).collect();
        let history: Vec<serde_json::Value> =
            layers.iter().map(|_| serde_json::json!({"created": "0001-01-01T00:00:00Z"})).collect();
        let config = serde_json::to_vec(&serde_json::json!({
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": history,
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {},
        }))?;
        let config = self.put_blob(reference, OCI_CONFIG, &config).await?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_string()),
            artifact_type: Some(SIGNATURE_ARTIFACT_TYPE.to_string()),
            config,
            layers,
            subject: Some(subject.bare()),
            annotations: BTreeMap::new(),
        };
        let descriptor = self.put_referrer(reference, &manifest, Some(&tag)).await?;
        if !api {
            // The `.sig` manifest before this one is superseded: its entry goes.
            self.list_in_fallback(reference, &subject.digest, &descriptor, Some(SIGNATURE_ARTIFACT_TYPE)).await?;
        }
        Ok(true)
    }

    /// The signatures under the `.sig` tag of `digest`.
    pub(crate) async fn signatures(&self, reference: &Reference, digest: &str) -> Result<Vec<Signature>> {
        let tag = format!("{}.sig", fallback_tag(digest)?);
        let Some((_, bytes)) = self.read_manifest(reference, &tag).await? else {
            return Ok(Vec::new());
        };
        let manifest: Manifest =
            serde_json::from_slice(&bytes).with_context(|| format!("{tag}: not an image manifest"))?;
        let mut found = Vec::new();
        for layer in manifest.layers.iter().filter(|l| l.media_type == SIMPLE_SIGNING_MEDIA_TYPE) {
            let Some(base64) = layer.annotations.get(SIGNATURE_ANNOTATION) else { continue };
            let payload = self.read_blob(reference, &layer.digest).await?;
            found.push(Signature { payload, base64: base64.clone() });
        }
        Ok(found)
    }

    /// The one layer of the artifact manifest `digest`: its media type and bytes.
    pub(crate) async fn artifact_payload(&self, reference: &Reference, digest: &str) -> Result<(String, Vec<u8>)> {
        let Some((_, bytes)) = self.read_manifest(reference, digest).await? else {
            bail!("the referrer {} is listed but not in the registry", short(digest));
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).context("a referrer is not an image manifest")?;
        let layer = manifest.layers.first().ok_or_else(|| anyhow!("the referrer {} has no layer", short(digest)))?;
        Ok((layer.media_type.clone(), self.read_blob(reference, &layer.digest).await?))
    }

    /// Pull rights on `reference`'s repository (no more: reading needs no push rights).
    async fn reading(&self, reference: &Reference) -> Result<()> {
        self.check_host(reference)?;
        self.client().await?.add_scope(format!("repository:{}:pull", reference.repository()));
        Ok(())
    }

    /// The fallback tag's index of `subject`, if there is one.
    async fn fallback_index(&self, reference: &Reference, subject: &str) -> Result<Option<Index>> {
        let tag = fallback_tag(subject)?;
        match self.read_manifest(reference, &tag).await? {
            Some((_, bytes)) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{tag}: not an image index"))?))
            }
            None => Ok(None),
        }
    }

    /// Merges `entry` into the fallback index of `subject` (replacing entries of the
    /// artifact type `replaces`, when given) and puts it back.
    async fn list_in_fallback(
        &self,
        reference: &Reference,
        subject: &str,
        entry: &Descriptor,
        replaces: Option<&str>,
    ) -> Result<()> {
        let tag = fallback_tag(subject)?;
        let mut index = self.fallback_index(reference, subject).await?.unwrap_or(Index {
            schema_version: 2,
            media_type: Some(OCI_INDEX.to_string()),
            manifests: Vec::new(),
        });
        index
            .manifests
            .retain(|m| m.digest != entry.digest && (replaces.is_none() || m.artifact_type.as_deref() != replaces));
        index.manifests.push(entry.clone());
        index.media_type = Some(OCI_INDEX.to_string());
        let body = serde_json::to_vec(&index)?;
        let client = self.client().await?;
        match client.put_manifest(reference.repository(), &tag, &[], OCI_INDEX, body).await? {
            Ok(_) => Ok(()),
            Err(rejected) => Err(refused(rejected, "the referrers index")),
        }
    }

    /// PUTs an artifact manifest by digest (or under `tag`); its descriptor, as referrers list it.
    async fn put_referrer(&self, reference: &Reference, manifest: &Manifest, tag: Option<&str>) -> Result<Descriptor> {
        let body = serde_json::to_vec(manifest)?;
        let mut descriptor = Descriptor::of(OCI_MANIFEST, &body);
        let target = tag.unwrap_or(&descriptor.digest).to_string();
        let client = self.client().await?;
        match client.put_manifest(reference.repository(), &target, &[], OCI_MANIFEST, body).await? {
            Ok(put) => {
                if let Some(theirs) = put.digest.filter(|d| *d != descriptor.digest) {
                    bail!("registry {} stored the artifact as {theirs}, not {}", self.registry, descriptor.digest);
                }
            }
            Err(rejected) => {
                let what = manifest.artifact_type.as_deref().unwrap_or("artifact");
                return Err(refused(rejected, &format!("the {what} artifact manifest")));
            }
        }
        descriptor.artifact_type = manifest.artifact_type.clone();
        descriptor.annotations = manifest.annotations.clone();
        Ok(descriptor)
    }

    /// Uploads `bytes` as a blob unless the repository has it; its descriptor.
    async fn put_blob(&self, reference: &Reference, media_type: &str, bytes: &[u8]) -> Result<Descriptor> {
        let descriptor = Descriptor::of(media_type, bytes);
        let repo = reference.repository();
        let blob = (descriptor.digest.as_str(), descriptor.size);
        let _transfer = self.transfers.acquire().await.context("the push session closed")?;
        let client = self.client().await?;
        if !client.blob_exists(repo, blob).await? {
            client.upload_blob(&self.uploads, repo, blob, UploadBody::Bytes(bytes.to_vec()), None).await?;
        }
        Ok(descriptor)
    }

    /// The manifest under `tag_or_digest`, and its media type; `None` when there is none.
    async fn read_manifest(&self, reference: &Reference, tag_or_digest: &str) -> Result<Option<(String, Vec<u8>)>> {
        self.reading(reference).await?;
        let repo = reference.repository();
        let client = self.client().await?;
        let what = format!("GET manifest {tag_or_digest}");
        let accept = ACCEPTED_MANIFEST_TYPES.join(", ");
        let answer = client
            .send(&what, |http, base| {
                http.get(format!("{base}/v2/{repo}/manifests/{tag_or_digest}")).header(ACCEPT, &accept)
            })
            .await?;
        match answer.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(client.rejected(answer, &what).await.into()),
        }
        let media_type = answer
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|t| t.split(';').next().unwrap_or(t).trim().to_string())
            .unwrap_or_default();
        let body = read_body(answer, &what, client.registry()).await?;
        if is_digest(tag_or_digest) && sha256(&body) != tag_or_digest {
            bail!("registry {} answered {what} with other bytes than the digest names", self.registry);
        }
        // A registry that does not say the type: the manifest's own field does.
        let media_type = match media_type.as_str() {
            "" | "application/json" | "application/octet-stream" => serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
                .unwrap_or(media_type),
            _ => media_type,
        };
        Ok(Some((media_type, body)))
    }

    /// A small blob (a payload, an envelope), checked against its digest.
    async fn read_blob(&self, reference: &Reference, digest: &str) -> Result<Vec<u8>> {
        if !is_digest(digest) {
            bail!("a manifest names the malformed digest {digest:?}");
        }
        self.reading(reference).await?;
        let repo = reference.repository();
        let client = self.client().await?;
        let what = format!("GET blob {}", short(digest));
        let answer = client.send(&what, |http, base| http.get(format!("{base}/v2/{repo}/blobs/{digest}"))).await?;
        if !answer.status().is_success() {
            return Err(client.rejected(answer, &what).await.into());
        }
        let body = read_body(answer, &what, client.registry()).await?;
        if sha256(&body) != digest {
            bail!("registry {} answered {what} with bytes of another digest", self.registry);
        }
        Ok(body)
    }
}

/// The fallback tag of a subject: `sha256-HEX`.
pub(crate) fn fallback_tag(digest: &str) -> Result<String> {
    if !is_digest(digest) {
        bail!("{digest:?} is not a sha256 digest");
    }
    Ok(digest.replacen(':', "-", 1))
}

/// `host[:port]/path`: the repository as cosign's payload names it.
pub(crate) fn repository_of(reference: &Reference) -> String {
    format!("{}/{}", reference.registry(), reference.repository())
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A refused manifest, said as what the registry did not take.
fn refused(rejected: Rejected, what: &str) -> anyhow::Error {
    let why = rejected.detail.clone().unwrap_or_else(|| rejected.status.to_string());
    if manifest_type_refused(&rejected) {
        anyhow!(
            "registry {} refused {what} ({why}): it may not take OCI 1.1 artifacts (a manifest with `artifactType` and `subject`)",
            rejected.registry
        )
    } else {
        anyhow!("registry {} refused {what} ({}: {why})", rejected.registry, rejected.status)
    }
}

async fn read_body(mut answer: reqwest::Response, what: &str, registry: &str) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| anyhow!("{what} to registry {registry} failed: {e}"))? {
        body.extend_from_slice(&chunk);
        if body.len() > READ_LIMIT {
            bail!("registry {registry} answered {what} with more than {} MiB", READ_LIMIT >> 20);
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_DIGEST: &str = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

    #[test]
    fn the_empty_config_is_the_specs() {
        assert_eq!(sha256(b"{}"), EMPTY_DIGEST);
        assert_eq!(fallback_tag(EMPTY_DIGEST).unwrap(), EMPTY_DIGEST.replace(':', "-"));
        assert!(fallback_tag("sha256:00").is_err());
    }

    #[test]
    fn referrers_match_on_type_and_annotations() {
        let mut entry = Descriptor::of(OCI_MANIFEST, b"x");
        entry.artifact_type = Some("application/vnd.in-toto+json".to_string());
        entry.annotations.insert("in-toto.io/predicate-type".to_string(), "https://slsa.dev/provenance/v1".to_string());
        let referrers = Referrers { api: false, manifests: vec![entry] };
        let mut artifact = Artifact {
            artifact_type: "application/vnd.in-toto+json".to_string(),
            layer_media_type: "application/vnd.in-toto+json".to_string(),
            payload: Vec::new(),
            annotations: [("in-toto.io/predicate-type".to_string(), "https://slsa.dev/provenance/v1".to_string())]
                .into(),
        };
        assert!(referrers.has(&artifact));
        artifact.annotations.insert("in-toto.io/predicate-type".to_string(), "https://cyclonedx.org/bom".to_string());
        assert!(!referrers.has(&artifact));
    }
}
