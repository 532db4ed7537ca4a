//! What the cache flags and `nixctr.toml` resolve to, and the checks made before any work:
//! store URLs nix can open, well-formed public keys, secret files no one else can read.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine as _;

use crate::progress::Progress;

/// How the build container reaches the network (`--network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Network {
    Bridge,
    Host,
    None,
}

impl Network {
    pub(crate) fn mode(self) -> &'static str {
        match self {
            Network::Bridge => "bridge",
            Network::Host => "host",
            Network::None => "none",
        }
    }
}

/// The cache settings, resolved from flags, environment and `nixctr.toml`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CacheSettings {
    pub(crate) substituters: Vec<String>,
    pub(crate) trusted_public_keys: Vec<String>,
    /// A store URL `nix copy --to` takes.
    pub(crate) cache_to: Option<String>,
    pub(crate) signing_key: Option<PathBuf>,
    pub(crate) netrc: Option<PathBuf>,
    /// A failed upload fails the command (else it is a warning).
    pub(crate) required: bool,
    /// `None`: the engine's default.
    pub(crate) network: Option<Network>,
}

/// One cache setting and what its check found: what it is, or why it cannot work.
pub(crate) struct Finding {
    /// `substituter`, `trusted public key`, `cache-to`, `signing key`, `netrc`.
    pub(crate) what: &'static str,
    pub(crate) result: Result<String>,
}

impl Finding {
    fn new(what: &'static str, result: Result<String>) -> Finding {
        Finding { what, result }
    }
}

/// Store URL schemes nix opens (`nix help-stores`); anything else is refused before a build.
pub(super) const SCHEMES: &[&str] = &["http", "https", "s3", "file", "ssh", "ssh-ng", "local", "daemon", "unix"];

impl CacheSettings {
    /// Whether anything cache-related is configured.
    pub(crate) fn is_active(&self) -> bool {
        !self.substituters.is_empty() || self.cache_to.is_some()
    }

    /// The cache `cache ls` reports on: the one written to, else the first read from.
    pub(crate) fn primary(&self) -> Option<&str> {
        self.cache_to.as_deref().or(self.substituters.first().map(String::as_str))
    }

    /// Checks what can be checked on this machine, before any engine work: the first
    /// [`CacheSettings::findings`] that failed.
    pub(crate) fn check(&self) -> Result<()> {
        match self.findings().into_iter().find_map(|f| f.result.err()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Each setting and what its check found, in the order `check` reports them: the
    /// substituters, the trusted keys, the `--cache-to` store and its signing key, the netrc.
    pub(crate) fn findings(&self) -> Vec<Finding> {
        let mut found = Vec::new();
        for url in &self.substituters {
            let result = check_store_url(url).with_context(|| format!("substituter {url:?}"));
            found.push(Finding::new("substituter", result.map(|()| url.clone())));
        }
        for key in &self.trusted_public_keys {
            let name = key.split_once(':').map_or("", |(name, _)| name);
            let result = check_key(key, 32).map(|()| format!("{name}: parses")).map_err(|why| {
                anyhow!(
                    "trusted public key {key:?}: {why} (give NAME:BASE64, what `nix key convert-secret-to-public` prints)"
                )
            });
            found.push(Finding::new("trusted public key", result));
        }
        if let Some(url) = &self.cache_to {
            let result = check_store_url(url).with_context(|| format!("--cache-to {url:?}"));
            found.push(Finding::new("cache-to", result.map(|()| url.clone())));
            let result = match &self.signing_key {
                None => Err(anyhow!(
                    "--cache-to {url} needs a signing key: --signing-key FILE, NIXCTR_SIGNING_KEY_FILE or \
                     signing-key in nixctr.toml (make one with `nix key generate-secret --key-name NAME-1`)"
                )),
                Some(key) => read_secret(key, "signing key").and_then(|text| match check_key(text.trim(), 64) {
                    // The key's name is public (it is in every signature); the rest is not shown.
                    Ok(()) => Ok(format!(
                        "{} ({}): parses, readable by its owner only",
                        key.display(),
                        text.trim().split_once(':').map_or("", |(name, _)| name)
                    )),
                    Err(why) => Err(anyhow!(
                        "signing key {}: {why}: not a nix secret key (NAME:BASE64, what `nix key generate-secret` \
                         prints)",
                        key.display()
                    )),
                }),
            };
            found.push(Finding::new("signing key", result));
        }
        if let Some(netrc) = &self.netrc {
            let result =
                read_secret(netrc, "netrc file").map(|_| format!("{}: readable by its owner only", netrc.display()));
            found.push(Finding::new("netrc", result));
        }
        found
    }

    /// Warnings about settings that cannot work together.
    pub(crate) fn warn_network(&self, progress: &Progress) {
        if self.network == Some(Network::None) && self.is_active() {
            progress.warn(
                "--network none: the build container has no network, so the binary caches (substituters, \
                 --cache-to) cannot be reached",
            );
        }
    }
}

/// A store URL nix understands: a known scheme, or an absolute path.
pub(super) fn check_store_url(url: &str) -> Result<()> {
    if url.starts_with('/') || url == "auto" {
        return Ok(());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        bail!("not a store URL (http://…, https://…, s3://bucket, file:///dir, ssh-ng://host)");
    };
    if !SCHEMES.contains(&scheme) {
        bail!("nix does not know how to open a {scheme}:// store (it opens {})", SCHEMES.join(", "));
    }
    if rest.is_empty() && scheme != "daemon" && scheme != "local" {
        bail!("names no {}", if scheme == "file" { "directory" } else { "host" });
    }
    Ok(())
}

/// `NAME:BASE64` of a key of `len` bytes (32: public, 64: secret). The error never shows it.
pub(super) fn check_key(key: &str, len: usize) -> std::result::Result<(), String> {
    let (name, data) = key.split_once(':').ok_or("no NAME: in front")?;
    if name.is_empty() {
        return Err("an empty name".to_string());
    }
    match base64::engine::general_purpose::STANDARD.decode(data) {
        Ok(bytes) if bytes.len() == len => Ok(()),
        Ok(bytes) => Err(format!("{} bytes of key, not {len}", bytes.len())),
        Err(_) => Err("not base64 after the name".to_string()),
    }
}

/// A secret file's text; refused when group or others may read it.
pub(super) fn read_secret(path: &Path, what: &str) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{what} {} may be read by group or others (mode {mode:03o}): run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

#[cfg(test)]
mod tests {
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
}
