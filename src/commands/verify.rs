//! `nixctr verify REF --key cosign.pub`: checks the image's cosign signatures with the key,
//! then lists what is attached to it (provenance, SBOMs), each signed attestation checked
//! with the key too. One line a finding on stdout; exit 1 when no signature of the image
//! verifies, or an attestation's signature does not.

use anyhow::{bail, Context, Result};

use crate::attest::PREDICATE_TYPE_ANNOTATION;
use crate::cli::VerifyArgs;
use crate::output;
use crate::progress::Progress;
use crate::registry::referrers::{repository_of, Descriptor, SIGNATURE_ARTIFACT_TYPE};
use crate::registry::{PushSession, Reference};
use crate::settings::{RegistryInputs, Settings};
use crate::sign::{self, PublicKey, DSSE_MEDIA_TYPE};

pub(crate) async fn run(settings: &Settings, args: VerifyArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let key = PublicKey::from_file(&args.key)?;
    let (reference, digest) = parse(&args.reference)?;
    let inputs = RegistryInputs {
        format: crate::registry::ManifestFormat::Oci,
        compression: crate::registry::Compression::Gzip,
        insecure: args.login.insecure,
        ca_cert: args.login.ca_cert.clone(),
        username: args.login.username.clone(),
        password_stdin: args.login.password_stdin,
        jobs: 4,
        chunk_size: None,
    };
    let config = settings.registry_config(&inputs)?;
    let session = PushSession::connect(&config, reference.registry(), &progress).await?;
    let name = repository_of(&reference);
    let digest = match digest {
        Some(digest) => digest,
        None => session.tag_digest(&reference).await?.with_context(|| format!("{reference} is not in the registry"))?,
    };
    let shown = format!("{name}@{digest}");
    let key_shown = args.key.display();

    let signatures = session.signatures(&reference, &digest).await?;
    if signatures.is_empty() {
        bail!("{shown} has no signature (no tag {}.sig)", crate::registry::referrers::fallback_tag(&digest)?);
    }
    let mut problems = Vec::new();
    let mut good = 0;
    for (i, signature) in signatures.iter().enumerate() {
        let n = i + 1;
        match sign::signed_digest(&signature.payload) {
            None => problems.push(format!("signature {n}: its payload is not cosign's simple signing")),
            Some(signed) if signed != digest => problems.push(format!("signature {n} signs {signed}, not {digest}")),
            Some(_) if !key.verifies_b64(&signature.payload, &signature.base64) => {
                problems.push(format!("signature {n} does not verify with {key_shown}"))
            }
            Some(_) => good += 1,
        }
    }
    if good == 0 {
        bail!("no signature of {shown} verifies with {key_shown}: {}", problems.join("; "));
    }
    output::line(format_args!("{shown}: signed by {key_shown} ({good} of {} signatures)", signatures.len()))?;

    // What is attached: to the image, and, for an index, to each platform image.
    let (top, images) = session.subjects(&reference, &digest).await?;
    let mut bad = Vec::new();
    for subject in std::iter::once(&top).chain(&images) {
        let on = subject.platform_name().map(|p| format!(" {p}")).unwrap_or_default();
        let referrers = session.referrers(&reference, &subject.digest).await?;
        for referrer in &referrers.manifests {
            let line = describe(&session, &reference, &key, subject, referrer).await;
            match line {
                Ok(line) => output::line(format_args!("  {}{on}: {line}", short_type(referrer)))?,
                Err(e) => {
                    output::line(format_args!("  {}{on}: BAD: {e:#}", short_type(referrer)))?;
                    bad.push(format!("{}{on} ({})", short_type(referrer), referrer.digest));
                }
            }
        }
    }
    if !bad.is_empty() {
        bail!("{shown}: attestations that do not verify with {key_shown}: {}", bad.join(", "));
    }
    Ok(())
}

/// What a referrer is, and for a DSSE envelope whether the key signed it for this subject.
async fn describe(
    session: &PushSession,
    reference: &Reference,
    key: &PublicKey,
    subject: &Descriptor,
    referrer: &Descriptor,
) -> Result<String> {
    let predicate = referrer.annotations.get(PREDICATE_TYPE_ANNOTATION).map(String::as_str);
    match referrer.artifact_type.as_deref() {
        Some(SIGNATURE_ARTIFACT_TYPE) => Ok(format!("cosign signatures, {}", referrer.digest)),
        Some(DSSE_MEDIA_TYPE) => {
            let (_, envelope) = session.artifact_payload(reference, &referrer.digest).await?;
            let statement = key.open_envelope(&envelope)?;
            let value: serde_json::Value = serde_json::from_slice(&statement).context("the statement is not JSON")?;
            let hex = subject.digest.trim_start_matches("sha256:");
            let names_subject = value["subject"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["digest"]["sha256"].as_str() == Some(hex)));
            if !names_subject {
                bail!("the signed statement is not about {}", subject.digest);
            }
            Ok(format!("{}, signed, {}", predicate.unwrap_or("?"), referrer.digest))
        }
        Some(other) => Ok(format!("{}, not signed, {}", predicate.unwrap_or(other), referrer.digest)),
        None => Ok(format!("unknown artifact, {}", referrer.digest)),
    }
}

/// `signature`, `attestation`, `sbom`: what a referrer's type says.
fn short_type(referrer: &Descriptor) -> &'static str {
    let predicate = referrer.annotations.get(PREDICATE_TYPE_ANNOTATION).map(String::as_str).unwrap_or_default();
    match referrer.artifact_type.as_deref().unwrap_or_default() {
        SIGNATURE_ARTIFACT_TYPE => "signature",
        _ if predicate.contains("slsa.dev/provenance") => "provenance",
        t if t.contains("cyclonedx")
            || t.contains("spdx")
            || predicate.contains("cyclonedx")
            || predicate.contains("spdx") =>
        {
            "sbom"
        }
        _ => "attestation",
    }
}

/// `host/path:tag` or `host/path@sha256:…`.
fn parse(text: &str) -> Result<(Reference, Option<String>)> {
    match text.split_once('@') {
        Some((name, digest)) => {
            if !digest.starts_with("sha256:")
                || digest.len() != 71
                || !digest[7..].bytes().all(|b| b.is_ascii_hexdigit())
            {
                bail!("{text:?}: the digest after @ must be sha256: and 64 hex digits");
            }
            let name = name.rsplit_once(':').filter(|(_, tag)| !tag.contains('/')).map_or(name, |(n, _)| n);
            Ok((Reference::parse(name)?, Some(digest.to_ascii_lowercase())))
        }
        None => Ok((Reference::parse(text)?, None)),
    }
}
