//! Building containers: one nix container and one upload of the project for the whole
//! selection; every container is evaluated, then all are built by one nix invocation, so what
//! they share builds once and the rest in parallel. Each archive is copied out as soon as it
//! is in the store (while the others still build) and written whole, or not at all. A
//! container whose output streams its image (`streamLayeredImage`) has it run in the nix
//! container instead, its stdout compressed into the file on this side, loaded straight into
//! the engine (`--load`), or handed to `publish` as it comes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use futures::StreamExt;
use tokio::sync::Mutex;

use crate::archive;
use crate::engine::Engine;
use crate::engines::{BuildTimes, Engines, Pick};
use crate::nix::{BuilderUse, Inputs, NixContainer, NixOptions};
use crate::output::{check_writable, AtomicFile};
use crate::platform::Platform;
use crate::progress::{human_bytes, Progress};
use crate::project;
use crate::stream::{self, HandOver, ImageStream, OutputKind};

/// How often the store is asked which archives are done while nix still builds.
const POLL: Duration = Duration::from_millis(1500);

/// Where one archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    Stdout,
    File(PathBuf),
}

/// One container to build, for one platform, and where its archive goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub name: String,
    /// `None`: the engine's own.
    pub platform: Option<Platform>,
    pub output: Output,
    /// Also read what the image's SBOM needs ([`crate::sbom::Closure`]) in the container
    /// that built it, while its store paths are at hand.
    pub sbom: bool,
    /// `--load`: a streamed image goes into the engine that built it and to no file.
    pub load: bool,
    /// The image is handed over as it comes (in [`Built::stream`], through `done`) rather
    /// than written to `output`: a stream's, and a plain or gzip archive's as it is copied out.
    pub hand_over: bool,
}

/// Where the time of one target went, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Phases {
    pub evaluate: f64,
    /// From the start of the build to the output being seen in the store.
    pub build: f64,
    /// Copying the archive out, or running the stream into its destination.
    pub copy_out: f64,
    pub streamed: bool,
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = if self.streamed { "stream" } else { "copy out" };
        write!(f, "evaluate {:.2}s, build {:.2}s, {last} {:.2}s", self.evaluate, self.build, self.copy_out)
    }
}

/// How to build.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Options {
    /// Derivations built at once (`--max-jobs`); `None`: the engine's CPU count.
    pub jobs: Option<usize>,
    /// Stop at the first failure instead of building everything that can be built.
    pub fail_fast: bool,
}

/// A built archive.
#[derive(Debug, Clone)]
pub(crate) struct Built {
    pub name: String,
    /// The address of the engine that built it.
    pub engine: String,
    /// The platform its image config says (checked against the one asked for).
    pub platform: Platform,
    /// `None` when it went to stdout, into the engine or is handed over.
    pub path: Option<PathBuf>,
    pub size: u64,
    pub seconds: f64,
    /// The images a streamed `--load` loaded.
    pub loaded: Vec<String>,
    /// A streamed image, handed over (see [`Target::hand_over`]); the build waits for its
    /// reader to take it all.
    pub stream: Option<HandOver>,
    pub phases: Phases,
    /// With remote builders: each builder's URI and the derivations of its closure built there.
    pub builders: Option<BTreeMap<String, usize>>,
    /// What it was built from, for provenance.
    pub origin: Box<Origin>,
    /// For a target with `sbom`: the image's closure, read once every build is done.
    pub closure: Option<ClosureSlot>,
}

/// What a build was made from: its derivation, nixpkgs and the nix image.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub drv: String,
    pub nixpkgs: crate::nix::ResolvedNixpkgs,
    pub nix_image: crate::nix::NixImage,
}

/// The closure an image's SBOM is made from, read once every build of its container is done
/// (the licences are evaluated then, with the build's secrets gone). Clones share it, so
/// what `done` hears early gets it too, and a push need not wait for it.
#[derive(Debug, Clone)]
pub(crate) struct ClosureSlot(tokio::sync::watch::Receiver<Option<ClosureRead>>);

type ClosureRead = std::result::Result<Box<crate::sbom::Closure>, String>;

impl ClosureSlot {
    /// Waits for the closure, or why it could not be read.
    pub(crate) async fn get(&self) -> ClosureRead {
        let mut slot = self.0.clone();
        let read = slot.wait_for(Option::is_some).await;
        match read.as_deref() {
            Ok(Some(read)) => read.clone(),
            _ => Err("the build ended before the image's closure was read".to_string()),
        }
    }
}

/// What became of one target.
#[derive(Debug)]
// One per target, never in a hot path: boxing `Built` would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outcome {
    Built(Built),
    Failed {
        error: String,
        seconds: f64,
    },
    /// Not attempted: `--fail-fast` stopped the run first.
    Stopped,
}

/// Checks names and destinations before any engine work. `output` is `-o`: one file (or `-`
/// for stdout) when one name is built for one platform; by default `NAME.tar.gz` in the
/// working directory, `NAME-ARCH.tar.gz` for each of several platforms.
pub(crate) fn plan(
    root: &Path,
    names: &[String],
    platforms: &[Platform],
    output: Option<&Path>,
    load: bool,
) -> Result<Vec<Target>> {
    for name in names {
        project::container_file(root, name)?;
    }
    if output.is_some() && names.len() > 1 {
        bail!("-o names one file, but {} containers were selected (drop -o: each goes to NAME.tar.gz)", names.len());
    }
    if output.is_some() && platforms.len() > 1 {
        bail!(
            "-o names one file, but {} platforms were asked for (drop -o: each goes to NAME-ARCH.tar.gz)",
            platforms.len()
        );
    }
    let each: Vec<Option<&Platform>> =
        if platforms.is_empty() { vec![None] } else { platforms.iter().map(Some).collect() };
    let mut targets = Vec::new();
    for (name, platform) in names.iter().flat_map(|n| each.iter().map(move |p| (n, *p))) {
        let file = match platform {
            Some(p) if platforms.len() > 1 => format!("{name}-{}.tar.gz", p.suffix()),
            _ => format!("{name}.tar.gz"),
        };
        let out = match output {
            Some(p) if p == Path::new("-") => {
                if load {
                    bail!("--load needs the archive in a file: drop -o - or --load");
                }
                Output::Stdout
            }
            Some(p) => Output::File(p.to_path_buf()),
            None => Output::File(PathBuf::from(file)),
        };
        if let Output::File(path) = &out {
            check_writable(path)?;
        }
        targets.push(Target {
            name: name.clone(),
            platform: platform.cloned(),
            output: out,
            sbom: false,
            load,
            hand_over: false,
        });
    }
    Ok(targets)
}

/// Builds every target and returns each one's outcome, in order: one nix container per engine
/// and platform, all at once (a native build finishes, and is pushed, while an emulated one
/// goes on). `done` hears of each archive as soon as it is written. An error is returned only
/// for what concerns them all; with several engines or platforms, what goes wrong with one
/// engine's container (the engine lost mid-build) fails only the targets it was building.
pub(crate) async fn build(
    engines: &Engines,
    nix: &NixOptions,
    root: &Path,
    targets: &[Target],
    options: Options,
    progress: &Progress,
    done: Option<tokio::sync::mpsc::UnboundedSender<Built>>,
) -> Result<Vec<Outcome>> {
    let picks = engines.assign(&targets.iter().map(|t| (t.name.as_str(), t.platform.as_ref())).collect::<Vec<_>>());
    let mut groups: Vec<(Pick, Option<&Platform>)> = Vec::new();
    for (t, pick) in targets.iter().zip(&picks) {
        if !groups.contains(&(*pick, t.platform.as_ref())) {
            groups.push((*pick, t.platform.as_ref()));
        }
    }
    let several_platforms = targets.iter().any(|t| t.platform.as_ref() != targets[0].platform.as_ref());
    let several = groups.len() > 1;
    let runs = groups.iter().map(|&(pick, platform)| {
        let engine = engines.get(pick);
        let indices: Vec<usize> =
            (0..targets.len()).filter(|&i| picks[i] == pick && targets[i].platform.as_ref() == platform).collect();
        let group: Vec<Target> = indices.iter().map(|&i| targets[i].clone()).collect();
        let done = done.clone();
        let mut progress = progress.clone();
        if engines.several() {
            progress = progress.for_item(engine.address());
        }
        if let (Some(p), true) = (platform, several_platforms) {
            progress = progress.for_item(&p.to_string());
        }
        async move {
            let started = Instant::now();
            if engines.several() {
                progress.info(format!("building {} here", names(&group)));
            }
            let jobs = match options.jobs {
                Some(n) => n,
                None => engine.cpus().await,
            };
            let result =
                build_on(engine, (nix, root), &group, platform, (jobs, options.fail_fast), &progress, done).await;
            (indices, engine.address().to_string(), started, result)
        }
    });
    let mut outcomes: Vec<Option<Outcome>> = targets.iter().map(|_| None).collect();
    for (indices, address, started, result) in futures::future::join_all(runs).await {
        let result = match result {
            Ok(result) => result,
            // One engine's trouble is its own targets' when others build the rest.
            Err(e) if several => {
                let error = format!("engine {address}: {e:#}");
                let seconds = started.elapsed().as_secs_f64();
                indices.iter().map(|_| Outcome::Failed { error: error.clone(), seconds }).collect()
            }
            Err(e) => return Err(e),
        };
        for (i, outcome) in indices.into_iter().zip(result) {
            outcomes[i] = Some(outcome);
        }
    }
    let outcomes: Vec<Outcome> = outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Stopped)).collect();
    BuildTimes::load().record(outcomes.iter().filter_map(|o| match o {
        Outcome::Built(b) => Some((b.name.clone(), b.seconds)),
        _ => None,
    }));
    Ok(outcomes)
}

fn names(targets: &[Target]) -> String {
    targets.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// One engine's share for one platform, in one nix container; `jobs` is resolved by now.
async fn build_on(
    engine: &Engine,
    (options, root): (&NixOptions, &Path),
    targets: &[Target],
    platform: Option<&Platform>,
    (jobs, fail_fast): (usize, bool),
    progress: &Progress,
    done: Option<tokio::sync::mpsc::UnboundedSender<Built>>,
) -> Result<Vec<Outcome>> {
    let inputs = Inputs { project: Some(root), role: "build", platform };
    let nix = NixContainer::start(engine, options, inputs, progress).await?;
    let result = build_in(engine, &nix, targets, jobs, fail_fast, progress, done).await;
    let removed = nix.finish().await;
    let outcomes = result?;
    removed?;
    Ok(outcomes)
}

async fn build_in(
    engine: &Engine,
    nix: &NixContainer,
    targets: &[Target],
    jobs: usize,
    fail_fast: bool,
    progress: &Progress,
    done: Option<tokio::sync::mpsc::UnboundedSender<Built>>,
) -> Result<Vec<Outcome>> {
    let started = Instant::now();
    let several = targets.len() > 1;
    let item = |name: &str| if several { progress.for_item(name) } else { progress.clone() };
    let mut outcomes: Vec<Option<Outcome>> = targets.iter().map(|_| None).collect();

    // Evaluate each container apart, so an evaluation error is that container's alone.
    let evaluated: Vec<(Result<String>, f64)> = futures::stream::iter(targets)
        .map(|t| async move {
            item(&t.name).info(format!("evaluating containers/{}/default.nix", t.name));
            let began = Instant::now();
            (nix.instantiate(&t.name).await, began.elapsed().as_secs_f64())
        })
        .buffered(jobs)
        .collect()
        .await;
    let mut building = Vec::new(); // (target index, drv)
                                   // Dropped unfilled on any early return: whoever waits on a slot then hears so.
    let slots: Vec<Option<tokio::sync::watch::Sender<Option<ClosureRead>>>> =
        targets.iter().map(|t| t.sbom.then(|| tokio::sync::watch::channel(None).0)).collect();
    let mut phases: Vec<Phases> = vec![Phases::default(); targets.len()];
    for (i, (result, seconds)) in evaluated.into_iter().enumerate() {
        phases[i].evaluate = seconds;
        match result {
            Ok(drv) => building.push((i, drv)),
            Err(e) => {
                outcomes[i] =
                    Some(Outcome::Failed { error: format!("{e:#}"), seconds: started.elapsed().as_secs_f64() });
            }
        }
    }
    if fail_fast && outcomes.iter().any(Option::is_some) {
        return Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Stopped)).collect());
    }
    if building.is_empty() {
        return Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Stopped)).collect());
    }

    let drvs: Vec<String> = building.iter().map(|(_, d)| d.clone()).collect();
    let outs = nix.outputs(&drvs).await?;
    for (i, _) in &building {
        item(&targets[*i].name).info(format!("building containers/{}/default.nix", targets[*i].name));
    }
    // Archives are copied out as they appear in the store, while nix builds the rest.
    let pending: Mutex<Vec<(usize, String)>> =
        Mutex::new(building.iter().zip(&outs).map(|((i, _), out)| (*i, out.clone())).collect());
    let finished = AtomicBool::new(false);
    let build_started = Instant::now();
    let wake = tokio::sync::Notify::new();
    let copied: Mutex<Vec<(usize, Result<Built>)>> = Mutex::new(Vec::new());
    let poll = async {
        loop {
            // Read before asking the store: after nix has finished, one last round sees all.
            let last = finished.load(Ordering::Acquire);
            let waiting: Vec<String> = pending.lock().await.iter().map(|(_, o)| o.clone()).collect();
            let valid = nix.valid(&waiting).await?;
            let ready: Vec<(usize, String)> = {
                let mut pending = pending.lock().await;
                let (ready, rest) = pending.drain(..).partition(|(_, o)| valid.contains(o));
                *pending = rest;
                ready
            };
            for (i, out) in ready {
                let drv = building.iter().find(|(b, _)| *b == i).map(|(_, d)| d.clone()).unwrap_or_default();
                let origin = Box::new(Origin { drv, nixpkgs: nix.nixpkgs.clone(), nix_image: nix.image.clone() });
                let phases = Phases { build: build_started.elapsed().as_secs_f64(), ..phases[i] };
                let (target, progress) = (&targets[i], item(&targets[i].name));
                let slot = slots[i].as_ref().map(|tx| ClosureSlot(tx.subscribe()));
                let how = (started, phases, origin, slot);
                let result = copy_out((engine, nix), target, &out, how, &progress, done.as_ref()).await;
                copied.lock().await.push((i, result));
            }
            if last || pending.lock().await.is_empty() {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = wake.notified() => {}
            }
        }
    };
    let live = !progress.quiet() && (!several || progress.verbose());
    let realise = async {
        let log = nix.realise(&drvs, jobs, !fail_fast, live).await;
        finished.store(true, Ordering::Release);
        wake.notify_one();
        log
    };
    let (log, polled) = tokio::join!(realise, poll);
    let log = log?;
    polled?;
    for (i, result) in copied.into_inner() {
        outcomes[i] = Some(match result {
            Ok(built) => {
                // Only now: the licences are evaluated, which must not happen while the
                // build's secrets are in the container (see `nix::cache`).
                if let Some(slot) = &slots[i] {
                    let read = match &built.path {
                        Some(path) => crate::sbom::closure(nix, path, &built.name, &item(&built.name)).await,
                        None => Err(anyhow::anyhow!("the SBOM needs the image in a file, and it was streamed")),
                    };
                    slot.send_replace(Some(read.map(Box::new).map_err(|e| format!("{e:#}"))));
                }
                Outcome::Built(built)
            }
            Err(e) => Outcome::Failed { error: format!("{e:#}"), seconds: started.elapsed().as_secs_f64() },
        });
    }
    // The binary caches: what nix built and downloaded; what was built goes up.
    nix.report_cache_use(&log, progress);
    let failing = building.iter().any(|(i, _)| outcomes[*i].is_none());
    let builder_use = nix.report_builders(&log, failing, progress);
    if let Some(usage) = &builder_use {
        for (i, drv) in &building {
            if let Some(Outcome::Built(built)) = &mut outcomes[*i] {
                built.builders = Some(builders_of(nix, drv, usage).await?);
            }
        }
    }
    let built: Vec<(usize, String)> =
        building.iter().filter(|(i, _)| matches!(outcomes[*i], Some(Outcome::Built(_)))).cloned().collect();
    for (i, error) in upload_built(nix, &built, progress).await {
        outcomes[i] = Some(Outcome::Failed { error, seconds: started.elapsed().as_secs_f64() });
    }
    let failed: Vec<(usize, String)> = building.into_iter().filter(|(i, _)| outcomes[*i].is_none()).collect();
    let seconds = started.elapsed().as_secs_f64();
    let reasons: Vec<Option<String>> =
        futures::stream::iter(&failed).then(|(_, drv)| nix.failure_of(drv, &log)).collect().await;
    // What went wrong with builders is every failure's news: nix names only the derivation.
    let builder_trouble: String = builder_use.iter().flat_map(|u| &u.trouble).map(|t| format!("\n  {t}")).collect();
    for ((i, _), reason) in failed.into_iter().zip(reasons) {
        let name = &targets[i].name;
        outcomes[i] = Some(match reason {
            Some(why) => Outcome::Failed {
                error: format!("nix-build containers/{name}/default.nix failed:\n{why}{builder_trouble}"),
                seconds,
            },
            None if fail_fast && builder_trouble.is_empty() => Outcome::Stopped,
            None => Outcome::Failed {
                error: format!(
                    "nix-build containers/{name}/default.nix failed:\n{}{builder_trouble}",
                    crate::nix::error_excerpt(&log)
                ),
                seconds,
            },
        });
    }
    Ok(outcomes.into_iter().map(|o| o.unwrap_or(Outcome::Stopped)).collect())
}

/// Each builder's count of the derivations of `drv`'s closure it built.
async fn builders_of(nix: &NixContainer, drv: &str, usage: &BuilderUse) -> Result<BTreeMap<String, usize>> {
    let closure = nix.requisites(drv).await?;
    let mut counts: BTreeMap<String, usize> = usage.built.keys().map(|uri| (uri.clone(), 0)).collect();
    for (built, on) in &usage.derivations {
        if let (Some(uri), true) = (on, closure.contains(built)) {
            *counts.entry(uri.clone()).or_default() += 1;
        }
    }
    Ok(counts)
}

/// After a build: the closures of the containers built (`(target index, drv)`) go to the
/// `--cache-to` cache. A failed upload is a warning, or, with `--cache-required`, an error
/// for each of them (returned; their archives are written all the same).
async fn upload_built(nix: &NixContainer, built: &[(usize, String)], progress: &Progress) -> Vec<(usize, String)> {
    let Some((url, required)) = nix.caches_to() else {
        return Vec::new();
    };
    if built.is_empty() {
        return Vec::new();
    }
    let drvs: Vec<String> = built.iter().map(|(_, d)| d.clone()).collect();
    match nix.cache_push(&drvs, progress).await {
        Ok(line) => {
            progress.info(line);
            Vec::new()
        }
        Err(e) if required => {
            let error = format!("the archive was written, but the upload to the cache {url} failed: {e:#}");
            built.iter().map(|(i, _)| (*i, error.clone())).collect()
        }
        Err(e) => {
            progress.warn(format!(
                "the upload to the cache {url} failed (the archive is written; --cache-required makes this an \
                 error): {e:#}"
            ));
            Vec::new()
        }
    }
}

/// Copies an archive out, or runs a stream into its destination; tells `done` once it is
/// written (a stream to hand over: before it runs, as its reader must be there).
async fn copy_out(
    (engine, nix): (&Engine, &NixContainer),
    target: &Target,
    out: &str,
    (started, mut phases, origin, closure): (Instant, Phases, Box<Origin>, Option<ClosureSlot>),
    progress: &Progress,
    done: Option<&tokio::sync::mpsc::UnboundedSender<Built>>,
) -> Result<Built> {
    let began = Instant::now();
    let kind = nix.output_kind(out).await?;
    let built = match kind {
        OutputKind::Archive => match (target.hand_over, done, stream::Packing::by_name(out)) {
            (true, Some(done), Some(packing)) => {
                let how = (started, phases, &*origin, closure.clone());
                hand_over_archive(nix, target, out, packing, how, progress, done).await
            }
            _ => copy_archive(nix, target, out, started, progress).await,
        },
        OutputKind::Stream => {
            phases.streamed = true;
            let how = (started, phases, &*origin, closure.clone());
            run_stream((engine, nix), target, out, how, progress, done).await
        }
    };
    let mut built = built?;
    built.origin = origin;
    built.closure = closure;
    phases.copy_out = began.elapsed().as_secs_f64();
    built.phases = phases;
    built.seconds = started.elapsed().as_secs_f64();
    if let (Some(done), None) = (done, &built.stream) {
        if !target.hand_over || built.path.is_some() {
            let _ = done.send(built.clone());
        }
    }
    Ok(built)
}

fn built(target: &Target, nix: &NixContainer, path: Option<PathBuf>, size: u64, started: Instant) -> Built {
    Built {
        name: target.name.clone(),
        engine: nix.engine_address().to_string(),
        platform: nix.platform().clone(),
        path,
        size,
        seconds: started.elapsed().as_secs_f64(),
        loaded: Vec::new(),
        stream: None,
        phases: Phases::default(),
        builders: None,
        // The derivation is set by `copy_out`.
        origin: Box::new(Origin { drv: String::new(), nixpkgs: nix.nixpkgs.clone(), nix_image: nix.image.clone() }),
        closure: None,
    }
}

/// Runs the stream program `out` and takes its image where the target says: handed over,
/// into the engine, or into the file (gzip-compressed unless its name ends in `.tar`) or
/// stdout (uncompressed). The program's own error comes first: what failed on the reading
/// side then follows from it.
async fn run_stream(
    (engine, nix): (&Engine, &NixContainer),
    target: &Target,
    out: &str,
    (started, phases, origin, closure): (Instant, Phases, &Origin, Option<ClosureSlot>),
    progress: &Progress,
    done: Option<&tokio::sync::mpsc::UnboundedSender<Built>>,
) -> Result<Built> {
    let name = &target.name;
    let (tx, image) = stream::channel(nix.platform());
    progress.info(format!("streaming the image of containers/{name}/default.nix"));
    let first = |ran: Result<()>, taken: Result<Built>| ran.and(taken);
    if let (true, Some(done)) = (target.hand_over, done) {
        hand_over(done, target, nix, image, (started, phases, origin, closure));
        nix.run_stream(out, tx).await?;
        return Ok(built(target, nix, None, 0, started));
    }
    if target.load {
        let (ran, loaded) = tokio::join!(nix.run_stream(out, tx), engine.load_stream(image, out));
        let loaded = first(ran, loaded.map(|loaded| Built { loaded, ..built(target, nix, None, 0, started) }))?;
        for image in &loaded.loaded {
            progress.info(format!("loaded {image} from the stream of containers/{name}/default.nix"));
        }
        return Ok(loaded);
    }
    match &target.output {
        Output::Stdout => {
            let write = tokio::task::spawn_blocking(move || -> Result<u64> {
                let mut out = std::io::stdout().lock();
                Ok(std::io::copy(&mut image.into_reader(), &mut out)?)
            });
            let (ran, written) = tokio::join!(nix.run_stream(out, tx), write);
            let size = written.map_err(|e| anyhow::anyhow!("writing the image stopped: {e}"))?;
            first(ran, size.map(|size| built(target, nix, None, size, started)))
        }
        Output::File(path) => {
            let mut file = AtomicFile::create(path)?;
            let compress = !path.to_string_lossy().ends_with(".tar");
            let std_file = file.file.try_clone().await?.into_std().await;
            let write = tokio::task::spawn_blocking(move || write_image(image, std_file, compress));
            let (ran, written) = tokio::join!(nix.run_stream(out, tx), write);
            let size = written.map_err(|e| anyhow::anyhow!("writing the image stopped: {e}"))?;
            let built = first(ran, size.map(|size| built(target, nix, Some(path.clone()), size, started)))?;
            file.flush().await?;
            file.commit().await?;
            progress.info(format!("wrote {} ({})", path.display(), human_bytes(built.size)));
            Ok(built)
        }
    }
}

/// Writes a streamed image to `file`, gzip-compressed or not; returns the bytes written.
fn write_image(image: ImageStream, file: std::fs::File, compress: bool) -> Result<u64> {
    use std::io::Write;
    let mut reader = image.into_reader();
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    let size =
        if compress { stream::gzip(&mut reader, &mut writer)? } else { std::io::copy(&mut reader, &mut writer)? };
    writer.flush()?;
    Ok(size)
}

/// Sends `image` to its taker before it is written (its reader must be there first).
fn hand_over(
    done: &tokio::sync::mpsc::UnboundedSender<Built>,
    target: &Target,
    nix: &NixContainer,
    image: ImageStream,
    (started, phases, origin, closure): (Instant, Phases, &Origin, Option<ClosureSlot>),
) {
    let handed = Built {
        stream: Some(HandOver::new(image)),
        phases,
        origin: Box::new(origin.clone()),
        closure,
        ..built(target, nix, None, 0, started)
    };
    let _ = done.send(handed);
}

/// Hands an archive over (see [`Target::hand_over`]) as it is copied out: unpacked on a
/// thread of its own while the taker reads it, with no file and no second pass for its
/// platform (the stream checks it on the way).
async fn hand_over_archive(
    nix: &NixContainer,
    target: &Target,
    out: &str,
    packing: stream::Packing,
    (started, phases, origin, closure): (Instant, Phases, &Origin, Option<ClosureSlot>),
    progress: &Progress,
    done: &tokio::sync::mpsc::UnboundedSender<Built>,
) -> Result<Built> {
    let (tx, image) = stream::channel(nix.platform());
    progress.info(format!("handing the image of containers/{}/default.nix over as it is copied out", target.name));
    hand_over(done, target, nix, image, (started, phases, origin, closure));
    let (mut writer, reader) = tokio::io::duplex(1 << 20);
    let unpacking = stream::unpack(reader, packing, tx.clone());
    let copying = async {
        let copied = nix.copy_out(out, &mut writer).await;
        drop(writer);
        copied
    };
    let (copied, unpacked) = tokio::join!(copying, unpacking);
    // The copy's own error first: what the unpacking saw then follows from it.
    let failed = match (copied, unpacked) {
        (Err(e), _) | (Ok(_), Err(e)) => e,
        (Ok(size), Ok(())) => return Ok(built(target, nix, None, size, started)),
    };
    let _ = tx.send(Err(archive::SourceError::io(format!("{failed:#}")))).await;
    Err(failed)
}

async fn copy_archive(
    nix: &NixContainer,
    target: &Target,
    out: &str,
    started: Instant,
    progress: &Progress,
) -> Result<Built> {
    let platform = nix.platform().clone();
    let name = target.name.clone();
    match &target.output {
        Output::Stdout => {
            let mut stdout = tokio::io::stdout();
            let size = nix.copy_out(out, &mut stdout).await?;
            Ok(built(target, nix, None, size, started))
        }
        Output::File(path) => {
            let mut file = AtomicFile::create(path)?;
            let size = nix.copy_out(out, &mut file.file).await?;
            file.flush().await?;
            // dockerTools writes the platform nix built on: it must be the one asked for,
            // before the archive is kept, loaded or pushed.
            let temp = file.temp_path().to_path_buf();
            let says = tokio::task::spawn_blocking(move || archive::platform_of(&temp))
                .await
                .map_err(|e| anyhow::anyhow!("reading the archive's config stopped: {e}"))??;
            if says != platform {
                bail!(
                    "containers/{name}/default.nix built an image whose config says {says}, not {platform} \
                     (was it built for another system?)"
                );
            }
            file.commit().await?;
            progress.info(format!("wrote {} ({})", path.display(), human_bytes(size)));
            Ok(built(target, nix, Some(path.clone()), size, started))
        }
    }
}
