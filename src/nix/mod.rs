//! What runs inside the nix container: starting it with the store volume and the uploaded
//! sources, resolving nixpkgs as the CI this replaces did (`nix flake metadata`, then
//! `NIX_PATH=nixpkgs=<its store path>`), `nix-build`, and evaluating package versions.

mod builders;
mod cache;
mod cache_settings;
mod closure;
mod text;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::context::{self, Source};
use crate::engine::{ContainerGuard, ContainerSpec, Engine, OutputMode, PullPolicy};
use crate::exit::Unexpected;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::stream::{self, OutputKind, StreamSender};
pub(crate) use builders::{BuilderSettings, BuilderUse, Builders};
use cache::{Phase, Session};
pub(crate) use cache_settings::{CacheSettings, Network};
pub(crate) use closure::{DrvNames, PathInfo};
pub(crate) use text::error_excerpt;
use text::{failed_builder, nix_cmd, store_paths, strings};

/// Where the project lands in the container.
pub(crate) const WORKSPACE: &str = "/workspace";
/// The user a built program of the project runs as (the nix image has `nobody`, and /tmp
/// is world-writable there).
const NOBODY: &str = "65534:65534";
/// Where a local nixpkgs directory lands.
pub(crate) const NIXPKGS_DIR: &str = "/nixctr/nixpkgs";
/// nix's download cache lives in the store volume, so a warm build fetches nothing.
const CACHE_HOME: &str = "/nix/var/nixctr/cache";

/// Where `nix-store --realise` roots what it builds (`--add-root`): in the container's /tmp, not
/// in the store volume, so the roots keep the outputs while they are copied out and go with the
/// container. Their registrations in the volume (`gcroots/auto`, one per output number, reused)
/// then dangle, which nix's collector ignores and clears.
const GC_ROOT: &str = "/tmp/nixctr-gcroots/result";
/// Lines of nix's log kept while building many derivations, to find each failure in.
const REALISE_LOG_LINES: usize = 20_000;
/// The end of a failed builder's log shown with its error.
const LOG_LINES_SHOWN: usize = 10;

/// Where nixpkgs comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Nixpkgs {
    /// A flake reference, resolved inside the container (`nixpkgs`, `github:NixOS/nixpkgs/…`).
    Flake(String),
    /// A directory on this machine, uploaded with the project.
    Local(std::path::PathBuf),
}

/// What a nix container is made of: the image, its store, nixpkgs and the binary caches.
#[derive(Debug, Clone)]
pub(crate) struct NixOptions {
    pub(crate) image: String,
    pub(crate) pull: PullPolicy,
    pub(crate) nixpkgs: Nixpkgs,
    /// A throwaway store instead of the store volume.
    pub(crate) no_cache: bool,
    pub(crate) cache: CacheSettings,
    /// Remote builders nix may send derivations to (`--builder`).
    pub(crate) builders: BuilderSettings,
}

/// nixpkgs after resolution: the reference asked for and the store path it became.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResolvedNixpkgs {
    #[serde(rename = "ref")]
    pub(crate) reference: String,
    pub(crate) path: String,
    /// Its NAR hash (`sha256-…`) and git revision, when the lock says them (provenance).
    #[serde(skip)]
    pub(crate) nar_hash: Option<String>,
    #[serde(skip)]
    pub(crate) revision: Option<String>,
}

/// A running nix container.
pub(crate) struct NixContainer {
    guard: ContainerGuard,
    platform: Platform,
    pub(crate) nixpkgs: ResolvedNixpkgs,
    /// The nix image it runs, as the engine has it.
    pub(crate) image: NixImage,
    progress: Progress,
    /// The binary caches it reads from and writes to, and their secrets (see `cache`).
    cache: Option<Session>,
    /// The remote builders of its builds (see `builders`).
    builders: Option<Builders>,
    /// The nix settings every exec needs (an exec's own `NIX_CONFIG` hides the container's).
    nix_config: Vec<String>,
    /// The nix system evaluated for when that differs from the container's: its derivations
    /// go to builders of that system, and the container runs natively.
    eval_system: Option<String>,
}

/// A nix image: its name and the engine's ID for it (the digest of its config).
#[derive(Debug, Clone)]
pub(crate) struct NixImage {
    pub(crate) name: String,
    pub(crate) id: String,
    /// The `NAME@sha256:…` digests the engine knows it by (none for an image built here).
    pub(crate) digests: Vec<String>,
}

/// What to put in the container besides nix.
pub(crate) struct Inputs<'a> {
    /// The project root, uploaded to /workspace (builds need it; version lookups do not).
    pub(crate) project: Option<&'a std::path::Path>,
    pub(crate) role: &'static str,
    /// The platform to build for; `None`: the engine's own.
    pub(crate) platform: Option<&'a Platform>,
}

impl NixContainer {
    /// Pulls the image if needed, starts the container on the store volume, uploads the
    /// inputs and resolves nixpkgs.
    pub(crate) async fn start(
        engine: &Engine,
        options: &NixOptions,
        inputs: Inputs<'_>,
        progress: &Progress,
    ) -> Result<NixContainer> {
        options.cache.check()?;
        options.cache.warn_network(progress);
        // Only builds realise derivations: other roles need no builder (nor its key).
        let builders = if inputs.role == "build" { Builders::new(&options.builders)? } else { None };
        let native = engine.native_platform().await?;
        let platform = inputs.platform.unwrap_or(&native);
        progress.debug(format!("platform: {platform} (the engine's own: {native})"));
        // A builder of the platform asked for builds it natively: the container runs on the
        // engine's own platform and only evaluates for that one.
        let eval_system = match (&builders, platform.nix_system()) {
            (Some(b), Some(system)) if platform != &native && !b.for_system(&system).is_empty() => {
                let uris: Vec<&str> = b.for_system(&system).iter().map(|m| m.uri.as_str()).collect();
                progress.info(format!(
                    "building for {platform} on a {native} engine: evaluated here, built by the {system} builder{} \
                     {} (no emulation)",
                    if uris.len() > 1 { "s" } else { "" },
                    uris.join(", ")
                ));
                Some(system)
            }
            _ => None,
        };
        let run_on = if eval_system.is_some() { &native } else { platform };
        if let Some(b) = builders.as_ref().filter(|b| b.only()) {
            let system = run_on.nix_system().unwrap_or_default();
            let wanted = eval_system.as_deref().unwrap_or(&system);
            if b.for_system(wanted).is_empty() && !b.machines().iter().any(|m| m.systems.is_empty()) {
                bail!(
                    "--builders-only: no builder builds {wanted} (the builders list {}): name one whose machine spec \
                     lists it, e.g. `ssh-ng://HOST {wanted}`",
                    b.machines().iter().flat_map(|m| m.systems.clone()).collect::<Vec<_>>().join(", ")
                );
            }
        }
        // The image of that platform, by ID: the tag may name another platform's by now.
        let image_id = engine.ensure_image(&options.image, options.pull, run_on, progress).await?;
        let mut volumes = Vec::new();
        let mut env = Vec::new();
        // Lines every NIX_CONFIG of this container needs (an exec's own hides the container's).
        let mut nix_config = Vec::new();
        if run_on != &native {
            progress.info(format!(
                "building for {platform} on a {native} engine: emulated, and slower than a native build"
            ));
            // seccomp filters cannot be loaded under QEMU's user-mode emulation.
            env.push("NIX_CONFIG=filter-syscalls = false".to_string());
            nix_config.push("filter-syscalls = false".to_string());
        }
        if !options.no_cache {
            let volume = engine.store_volume(&image_id).await?;
            progress.debug(format!("nix store: volume {volume}"));
            volumes.push((volume, "/nix".to_string()));
            env.push(format!("XDG_CACHE_HOME={CACHE_HOME}"));
        }
        let network = options.cache.network.map(|n| n.mode().to_string());
        let spec = ContainerSpec { image: image_id.clone(), role: inputs.role, volumes, env, network };
        let guard = ContainerGuard::start(engine, spec, progress).await.map_err(|e| cannot_run(e, run_on, &native))?;
        let cache = Session::new(&options.cache, &nix_config, progress);

        let mut sources = Vec::new();
        if let Some(project) = inputs.project {
            sources.push(Source { dir: project.to_path_buf(), prefix: WORKSPACE.trim_start_matches('/').to_string() });
        }
        // (what nix resolves, what the user is shown)
        let (reference, shown) = match &options.nixpkgs {
            Nixpkgs::Flake(reference) => (reference.clone(), reference.clone()),
            Nixpkgs::Local(dir) => {
                sources.push(Source { dir: dir.clone(), prefix: NIXPKGS_DIR.trim_start_matches('/').to_string() });
                (format!("path:{NIXPKGS_DIR}"), dir.display().to_string())
            }
        };
        if !sources.is_empty() {
            let started = std::time::Instant::now();
            let (body, walk) = context::tar_stream(sources);
            let sent = guard.upload(body).await;
            let walked = walk.await.map_err(|e| anyhow!("the upload thread failed: {e}"))?;
            let stats = match (walked, sent) {
                // The walk stopped because the engine stopped taking the tar: that is the news.
                (Err(w), Err(e)) if crate::pipe::receiver_stopped(&w) => return Err(e),
                (walked, sent) => {
                    let stats = walked.context("cannot send the project")?;
                    sent?;
                    stats
                }
            };
            progress.debug(format!(
                "context: {} files, {} bytes in {:.2}s",
                stats.files,
                stats.bytes,
                started.elapsed().as_secs_f64()
            ));
        }
        let flake = resolve_nixpkgs(&guard, &reference, &shown, progress).await?;
        let nixpkgs =
            ResolvedNixpkgs { reference: shown, path: flake.path, nar_hash: flake.nar_hash, revision: flake.revision };
        let digests = engine.repo_digests(&image_id).await?;
        let image = NixImage { name: options.image.clone(), id: image_id, digests };
        Ok(NixContainer {
            guard,
            platform: platform.clone(),
            nixpkgs,
            image,
            progress: progress.clone(),
            cache,
            builders,
            nix_config,
            eval_system,
        })
    }

    /// The address of the engine it runs on.
    pub(crate) fn engine_address(&self) -> &str {
        self.guard.engine_address()
    }

    /// The platform it builds for.
    pub(crate) fn platform(&self) -> &Platform {
        &self.platform
    }

    /// The environment of an exec that evaluates project code: no secret (see `cache`).
    fn eval_env(&self) -> Vec<String> {
        let mut env = vec![format!("NIX_PATH=nixpkgs={}", self.nixpkgs.path)];
        if let Some(cache) = &self.cache {
            env.extend(cache.eval_env());
        }
        match &self.eval_system {
            Some(system) => with_nix_config(env, &self.nix_config, &[format!("system = {system}")]),
            None => env,
        }
    }

    /// Says where nix built the derivations of a realise, and what went wrong with builders.
    pub(crate) fn report_builders(&self, log: &[String], failed: bool, progress: &Progress) -> Option<BuilderUse> {
        self.builders.as_ref().map(|b| b.report(log, failed, progress))
    }

    /// Whether built containers go to a cache (`--cache-to`).
    pub(crate) fn caches_to(&self) -> Option<(&str, bool)> {
        let cache = self.cache.as_ref()?;
        let settings = cache.settings();
        Some((settings.cache_to.as_deref()?, settings.required))
    }

    /// Reports what nix's realise log says about the caches (when any is configured).
    pub(crate) fn report_cache_use(&self, log: &[String], progress: &Progress) {
        if let Some(cache) = self.cache.as_ref().filter(|c| c.settings().is_active()) {
            cache.report_realise(log, progress);
        }
    }

    /// Signs and copies the closures of `drvs` (and their outputs) to the `--cache-to` cache.
    /// The signing key is in the container only meanwhile.
    pub(crate) async fn cache_push(&self, drvs: &[String], progress: &Progress) -> Result<String> {
        match &self.cache {
            Some(cache) => cache.push(&self.guard, drvs, progress).await,
            None => bail!("no cache to write to (--cache-to)"),
        }
    }

    /// Whether the cache at `url` has each of `paths`.
    pub(crate) async fn cache_has(&self, url: &str, paths: &[String]) -> Result<Vec<Result<bool>>> {
        match &self.cache {
            Some(cache) => cache.has(&self.guard, url, paths).await,
            None => bail!("no cache configured"),
        }
    }

    /// Evaluates `containers/NAME/default.nix` into its derivation (`nix-instantiate`).
    pub(crate) async fn instantiate(&self, name: &str) -> Result<String> {
        let file = format!("containers/{name}/default.nix");
        let cmd = strings(&["nix-instantiate", "--extra-experimental-features", "nix-command flakes", &file]);
        let out = self.guard.exec(&cmd, &self.eval_env(), Some(WORKSPACE), OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("cannot evaluate {file} (exit code {}):\n{}", out.exit_code, error_excerpt(&out.stderr_tail));
        }
        store_paths(&out.stdout).pop().ok_or_else(|| anyhow!("nix-instantiate {file} printed no derivation"))
    }

    /// Builds the derivations in one nix invocation, so what they share builds once and the
    /// rest in parallel (`--max-jobs`). With `keep_going`, a failure stops only what depends
    /// on it. Returns nix's stderr lines for [`failure_of`]; success is read from the store.
    pub(crate) async fn realise(
        &self,
        drvs: &[String],
        jobs: usize,
        keep_going: bool,
        live: bool,
    ) -> Result<Vec<String>> {
        // --builders-only: nix's own way to build nothing here.
        let jobs = if self.builders.as_ref().is_some_and(Builders::only) { 0 } else { jobs };
        let mut cmd = strings(&["nix-store", "--realise", "--add-root", GC_ROOT, "--max-jobs", &jobs.to_string()]);
        if keep_going {
            cmd.push("--keep-going".to_string());
        }
        cmd.extend(drvs.iter().cloned());
        let mode = if live { OutputMode::Live } else { OutputMode::Captured };
        // Builders run as build users, who cannot read what is staged (root only, 0600).
        let mut env = vec![format!("NIX_PATH=nixpkgs={}", self.nixpkgs.path)];
        // Builders substitute from the caches themselves when caches are configured.
        let substitutes = self.cache.as_ref().is_some_and(|c| !c.settings().substituters.is_empty());
        let builders = match &self.builders {
            Some(builders) => Some(builders.stage(&self.guard, substitutes).await?),
            None => None,
        };
        let staged = match &self.cache {
            Some(cache) => match cache.stage(&self.guard, Phase::Build).await {
                Ok(staged) => Some(staged),
                Err(e) => {
                    if let Some(builders) = builders {
                        builders.remove(&self.guard).await?;
                    }
                    return Err(e);
                }
            },
            None => None,
        };
        env.extend(staged.as_ref().map(|s| s.env().to_vec()).unwrap_or_default());
        if let Some(builders) = &builders {
            env.extend(builders.env.iter().cloned());
            env = with_nix_config(env, &self.nix_config, &builders.nix_config);
        }
        let out = self.guard.exec_keeping(&cmd, &env, Some(WORKSPACE), mode, REALISE_LOG_LINES).await;
        let removed = match staged {
            Some(staged) => staged.remove(&self.guard).await,
            None => Ok(()),
        };
        let removed_keys = match builders {
            Some(builders) => builders.remove(&self.guard).await,
            None => Ok(()),
        };
        // The exec's own error says more than the removal's that follows from it.
        let out = out?;
        removed?;
        removed_keys?;
        self.progress.debug(format!("nix-store --realise: exit code {}", out.exit_code));
        Ok(out.stderr_tail)
    }

    /// The output path of each derivation, in order.
    pub(crate) async fn outputs(&self, drvs: &[String]) -> Result<Vec<String>> {
        let mut cmd = strings(&["nix-store", "--query", "--outputs"]);
        cmd.extend(drvs.iter().cloned());
        let out = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
        let paths = store_paths(&out.stdout);
        if out.exit_code != 0 || paths.len() != drvs.len() {
            return Err(Unexpected(format!(
                "nix-store --query --outputs answered {} paths for {} derivations (exit code {}):\n{}",
                paths.len(),
                drvs.len(),
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            ))
            .into());
        }
        Ok(paths)
    }

    /// Those of `paths` that are in the store, built.
    pub(crate) async fn valid(&self, paths: &[String]) -> Result<Vec<String>> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = strings(&["nix-store", "--check-validity", "--print-invalid"]);
        cmd.extend(paths.iter().cloned());
        let out = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!(
                "nix-store --check-validity failed (exit code {}):\n{}",
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            );
        }
        let invalid = store_paths(&out.stdout);
        Ok(paths.iter().filter(|p| !invalid.contains(p)).cloned().collect())
    }

    /// The store paths `drv` needs, itself included (`nix-store --query --requisites`).
    pub(crate) async fn requisites(&self, drv: &str) -> Result<Vec<String>> {
        let cmd = strings(&["nix-store", "--query", "--requisites", drv]);
        let out = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("nix-store --query --requisites failed:\n{}", error_excerpt(&out.stderr_tail));
        }
        Ok(store_paths(&out.stdout))
    }

    /// Why `drv` did not build: nix's error for each derivation of its closure that failed,
    /// with the end of that builder's log.
    pub(crate) async fn failure_of(&self, drv: &str, log: &[String]) -> Option<String> {
        let failed: Vec<&str> = log.iter().filter_map(|l| failed_builder(l)).collect();
        let cmd = strings(&["nix-store", "--query", "--requisites", drv]);
        let closure = match self.guard.exec(&cmd, &[], None, OutputMode::Captured).await {
            Ok(out) if out.exit_code == 0 => store_paths(&out.stdout),
            _ => Vec::new(),
        };
        let mut lines = Vec::new();
        for failed in failed.iter().filter(|f| closure.iter().any(|c| c == *f)) {
            lines.push(format!("builder for '{failed}' failed"));
            let cmd = strings(&["nix-store", "--read-log", failed]);
            if let Ok(out) = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await {
                let log: Vec<&str> = out.stdout.lines().filter(|l| !l.trim().is_empty()).collect();
                lines.extend(log[log.len().saturating_sub(LOG_LINES_SHOWN)..].iter().map(|l| format!("  {l}")));
            }
        }
        // None: nothing of its own closure failed (nix stopped before building it).
        (!lines.is_empty()).then(|| lines.iter().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"))
    }

    /// The `version` of each nixpkgs attribute, in one evaluation.
    pub(crate) async fn versions(&self, attrs: &[String]) -> Result<Vec<AttrVersion>> {
        let expr = versions_expr(&self.nixpkgs.path, attrs)?;
        let cmd = nix_cmd(&["eval", "--impure", "--json", "--expr", &expr]);
        let out = self.guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("nix eval failed (exit code {}):\n{}", out.exit_code, error_excerpt(&out.stderr_tail));
        }
        let found: Vec<AttrVersion> = serde_json::from_str(out.stdout.trim())
            .map_err(|e| Unexpected(format!("nix eval printed something unexpected ({e}): {:?}", out.stdout)))?;
        if found.len() != attrs.len() {
            return Err(
                Unexpected(format!("nix eval answered {} values for {} names", found.len(), attrs.len())).into()
            );
        }
        Ok(found)
    }

    /// Copies a store path's file out of the container.
    pub(crate) async fn copy_out<W: tokio::io::AsyncWrite + Unpin>(
        &self,
        store_path: &str,
        dest: &mut W,
    ) -> Result<u64> {
        self.guard.copy_file_out(store_path, dest).await
    }

    /// Whether a built output is an archive file or a program that streams one.
    pub(crate) async fn output_kind(&self, store_path: &str) -> Result<OutputKind> {
        if let Some(kind) = stream::kind_by_name(store_path) {
            return Ok(kind);
        }
        stream::kind_by_mode(store_path, self.guard.file_mode(store_path).await?)
    }

    /// Runs the stream program at `store_path` (built, so evaluation is over) and sends its
    /// stdout, the image, into `tx`; if it fails, its error goes last into `tx` too, so the
    /// reader does not take what came before as the whole image. Runs with no environment
    /// of ours (no secret), as `nobody`, in /tmp.
    pub(crate) async fn run_stream(&self, store_path: &str, tx: StreamSender) -> Result<()> {
        let cmd = vec![store_path.to_string()];
        // The program is the project's (its default.nix made it): never root, which could read
        // what a concurrent realise has staged (see `cache::Phase`).
        let result = match self.guard.exec_streaming(&cmd, NOBODY, Some("/tmp"), &tx).await {
            Ok(out) if out.exit_code == 0 => Ok(()),
            Ok(out) => Err(anyhow!(
                "{store_path} failed (exit code {}) while writing the image:\n{}",
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            )),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            let _ = tx.send(Err(crate::archive::SourceError::io(format!("{e:#}")))).await;
        }
        result
    }

    /// Removes the container.
    pub(crate) async fn finish(self) -> Result<()> {
        self.guard.remove().await
    }
}

/// `env` with `lines` added to its `NIX_CONFIG`, or a `NIX_CONFIG` of `base` and `lines` when it
/// has none (an exec's own `NIX_CONFIG` hides the container's).
fn with_nix_config(mut env: Vec<String>, base: &[String], lines: &[String]) -> Vec<String> {
    match env.iter_mut().find(|e| e.starts_with("NIX_CONFIG=")) {
        Some(config) => {
            for line in lines {
                config.push('\n');
                config.push_str(line);
            }
        }
        None => env.push(format!("NIX_CONFIG={}", base.iter().chain(lines).cloned().collect::<Vec<_>>().join("\n"))),
    }
    env
}

/// An engine that cannot run `platform` says "exec format error": say what fixes it.
fn cannot_run(e: anyhow::Error, platform: &Platform, native: &Platform) -> anyhow::Error {
    if !format!("{e:#}").contains("exec format error") {
        return e;
    }
    e.context(format!(
        "the engine cannot run {platform} containers (it is {native}): on Docker Desktop enable Rosetta or \
         QEMU emulation; on Linux install qemu-user-static with binfmt (fix-binary flag); or name an engine \
         of that platform with --engine"
    ))
}

/// What nixpkgs `reference` resolves to (`shown` is what the user named).
async fn resolve_nixpkgs(
    guard: &ContainerGuard,
    reference: &str,
    shown: &str,
    progress: &Progress,
) -> Result<FlakeMetadata> {
    progress.debug(format!("resolving nixpkgs {shown}"));
    let cmd = nix_cmd(&["flake", "metadata", reference, "--json"]);
    let out = guard.exec(&cmd, &[], None, OutputMode::Captured).await?;
    if out.exit_code != 0 {
        bail!(
            "cannot resolve nixpkgs {shown:?} (nix flake metadata exit code {}):\n{}\n  \
             offline? point --nixpkgs (or `nixpkgs` in nixctr.toml) at a local nixpkgs directory",
            out.exit_code,
            error_excerpt(&out.stderr_tail)
        );
    }
    let flake =
        parse_flake_metadata(&out.stdout).with_context(|| format!("cannot read nix flake metadata for {shown:?}"))?;
    progress.debug(format!("nixpkgs: {}", flake.path));
    Ok(flake)
}

/// What `nix flake metadata --json` says of a flake: its store path, and the locked NAR hash
/// and git revision when it has them.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct FlakeMetadata {
    path: String,
    nar_hash: Option<String>,
    revision: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFlakeMetadata {
    path: String,
    revision: Option<String>,
    #[serde(default)]
    locked: RawLocked,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawLocked {
    nar_hash: Option<String>,
    rev: Option<String>,
}

/// Reads `nix flake metadata --json` output.
pub(crate) fn parse_flake_metadata(json: &str) -> Result<FlakeMetadata> {
    let meta: RawFlakeMetadata = serde_json::from_str(json.trim())?;
    if !meta.path.starts_with("/nix/store/") {
        bail!("path {:?} is not in /nix/store", meta.path);
    }
    let revision = meta.revision.or(meta.locked.rev);
    Ok(FlakeMetadata { path: meta.path, nar_hash: meta.locked.nar_hash, revision })
}

/// One attribute's answer: whether nixpkgs has it, and its version if it is a string.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub(crate) struct AttrVersion {
    pub(crate) exists: bool,
    pub(crate) version: Option<String>,
}

/// A nix expression giving `[{exists, version}]` for each attribute path, evaluated against
/// the flake's `legacyPackages` (what `nix eval nixpkgs#PKG.version` reads), or its
/// `default.nix` for a flake without them.
pub(crate) fn versions_expr(nixpkgs_path: &str, attrs: &[String]) -> Result<String> {
    let mut items = String::new();
    for attr in attrs {
        let selector = attr_selector(attr)?;
        items.push_str(&format!(
            "(let r = builtins.tryEval (let v = pkgs.{selector}.version or null; in if builtins.isString v then v else null); \
             in {{ exists = pkgs ? {selector}; version = if r.success then r.value else null; }}) "
        ));
    }
    Ok(format!(
        "let flake = builtins.getFlake \"path:{nixpkgs_path}\"; \
         pkgs = if flake ? legacyPackages then flake.legacyPackages.${{builtins.currentSystem}} else import flake.outPath {{ }}; \
         in [ {items}]"
    ))
}

/// `python3Packages.requests` -> `"python3Packages"."requests"`; refuses what cannot be an
/// attribute path, so nothing the user typed becomes nix code.
fn attr_selector(attr: &str) -> Result<String> {
    let ok = !attr.is_empty()
        && attr.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '\'' | '+'))
        });
    if !ok {
        bail!("{attr:?} is not a nixpkgs attribute name (letters, digits, _ - ' + and dots)");
    }
    Ok(attr.split('.').map(|p| format!("\"{p}\"")).collect::<Vec<_>>().join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flake_metadata_path_is_read() {
        let json = r#"{"description":"x","lastModified":1,"locked":{"lastModified":1,"narHash":"sha256-AAA=","path":"/nixctr/nixpkgs","type":"path"},"path":"/nix/store/abc-source","url":"path:/nixctr/nixpkgs"}"#;
        let meta = parse_flake_metadata(json).unwrap();
        assert_eq!(
            meta,
            FlakeMetadata {
                path: "/nix/store/abc-source".to_string(),
                nar_hash: Some("sha256-AAA=".to_string()),
                revision: None
            }
        );
        let github = r#"{"locked":{"narHash":"sha256-B=","owner":"NixOS","repo":"nixpkgs","rev":"0123abc","type":"github"},"path":"/nix/store/def-source","revision":"0123abc"}"#;
        assert_eq!(parse_flake_metadata(github).unwrap().revision.as_deref(), Some("0123abc"));
        assert!(parse_flake_metadata(r#"{"path":"/tmp/x"}"#).is_err());
        assert!(parse_flake_metadata("not json").is_err());
    }

    #[test]
    fn nix_config_lines_are_added_to_the_exec_own() {
        let lines = vec!["builders = x".to_string()];
        let base = vec!["filter-syscalls = false".to_string()];
        let env = with_nix_config(vec!["A=1".to_string()], &base, &lines);
        assert_eq!(env, vec!["A=1", "NIX_CONFIG=filter-syscalls = false\nbuilders = x"]);
        let env = with_nix_config(vec!["NIX_CONFIG=substituters = y".to_string()], &base, &lines);
        assert_eq!(env, vec!["NIX_CONFIG=substituters = y\nbuilders = x"]);
    }

    #[test]
    fn attribute_names_are_quoted_and_checked() {
        assert_eq!(attr_selector("ntfy-sh").unwrap(), "\"ntfy-sh\"");
        assert_eq!(attr_selector("python3Packages.requests").unwrap(), "\"python3Packages\".\"requests\"");
        assert!(attr_selector("a\"; builtins.exec").is_err());
        assert!(attr_selector("a..b").is_err());
        assert!(attr_selector("${x}").is_err());
    }
}
