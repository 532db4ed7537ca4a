//! The shared nix binary cache: reading from caches (`extra-substituters` and
//! `extra-trusted-public-keys` added to the build container's nix settings), writing to one
//! after a build (the image's closure and its derivation's build-time closure, signed, then
//! `nix copy --to`), `nixctr cache push` / `cache ls`, and the secrets that takes.
//!
//! Secrets (the signing key, a netrc file, `AWS_*` variables) reach the container only through
//! the API: files in a tar uploaded into a fresh directory (mode 0700, files 0600) that is
//! removed after use, and variables of the one exec that needs them. Never in the container's
//! create config, never printed, never in the store.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;

use crate::engine::{ContainerGuard, Engine, OutputMode};

mod settings;

use crate::progress::Progress;
use settings::read_secret;
pub(crate) use settings::{CacheSettings, Network};

/// Where the secrets directory goes in the container: outside `/nix` (a volume that stays).
const SECRETS_PARENT: &str = "/nixctr";

/// The cache side of one nix container: the nix settings and secrets its execs get.
pub(crate) struct Session {
    settings: CacheSettings,
    /// `NIX_CONFIG=…` (and `AWS_*`) for the execs that substitute or upload.
    env: Vec<String>,
    /// The uploaded secrets directory, removed after use.
    secrets: Option<String>,
    signing_key: Option<String>,
}

impl Session {
    /// Uploads the secrets into the container and builds the exec environment. `nix_config`
    /// holds lines the container needs anyway (they would otherwise be hidden by this
    /// exec's `NIX_CONFIG`).
    pub(crate) async fn prepare(
        guard: &ContainerGuard,
        settings: &CacheSettings,
        nix_config: &[String],
        progress: &Progress,
    ) -> Result<Option<Session>> {
        if !settings.is_active() && settings.netrc.is_none() {
            return Ok(None);
        }
        let mut files: Vec<(&str, String)> = Vec::new();
        if let (Some(_), Some(key)) = (&settings.cache_to, &settings.signing_key) {
            files.push(("signing-key", read_secret(key, "signing key")?));
        }
        if let Some(netrc) = &settings.netrc {
            files.push(("netrc", read_secret(netrc, "netrc file")?));
        }
        let dir = format!("{SECRETS_PARENT}/secrets-{}", random_hex());
        let secrets = if files.is_empty() {
            None
        } else {
            let tar = secrets_tar(dir.trim_start_matches('/'), &files)?;
            let body = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(tar)) });
            guard.upload(body).await.context("cannot put the cache secrets into the container")?;
            Some(dir.clone())
        };
        let mut lines: Vec<String> = nix_config.to_vec();
        if !settings.substituters.is_empty() {
            lines.push(format!("extra-substituters = {}", settings.substituters.join(" ")));
        }
        if !settings.trusted_public_keys.is_empty() {
            lines.push(format!("extra-trusted-public-keys = {}", settings.trusted_public_keys.join(" ")));
        }
        if settings.netrc.is_some() {
            lines.push(format!("netrc-file = {dir}/netrc"));
        }
        let mut env = vec![format!("NIX_CONFIG={}", lines.join("\n"))];
        if settings.uses_s3() {
            env.extend(std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).map(|(k, v)| format!("{k}={v}")));
        }
        for url in &settings.substituters {
            progress.debug(format!("substituter: {url}"));
        }
        if let Some(url) = &settings.cache_to {
            progress.debug(format!("cache to: {url}"));
        }
        let signing_key = secrets.as_ref().filter(|_| settings.cache_to.is_some()).map(|d| format!("{d}/signing-key"));
        Ok(Some(Session { settings: settings.clone(), env, secrets, signing_key }))
    }

    pub(crate) fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The environment of the execs that substitute or upload.
    pub(crate) fn env(&self) -> &[String] {
        &self.env
    }

    /// Removes the secrets directory (the container goes soon after anyway).
    pub(crate) async fn forget(&self, guard: &ContainerGuard) {
        if let Some(dir) = &self.secrets {
            let cmd = vec!["rm".to_string(), "-rf".to_string(), dir.clone()];
            let _ = guard.exec(&cmd, &[], None, OutputMode::Captured).await;
        }
    }

    /// What nix's realise log says about the caches: a line counting what was built and what
    /// downloaded, and a warning for each cache that was refused or did not answer.
    pub(crate) fn report_realise(&self, log: &[String], progress: &Progress) {
        let built = log.iter().filter(|l| l.starts_with("building '/nix/store/")).count();
        let mut from: Vec<(String, usize)> = Vec::new();
        for line in log {
            if let Some((path, url)) = copied_from(line) {
                progress.debug(format!("substituted {path} from {url}"));
                match from.iter_mut().find(|(u, _)| *u == url) {
                    Some((_, n)) => *n += 1,
                    None => from.push((url.to_string(), 1)),
                }
            }
        }
        let downloaded: usize = from.iter().map(|(_, n)| n).sum();
        let size = match downloaded {
            0 => String::new(),
            _ => log.iter().rev().find_map(|l| fetch_size(l)).map(|s| format!(" ({s})")).unwrap_or_default(),
        };
        let sources = from.iter().map(|(u, n)| format!("{n} from {u}")).collect::<Vec<_>>().join(", ");
        progress.info(format!(
            "nix: {built} paths built, {downloaded} downloaded{size}{}",
            if sources.is_empty() { String::new() } else { format!(": {sources}") }
        ));
        for url in &self.settings.substituters {
            let url = url.trim_end_matches('/');
            let refused = log.iter().filter(|l| l.contains("not signed by any of the keys") && l.contains(url)).count();
            if refused > 0 {
                progress.warn(format!(
                    "cache {url}: {refused} paths refused: not signed by any key in trusted-public-keys \
                     (check --trusted-public-key); they were built here instead"
                ));
            }
            if log.iter().any(|l| l.contains("does not appear to be a binary cache") && l.contains(url)) {
                progress.warn(format!(
                    "cache {url} did not answer as a binary cache (a wrong URL, or it needs a login: --netrc \
                     FILE); nothing was downloaded from it"
                ));
            } else if let Some(line) = log.iter().find(|l| {
                (l.starts_with("warning: unable to download") || l.contains("HTTP error 401")) && l.contains(url)
            }) {
                progress.warn(format!(
                    "cache {url} does not answer ({}); nothing was downloaded from it",
                    line.trim_start_matches("warning: ")
                ));
            }
        }
    }

    /// Signs and copies to the cache the closure of each `(drv, out)` built: the output's
    /// runtime closure and the derivation's build-time closure. nix copy sends only what the
    /// cache lacks. Returns a line for the user.
    pub(crate) async fn push(&self, guard: &ContainerGuard, drvs: &[String], progress: &Progress) -> Result<String> {
        let url = self.settings.cache_to.as_deref().ok_or_else(|| anyhow!("no --cache-to cache"))?;
        let key = self.signing_key.as_deref().ok_or_else(|| anyhow!("no signing key"))?;
        let mut query = strings(&["nix-store", "--query", "--requisites", "--include-outputs"]);
        query.extend(drvs.iter().cloned());
        let out = guard.exec(&query, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("nix-store --query --requisites failed:\n{}", crate::nix::error_excerpt(&out.stderr_tail));
        }
        let paths: Vec<String> =
            out.stdout.lines().map(str::trim).filter(|l| l.starts_with("/nix/store/")).map(str::to_string).collect();
        // `--derivation` makes nix take a .drv itself, and an output for its deriver: two lists.
        let (derivations, outputs): (Vec<String>, Vec<String>) =
            paths.iter().cloned().partition(|p| p.ends_with(".drv"));
        progress.debug(format!(
            "cache {url}: signing and copying {} paths ({} derivations)",
            paths.len(),
            derivations.len()
        ));
        let mut sent = 0;
        for (list, derivation) in [(&outputs, false), (&derivations, true)] {
            if list.is_empty() {
                continue;
            }
            let extra: &[&str] = if derivation { &["--derivation"] } else { &[] };
            let mut sign = nix_cmd(&["store", "sign", "--key-file", key]);
            sign.extend(extra.iter().map(|s| s.to_string()));
            sign.extend(list.iter().cloned());
            let out = guard.exec(&sign, &self.env, None, OutputMode::Captured).await?;
            if out.exit_code != 0 {
                bail!(
                    "nix store sign failed (exit code {}):\n{}",
                    out.exit_code,
                    crate::nix::error_excerpt(&out.stderr_tail)
                );
            }
            let mut copy = nix_cmd(&["copy", "--to", url]);
            copy.extend(extra.iter().map(|s| s.to_string()));
            copy.extend(list.iter().cloned());
            let out = guard.exec_keeping(&copy, &self.env, None, OutputMode::Captured, 100_000).await?;
            for line in &out.stderr_tail {
                if let Some(path) = line.strip_prefix("copying path '").and_then(|r| r.split_once('\'')).map(|(p, _)| p)
                {
                    progress.debug(format!("uploaded {path}"));
                    sent += 1;
                }
            }
            if out.exit_code != 0 {
                bail!("nix copy --to {url} failed (exit code {}):\n{}", out.exit_code, hint(&out.stderr_tail));
            }
        }
        Ok(format!("cache {url}: {sent} paths uploaded, {} there already", paths.len() - sent))
    }

    /// Whether `path` is in the cache (`nix path-info --store URL PATH`).
    pub(crate) async fn has(&self, guard: &ContainerGuard, url: &str, path: &str) -> Result<bool> {
        let cmd = nix_cmd(&["path-info", "--store", url, path]);
        let out = guard.exec(&cmd, &self.env, None, OutputMode::Captured).await?;
        if out.exit_code == 0 {
            return Ok(true);
        }
        if out.stderr_tail.iter().any(|l| l.contains("is not valid")) {
            return Ok(false);
        }
        bail!("cannot ask cache {url}:\n{}", hint(&out.stderr_tail))
    }
}

/// nix's error, with what it likely means.
fn hint(tail: &[String]) -> String {
    let mut text = crate::nix::error_excerpt(tail);
    let all = tail.join("\n");
    if all.contains("does not appear to be a binary cache") || all.contains("401") {
        text.push_str(
            "\n  (it did not answer as a binary cache: a wrong URL, or a login is needed or wrong: --netrc FILE)",
        );
    } else if [
        "Couldn't connect",
        "Could not connect",
        "Failed to connect",
        "Connection refused",
        "Connection reset",
        "resolve host",
        "Timeout",
        "timed out",
    ]
    .iter()
    .any(|s| all.contains(s))
    {
        text.push_str("\n  (it does not answer: is it up, and can the build container reach it? --network host)");
    } else if all.contains("don't know how to open") {
        text.push_str("\n  (nix does not understand this store URL)");
    }
    text
}

/// `(path, url)` of nix's `copying path '…' from '…'...` line.
fn copied_from(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_start().strip_prefix("copying path '")?;
    let (path, rest) = rest.split_once('\'')?;
    let rest = rest.strip_prefix(" from '")?;
    let (url, _) = rest.split_once('\'')?;
    Some((path, url))
}

/// `0.01 MiB download` of nix's `these N paths will be fetched (0.01 MiB download, …)` line.
fn fetch_size(line: &str) -> Option<String> {
    let rest = line.split_once("will be fetched (")?.1;
    let (size, _) = rest.split_once(',')?;
    Some(size.trim().to_string())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn nix_cmd(args: &[&str]) -> Vec<String> {
    let mut cmd = strings(&["nix", "--extra-experimental-features", "nix-command flakes"]);
    cmd.extend(strings(args));
    cmd
}

fn random_hex() -> String {
    let mut bytes = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}{:x}", hex::encode(bytes), nanos & 0xffff)
}

/// A tar of `dir` (mode 0700) holding `files` (mode 0600), owned by root.
fn secrets_tar(dir: &str, files: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o700);
    header.set_uid(0);
    header.set_gid(0);
    header.set_size(0);
    header.set_mtime(0);
    tar.append_data(&mut header, format!("{dir}/"), std::io::empty())?;
    for (name, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o600);
        header.set_uid(0);
        header.set_gid(0);
        header.set_size(text.len() as u64);
        header.set_mtime(0);
        tar.append_data(&mut header, format!("{dir}/{name}"), text.as_bytes())?;
    }
    Ok(tar.into_inner()?)
}

/// After a build: the closures of the containers built (`(target index, drv)`) go to the
/// `--cache-to` cache. A failed upload is a warning, or, with `--cache-required`, an error
/// for each of them (returned; their archives are written all the same).
pub(crate) async fn after_build(
    nix: &crate::nix::NixContainer,
    built: &[(usize, String)],
    progress: &Progress,
) -> Vec<(usize, String)> {
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

/// `nixctr cache push NAME…`: copies containers already built in the store volume to the
/// cache, without building.
pub(crate) async fn push_built(
    engine: &Engine,
    settings: &crate::settings::Settings,
    names: &[String],
    progress: &Progress,
) -> Result<()> {
    if settings.cache.cache_to.is_none() {
        bail!("cache push needs a cache to write to: --cache-to URL (or cache-to in nixctr.toml)");
    }
    if settings.no_cache {
        bail!("cache push copies what is in the store volume: drop --no-cache (a throwaway store holds nothing built)");
    }
    let root = settings.project_root()?;
    for name in names {
        crate::project::container_file(root, name)?;
    }
    let inputs = crate::nix::Inputs { project: Some(root), role: "cache", platform: settings.platforms.first() };
    let nix = crate::nix::NixContainer::start(engine, settings, inputs, progress).await?;
    let result = async {
        let mut drvs = Vec::new();
        for name in names {
            drvs.push(nix.instantiate(name).await?);
        }
        let outs = nix.outputs(&drvs).await?;
        let valid = nix.valid(&outs).await?;
        let missing: Vec<&String> =
            names.iter().zip(&outs).filter(|(_, o)| !valid.contains(o)).map(|(n, _)| n).collect();
        if !missing.is_empty() {
            let list = missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ");
            bail!(
                "not built in the store volume of {}: {list} (its current output is not there; run `nixctr build \
                 {list}` first)",
                settings.nix_image
            );
        }
        let line = nix.cache_push(&drvs, progress).await?;
        progress.info(line);
        for (name, out) in names.iter().zip(&outs) {
            crate::output::line(format_args!("{name}\t{out}"))?;
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let removed = nix.finish().await;
    result?;
    removed
}

/// `nixctr cache ls`, for the configured cache: each container's current output, and whether
/// the cache has it.
pub(crate) async fn list(
    engine: &Engine,
    settings: &crate::settings::Settings,
    names: &[String],
    progress: &Progress,
) -> Result<()> {
    let Some(url) = settings.cache.primary().map(str::to_string) else {
        return Ok(());
    };
    let root = settings.project_root()?;
    let inputs = crate::nix::Inputs { project: Some(root), role: "cache", platform: settings.platforms.first() };
    let nix = crate::nix::NixContainer::start(engine, settings, inputs, progress).await?;
    let result = async {
        let answers: Vec<(String, Result<(String, bool)>)> = futures::stream::iter(names)
            .map(|name| {
                let nix = &nix;
                let url = url.as_str();
                async move {
                    let found = async {
                        let drv = nix.instantiate(name).await?;
                        let out = nix.outputs(std::slice::from_ref(&drv)).await?.remove(0);
                        let has = nix.cache_has(url, &out).await?;
                        Ok((out, has))
                    }
                    .await;
                    (name.clone(), found)
                }
            })
            .buffered(4)
            .collect()
            .await;
        for (name, answer) in answers {
            match answer {
                Ok((out, true)) => crate::output::line(format_args!("{name}\tcached\t{out}\t{url}"))?,
                Ok((out, false)) => crate::output::line(format_args!("{name}\tmissing\t{out}\t{url}"))?,
                Err(e) => {
                    let first = format!("{e:#}").lines().next().unwrap_or_default().to_string();
                    progress.warn(format!("{name}: {first}"));
                    crate::output::line(format_args!("{name}\tunknown\t-\t{url}"))?;
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    let removed = nix.finish().await;
    result?;
    removed
}

#[cfg(test)]
mod tests {
    use super::settings::*;
    use super::*;

    #[test]
    fn store_urls_are_checked() {
        assert!(check_store_url("http://127.0.0.1:5081").is_ok());
        assert!(check_store_url("s3://bucket?endpoint=minio:9000").is_ok());
        assert!(check_store_url("file:///tmp/cache").is_ok());
        assert!(check_store_url("ssh-ng://builder").is_ok());
        assert!(check_store_url("ftp://x").unwrap_err().to_string().contains("ftp://"));
        assert!(check_store_url("cache.example.com").is_err());
    }

    #[test]
    fn keys_are_checked_without_showing_them() {
        let public = "nixctr-test-1:Wu7cCvxtulxmupL5SOFvCZ6oxfa7mFTeQxyMmXE0pdE=";
        assert!(check_key(public, 32).is_ok());
        assert!(check_key(public, 64).is_err());
        let err = check_key("nixctr-test-1:not base64!", 32).unwrap_err();
        assert!(!err.contains("not base64!"), "{err}");
        assert!(check_key("nocolon", 32).is_err());
    }

    #[test]
    fn copied_lines_are_read() {
        let line = "copying path '/nix/store/abc-x' from 'http://127.0.0.1:5081/t'...";
        assert_eq!(copied_from(line), Some(("/nix/store/abc-x", "http://127.0.0.1:5081/t")));
        assert_eq!(copied_from("copying path '/nix/store/abc-x' to 'http://c'..."), None);
        let fetched = "these 3 paths will be fetched (0.05 MiB download, 0.20 MiB unpacked):";
        assert_eq!(fetch_size(fetched).as_deref(), Some("0.05 MiB download"));
    }

    #[test]
    fn secrets_tar_is_private() {
        let tar = secrets_tar("nixctr/secrets-x", &[("netrc", "machine h password p".to_string())]).unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let modes: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(
            modes,
            vec![("nixctr/secrets-x/".to_string(), 0o700), ("nixctr/secrets-x/netrc".to_string(), 0o600)]
        );
    }
}
