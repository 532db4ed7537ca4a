//! What runs inside the nix container: starting it with the store volume and the uploaded
//! sources, resolving nixpkgs as the CI this replaces did (`nix flake metadata`, then
//! `NIX_PATH=nixpkgs=<its store path>`), `nix-build`, and evaluating package versions.

mod cache;
mod cache_settings;
mod text;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::context::{self, Source};
use crate::engine::{ContainerGuard, ContainerSpec, Engine, OutputMode, PullPolicy};
use crate::exit::Unexpected;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::stream::{self, OutputKind, StreamSender};
use cache::{Phase, Session};
pub(crate) use cache_settings::{CacheSettings, Network};
pub(crate) use text::error_excerpt;
use text::{failed_builder, nix_cmd, store_paths, strings};

/// Where the project lands in the container.
pub(crate) const WORKSPACE: &str = "/workspace";
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
}

/// nixpkgs after resolution: the reference asked for and the store path it became.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ResolvedNixpkgs {
    #[serde(rename = "ref")]
    pub(crate) reference: String,
    pub(crate) path: String,
}

/// A running nix container.
pub(crate) struct NixContainer {
    guard: ContainerGuard,
    platform: Platform,
    pub(crate) nixpkgs: ResolvedNixpkgs,
    progress: Progress,
    /// The binary caches it reads from and writes to, and their secrets (see `cache`).
    cache: Option<Session>,
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
        let native = engine.native_platform().await?;
        let platform = inputs.platform.unwrap_or(&native);
        progress.debug(format!("platform: {platform} (the engine's own: {native})"));
        // The image of that platform, by ID: the tag may name another platform's by now.
        let image_id = engine.ensure_image(&options.image, options.pull, platform, progress).await?;
        let mut volumes = Vec::new();
        let mut env = Vec::new();
        // Lines every NIX_CONFIG of this container needs (an exec's own hides the container's).
        let mut nix_config = Vec::new();
        if platform != &native {
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
        let guard =
            ContainerGuard::start(engine, spec, progress).await.map_err(|e| cannot_run(e, platform, &native))?;
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
        let path = resolve_nixpkgs(&guard, &reference, &shown, progress).await?;
        let nixpkgs = ResolvedNixpkgs { reference: shown, path };
        Ok(NixContainer { guard, platform: platform.clone(), nixpkgs, progress: progress.clone(), cache })
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
        env
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
        let mut cmd = strings(&["nix-store", "--realise", "--add-root", GC_ROOT, "--max-jobs", &jobs.to_string()]);
        if keep_going {
            cmd.push("--keep-going".to_string());
        }
        cmd.extend(drvs.iter().cloned());
        let mode = if live { OutputMode::Live } else { OutputMode::Captured };
        // Builders run as build users, who cannot read what is staged (root only, 0600).
        let mut env = vec![format!("NIX_PATH=nixpkgs={}", self.nixpkgs.path)];
        let staged = match &self.cache {
            Some(cache) => Some(cache.stage(&self.guard, Phase::Build).await?),
            None => None,
        };
        env.extend(staged.as_ref().map(|s| s.env().to_vec()).unwrap_or_default());
        let out = self.guard.exec_keeping(&cmd, &env, Some(WORKSPACE), mode, REALISE_LOG_LINES).await;
        let removed = match staged {
            Some(staged) => staged.remove(&self.guard).await,
            None => Ok(()),
        };
        // The exec's own error says more than the removal's that follows from it.
        let out = out?;
        removed?;
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
    /// of ours (no secret) in /tmp.
    pub(crate) async fn run_stream(&self, store_path: &str, tx: StreamSender) -> Result<()> {
        let cmd = vec![store_path.to_string()];
        let result = match self.guard.exec_streaming(&cmd, &[], Some("/tmp"), &tx).await {
            Ok(out) if out.exit_code == 0 => Ok(()),
            Ok(out) => Err(anyhow!(
                "{store_path} failed (exit code {}) while writing the image:\n{}",
                out.exit_code,
                error_excerpt(&out.stderr_tail)
            )),
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            let _ = tx.send(Err(std::io::Error::other(format!("{e:#}")))).await;
        }
        result
    }

    /// Removes the container.
    pub(crate) async fn finish(self) -> Result<()> {
        self.guard.remove().await
    }
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

/// The store path nixpkgs `reference` resolves to (`shown` is what the user named).
async fn resolve_nixpkgs(guard: &ContainerGuard, reference: &str, shown: &str, progress: &Progress) -> Result<String> {
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
    let path =
        parse_flake_path(&out.stdout).with_context(|| format!("cannot read nix flake metadata for {shown:?}"))?;
    progress.debug(format!("nixpkgs: {path}"));
    Ok(path)
}

#[derive(Deserialize)]
struct FlakeMetadata {
    path: String,
}

/// The store path in `nix flake metadata --json` output.
pub(crate) fn parse_flake_path(json: &str) -> Result<String> {
    let meta: FlakeMetadata = serde_json::from_str(json.trim())?;
    if !meta.path.starts_with("/nix/store/") {
        bail!("path {:?} is not in /nix/store", meta.path);
    }
    Ok(meta.path)
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
        let json = r#"{"description":"x","lastModified":1,"locked":{"path":"/nixctr/nixpkgs","type":"path"},"path":"/nix/store/abc-source","url":"path:/nixctr/nixpkgs"}"#;
        assert_eq!(parse_flake_path(json).unwrap(), "/nix/store/abc-source");
        assert!(parse_flake_path(r#"{"path":"/tmp/x"}"#).is_err());
        assert!(parse_flake_path("not json").is_err());
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
