//! The tag side of a push: which tags the registry has already and what they name, the
//! manifest put under several tags in one request (`?tag=`, answered with `OCI-Tag`) or
//! one tag at a time where the registry ignores that, and the two errors that name a tag:
//! a tag that names another image, and a tag the registry refuses to overwrite.

use anyhow::{anyhow, bail, Result};
use reqwest::StatusCode;

use super::{ManifestFormat, Prepared, PushOutcome, PushSession};
use crate::archive::sha256_digest;
use crate::progress::Progress;
use crate::registry::api::PutManifest;
use crate::registry::client::Rejected;
use crate::registry::manifest::{image_manifest, Compression};
use crate::registry::{short, Reference};

/// What a push does about tags the registry has already.
// pub: used by tests/it/push.rs
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingTags {
    /// Moves them to the pushed image (`nixctr push`, `publish --force`).
    Overwrite,
    /// Leaves them as they are when they name the image being pushed (nothing is sent for
    /// them), and refuses the push, before anything is sent, when one names another image.
    MustMatch,
}

/// Where a push puts its manifest: a repository, its tags (the reference's own first), and
/// what happens to those the registry has already.
// pub: used by tests/it/push.rs
#[derive(Debug, Clone)]
pub struct Destination {
    reference: Reference,
    tags: Vec<String>,
    existing: ExistingTags,
}

impl Destination {
    /// `reference`'s one tag, overwritten if it exists.
    pub fn new(reference: Reference) -> Destination {
        let tags = vec![reference.tag().to_string()];
        Destination { reference, tags, existing: ExistingTags::Overwrite }
    }

    /// `reference`'s tag and `more` (each checked; one given twice counts once).
    pub fn with_tags(reference: Reference, more: &[String], existing: ExistingTags) -> Result<Destination> {
        let mut destination = Destination { existing, ..Destination::new(reference) };
        for tag in more {
            destination.reference.with_tag(tag)?;
            if !destination.tags.contains(tag) {
                destination.tags.push(tag.clone());
            }
        }
        Ok(destination)
    }

    /// The repository and the first tag: what messages and `REF@DIGEST` name.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    pub fn existing(&self) -> ExistingTags {
        self.existing
    }
}

/// A tag, and the digest the registry has under it (`None`: it has no such tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TagState {
    pub tag: String,
    pub digest: Option<String>,
}

/// A manifest nixctr may push for an image (or index): one per format the registry may
/// end up with (the session's, then the other one it falls back to).
pub(super) struct Candidate {
    pub format: ManifestFormat,
    pub media_type: &'static str,
    pub body: Vec<u8>,
    pub digest: String,
    /// For an index: each platform and its image manifest's digest in this format.
    pub platforms: Vec<(String, String)>,
}

impl Candidate {
    pub fn new(format: ManifestFormat, media_type: &'static str, body: Vec<u8>) -> Candidate {
        let digest = sha256_digest(&body);
        Candidate { format, media_type, body, digest, platforms: Vec::new() }
    }
}

/// How the tags the registry has compare with the manifests nixctr may push.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Every existing tag names candidate `index`; `missing` are the tags still to put.
    Same { index: usize, missing: Vec<String> },
    /// `tag` names `theirs`, which is none of the candidates.
    Other { tag: String, theirs: String },
}

fn verdict(states: &[TagState], candidates: &[String]) -> Verdict {
    let existing: Vec<(&str, &str)> =
        states.iter().filter_map(|s| s.digest.as_deref().map(|d| (s.tag.as_str(), d))).collect();
    // The first existing tag picks the candidate (the format the registry took); every
    // other existing tag must name the same.
    let index = existing.first().and_then(|(_, theirs)| candidates.iter().position(|c| c == theirs));
    if let Some(index) = index {
        if let Some((tag, theirs)) = existing.iter().find(|(_, theirs)| *theirs != candidates[index]) {
            return Verdict::Other { tag: tag.to_string(), theirs: theirs.to_string() };
        }
        let missing = states.iter().filter(|s| s.digest.is_none()).map(|s| s.tag.clone()).collect();
        return Verdict::Same { index, missing };
    }
    match existing.first() {
        Some((tag, theirs)) => Verdict::Other { tag: tag.to_string(), theirs: theirs.to_string() },
        None => Verdict::Same { index: 0, missing: states.iter().map(|s| s.tag.clone()).collect() },
    }
}

/// Whether a refused manifest PUT is the registry's policy saying no (rather than a
/// malformed manifest): 403, or a `DENIED` code whatever the status.
fn denied(rejected: &Rejected) -> bool {
    rejected.status == StatusCode::FORBIDDEN || rejected.code.as_deref() == Some("DENIED")
}

impl PushSession {
    /// Each tag of `destination` and what the registry has under it. Not asked when the one
    /// tag is to be overwritten anyway: a plain push costs no extra request.
    pub(super) async fn tag_states(&self, destination: &Destination) -> Result<Vec<TagState>> {
        let reference = destination.reference();
        if destination.existing() == ExistingTags::Overwrite && destination.tags().len() == 1 {
            return Ok(vec![TagState { tag: reference.tag().to_string(), digest: None }]);
        }
        self.login_for(reference).await?;
        let client = self.client().await?;
        let repo = reference.repository();
        let digests =
            futures::future::try_join_all(destination.tags().iter().map(|tag| client.manifest_digest(repo, tag)))
                .await?;
        Ok(destination.tags().iter().cloned().zip(digests).map(|(tag, digest)| TagState { tag, digest }).collect())
    }

    /// The manifests an image may get: in the session's format, and in the other one when
    /// a registry that refuses the first may have been given it (gzip layers only).
    pub(super) fn manifest_candidates(&self, image: &Prepared) -> Result<Vec<Candidate>> {
        let config = (image.config.0.as_str(), image.config.1);
        let mut formats = vec![self.format];
        if self.compression == Compression::Gzip {
            formats.push(self.format.other());
        }
        formats
            .into_iter()
            .map(|format| {
                let (media_type, body) = image_manifest(format, self.compression, config, &image.layers)?;
                Ok(Candidate::new(format, media_type, body))
            })
            .collect()
    }

    /// Some of `destination`'s tags exist and must name the image: when they all name one of
    /// `candidates`, only the missing tags are put (nothing at all when none is missing);
    /// when one names another image, an error naming both digests, and nothing is sent.
    pub(super) async fn publish_unless_there(
        &self,
        destination: &Destination,
        states: &[TagState],
        candidates: Vec<Candidate>,
        mut outcome: PushOutcome,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        let reference = destination.reference();
        let digests: Vec<String> = candidates.iter().map(|c| c.digest.clone()).collect();
        let (index, missing) = match verdict(states, &digests) {
            Verdict::Same { index, missing } => (index, missing),
            Verdict::Other { tag, theirs } => bail!(
                "{} already names {theirs}, another image than this one ({}): a tag names one build; publish a new version, or overwrite the tag with --force (nothing was pushed)",
                reference.with_tag(&tag)?,
                digests[0]
            ),
        };
        let Some(candidate) = candidates.into_iter().nth(index) else {
            bail!("no manifest to compare {reference} with");
        };
        let already: Vec<String> = states.iter().filter(|s| s.digest.is_some()).map(|s| s.tag.clone()).collect();
        for tag in &already {
            progress.info(format!(
                "{} already names {}: already published",
                reference.with_tag(tag)?,
                candidate.digest
            ));
        }
        if !missing.is_empty() {
            // The registry has the manifest (under the existing tags), so its blobs too.
            let repo = reference.repository();
            let put =
                self.put_tagged(repo, &missing, &[], candidate.media_type, candidate.body.clone(), progress).await?;
            put.map_err(anyhow::Error::new)?;
            progress.info(format!("tagged {} as {}", candidate.digest, missing.join(", ")));
        }
        outcome.digest = candidate.digest;
        outcome.format = candidate.format;
        outcome.manifest_size = candidate.body.len() as u64;
        outcome.media_type = candidate.media_type.to_string();
        outcome.platforms = candidate.platforms;
        outcome.tags = destination.tags().to_vec();
        outcome.already = already;
        outcome.pushed_bytes = 0;
        outcome.pushed_layers = 0;
        Ok(outcome)
    }

    /// PUTs a manifest under `tags` of `repo`: by digest only when there are none; under
    /// the one tag; for several, by digest with each tag asked for (`?tag=`), then tag by
    /// tag those the registry did not say (`OCI-Tag`) it applied, `existing` ones first so
    /// that a refusal to overwrite stops before a new tag is made. `Ok(Err(rejected))`: the
    /// first PUT was refused, and the caller may try another format.
    pub(super) async fn put_tagged(
        &self,
        repo: &str,
        tags: &[String],
        existing: &[String],
        media_type: &str,
        body: Vec<u8>,
        progress: &Progress,
    ) -> Result<std::result::Result<String, Rejected>> {
        let ours = sha256_digest(&body);
        let client = self.client().await?;
        let (first, asked): (&str, &[String]) = match tags {
            [] => (&ours, &[]),
            [one] => (one, &[]),
            several => (&ours, several),
        };
        let put = match client.put_manifest(repo, first, asked, media_type, body.clone()).await? {
            Ok(put) => put,
            Err(rejected) if denied(&rejected) && !tags.is_empty() => {
                return Err(self.refusal(repo, tags, rejected).await);
            }
            Err(rejected) => return Ok(Err(rejected)),
        };
        let digest = put.digest.clone().unwrap_or_else(|| ours.clone());
        if asked.is_empty() {
            return Ok(Ok(digest));
        }
        let mut rest: Vec<&String> = tags.iter().filter(|t| !put.tagged.contains(t)).collect();
        if rest.is_empty() {
            progress.debug(format!("registry {} applied {} tags in one request", self.registry, tags.len()));
            return Ok(Ok(digest));
        }
        progress.debug(format!(
            "registry {} did not apply {} of the tags asked for (no OCI-Tag): tagging one at a time",
            self.registry,
            rest.len()
        ));
        rest.sort_by_key(|t| !existing.contains(t));
        for tag in rest {
            let put = match client.put_manifest(repo, tag, &[], media_type, body.clone()).await? {
                Ok(put) => put,
                Err(rejected) if denied(&rejected) => {
                    return Err(self.refusal(repo, std::slice::from_ref(tag), rejected).await)
                }
                Err(rejected) => return Err(rejected.into()),
            };
            self.check_tagged(repo, tag, &put, &digest).await?;
        }
        Ok(Ok(digest))
    }

    /// A tag put on its own must name the manifest the digest PUT stored: said in the
    /// answer, or else asked for.
    async fn check_tagged(&self, repo: &str, tag: &str, put: &PutManifest, digest: &str) -> Result<()> {
        let theirs = match &put.digest {
            Some(theirs) => Some(theirs.clone()),
            None => self.client().await?.manifest_digest(repo, tag).await?,
        };
        if theirs.as_deref() != Some(digest) {
            bail!(
                "registry {} put tag {tag:?} of {repo} on {}, not on the pushed manifest {}",
                self.registry,
                theirs.as_deref().map_or("nothing", short),
                short(digest)
            );
        }
        Ok(())
    }

    /// The error for a manifest PUT the registry denied: when one of `tags` exists, the
    /// registry will not overwrite it, which no flag changes; else the account may not push.
    async fn refusal(&self, repo: &str, tags: &[String], rejected: Rejected) -> anyhow::Error {
        let client = match self.client().await {
            Ok(client) => client,
            Err(e) => return e,
        };
        for tag in tags {
            if let Ok(Some(theirs)) = client.manifest_digest(repo, tag).await {
                return anyhow!(
                    "registry {} refuses to overwrite tag {tag:?} of {repo} ({}: immutable tags or a create-only policy; it names {}); --force cannot change that: publish a new version, or have the tag deleted in the registry",
                    self.registry,
                    rejected.detail.as_deref().unwrap_or(rejected.status.as_str()),
                    short(&theirs)
                );
            }
        }
        anyhow::Error::new(rejected).context(format!(
            "registry {} denied the manifest for {repo} (the account may not push tags there; check its rights)",
            self.registry
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(list: &[(&str, Option<&str>)]) -> Vec<TagState> {
        list.iter().map(|(t, d)| TagState { tag: t.to_string(), digest: d.map(str::to_string) }).collect()
    }

    #[test]
    fn tags_naming_the_image_need_nothing_and_another_image_is_named() {
        let ours = ["sha256:oci".to_string(), "sha256:docker".to_string()];
        let all_there = states(&[("a", Some("sha256:oci")), ("b", Some("sha256:oci"))]);
        assert_eq!(verdict(&all_there, &ours), Verdict::Same { index: 0, missing: vec![] });
        let one_new = states(&[("a", None), ("b", Some("sha256:docker"))]);
        assert_eq!(verdict(&one_new, &ours), Verdict::Same { index: 1, missing: vec!["a".to_string()] });
        let other = states(&[("a", Some("sha256:old")), ("b", None)]);
        assert_eq!(verdict(&other, &ours), Verdict::Other { tag: "a".into(), theirs: "sha256:old".into() });
        // Two formats under two tags: the second one is not what this push would make.
        let mixed = states(&[("a", Some("sha256:oci")), ("b", Some("sha256:docker"))]);
        assert_eq!(verdict(&mixed, &ours), Verdict::Other { tag: "b".into(), theirs: "sha256:docker".into() });
        let none = states(&[("a", None)]);
        assert_eq!(verdict(&none, &ours), Verdict::Same { index: 0, missing: vec!["a".to_string()] });
    }

    #[test]
    fn a_destination_checks_and_dedups_its_tags() {
        let reference = Reference::parse("127.0.0.1:5000/team/app:v1-abc-nix").unwrap();
        let more = ["v1-nix".to_string(), "v1-abc-nix".to_string(), "v1-nix".to_string()];
        let d = Destination::with_tags(reference.clone(), &more, ExistingTags::MustMatch).unwrap();
        assert_eq!(d.tags(), ["v1-abc-nix", "v1-nix"]);
        assert_eq!(d.reference().to_string(), "127.0.0.1:5000/team/app:v1-abc-nix");
        let err = Destination::with_tags(reference, &["bad tag".to_string()], ExistingTags::Overwrite).unwrap_err();
        assert!(err.to_string().contains("\"bad tag\""), "{err}");
    }

    #[test]
    fn denied_is_a_403_or_the_denied_code() {
        let rejected = |status, code: Option<&str>| Rejected {
            registry: "r".into(),
            status,
            what: "PUT manifest a".into(),
            code: code.map(str::to_string),
            detail: None,
        };
        assert!(denied(&rejected(StatusCode::FORBIDDEN, None)));
        assert!(denied(&rejected(StatusCode::BAD_REQUEST, Some("DENIED"))));
        assert!(!denied(&rejected(StatusCode::BAD_REQUEST, Some("MANIFEST_INVALID"))));
    }
}
