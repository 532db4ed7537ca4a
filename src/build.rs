//! Building containers: one nix container and one upload of the project for the whole
//! selection; every container is evaluated, then all are built by one nix invocation, so what
//! they share builds once and the rest in parallel. Each archive is copied out as soon as it
//! is in the store (while the others still build) and written whole, or not at all.

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
    /// `None` when it went to stdout.
    pub path: Option<PathBuf>,
    pub size: u64,
    pub seconds: f64,
    /// With remote builders: each builder's URI and the derivations of its closure built there.
    pub builders: Option<BTreeMap<String, usize>>,
    /// What it was built from, for provenance.
    pub origin: Box<Origin>,
    /// For a target with `sbom`: the image's closure, or why it could not be read (in the
    /// outcome `build` returns; not yet in what `done` hears).
    pub closure: Option<std::result::Result<Box<crate::sbom::Closure>, String>>,
}

/// What a build was made from: its derivation, nixpkgs and the nix image.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub drv: String,
    pub nixpkgs: crate::nix::ResolvedNixpkgs,
    pub nix_image: crate::nix::NixImage,
}

/// What became of one target.
#[derive(Debug)]
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
        targets.push(Target { name: name.clone(), platform: platform.cloned(), output: out, sbom: false });
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
    let result = build_in(&nix, targets, jobs, fail_fast, progress, done).await;
    let removed = nix.finish().await;
    let outcomes = result?;
    removed?;
    Ok(outcomes)
}

async fn build_in(
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
    let evaluated: Vec<Result<String>> = futures::stream::iter(targets)
        .map(|t| async move {
            item(&t.name).info(format!("evaluating containers/{}/default.nix", t.name));
            nix.instantiate(&t.name).await
        })
        .buffered(jobs)
        .collect()
        .await;
    let mut building = Vec::new(); // (target index, drv)
    for (i, result) in evaluated.into_iter().enumerate() {
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
                let result = copy_out(nix, &targets[i], &out, origin, started, &item(&targets[i].name)).await;
                if let (Ok(built), Some(done)) = (&result, &done) {
                    let _ = done.send(built.clone());
                }
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
            Ok(mut built) => {
                // Only now: the licences are evaluated, which must not happen while the
                // build's secrets are in the container (see `nix::cache`).
                if let (true, Some(path)) = (targets[i].sbom, &built.path) {
                    let closure = crate::sbom::closure(nix, path, &built.name, &item(&built.name)).await;
                    built.closure = Some(closure.map(Box::new).map_err(|e| format!("{e:#}")));
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

async fn copy_out(
    nix: &NixContainer,
    target: &Target,
    out: &str,
    origin: Box<Origin>,
    started: Instant,
    progress: &Progress,
) -> Result<Built> {
    let platform = nix.platform().clone();
    let name = target.name.clone();
    let engine = nix.engine_address().to_string();
    match &target.output {
        Output::Stdout => {
            let mut stdout = tokio::io::stdout();
            let size = nix.copy_out(out, &mut stdout).await?;
            Ok(Built {
                name,
                engine,
                platform,
                path: None,
                size,
                seconds: started.elapsed().as_secs_f64(),
                builders: None,
                origin,
                closure: None,
            })
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
            Ok(Built {
                name,
                engine,
                platform,
                path: Some(path.clone()),
                size,
                seconds: started.elapsed().as_secs_f64(),
                builders: None,
                origin,
                closure: None,
            })
        }
    }
}
