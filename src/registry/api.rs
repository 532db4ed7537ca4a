//! The distribution API endpoints nixctr uses, as methods of [`Client`]: blob checks,
//! cross-repository mounts and manifests (blob uploads are in `upload.rs`). Each maps the
//! registry's answer to what the caller decides on (a bool, a digest, or a [`Rejected`] to
//! inspect); transport, authentication and retries are the client's.

use anyhow::{anyhow, bail, Result};
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;

use super::client::{Client, Rejected};
use super::manifest::ACCEPTED_MANIFEST_TYPES;
use super::short;
use crate::archive::sha256_digest;

/// The most of a manifest read when a registry does not say its digest.
const MANIFEST_LIMIT: usize = 4 << 20;

/// A registry's answer to a manifest PUT it took.
pub(crate) struct PutManifest {
    /// Its `Docker-Content-Digest`, when it said one.
    pub digest: Option<String>,
    /// The tags it says it applied (`OCI-Tag`); none from a registry that ignores `?tag=`.
    pub tagged: Vec<String>,
}

impl Client {
    /// Whether `repo` has the blob `digest` of `size` bytes. An answer naming another size
    /// or digest counts as no: what would go into a manifest must be what the registry has.
    pub async fn blob_exists(&self, repo: &str, (digest, size): (&str, u64)) -> Result<bool> {
        let what = format!("HEAD blob {}", short(digest));
        let answer = self.send(&what, |http, base| http.head(format!("{base}/v2/{repo}/blobs/{digest}"))).await?;
        match answer.status() {
            s if s.is_success() => {
                // The header itself: reqwest's content_length() is the (empty) body's for HEAD.
                let header = |name| answer.headers().get(name).and_then(|v| v.to_str().ok());
                let their_size = header(CONTENT_LENGTH.as_str()).and_then(|v| v.trim().parse::<u64>().ok());
                let their_digest = header("Docker-Content-Digest");
                if their_size.is_some_and(|s| s != size) || their_digest.is_some_and(|d| d != digest) {
                    self.debug(format!(
                        "{what}: the registry has it as {} bytes, digest {}; expected {size} bytes: not using it",
                        their_size.map_or("?".to_string(), |s| s.to_string()),
                        their_digest.unwrap_or("?")
                    ));
                    return Ok(false);
                }
                Ok(true)
            }
            StatusCode::NOT_FOUND => Ok(false),
            StatusCode::FORBIDDEN => Err(self.forbidden(repo, &what)),
            _ => Err(self.rejected(answer, &what).await.into()),
        }
    }

    /// Cross-repository mount; `false` when the registry answers 202 ("upload it instead").
    pub async fn mount_blob(&self, repo: &str, digest: &str, from: &str) -> Result<bool> {
        self.add_scope(format!("repository:{from}:pull"));
        let what = format!("mount of {} from {from}", short(digest));
        let answer = self
            .send(&what, |http, base| {
                http.post(format!("{base}/v2/{repo}/blobs/uploads/"))
                    .query(&[("mount", digest), ("from", from)])
                    .header(CONTENT_LENGTH, 0)
            })
            .await?;
        match answer.status() {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => {
                // An upload session was opened instead; close it so it does not linger.
                if let Some(location) = answer.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                    let url = self.absolute(location);
                    let _ = self.send("cancel upload", |http, _| http.delete(&url)).await;
                }
                Ok(false)
            }
            StatusCode::FORBIDDEN => Err(self.forbidden(repo, &what)),
            _ => Err(self.rejected(answer, &what).await.into()),
        }
    }

    /// PUTs a manifest under `reference` (a tag, or its digest), asking the registry to
    /// tag it with each of `tags` too (`?tag=`, OCI distribution 1.1). `Ok(Err(rejected))`:
    /// the registry said no, and the caller may try another format.
    pub async fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        tags: &[String],
        media_type: &str,
        body: Vec<u8>,
    ) -> Result<std::result::Result<PutManifest, Rejected>> {
        let what = format!("PUT manifest {}", if tags.is_empty() { reference } else { &tags[0] });
        let query: Vec<(&str, &str)> = tags.iter().map(|t| ("tag", t.as_str())).collect();
        let answer = self
            .send(&what, |http, base| {
                let request = http.put(format!("{base}/v2/{repo}/manifests/{reference}"));
                let request = if query.is_empty() { request } else { request.query(&query) };
                request.header(CONTENT_TYPE, media_type).body(body.clone())
            })
            .await?;
        if !answer.status().is_success() {
            return Ok(Err(self.rejected(answer, &what).await));
        }
        let headers = answer.headers();
        let digest = headers
            .get("Docker-Content-Digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| super::is_digest(d))
            .map(str::to_string);
        // One `OCI-Tag` header per tag, though a proxy may have folded them into one list.
        let tagged = headers
            .get_all("OCI-Tag")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect();
        Ok(Ok(PutManifest { digest, tagged }))
    }

    /// The digest of the manifest (of any kind, an index included) `repo` has under `tag`;
    /// `None` when there is none.
    pub async fn manifest_digest(&self, repo: &str, tag: &str) -> Result<Option<String>> {
        let what = format!("HEAD manifest {tag}");
        let accept = ACCEPTED_MANIFEST_TYPES.join(", ");
        let answer = self
            .send(&what, |http, base| http.head(format!("{base}/v2/{repo}/manifests/{tag}")).header(ACCEPT, &accept))
            .await?;
        match answer.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(self.rejected(answer, &what).await.into()),
        }
        let digest = answer.headers().get("Docker-Content-Digest").and_then(|d| d.to_str().ok());
        if let Some(digest) = digest.filter(|d| super::is_digest(d)) {
            return Ok(Some(digest.to_string()));
        }
        // Registries need not say the digest on HEAD: the bytes themselves tell it.
        let what = format!("GET manifest {tag}");
        let answer = self
            .send(&what, |http, base| http.get(format!("{base}/v2/{repo}/manifests/{tag}")).header(ACCEPT, &accept))
            .await?;
        if !answer.status().is_success() {
            return Err(self.rejected(answer, &what).await.into());
        }
        // Manifests are small (registries refuse those over 4 MiB): read no more than that.
        let mut answer = answer;
        let mut body = Vec::new();
        while let Some(chunk) =
            answer.chunk().await.map_err(|e| anyhow!("{what} to registry {} failed: {e}", self.registry()))?
        {
            body.extend_from_slice(&chunk);
            if body.len() > MANIFEST_LIMIT {
                bail!("registry {} answered {what} with more than {} MiB", self.registry(), MANIFEST_LIMIT >> 20);
            }
        }
        Ok(Some(sha256_digest(&body)))
    }

    /// The absolute URL of an upload session's `Location` header.
    pub(super) fn upload_location(&self, answer: &reqwest::Response) -> Result<String> {
        let location = answer
            .headers()
            .get(LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| anyhow!("registry {} answered an upload without a Location header", self.registry()))?;
        Ok(self.absolute(location))
    }

    pub(super) fn forbidden(&self, repo: &str, what: &str) -> anyhow::Error {
        anyhow!(
            "registry {} denied {what} in {repo:?} (403 Forbidden: the user may not push there; check the repository name and the account's rights)",
            self.registry()
        )
    }
}

/// Whether the registry said no to the manifest's media type (rather than to its content).
pub(crate) fn manifest_type_refused(rejected: &Rejected) -> bool {
    matches!(rejected.status, StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::NOT_ACCEPTABLE)
        && rejected.code.as_deref().is_none_or(|c| c == "MANIFEST_INVALID" || c == "UNSUPPORTED" || c == "UNKNOWN")
}
