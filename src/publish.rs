//! Publishing containers: every check first (each directory committed, each version found,
//! each tag new), then one build of all that passed, each archive pushed as soon as it is
//! written (while the others still build) as `REGISTRY/NAMESPACE/NAME:TAG`, the tag rendered
//! from the template `v{version}-{sha}-nix`. A container that fails a check or its build is
//! reported and left out; the others go on.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use crate::build::{self, Built, Outcome, Output};
use crate::engines::Engines;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::project;
use crate::registry::{PushSession, Reference, RegistryConfig};
use crate::report::{Record, Status};
use crate::selection;
use crate::settings::Settings;
use crate::version;

/// What to publish and how; resolved from flags and nixctr.toml.
pub(crate) struct Request {
    pub names: Vec<String>,
    /// The app version for the tag (one container only); found with the version lookup when `None`.
    pub version: Option<String>,
    /// `host[:port]`.
    pub registry: String,
    pub namespace: Option<String>,
    /// The whole tag, instead of the template.
    pub tag: Option<String>,
    pub allow_dirty: bool,
    pub force: bool,
    /// An existing tag counts as done.
    pub skip_existing: bool,
    /// Publish this archive (one container only) instead of building.
    pub archive: Option<PathBuf>,
    pub build: build::Options,
}

/// A container that passed the checks, and where it goes.
struct Planned {
    name: String,
    version: String,
    tag: String,
    reference: Reference,
}

/// Publishes every container of the request; one record each, in order. An error is returned
/// only for what concerns them all (no registry, no engine, the nix container).
pub(crate) async fn publish(
    settings: &Settings,
    request: &Request,
    registry: &RegistryConfig,
    progress: &Progress,
) -> Result<Vec<Record>> {
    let started = Instant::now();
    let root = settings.project_root()?.to_path_buf();
    let several = request.names.len() > 1;
    if several && (request.version.is_some() || request.archive.is_some()) {
        bail!("--version and --archive name one container's, but {} were selected", request.names.len());
    }
    let item = |name: &str| if several { progress.for_item(name) } else { progress.clone() };
    let mut records: Vec<Option<Record>> = request.names.iter().map(|_| None).collect();
    let fail = |records: &mut Vec<Option<Record>>, i: usize, error: String| {
        records[i] = Some(Record::failed(&request.names[i], error, started.elapsed().as_secs_f64()));
    };

    // The cheap checks first: a dirty directory needs no version lookup (which may start a container).
    if request.archive.is_none() {
        for (i, name) in request.names.iter().enumerate() {
            if let Err(e) = check_clean(&root, name, request.allow_dirty) {
                fail(&mut records, i, format!("{e:#}"));
            }
        }
    }
    let mut versions: Vec<Option<String>> = request.names.iter().map(|_| request.version.clone()).collect();
    let lookup: Vec<usize> = (0..request.names.len())
        .filter(|&i| records[i].is_none() && request.tag.is_none() && request.version.is_none())
        .collect();
    if !lookup.is_empty() {
        let names: Vec<String> = lookup.iter().map(|&i| request.names[i].clone()).collect();
        let found = version::versions(settings.version_sources(), &names, version::From::Auto, progress).await?;
        for (i, answer) in lookup.into_iter().zip(found) {
            match answer {
                Ok(answer) => versions[i] = Some(answer.version),
                Err(e) => fail(&mut records, i, format!("{e:#}")),
            }
        }
    }
    let sha = if request.tag.is_none() && settings.tag_template.contains("{sha}") {
        project::head_commit(&root)?.chars().take(7).collect()
    } else {
        String::new()
    };
    let mut planned: Vec<(usize, Planned)> = Vec::new();
    for (i, name) in request.names.iter().enumerate() {
        if records[i].is_some() {
            continue;
        }
        let version = versions[i].clone().unwrap_or_default();
        let tag = match &request.tag {
            Some(tag) => Ok(tag.clone()),
            None => render_tag(&settings.tag_template, &version, &sha),
        };
        let reference = tag.and_then(|tag| {
            let repository = repository(&request.registry, request.namespace.as_deref(), name);
            Ok((Reference::parse(&format!("{repository}:{tag}"))?, tag))
        });
        match reference {
            Ok((reference, tag)) => planned.push((i, Planned { name: name.clone(), version, tag, reference })),
            Err(e) => fail(&mut records, i, format!("{e:#}")),
        }
    }

    let session = PushSession::connect(registry, &request.registry, progress).await?;
    let existing: Vec<Result<bool>> =
        futures::future::join_all(planned.iter().map(|(_, p)| session.tag_exists(&p.reference))).await;
    let mut to_build = Vec::new();
    for ((i, plan), exists) in planned.into_iter().zip(existing) {
        match exists {
            Err(e) => fail(&mut records, i, format!("{e:#}")),
            Ok(true) if request.skip_existing => {
                item(&plan.name).info(format!("{} already exists: skipped", plan.reference));
                let mut record = record_of(&plan, Status::Skipped);
                record.error = Some("tag exists".to_string());
                records[i] = Some(record);
            }
            Ok(true) if !request.force => fail(
                &mut records,
                i,
                format!(
                    "{} already exists in the registry (a tag names one build: bump the version, or overwrite it with --force; --skip-existing counts it as done)",
                    plan.reference
                ),
            ),
            Ok(_) => to_build.push((i, plan)),
        }
    }
    if request.build.fail_fast && records.iter().any(|r| r.as_ref().is_some_and(|r| r.status == Status::Failed)) {
        to_build.clear();
    }

    // Build, and push each container as soon as its archives (one per platform) are written.
    let platforms = &settings.platforms;
    let annotations = annotations(&root);
    let push = |plan: &Planned, archives: Vec<PathBuf>| {
        let (session, progress) = (&session, item(&plan.name));
        let mut annotations = annotations.clone();
        if !plan.version.is_empty() {
            annotations.insert("org.opencontainers.image.version".to_string(), plan.version.clone());
        }
        let reference = plan.reference.clone();
        async move {
            if platforms.len() > 1 {
                session.push_index(&archives, &reference, &annotations, &progress).await
            } else {
                session.push(&archives[0], &reference, &progress).await
            }
        }
    };
    let mut pushed: Vec<(usize, Result<crate::registry::PushOutcome>)> = Vec::new();
    let mut built_outcomes: Vec<(usize, Option<Platform>, Outcome)> = Vec::new();
    let workdir;
    if let Some(archive) = &request.archive {
        for (i, plan) in &to_build {
            pushed.push((*i, push(plan, vec![archive.clone()]).await));
        }
    } else if !to_build.is_empty() {
        workdir = tempfile::Builder::new()
            .prefix("nixctr-publish-")
            .tempdir()
            .context("cannot make a temporary directory")?;
        let names: Vec<String> = to_build.iter().map(|(_, p)| p.name.clone()).collect();
        let mut targets = build::plan(&root, &names, platforms, None, false)?;
        for target in &mut targets {
            if let Output::File(path) = &mut target.output {
                *path = workdir.path().join(&*path);
            }
        }
        let per_container = platforms.len().max(1);
        let engines = Engines::connect(&settings.engines, platforms, progress).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Built>();
        // An archive is pushed as soon as it is written, unless an upload to the binary cache
        // must succeed first (--cache-required): then only what the build kept is pushed.
        let early = !(settings.nix.cache.required && settings.nix.cache.cache_to.is_some());
        let building = async move {
            let outcomes = build::build(
                &engines,
                &settings.nix,
                &root,
                &targets,
                request.build,
                progress,
                early.then(|| tx.clone()),
            )
            .await;
            if let (false, Ok(outcomes)) = (early, &outcomes) {
                for outcome in outcomes {
                    if let Outcome::Built(built) = outcome {
                        let _ = tx.send(built.clone());
                    }
                }
            }
            (outcomes, targets)
        };
        let pushing = async {
            let mut pushes = FuturesUnordered::new();
            let mut arrived: HashMap<String, Vec<Built>> = HashMap::new();
            let mut open = true;
            loop {
                tokio::select! {
                    got = rx.recv(), if open => match got {
                        Some(built) => {
                            let ready = arrived.entry(built.name.clone()).or_default();
                            ready.push(built);
                            let name = ready[0].name.clone();
                            if ready.len() == per_container {
                                let mut ready = arrived.remove(&name).unwrap_or_default();
                                // The index lists the platforms in the order they were asked for.
                                ready.sort_by_key(|b| platforms.iter().position(|p| *p == b.platform));
                                let archives: Vec<PathBuf> = ready.into_iter().filter_map(|b| b.path).collect();
                                if let Some((i, plan)) = to_build.iter().find(|(_, p)| p.name == name) {
                                    let i = *i;
                                    let push = push(plan, archives);
                                    pushes.push(async move { (i, push.await) });
                                }
                            }
                        }
                        None => open = false,
                    },
                    Some(done) = pushes.next(), if !pushes.is_empty() => pushed.push(done),
                    else => break,
                }
            }
        };
        let ((outcomes, targets), ()) = tokio::join!(building, pushing);
        for (target, outcome) in targets.iter().zip(outcomes?) {
            if let Some((i, _)) = to_build.iter().find(|(_, p)| p.name == target.name) {
                built_outcomes.push((*i, target.platform.clone(), outcome));
            }
        }
    }
    for (i, platform, outcome) in built_outcomes {
        let on = match &platform {
            Some(p) if platforms.len() > 1 => format!("{p}: "),
            _ => String::new(),
        };
        match outcome {
            Outcome::Built(_) => {}
            Outcome::Failed { error, .. } => {
                let error = match records[i].take() {
                    Some(earlier) => format!("{}\n{on}{error}", earlier.error.unwrap_or_default()),
                    None => format!("{on}{error}"),
                };
                fail(&mut records, i, error)
            }
            Outcome::Stopped if records[i].is_none() => {
                records[i] = Some(Record {
                    error: Some("not built: --fail-fast".to_string()),
                    ..Record::new(&request.names[i], Status::Skipped)
                });
            }
            Outcome::Stopped => {}
        }
    }
    for (i, result) in pushed {
        let Some((_, plan)) = to_build.iter().find(|(j, _)| *j == i) else { continue };
        match result {
            Ok(outcome) => {
                let mut record = record_of(plan, Status::Pushed);
                record.reference = Some(outcome.reference);
                record.digest = Some(outcome.digest);
                record.pushed_bytes = Some(outcome.pushed_bytes);
                record.bytes = Some(outcome.pushed_bytes);
                record.skipped_layers = Some(outcome.skipped_layers);
                if !outcome.platforms.is_empty() {
                    record.platforms = Some(outcome.platforms.into_iter().collect());
                }
                record.seconds = started.elapsed().as_secs_f64();
                records[i] = Some(record);
            }
            Err(e) => fail(&mut records, i, format!("{e:#}")),
        }
    }
    let records: Vec<Record> = records
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| Record::failed(&request.names[i], "not published", started.elapsed().as_secs_f64()))
        })
        .collect();
    Ok(records)
}

/// The OCI annotations a registry shows for an index, besides the version: the commit and
/// the repository it was built from, when known.
fn annotations(root: &std::path::Path) -> BTreeMap<String, String> {
    let mut notes = BTreeMap::new();
    if let Ok(commit) = project::head_commit(root) {
        notes.insert("org.opencontainers.image.revision".to_string(), commit);
    }
    // CI runners say where the repository lives (GitHub Actions and Forgejo Actions alike).
    if let (Ok(server), Ok(repository)) = (std::env::var("GITHUB_SERVER_URL"), std::env::var("GITHUB_REPOSITORY")) {
        notes.insert("org.opencontainers.image.source".to_string(), format!("{server}/{repository}"));
    }
    notes
}

fn record_of(plan: &Planned, status: Status) -> Record {
    let mut record = Record::new(&plan.name, status);
    record.version = Some(plan.version.clone()).filter(|v| !v.is_empty());
    record.tag = Some(plan.tag.clone());
    record.reference = Some(plan.reference.to_string());
    record
}

/// `host/namespace/name`, or `host/name` without a namespace.
fn repository(host: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}/{}/{name}", host.trim_end_matches('/'), ns.trim_matches('/')),
        None => format!("{}/{name}", host.trim_end_matches('/')),
    }
}

/// Refuses when `containers/NAME/` has changes git has not committed: a tag must name the
/// source it was built from.
fn check_clean(root: &std::path::Path, name: &str, allow_dirty: bool) -> Result<()> {
    project::container_file(root, name)?;
    if allow_dirty {
        return Ok(());
    }
    let changes = selection::dirty_files(root, name)?;
    if !changes.is_empty() {
        let listed: Vec<&str> = changes.iter().take(5).map(|s| s.trim()).collect();
        return Err(anyhow!(
            "containers/{name} has uncommitted changes ({}): commit them, or pass --allow-dirty",
            listed.join(", ")
        ));
    }
    Ok(())
}

/// Fills `{version}` (with at most one `v` in front) and `{sha}` into the tag template.
pub fn render_tag(template: &str, version: &str, sha: &str) -> Result<String> {
    let mut version = version;
    // `v{version}` with version `v2.17.0` would give `vv2.17.0`.
    if template.contains("v{version}") {
        version = version.strip_prefix('v').unwrap_or(version);
    }
    let tag = template.replace("{version}", version).replace("{sha}", sha);
    if tag.contains('{') || tag.contains('}') {
        bail!("tag template {template:?} has an unknown placeholder (known: {{version}}, {{sha}})");
    }
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        bail!("tag {tag:?} is not a valid image tag (letters, digits, _ . -; at most 128)");
    }
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_has_one_v() {
        assert_eq!(render_tag("v{version}-{sha}-nix", "2.17.0", "abc1234").unwrap(), "v2.17.0-abc1234-nix");
        assert_eq!(render_tag("v{version}-{sha}-nix", "v2.17.0", "abc1234").unwrap(), "v2.17.0-abc1234-nix");
        assert_eq!(render_tag("{version}", "v1", "").unwrap(), "v1");
    }

    #[test]
    fn bad_templates_and_tags_are_refused() {
        assert!(render_tag("v{verison}", "1", "").is_err());
        assert!(render_tag("v{version}", "1+build", "").is_err());
        assert!(render_tag("{version}", ".1", "").is_err());
    }
}
