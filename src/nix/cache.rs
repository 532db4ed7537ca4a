//! The shared nix binary cache, as one nix container sees it: the nix settings its execs get
//! (`extra-substituters`, `extra-trusted-public-keys`), signing and copying a closure to the
//! `--cache-to` store, asking a cache what it holds, and the secrets all that takes.
//!
//! The repository's code is untrusted: `nix-instantiate` evaluates it as root, and with
//! `sandbox = false` its builders run as `nixbld*` users with the run of the container. So a
//! secret is in the container only for the exec that needs it, and never while project code is
//! evaluated ([`Phase`]):
//! - the signing key only for `nix store sign` + `nix copy`, after every build, removed right after;
//! - a netrc only for the execs that reach a cache (the build, the upload), in a root-only
//!   directory (0700, files 0600) that build users cannot read;
//! - `AWS_*` variables only in the environment of the execs that reach an `s3://` store;
//! - never in the container's create config, never printed, never in the store.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;

use super::cache_settings::{read_secret, CacheSettings};
use super::text::{
    built_on, cache_trouble, copied_from, copied_to, error_excerpt, fetch_size, is_building, nix_cmd, says_not_valid,
    store_hint, store_paths, strings, CacheTrouble,
};
use crate::engine::{ContainerGuard, OutputMode};
use crate::progress::Progress;

/// Where a secrets directory goes in the container: outside `/nix` (a volume that stays).
pub(super) const SECRETS_PARENT: &str = "/nixctr";

/// What an exec does, which decides the secrets it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Project code runs as root (`nix-instantiate`, import-from-derivation): no secret at all.
    Evaluate,
    /// `nix-store --realise`: builders run as build users; nix substitutes from the caches.
    Build,
    /// Asking a cache what it holds.
    Query,
    /// Signing and copying to `--cache-to`.
    Upload,
}

/// The cache side of one nix container.
pub(crate) struct Session {
    settings: CacheSettings,
    /// nix settings every exec gets (the container's own, substituters, trusted keys).
    base: Vec<String>,
}

/// Secrets put in the container for one phase, and the environment that uses them. They must
/// be removed with [`Staged::remove`] once the phase's execs are done.
pub(crate) struct Staged {
    dir: Option<String>,
    env: Vec<String>,
    signing_key: Option<String>,
}

impl Staged {
    pub(crate) fn env(&self) -> &[String] {
        &self.env
    }

    /// Removes the secrets. An error means they may still be there: the caller stops.
    pub(crate) async fn remove(self, guard: &ContainerGuard) -> Result<()> {
        let Some(dir) = self.dir else { return Ok(()) };
        let cmd = strings(&["rm", "-rf", &dir]);
        let out = guard
            .exec(&cmd, &[], None, OutputMode::Captured)
            .await
            .context("cannot remove the cache secrets from the container")?;
        if out.exit_code != 0 {
            bail!("cannot remove the cache secrets from the container (rm exit code {})", out.exit_code);
        }
        Ok(())
    }
}

impl Session {
    /// `nix_config` holds lines the container needs anyway (an exec's own `NIX_CONFIG` would
    /// hide the container's). `None` when no cache is configured.
    pub(crate) fn new(settings: &CacheSettings, nix_config: &[String], progress: &Progress) -> Option<Session> {
        if !settings.is_active() && settings.netrc.is_none() {
            return None;
        }
        let mut base: Vec<String> = nix_config.to_vec();
        if !settings.substituters.is_empty() {
            base.push(format!("extra-substituters = {}", settings.substituters.join(" ")));
        }
        if !settings.trusted_public_keys.is_empty() {
            base.push(format!("extra-trusted-public-keys = {}", settings.trusted_public_keys.join(" ")));
        }
        for url in &settings.substituters {
            progress.debug(format!("substituter: {url}"));
        }
        if let Some(url) = &settings.cache_to {
            progress.debug(format!("cache to: {url}"));
        }
        Some(Session { settings: settings.clone(), base })
    }

    pub(crate) fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    /// The environment of an exec that evaluates project code: nix settings, no secret.
    pub(crate) fn eval_env(&self) -> Vec<String> {
        phase_env(&self.settings, &self.base, Phase::Evaluate, "", &[])
    }

    /// Puts in the container what `phase` needs, in a fresh root-only directory.
    pub(crate) async fn stage(&self, guard: &ContainerGuard, phase: Phase) -> Result<Staged> {
        let settings = &self.settings;
        let mut files: Vec<(&str, String)> = Vec::new();
        if phase != Phase::Evaluate {
            if let Some(netrc) = &settings.netrc {
                files.push(("netrc", read_secret(netrc, "netrc file")?));
            }
        }
        if phase == Phase::Upload {
            let key = settings.signing_key.as_ref().ok_or_else(|| anyhow!("no signing key (--signing-key)"))?;
            files.push(("signing-key", read_secret(key, "signing key")?));
        }
        let dir = format!("{SECRETS_PARENT}/secrets-{}", random_hex());
        let aws: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("AWS_")).collect();
        let env = phase_env(settings, &self.base, phase, &dir, &aws);
        if files.is_empty() {
            return Ok(Staged { dir: None, env, signing_key: None });
        }
        let tar = secrets_tar(dir.trim_start_matches('/'), &files)?;
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(tar)) });
        guard.upload(body).await.context("cannot put the cache secrets into the container")?;
        let signing_key = (phase == Phase::Upload).then(|| format!("{dir}/signing-key"));
        Ok(Staged { dir: Some(dir), env, signing_key })
    }

    /// What nix's realise log says about the caches: a line counting what was built and what
    /// downloaded, and a warning for each cache that was refused or did not answer.
    pub(crate) fn report_realise(&self, log: &[String], progress: &Progress) {
        // A remote build's log echoes its `building '…'` line: each derivation counts once.
        let mut drvs: Vec<&str> =
            log.iter().filter(|l| is_building(l)).filter_map(|l| built_on(l)).map(|b| b.0).collect();
        drvs.sort_unstable();
        drvs.dedup();
        let built = drvs.len();
        let mut from: Vec<(String, usize)> = Vec::new();
        for line in log {
            // Outputs copied back from a remote builder (`from 'ssh-ng://'`) were built, not downloaded.
            if let Some((path, url)) = copied_from(line).filter(|(_, url)| !url.starts_with("ssh")) {
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
            let trouble: Vec<(CacheTrouble, &String)> =
                log.iter().filter_map(|l| cache_trouble(l, url).map(|t| (t, l))).collect();
            let refused = trouble.iter().filter(|(t, _)| *t == CacheTrouble::Unsigned).count();
            if refused > 0 {
                progress.warn(format!(
                    "cache {url}: {refused} paths refused: not signed by any key in trusted-public-keys \
                     (check --trusted-public-key); they were built here instead"
                ));
            }
            if trouble.iter().any(|(t, _)| *t == CacheTrouble::NotACache) {
                progress.warn(format!(
                    "cache {url} did not answer as a binary cache (a wrong URL, or it needs a login: --netrc \
                     FILE); nothing was downloaded from it"
                ));
            } else if let Some((_, line)) = trouble.iter().find(|(t, _)| *t == CacheTrouble::Unreachable) {
                progress.warn(format!(
                    "cache {url} does not answer ({}); nothing was downloaded from it",
                    line.trim_start_matches("warning: ")
                ));
            }
        }
    }

    /// Signs and copies to the cache the closure of each derivation built: the output's
    /// runtime closure and the derivation's build-time closure. nix copy sends only what the
    /// cache lacks (asked for real: see [`Phase::Upload`]). Returns a line for the user.
    pub(crate) async fn push(&self, guard: &ContainerGuard, drvs: &[String], progress: &Progress) -> Result<String> {
        let url = self.settings.cache_to.as_deref().ok_or_else(|| anyhow!("no --cache-to cache"))?;
        let mut query = strings(&["nix-store", "--query", "--requisites", "--include-outputs"]);
        query.extend(drvs.iter().cloned());
        let out = guard.exec(&query, &[], None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("nix-store --query --requisites failed:\n{}", error_excerpt(&out.stderr_tail));
        }
        let paths = store_paths(&out.stdout);
        // `--derivation` makes nix take a .drv itself, and an output for its deriver: two lists.
        let (derivations, outputs): (Vec<String>, Vec<String>) =
            paths.iter().cloned().partition(|p| p.ends_with(".drv"));
        progress.debug(format!(
            "cache {url}: signing and copying {} paths ({} derivations)",
            paths.len(),
            derivations.len()
        ));
        let staged = self.stage(guard, Phase::Upload).await?;
        let result = sign_and_copy(guard, &staged, url, [(&outputs, false), (&derivations, true)], progress).await;
        let removed = staged.remove(guard).await;
        let sent = result?;
        removed?;
        Ok(format!("cache {url}: {sent} paths uploaded, {} there already", paths.len() - sent))
    }

    /// Whether the cache at `url` has each of `paths` (`nix path-info --store URL PATH`).
    pub(crate) async fn has(&self, guard: &ContainerGuard, url: &str, paths: &[String]) -> Result<Vec<Result<bool>>> {
        let staged = self.stage(guard, Phase::Query).await?;
        let mut answers = Vec::new();
        for path in paths {
            let cmd = nix_cmd(&["path-info", "--store", url, path]);
            let answer = match guard.exec(&cmd, staged.env(), None, OutputMode::Captured).await {
                Ok(out) if out.exit_code == 0 => Ok(true),
                Ok(out) if says_not_valid(&out.stderr_tail) => Ok(false),
                Ok(out) => Err(anyhow!("cannot ask cache {url}:\n{}", store_hint(&out.stderr_tail))),
                Err(e) => Err(e),
            };
            answers.push(answer);
        }
        staged.remove(guard).await?;
        Ok(answers)
    }
}

/// The environment of an exec of `phase`: nix settings (a netrc in `dir` when one is
/// staged), and the `AWS_*` variables only where an `s3://` store is reached.
fn phase_env(
    settings: &CacheSettings,
    base: &[String],
    phase: Phase,
    dir: &str,
    aws: &[(String, String)],
) -> Vec<String> {
    let mut lines = base.to_vec();
    if matches!(phase, Phase::Query | Phase::Upload) {
        // nix's narinfo disk cache (in the store volume) believes "the cache has it" for
        // 30 days: a cache emptied since would never be refilled.
        lines.push("narinfo-cache-positive-ttl = 0".to_string());
        lines.push("narinfo-cache-negative-ttl = 0".to_string());
    }
    if phase != Phase::Evaluate && settings.netrc.is_some() {
        lines.push(format!("netrc-file = {dir}/netrc"));
    }
    let mut env = vec![format!("NIX_CONFIG={}", lines.join("\n"))];
    let s3 = match phase {
        Phase::Evaluate => false,
        Phase::Build => settings.substituters.iter().any(|u| u.starts_with("s3://")),
        Phase::Query => settings.primary().is_some_and(|u| u.starts_with("s3://")),
        Phase::Upload => settings.cache_to.as_deref().is_some_and(|u| u.starts_with("s3://")),
    };
    if s3 {
        env.extend(aws.iter().map(|(k, v)| format!("{k}={v}")));
    }
    env
}

/// `nix store sign` then `nix copy --to url` for each list; the number of paths sent.
async fn sign_and_copy(
    guard: &ContainerGuard,
    staged: &Staged,
    url: &str,
    lists: [(&Vec<String>, bool); 2],
    progress: &Progress,
) -> Result<usize> {
    let key = staged.signing_key.as_deref().ok_or_else(|| anyhow!("no signing key staged"))?;
    let mut sent = 0;
    for (list, derivation) in lists {
        if list.is_empty() {
            continue;
        }
        let extra: &[&str] = if derivation { &["--derivation"] } else { &[] };
        let mut sign = nix_cmd(&["store", "sign", "--key-file", key]);
        sign.extend(strings(extra));
        sign.extend(list.iter().cloned());
        let out = guard.exec(&sign, staged.env(), None, OutputMode::Captured).await?;
        if out.exit_code != 0 {
            bail!("nix store sign failed (exit code {}):\n{}", out.exit_code, error_excerpt(&out.stderr_tail));
        }
        let mut copy = nix_cmd(&["copy", "--to", url]);
        copy.extend(strings(extra));
        copy.extend(list.iter().cloned());
        let out = guard.exec_keeping(&copy, staged.env(), None, OutputMode::Captured, 100_000).await?;
        for path in out.stderr_tail.iter().filter_map(|l| copied_to(l)) {
            progress.debug(format!("uploaded {path}"));
            sent += 1;
        }
        if out.exit_code != 0 {
            bail!("nix copy --to {url} failed (exit code {}):\n{}", out.exit_code, store_hint(&out.stderr_tail));
        }
    }
    Ok(sent)
}

pub(super) fn random_hex() -> String {
    let mut bytes = [0u8; 12];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}{:x}", hex::encode(bytes), nanos & 0xffff)
}

/// A tar of `dir` (mode 0700) holding `files` (mode 0600), owned by root.
pub(super) fn secrets_tar(dir: &str, files: &[(&str, String)]) -> Result<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_reach_only_the_phases_that_need_them() {
        let settings = CacheSettings {
            substituters: vec!["s3://in?region=x".to_string()],
            cache_to: Some("https://out".to_string()),
            netrc: Some("/n".into()),
            ..Default::default()
        };
        let aws = vec![("AWS_SECRET_ACCESS_KEY".to_string(), "s3cr3t".to_string())];
        let env =
            |phase, settings: &CacheSettings| phase_env(settings, &[], phase, "/nixctr/secrets-x", &aws).join(" ");
        let eval = env(Phase::Evaluate, &settings);
        assert!(!eval.contains("s3cr3t") && !eval.contains("netrc"), "{eval}");
        let build = env(Phase::Build, &settings);
        assert!(build.contains("s3cr3t") && build.contains("netrc-file = /nixctr/secrets-x/netrc"), "{build}");
        assert!(!build.contains("ttl"), "{build}");
        // The upload goes to https: no AWS variable; nix asks the cache afresh.
        let upload = env(Phase::Upload, &settings);
        assert!(!upload.contains("s3cr3t") && upload.contains("narinfo-cache-positive-ttl = 0"), "{upload}");
        let to_s3 = CacheSettings { substituters: Vec::new(), cache_to: Some("s3://out".to_string()), ..settings };
        assert!(!env(Phase::Build, &to_s3).contains("s3cr3t"));
        assert!(env(Phase::Upload, &to_s3).contains("AWS_SECRET_ACCESS_KEY=s3cr3t"));
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
