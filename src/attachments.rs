//! What publish attaches to an image once it is pushed: its SLSA provenance and SBOM as
//! OCI referrers (DSSE envelopes signed with the sign key when there is one, plain
//! statements otherwise), and a cosign signature of the image. Each image of an index gets
//! its own provenance and SBOM; the signature is of the manifest the tags name.
//!
//! What goes up, by kind (`artifactType` of the referrer / its one layer's media type):
//! - provenance: `application/vnd.in-toto+json` (the statement), or, signed,
//!   `application/vnd.dsse.envelope.v1+json` (a DSSE envelope of it); both annotated
//!   `in-toto.io/predicate-type: https://slsa.dev/provenance/v1`.
//! - SBOM: its own type (`application/vnd.cyclonedx+json`, `application/spdx+json`), or,
//!   signed, a DSSE envelope of an in-toto statement with the SBOM as predicate (predicate
//!   type `https://cyclonedx.org/bom` or `https://spdx.dev/Document`, as cosign names them).
//! - signature: cosign's `sha256-HEX.sig` manifest, also listed as a referrer
//!   (`application/vnd.dev.cosign.artifact.sig.v1+json`).
//!
//! A kind already attached (same type and predicate) is not pushed again, so a re-run
//! adds only what is missing; an equal signature by the same key is not added twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Result;

use crate::attest::{self, BuildFacts, PREDICATE_TYPE_ANNOTATION, SLSA_PROVENANCE};
use crate::build::Built;
use crate::progress::Progress;
use crate::registry::referrers::{repository_of, Artifact, Descriptor, Signature};
use crate::registry::{PushSession, Reference};
use crate::sbom::{self, Sbom};
use crate::sign::{self, Signer, DSSE_MEDIA_TYPE, IN_TOTO_PAYLOAD_TYPE};

/// What to attach to each image published.
#[derive(Debug, Clone, Default)]
pub(crate) struct Options {
    /// Sign the image, and the attestations.
    pub signer: Option<Arc<Signer>>,
    pub provenance: bool,
    pub sbom: bool,
}

impl Options {
    pub(crate) fn any(&self) -> bool {
        self.signer.is_some() || self.provenance || self.sbom
    }
}

/// The SBOM of a built image, from the closure its build read (`Target::sbom`).
async fn sbom_for(built: &Built, run: &Run<'_>) -> Result<Sbom> {
    let closure = match &built.closure {
        Some(slot) => *slot.get().await.map_err(|e| anyhow::anyhow!("the image's closure could not be read: {e}"))?,
        None => anyhow::bail!("the build did not read the image's closure"),
    };
    let meta = sbom::Metadata {
        name: built.name.clone(),
        app_version: run.app_version.map(str::to_string),
        commit: crate::project::head_commit(run.root).ok(),
    };
    sbom::Document::new(meta, closure).render(sbom::Format::default())
}

/// What provenance needs of the run, besides each platform's build.
pub(crate) struct Run<'a> {
    pub root: &'a Path,
    /// The app version the tags were made from (the SBOM says it).
    pub app_version: Option<&'a str>,
    pub started: SystemTime,
}

/// What attaching did: each thing attached now or found there, and what failed.
#[derive(Debug, Default)]
pub(crate) struct Attached {
    pub done: Vec<String>,
    pub failed: Vec<String>,
}

/// Attaches what `options` asks to the image `digest` of `reference`'s repository; `built`
/// are its builds (one per platform; none for `--archive`). Each kind is tried even when
/// another failed.
pub(crate) async fn attach(
    session: &PushSession,
    reference: &Reference,
    digest: &str,
    built: &[Built],
    options: &Options,
    run: &Run<'_>,
    progress: &Progress,
) -> Attached {
    let mut attached = Attached::default();
    let (top, images) = match session.subjects(reference, digest).await {
        Ok(found) => found,
        Err(e) => {
            attached.failed.push(format!("all attachments: {e:#}"));
            return attached;
        }
    };
    let name = repository_of(reference);
    let repository = git_repository(run.root);
    let commit = crate::project::head_commit(run.root).ok();
    let finished = SystemTime::now();
    // An index: one provenance and SBOM per platform image.
    let subjects: Vec<Descriptor> = if images.is_empty() { vec![top.clone()] } else { images };
    for subject in &subjects {
        let platform = subject.platform_name();
        let build = match platform.as_deref() {
            Some(p) => built.iter().find(|b| b.platform.to_string() == p),
            None => built.first(),
        };
        let on = platform.as_deref().map(|p| format!(" ({p})")).unwrap_or_default();
        let mut artifacts: Vec<(String, Artifact)> = Vec::new();
        if options.provenance {
            match build {
                Some(build) => {
                    let facts = BuildFacts {
                        container: build.name.clone(),
                        platform: platform.clone(),
                        derivation: build.origin.drv.clone(),
                        repository: repository.clone(),
                        commit: commit.clone(),
                        nixpkgs: build.origin.nixpkgs.reference.clone(),
                        nixpkgs_path: build.origin.nixpkgs.path.clone(),
                        nixpkgs_nar_hash: build.origin.nixpkgs.nar_hash.clone(),
                        nixpkgs_revision: build.origin.nixpkgs.revision.clone(),
                        nix_image: build.origin.nix_image.name.clone(),
                        nix_image_id: build.origin.nix_image.id.clone(),
                        engine: build.engine.clone(),
                        started: run.started,
                        finished,
                    };
                    let statement =
                        attest::statement(&name, &subject.digest, SLSA_PROVENANCE, attest::provenance(&facts));
                    match in_toto(statement, SLSA_PROVENANCE, options.signer.as_deref()) {
                        Ok(artifact) => artifacts.push((format!("provenance{on}"), artifact)),
                        Err(e) => attached.failed.push(format!("provenance{on}: {e:#}")),
                    }
                }
                None => attached.failed.push(format!("provenance{on}: no build of this image to describe")),
            }
        }
        if options.sbom {
            let artifact = match build {
                Some(build) => sbom_for(build, run)
                    .await
                    .and_then(|sbom| sbom_artifact(&name, &subject.digest, sbom, options.signer.as_deref())),
                None => Err(anyhow::anyhow!("no build of this image to describe")),
            };
            match artifact {
                Ok(artifact) => artifacts.push((format!("sbom{on}"), artifact)),
                Err(e) => attached.failed.push(format!("sbom{on}: {e:#}")),
            }
        }
        if artifacts.is_empty() {
            continue;
        }
        let referrers = match session.referrers(reference, &subject.digest).await {
            Ok(referrers) => referrers,
            Err(e) => {
                attached.failed.extend(artifacts.iter().map(|(what, _)| format!("{what}: {e:#}")));
                continue;
            }
        };
        for (what, artifact) in artifacts {
            if referrers.has(&artifact) {
                progress.info(format!("{what} of {name}@{} is attached already", subject.digest));
                attached.done.push(format!("{what} (there already)"));
                continue;
            }
            match session.attach(reference, subject, &artifact, referrers.api).await {
                Ok(descriptor) => {
                    progress.info(format!("attached {what} to {name}@{}: {}", subject.digest, descriptor.digest));
                    attached.done.push(what);
                }
                Err(e) => attached.failed.push(format!("{what}: {e:#}")),
            }
        }
    }
    if let Some(signer) = &options.signer {
        match sign_image(session, reference, &top, signer).await {
            Ok(true) => {
                progress.info(format!("signed {name}@{}", top.digest));
                attached.done.push("signature".to_string());
            }
            Ok(false) => {
                progress.info(format!("{name}@{} is signed with this key already", top.digest));
                attached.done.push("signature (there already)".to_string());
            }
            Err(e) => attached.failed.push(format!("signature: {e:#}")),
        }
    }
    attached
}

/// cosign's signature of the manifest `subject`, added to its `.sig` tag.
async fn sign_image(
    session: &PushSession,
    reference: &Reference,
    subject: &Descriptor,
    signer: &Signer,
) -> Result<bool> {
    let payload = sign::simple_signing_payload(&repository_of(reference), &subject.digest);
    let base64 = sign::b64(&signer.sign(&payload)?);
    let public = signer.public_key();
    let api = session.referrers(reference, &subject.digest).await?.api;
    let ours = |there: &Signature| public.verifies_b64(&there.payload, &there.base64);
    session.add_signature(reference, subject, &Signature { payload, base64 }, ours, api).await
}

/// An in-toto statement as a referrer: a signed DSSE envelope of it, or the statement.
fn in_toto(statement: Vec<u8>, predicate_type: &str, signer: Option<&Signer>) -> Result<Artifact> {
    let annotations = BTreeMap::from([(PREDICATE_TYPE_ANNOTATION.to_string(), predicate_type.to_string())]);
    Ok(match signer {
        Some(signer) => Artifact {
            artifact_type: DSSE_MEDIA_TYPE.to_string(),
            layer_media_type: DSSE_MEDIA_TYPE.to_string(),
            payload: signer.envelope(IN_TOTO_PAYLOAD_TYPE, &statement)?,
            annotations,
        },
        None => Artifact {
            artifact_type: IN_TOTO_PAYLOAD_TYPE.to_string(),
            layer_media_type: IN_TOTO_PAYLOAD_TYPE.to_string(),
            payload: statement,
            annotations,
        },
    })
}

/// An SBOM as a referrer: the document itself, or, signed, an in-toto statement of it in
/// a DSSE envelope.
fn sbom_artifact(name: &str, digest: &str, sbom: Sbom, signer: Option<&Signer>) -> Result<Artifact> {
    match signer {
        Some(_) => {
            let predicate: serde_json::Value = serde_json::from_slice(&sbom.bytes)?;
            let predicate_type = attest::sbom_predicate_type(sbom.media_type);
            in_toto(attest::statement(name, digest, predicate_type, predicate), predicate_type, signer)
        }
        None => Ok(Artifact {
            artifact_type: sbom.media_type.to_string(),
            layer_media_type: sbom.media_type.to_string(),
            payload: sbom.bytes,
            annotations: BTreeMap::new(),
        }),
    }
}

/// Where the git repository lives: the CI's word for it, else `origin`'s URL without
/// credentials (a URL may carry a token).
fn git_repository(root: &Path) -> Option<String> {
    if let (Ok(server), Ok(repository)) = (std::env::var("GITHUB_SERVER_URL"), std::env::var("GITHUB_REPOSITORY")) {
        return Some(format!("{server}/{repository}"));
    }
    let out = crate::project::git_command("git", root).args(["remote", "get-url", "origin"]).output().ok()?;
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !url.is_empty()).then(|| without_credentials(&url))
}

/// `https://user:token@host/x` -> `https://host/x`.
fn without_credentials(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            if path.is_empty() {
                format!("{scheme}://{host}")
            } else {
                format!("{scheme}://{host}/{path}")
            }
        }
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_urls_lose_their_credentials() {
        assert_eq!(without_credentials("https://u:tok@git.example/a/b.git"), "https://git.example/a/b.git");
        assert_eq!(without_credentials("https://git.example/a"), "https://git.example/a");
        assert_eq!(without_credentials("git@github.com:a/b.git"), "git@github.com:a/b.git");
    }

    #[test]
    fn unsigned_statements_are_plain_in_toto() {
        let artifact = in_toto(b"{}".to_vec(), SLSA_PROVENANCE, None).expect("artifact");
        assert_eq!(artifact.artifact_type, IN_TOTO_PAYLOAD_TYPE);
        assert_eq!(artifact.annotations[PREDICATE_TYPE_ANNOTATION], SLSA_PROVENANCE);
        let sbom = Sbom { media_type: "application/vnd.cyclonedx+json", bytes: b"{}".to_vec() };
        let artifact = sbom_artifact("r/a", "sha256:ab", sbom, None).expect("sbom");
        assert_eq!(artifact.artifact_type, "application/vnd.cyclonedx+json");
    }
}
