//! Publishing containers: every check first (each directory committed, each version found,
//! each tag valid, what the registry has under each), then one build of all that passed,
//! each archive pushed as soon as it is written (while the others still build) as
//! `REGISTRY/NAMESPACE/NAME:TAG` under each of its tags, rendered from the templates
//! (`v{version}-{sha}-nix` unless nixctr.toml says otherwise). A tag the registry has
//! already must name the image built now: then nothing is pushed for it ("already
//! published", so a re-run of the same commit succeeds); another image is an error, unless
//! `--force` (overwrite) or `--skip-existing` (leave it). A container that fails a check or
//! its build is reported and left out; the others go on.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::FuturesUnordered;
use futures::StreamExt;

use tokio::sync::mpsc::UnboundedReceiver;

use crate::attachments::{self, Attached};
use crate::build::{self, Built, Outcome, Output, Target};
use crate::engines::{EngineChoice, Engines};
use crate::nix::NixOptions;
use crate::pin;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::project;
use crate::registry::{Destination, ExistingTags, PushOutcome, PushSession, Reference, RegistryConfig};
use crate::report::{Record, Status};
use crate::selection;
use crate::stream::{HandOver, ImageStream};
use crate::version;

/// What to publish and how; resolved from flags and nixctr.toml.
pub(crate) struct Request {
    pub names: Vec<String>,
    /// The app version for the tag (one container only); found with the version lookup when `None`.
    pub version: Option<String>,
    /// `host[:port]`.
    pub registry: String,
    pub namespace: Option<String>,
    /// The whole tags, instead of the templates.
    pub tags: Vec<String>,
    pub allow_dirty: bool,
    pub force: bool,
    /// An existing tag counts as done, whatever it names.
    pub skip_existing: bool,
    /// Publish this archive (one container only) instead of building.
    pub archive: Option<PathBuf>,
    pub build: build::Options,
    /// What to attach to each image pushed: signature, provenance, SBOM.
    pub attach: attachments::Options,
}

/// What publishing reads of the settings.
pub(crate) struct Options<'a> {
    /// The project root.
    pub root: &'a Path,
    /// The tag templates (`v{version}-{sha}-nix` unless nixctr.toml says otherwise).
    pub tag_templates: &'a [String],
    /// The platforms built; several make an image index. Empty: the engine's own.
    pub platforms: &'a [Platform],
    /// Push an archive only once its upload to the binary cache succeeded (`--cache-required`
    /// with `--cache-to`), rather than as soon as it is written.
    pub cache_first: bool,
    /// The engines to build on.
    pub engines: &'a EngineChoice,
    /// The nix container the builds run in.
    pub nix: &'a NixOptions,
    /// Where the versions of the tags are found.
    pub versions: version::Sources<'a>,
}

/// A container whose source passed the checks, and the app version for its tag (empty when
/// the tag is given whole).
struct Versioned {
    name: String,
    version: String,
}

/// A container that passed the checks, and where it goes.
struct Planned {
    name: String,
    version: String,
    /// Its tags, the first one's reference.
    tags: Vec<String>,
    reference: Reference,
    /// The tags to push: all, or with `--skip-existing` those the registry does not have.
    to_push: Vec<String>,
    existing: ExistingTags,
}

/// Publishes every container of the request; one record each, in order. An error is returned
/// only for what concerns them all (no registry, no engine, the nix container). Each step
/// passes on the containers still going and settles the others' records.
pub(crate) async fn publish(
    options: &Options<'_>,
    request: &Request,
    registry: &RegistryConfig,
    progress: &Progress,
) -> Result<Vec<Record>> {
    if request.names.len() > 1 && (request.version.is_some() || request.archive.is_some()) {
        bail!("--version and --archive name one container's, but {} were selected", request.names.len());
    }
    if request.archive.is_some() && (request.attach.provenance || request.attach.sbom) {
        bail!("--provenance and --sbom describe a build, and --archive builds nothing: drop one of them");
    }
    let mut records = Records::new(&request.names);
    // The cheap checks first: a dirty directory needs no version lookup (which may start a container).
    let committed = check_sources(options.root, request, &mut records);
    let versioned = find_versions(options, request, committed, &mut records, progress).await?;
    let planned = plan_tags(options, request, versioned, &mut records)?;
    let session = PushSession::connect(registry, &request.registry, progress).await?;
    let pusher = Pusher::new(&session, options, request, progress);
    let mut to_publish = check_existing_tags(&pusher, request, planned, &mut records).await;
    if request.build.fail_fast && records.any_failed() {
        to_publish.clear();
    }
    let (builds, pushes) = match &request.archive {
        Some(archive) => (Vec::new(), push_archive(&pusher, archive, &to_publish).await),
        None => build_and_push(options, request, &pusher, &to_publish, progress).await?,
    };
    record_builds(builds, options.platforms.len() > 1, &mut records, progress);
    record_pushes(pushes, &mut records);
    Ok(records.finish())
}

/// The last step, once the pushes are recorded: the images pushed (or already published
/// under the same digest) are written into the `--pin` files, each record listing the files
/// changed for it. A container whose push failed or was refused pins nothing.
pub(crate) fn pin_published(
    records: &mut [Record],
    request: &pin::Request,
    progress: &Progress,
) -> Result<pin::Outcome> {
    let images: Vec<pin::Image> = records.iter().filter_map(pinnable).collect();
    let outcome = pin::pin(request, &images)?;
    for record in records.iter_mut() {
        let Some(image) = pinnable(record) else { continue };
        let files: Vec<String> = outcome
            .changed
            .iter()
            .filter(|f| f.changes.iter().any(|c| c.repository == image.repository))
            .map(|f| f.shown.clone())
            .collect();
        record.pinned = Some(files);
    }
    report_pins(&outcome, progress);
    Ok(outcome)
}

/// What `--pin` did, on stderr: each value changed, and the commits.
pub(crate) fn report_pins(outcome: &pin::Outcome, progress: &Progress) {
    for file in &outcome.changed {
        for change in &file.changes {
            let old = change.old.as_deref().map_or_else(|| "added".to_string(), |old| format!("{old} ->"));
            progress.info(format!("pinned {}:{}: {} {old} {}", file.shown, change.line, change.field, change.new));
        }
    }
    if outcome.changed.is_empty() {
        progress.info("pinned: no file needed a change");
    }
    for commit in &outcome.commits {
        progress.info(format!("committed the pins as {}", &commit[..commit.len().min(12)]));
    }
}

/// The image a record pushed, when it has one to pin: pushed now, or already published
/// under the same digest.
fn pinnable(record: &Record) -> Option<pin::Image> {
    let published = record.status == Status::Pushed
        || (record.status == Status::Skipped && record.error.as_deref() == Some("already published"));
    if !published {
        return None;
    }
    // The reference names the first tag pushed (with `--skip-existing`, the first new one).
    let (reference, digest) = (Reference::parse(record.reference.as_deref()?).ok()?, record.digest.as_deref()?);
    Some(pin::Image {
        repository: format!("{}/{}", reference.registry(), reference.repository()),
        tag: reference.tag().to_string(),
        digest: digest.to_string(),
    })
}

/// The containers whose directory git has committed (all of them for `--archive`, which
/// builds nothing); the others fail.
fn check_sources(root: &Path, request: &Request, records: &mut Records) -> Vec<String> {
    if request.archive.is_some() {
        return request.names.clone();
    }
    let mut committed = Vec::new();
    for name in &request.names {
        match check_clean(root, name, request.allow_dirty) {
            Ok(()) => committed.push(name.clone()),
            Err(e) => records.fail(name, format!("{e:#}")),
        }
    }
    committed
}

/// The version each tag names: `--version`, nothing when `--tag` gives the whole tags, else
/// what the version lookup finds (a container whose version is not found fails).
async fn find_versions(
    options: &Options<'_>,
    request: &Request,
    names: Vec<String>,
    records: &mut Records,
    progress: &Progress,
) -> Result<Vec<Versioned>> {
    if !request.tags.is_empty() || request.version.is_some() || names.is_empty() {
        let version = request.version.clone().unwrap_or_default();
        return Ok(names.into_iter().map(|name| Versioned { name, version: version.clone() }).collect());
    }
    let found = version::versions(options.versions, &names, version::From::Auto, progress).await?;
    let mut versioned = Vec::new();
    for (name, answer) in names.into_iter().zip(found) {
        match answer {
            Ok(answer) => versioned.push(Versioned { name, version: answer.version }),
            Err(e) => records.fail(&name, format!("{e:#}")),
        }
    }
    Ok(versioned)
}

/// Each container's tags (`--tag`, or the templates filled in) and reference; a container
/// whose tags are not all valid fails. Reading the HEAD commit for `{sha}` failing is an
/// error for all.
fn plan_tags(
    options: &Options<'_>,
    request: &Request,
    versioned: Vec<Versioned>,
    records: &mut Records,
) -> Result<Vec<Planned>> {
    let given = !request.tags.is_empty();
    let sha: String = if !given && options.tag_templates.iter().any(|t| t.contains("{sha}")) {
        project::head_commit(options.root)?.chars().take(7).collect()
    } else {
        String::new()
    };
    let existing = if request.force { ExistingTags::Overwrite } else { ExistingTags::MustMatch };
    let mut planned = Vec::new();
    for Versioned { name, version } in versioned {
        let tags: Result<Vec<String>> = if given {
            request.tags.iter().map(|tag| check_tag(tag)).collect()
        } else {
            options.tag_templates.iter().map(|template| render_tag(template, &version, &sha)).collect()
        };
        let plan = tags.and_then(|mut tags| {
            // Two templates may render alike (`{version}` of a version that is all `v`s, say).
            let mut seen = std::collections::HashSet::new();
            tags.retain(|t| seen.insert(t.clone()));
            let repository = repository(&request.registry, request.namespace.as_deref(), &name);
            let reference = Reference::parse(&format!("{repository}:{}", tags[0]))?;
            Ok(Planned {
                name: name.clone(),
                version: version.clone(),
                to_push: tags.clone(),
                tags,
                reference,
                existing,
            })
        });
        match plan {
            Ok(plan) => planned.push(plan),
            Err(e) => records.fail(&name, format!("{e:#}")),
        }
    }
    Ok(planned)
}

/// What the registry has under each container's tags, asked before anything is built (so a
/// registry that cannot be read stops the container early). With `--skip-existing` a tag it
/// has counts as done, and a container whose tags all exist is skipped. Otherwise existing
/// tags are compared with the image once it is built (see [`Pusher::push`]).
async fn check_existing_tags(
    pusher: &Pusher<'_>,
    request: &Request,
    planned: Vec<Planned>,
    records: &mut Records,
) -> Vec<Planned> {
    let session = pusher.session;
    let asked = planned.iter().map(|p| async move {
        let lookups = p.tags.iter().map(|tag| async move {
            let reference = p.reference.with_tag(tag)?;
            Ok::<_, anyhow::Error>((tag.clone(), session.tag_digest(&reference).await?.is_some()))
        });
        futures::future::try_join_all(lookups).await
    });
    let existing: Vec<Result<Vec<(String, bool)>>> = futures::future::join_all(asked).await;
    let mut to_publish = Vec::new();
    for (mut plan, found) in planned.into_iter().zip(existing) {
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                records.fail(&plan.name, format!("{e:#}"));
                continue;
            }
        };
        if !request.skip_existing {
            to_publish.push(plan);
            continue;
        }
        let (there, new): (Vec<_>, Vec<_>) = found.into_iter().partition(|(_, exists)| *exists);
        let progress = pusher.progress_of(&plan.name);
        for (tag, _) in &there {
            let reference = plan.reference.with_tag(tag).map_or_else(|_| tag.clone(), |r| r.to_string());
            let left = if new.is_empty() { "skipped" } else { "left as it is" };
            progress.info(format!("{reference} already exists: {left}"));
        }
        if new.is_empty() {
            let mut record = record_of(&plan, Status::Skipped);
            record.error = Some(if plan.tags.len() == 1 { "tag exists" } else { "tags exist" }.to_string());
            records.settle(record);
            continue;
        }
        plan.to_push = new.into_iter().map(|(tag, _)| tag).collect();
        to_publish.push(plan);
    }
    to_publish
}

/// `--archive`: the one archive given, pushed as it is.
async fn push_archive<'p>(
    pusher: &Pusher<'_>,
    archive: &Path,
    to_publish: &'p [Planned],
) -> Vec<(&'p Planned, Result<Published>)> {
    let mut pushed = Vec::new();
    for plan in to_publish {
        pushed.push((plan, pusher.push(plan, Image::Archives(vec![archive.to_path_buf()]), &[]).await));
    }
    pushed
}

/// Each build's outcome (per container and platform) and each push's.
type BuildsAndPushes<'p> = (Vec<(Target, Outcome)>, Vec<(&'p Planned, Result<Published>)>);

/// Builds the containers into a temporary directory, and pushes each as soon as its archives
/// (one per platform) are written, while the others still build.
async fn build_and_push<'p>(
    options: &Options<'_>,
    request: &Request,
    pusher: &Pusher<'_>,
    to_publish: &'p [Planned],
    progress: &Progress,
) -> Result<BuildsAndPushes<'p>> {
    if to_publish.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let workdir =
        tempfile::Builder::new().prefix("nixctr-publish-").tempdir().context("cannot make a temporary directory")?;
    let names: Vec<String> = to_publish.iter().map(|p| p.name.clone()).collect();
    let mut targets = build::plan(options.root, &names, options.platforms, None, false)?;
    // Unless the binary-cache upload must succeed first, build hands each archive over as
    // soon as it is written; else only what the build kept is pushed, once it is done.
    let early = !options.cache_first;
    for target in &mut targets {
        target.sbom = request.attach.sbom;
        if let Output::File(path) = &mut target.output {
            // `.tar`: a streamed image lands uncompressed (the push compresses its layers).
            *path = workdir.path().join(path.with_extension(""));
        }
        // One image per container: it goes to the registry as it comes (streamed or copied out).
        // (Not with `--sbom`: the SBOM's closure is read from the image's file.)
        target.hand_over = early && options.platforms.len() <= 1 && !request.attach.sbom;
    }
    let engines = Engines::connect(options.engines, options.platforms, progress).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Built>();
    let (nix, root, build_options) = (options.nix, options.root, request.build);
    let building = async move {
        let outcomes =
            build::build(&engines, nix, root, &targets, build_options, progress, early.then(|| tx.clone())).await;
        if let (false, Ok(outcomes)) = (early, &outcomes) {
            for outcome in outcomes {
                if let Outcome::Built(built) = outcome {
                    let _ = tx.send(built.clone());
                }
            }
        }
        // `tx` drops here: the pushing side sees the channel close.
        (outcomes, targets)
    };
    let ((outcomes, targets), pushes) = tokio::join!(building, push_as_built(pusher, to_publish, rx));
    Ok((targets.into_iter().zip(outcomes?).collect(), pushes))
}

/// Pushes each container once all its archives (one per platform) have arrived, until the
/// builds are done and every push has finished.
async fn push_as_built<'p>(
    pusher: &Pusher<'_>,
    to_publish: &'p [Planned],
    mut rx: UnboundedReceiver<Built>,
) -> Vec<(&'p Planned, Result<Published>)> {
    let platforms = pusher.platforms;
    let per_container = platforms.len().max(1);
    let mut arrived: HashMap<String, Vec<Built>> = HashMap::new();
    let mut pushes = FuturesUnordered::new();
    let mut pushed = Vec::new();
    let mut open = true;
    loop {
        tokio::select! {
            got = rx.recv(), if open => match got {
                Some(built) => {
                    let name = built.name.clone();
                    let ready = arrived.entry(name.clone()).or_default();
                    ready.push(built);
                    if ready.len() == per_container {
                        let mut ready = arrived.remove(&name).unwrap_or_default();
                        // The index lists the platforms in the order they were asked for.
                        ready.sort_by_key(|b| platforms.iter().position(|p| *p == b.platform));
                        let stream = ready.iter().find_map(|b| b.stream.as_ref().and_then(HandOver::take));
                        let archives: Vec<PathBuf> = ready.iter().filter_map(|b| b.path.clone()).collect();
                        if let Some(plan) = to_publish.iter().find(|p| p.name == name) {
                            let image = match stream {
                                Some(stream) => Image::Stream(stream),
                                None => Image::Archives(archives),
                            };
                            pushes.push(Box::pin(async move { (plan, pusher.push(plan, image, &ready).await) }));
                        }
                    }
                }
                None => open = false,
            },
            Some(done) = pushes.next(), if !pushes.is_empty() => pushed.push(done),
            else => break,
        }
    }
    pushed
}

/// A failed or stopped build settles its container's record; with several platforms, each
/// failure is named by its platform.
fn record_builds(builds: Vec<(Target, Outcome)>, several_platforms: bool, records: &mut Records, progress: &Progress) {
    for (target, outcome) in builds {
        let on = match &target.platform {
            Some(p) if several_platforms => format!("{p}: "),
            _ => String::new(),
        };
        match outcome {
            Outcome::Built(built) => progress.debug(format!("{}: {on}{}", target.name, built.phases)),
            Outcome::Failed { error, .. } => {
                let error = match records.take(&target.name) {
                    Some(earlier) => format!("{}\n{on}{error}", earlier.error.unwrap_or_default()),
                    None => format!("{on}{error}"),
                };
                records.fail(&target.name, error);
            }
            Outcome::Stopped if !records.is_settled(&target.name) => records.settle(Record {
                error: Some("not built: --fail-fast".to_string()),
                ..Record::new(&target.name, Status::Skipped)
            }),
            Outcome::Stopped => {}
        }
    }
}

/// Each push settles its container's record: pushed (with the digest), already published
/// (skipped, with the digest its tags name), or failed. An image pushed whose attachments
/// did not all go up fails, saying what went up and what did not.
fn record_pushes(pushes: Vec<(&Planned, Result<Published>)>, records: &mut Records) {
    for (plan, result) in pushes {
        match result {
            Ok(Published { outcome, attached }) => {
                let mut record = record_of(plan, Status::Pushed);
                if outcome.already_published() {
                    record.status = Status::Skipped;
                    record.error = Some("already published".to_string());
                }
                record.reference = Some(outcome.reference);
                record.digest = Some(outcome.digest);
                record.pushed_bytes = Some(outcome.pushed_bytes);
                record.bytes = Some(outcome.pushed_bytes);
                record.skipped_layers = Some(outcome.skipped_layers);
                record.set_uploads(&outcome.uploads);
                if !outcome.platforms.is_empty() {
                    record.platforms = Some(outcome.platforms.into_iter().collect());
                }
                record.seconds = records.seconds();
                if !attached.done.is_empty() {
                    record.attached = Some(attached.done.clone());
                }
                // A build that failed after its image was handed over stays failed (the
                // stream is read to its end, so this takes a copy-out error the push missed).
                if let Some(failed) = records.take(&plan.name).filter(|r| r.status == Status::Failed) {
                    record.error = Some(format!(
                        "{} (its image went up as {}@{} all the same)",
                        failed.error.unwrap_or_default(),
                        record.reference.as_deref().unwrap_or_default(),
                        record.digest.as_deref().unwrap_or_default()
                    ));
                    record.status = Status::Failed;
                    records.settle(record);
                    continue;
                }
                if !attached.failed.is_empty() {
                    let pushed = if record.status == Status::Pushed { "pushed" } else { "already published" };
                    let mut error = format!(
                        "{} {pushed} as {}, but not all its attachments: failed: {}",
                        record.reference.as_deref().unwrap_or_default(),
                        record.digest.as_deref().unwrap_or_default(),
                        attached.failed.join("; ")
                    );
                    if !attached.done.is_empty() {
                        error.push_str(&format!("; attached: {}", attached.done.join(", ")));
                    }
                    error.push_str(" (a re-run adds what is missing)");
                    record.status = Status::Failed;
                    record.error = Some(error);
                }
                records.settle(record);
            }
            Err(e) => records.fail(&plan.name, format!("{e:#}")),
        }
    }
}

/// Pushes a container's archives to its tag: one image, or an image index of several
/// platforms (annotated with the version, commit and repository).
struct Pusher<'a> {
    session: &'a PushSession,
    platforms: &'a [Platform],
    annotations: BTreeMap<String, String>,
    /// Several containers: each one's messages carry its name.
    several: bool,
    progress: &'a Progress,
    /// What to attach to each image once pushed.
    attach: &'a attachments::Options,
    /// When publishing started (provenance says it).
    started: SystemTime,
    root: &'a Path,
}

/// What is pushed: the archives of a container (one per platform), or its image as it streams.
enum Image {
    Archives(Vec<PathBuf>),
    Stream(ImageStream),
}

/// A pushed image, and what was attached to it.
struct Published {
    outcome: PushOutcome,
    attached: Attached,
}

impl<'a> Pusher<'a> {
    fn new(
        session: &'a PushSession,
        options: &Options<'a>,
        request: &'a Request,
        progress: &'a Progress,
    ) -> Pusher<'a> {
        let annotations = if options.platforms.len() > 1 { annotations(options.root) } else { BTreeMap::new() };
        Pusher {
            session,
            platforms: options.platforms,
            annotations,
            several: request.names.len() > 1,
            progress,
            attach: &request.attach,
            started: SystemTime::now(),
            root: options.root,
        }
    }

    fn progress_of(&self, name: &str) -> Progress {
        if self.several {
            self.progress.for_item(name)
        } else {
            self.progress.clone()
        }
    }

    /// Pushes the image under the plan's tags, then attaches what was asked to it (also
    /// when it was published already: a re-run adds what is missing). Tags the registry has
    /// must name the image built (nothing is sent then), unless `--force`.
    async fn push(&self, plan: &Planned, image: Image, builds: &[Built]) -> Result<Published> {
        let outcome = match image {
            Image::Archives(archives) => self.push_archives(plan, archives).await?,
            Image::Stream(stream) => self.push_stream(plan, stream).await?,
        };
        let mut attached = Attached::default();
        if self.attach.any() {
            let progress = self.progress_of(&plan.name);
            let run = attachments::Run { root: self.root, app_version: Some(&plan.version), started: self.started };
            attached = attachments::attach(
                self.session,
                &plan.reference,
                &outcome.digest,
                builds,
                self.attach,
                &run,
                &progress,
            )
            .await;
        }
        Ok(Published { outcome, attached })
    }

    /// Pushes a streamed image, as it comes, under the plan's tags (one platform).
    async fn push_stream(&self, plan: &Planned, stream: ImageStream) -> Result<PushOutcome> {
        let progress = self.progress_of(&plan.name);
        let Some((first, more)) = plan.to_push.split_first() else {
            bail!("{}: no tag to push", plan.name);
        };
        let destination = Destination::with_tags(plan.reference.with_tag(first)?, more, plan.existing)?;
        self.session.push_reader(stream.into_reader(), &destination, &progress).await
    }

    async fn push_archives(&self, plan: &Planned, archives: Vec<PathBuf>) -> Result<PushOutcome> {
        let progress = self.progress_of(&plan.name);
        let Some((first, more)) = plan.to_push.split_first() else {
            bail!("{}: no tag to push", plan.name);
        };
        let destination = Destination::with_tags(plan.reference.with_tag(first)?, more, plan.existing)?;
        if self.platforms.len() > 1 {
            let mut annotations = self.annotations.clone();
            if !plan.version.is_empty() {
                annotations.insert("org.opencontainers.image.version".to_string(), plan.version.clone());
            }
            self.session.push_index(&archives, &destination, &annotations, &progress).await
        } else {
            self.session.push_to(&archives[0], &destination, &progress).await
        }
    }
}

/// Each container's record, as the steps settle it; the request's order at the end.
struct Records {
    names: Vec<String>,
    settled: HashMap<String, Record>,
    started: Instant,
}

impl Records {
    fn new(names: &[String]) -> Records {
        Records { names: names.to_vec(), settled: HashMap::new(), started: Instant::now() }
    }

    /// Seconds since publishing started.
    fn seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn settle(&mut self, record: Record) {
        self.settled.insert(record.name.clone(), record);
    }

    fn fail(&mut self, name: &str, error: String) {
        let record = Record::failed(name, error, self.seconds());
        self.settle(record);
    }

    fn take(&mut self, name: &str) -> Option<Record> {
        self.settled.remove(name)
    }

    fn is_settled(&self, name: &str) -> bool {
        self.settled.contains_key(name)
    }

    fn any_failed(&self) -> bool {
        self.settled.values().any(|r| r.status == Status::Failed)
    }

    /// One record per name, in order; a container no step settled was not published.
    fn finish(mut self) -> Vec<Record> {
        let seconds = self.seconds();
        let names = std::mem::take(&mut self.names);
        names
            .into_iter()
            .map(|name| self.settled.remove(&name).unwrap_or_else(|| Record::failed(&name, "not published", seconds)))
            .collect()
    }
}

/// The OCI annotations a registry shows for an index, besides the version: the commit and
/// the repository it was built from, when known.
fn annotations(root: &Path) -> BTreeMap<String, String> {
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
    record.tag = plan.tags.first().cloned();
    record.tags = Some(plan.tags.clone());
    record.reference = Some(plan.reference.to_string());
    record
}

/// `host/namespace/name`, or `host/name` without a namespace.
pub(crate) fn repository(host: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}/{}/{name}", host.trim_end_matches('/'), ns.trim_matches('/')),
        None => format!("{}/{name}", host.trim_end_matches('/')),
    }
}

/// Refuses when `containers/NAME/` has changes git has not committed: a tag must name the
/// source it was built from.
fn check_clean(root: &Path, name: &str, allow_dirty: bool) -> Result<()> {
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
    check_tag(&tag)
}

/// The tag, if an image tag may be it.
fn check_tag(tag: &str) -> Result<String> {
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        bail!("tag {tag:?} is not a valid image tag (letters, digits, _ . -; at most 128)");
    }
    Ok(tag.to_string())
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
    fn only_published_records_are_pinned() {
        let mut record = Record::new("ntfy", Status::Pushed);
        record.reference = Some("r:5000/team/ntfy:v1".to_string());
        record.tag = Some("v1".to_string());
        record.digest = Some("sha256:ab".to_string());
        let image = pinnable(&record).expect("pushed");
        assert_eq!((image.repository.as_str(), image.tag.as_str()), ("r:5000/team/ntfy", "v1"));
        record.reference = Some("r:5000/team/ntfy:v2".to_string());
        assert_eq!(pinnable(&record).expect("pushed").tag, "v2", "the tag pushed, not the first planned");
        record.status = Status::Skipped;
        record.error = Some("already published".to_string());
        assert!(pinnable(&record).is_some());
        record.error = Some("tag exists".to_string());
        assert!(pinnable(&record).is_none(), "--skip-existing: what the tag names is not known to be this build");
        record.status = Status::Failed;
        record.error = None;
        assert!(pinnable(&record).is_none());
    }

    #[test]
    fn bad_templates_and_tags_are_refused() {
        assert!(render_tag("v{verison}", "1", "").is_err());
        assert!(render_tag("v{version}", "1+build", "").is_err());
        assert!(render_tag("{version}", ".1", "").is_err());
        assert!(check_tag("v1-nix").is_ok());
        let err = check_tag("v1 nix").unwrap_err().to_string();
        assert!(err.contains("\"v1 nix\""), "{err}");
    }
}
