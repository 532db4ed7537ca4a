//! `nixctr publish`: `REF@DIGEST` on stdout for each pushed (or already published) container
//! (or, with `--json`, one object per container), a summary on stderr when several were selected.

use std::sync::Arc;

use anyhow::{anyhow, bail, Result};

use crate::attachments;

use crate::build;
use crate::cli::PublishArgs;
use crate::output;
use crate::progress::Progress;
use crate::publish::{self, Request};
use crate::report::{self, Status};
use crate::settings::Settings;
use crate::sign::Signer;

pub(crate) async fn run(settings: &Settings, args: PublishArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    // The sign key is read (and a bad one refused) before anything is selected or built.
    let signer = match args.sign_key.as_ref().or(settings.sign_key.as_ref()) {
        Some(path) => Some(Arc::new(Signer::from_file(path)?)),
        None => None,
    };
    let attach = attachments::Options {
        signer,
        provenance: args.provenance || settings.provenance,
        sbom: args.sbom || settings.sbom,
    };
    let names = super::selected(settings, &args.select, &progress)?;
    if names.is_empty() {
        return Ok(());
    }
    let Some(registry) = args.registry_host.clone().or(settings.registry.clone()) else {
        bail!("no registry to publish to: pass --registry HOST[:PORT] or set `registry` in nixctr.toml");
    };
    let config = settings.registry_config(&super::registry_inputs(&args.registry))?;
    let request = Request {
        names,
        version: args.version.clone(),
        registry,
        namespace: args.namespace.clone().or(settings.namespace.clone()),
        tags: args.tag.clone(),
        allow_dirty: args.allow_dirty,
        force: args.force,
        skip_existing: args.skip_existing,
        archive: args.archive.clone(),
        build: build::Options { jobs: super::max_jobs(&args.many)?, fail_fast: args.many.fail_fast },
        attach,
    };
    let options = publish::Options {
        root: settings.project_root()?,
        tag_templates: &settings.tag_templates,
        platforms: &settings.platforms,
        cache_first: settings.nix.cache.required && settings.nix.cache.cache_to.is_some(),
        engines: &settings.engines,
        nix: &settings.nix,
        versions: settings.version_sources(),
    };
    // The files to pin are found and parsed before anything is built or pushed.
    let repositories: Vec<String> = request
        .names
        .iter()
        .map(|name| publish::repository(&request.registry, request.namespace.as_deref(), name))
        .collect();
    let pins = super::pin_request(settings, &args.pin, &repositories, &progress)?;
    let mut records = publish::publish(&options, &request, &config, &progress).await?;
    let pinned = match &pins {
        Some(pins) => publish::pin_published(&mut records, pins, &progress).map(drop),
        None => Ok(()),
    };
    if let [record] = records.as_slice() {
        if record.status == Status::Failed {
            // One container: its error is the command's, as it always was.
            return Err(anyhow!("{}", record.error.as_deref().unwrap_or("failed")));
        }
    }
    for record in &records {
        if args.many.json {
            output::line(serde_json::to_string(record)?)?;
        } else if let (Status::Pushed | Status::Skipped, Some(reference), Some(digest)) =
            (record.status, &record.reference, &record.digest)
        {
            // Already published: its tags name this digest, as if pushed now.
            output::line(format_args!("{reference}@{digest}"))?;
        }
    }
    if records.len() > 1 {
        report::summary(&records, &progress);
    }
    // The pushes are said first: the images are in the registry even when a file is not written.
    pinned?;
    report::outcome(&records)
}
