//! The version of the app a container ships. In order: a `version = "…"` binding in
//! containers/NAME/default.nix ([`nix_file`]), `ARG CONTAINER_APP_VERSION` in
//! containers/NAME/Dockerfile ([`dockerfile`]), then nixpkgs' own version of the package,
//! evaluated in the nix container against the nixpkgs builds resolve. The files are read
//! without any engine contact; all nixpkgs lookups of one call share one container and one
//! evaluation.

mod dockerfile;
mod nix_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::engine::{Engine, EngineAddress};
use crate::nix::{Inputs, NixContainer, NixOptions, ResolvedNixpkgs};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::project;

pub(crate) use dockerfile::from_dockerfile;
pub(crate) use nix_file::from_default_nix;

/// Where versions are found: the project's files, then nixpkgs, evaluated in a nix container.
#[derive(Clone, Copy)]
pub(crate) struct Sources<'a> {
    /// The project root; `None`: only nixpkgs is asked.
    pub(crate) root: Option<&'a Path>,
    /// Container name -> nixpkgs attribute (`[packages]` in nixctr.toml).
    pub(crate) packages: &'a BTreeMap<String, String>,
    /// The engine; `None`: probe the usual sockets.
    pub(crate) engine: Option<&'a EngineAddress>,
    /// The platform nixpkgs is evaluated for; `None`: the engine's own.
    pub(crate) platform: Option<&'a Platform>,
    pub(crate) nix: &'a NixOptions,
}

/// Where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum From {
    /// default.nix, then the Dockerfile, then nixpkgs.
    Auto,
    /// Only nixpkgs' own version of the package.
    Nixpkgs,
}

/// What a reader found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// A usable version, as written (e.g. "2.17.0", "v1.2").
    Version(String),
    /// The file declares something, but not a usable version: why (for `-v`), e.g.
    /// "`version` is bound to an expression, not a string literal (line 4)",
    /// "`ARG CONTAINER_APP_VERSION` has no default (line 3)".
    Unusable(String),
    /// Nothing relevant in the file.
    Absent,
}

/// Checks a version before it is printed or put in a tag: non-empty, no whitespace or control chars.
pub(crate) fn validate(version: &str) -> std::result::Result<&str, String> {
    if version.is_empty() {
        return Err("version is empty".to_string());
    }
    // Checked before control characters, since tab and newline are both.
    if version.chars().any(char::is_whitespace) {
        return Err(format!("version {version:?} holds whitespace"));
    }
    if version.chars().any(char::is_control) {
        return Err(format!("version {version:?} holds a control character"));
    }
    Ok(version)
}

/// One name's version and where it was found.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Answer {
    pub name: String,
    pub version: String,
    pub source: &'static str,
    pub file: Option<String>,
    pub nixpkgs: Option<ResolvedNixpkgs>,
}

/// One name's lookup: answered from a file, or waiting for nixpkgs.
enum Lookup {
    Found(Answer),
    Nixpkgs { attr: String, tried: Vec<String> },
}

/// Every name's version, in the order given: an answer, or why there is none. Errors that
/// concern no single name (the engine, nix itself) end the whole lookup.
pub(crate) async fn versions(
    sources: Sources<'_>,
    names: &[String],
    from: From,
    progress: &Progress,
) -> Result<Vec<Result<Answer>>> {
    let lookups: Vec<Result<Lookup>> =
        names.iter().map(|name| from_files(sources.root, sources.packages, name, from, progress)).collect();
    let attrs: Vec<String> = lookups
        .iter()
        .filter_map(|l| match l {
            Ok(Lookup::Nixpkgs { attr, .. }) => Some(attr.clone()),
            _ => None,
        })
        .collect();
    let mut evaluated = Vec::new().into_iter();
    let mut nixpkgs = None;
    if !attrs.is_empty() {
        let engine = Engine::connect(sources.engine, progress).await?;
        let nix = NixContainer::start(
            &engine,
            sources.nix,
            Inputs { project: None, role: "version", platform: sources.platform },
            progress,
        )
        .await?;
        let result = nix.versions(&attrs).await;
        nixpkgs = Some(nix.nixpkgs.clone());
        let removed = nix.finish().await;
        evaluated = result?.into_iter();
        removed?;
    }
    let reference = nixpkgs.as_ref().map(|n: &ResolvedNixpkgs| n.reference.clone()).unwrap_or_default();
    let mut answers = Vec::new();
    for (name, lookup) in names.iter().zip(lookups) {
        let answer = match lookup {
            Err(e) => Err(e),
            Ok(Lookup::Found(answer)) => Ok(answer),
            Ok(Lookup::Nixpkgs { attr, mut tried }) => {
                // `nix.versions` answers exactly one value per attribute, in order.
                let found = evaluated.next().unwrap_or(crate::nix::AttrVersion { exists: false, version: None });
                match (found.exists, found.version) {
                    (true, Some(version)) => checked(name, &version, "nixpkgs").map(|()| Answer {
                        name: name.clone(),
                        version,
                        source: "nixpkgs",
                        file: None,
                        nixpkgs: nixpkgs.clone(),
                    }),
                    (exists, _) => {
                        tried.push(if exists {
                            format!("nixpkgs ({reference}) attribute {attr} has no version")
                        } else {
                            format!("nixpkgs ({reference}) has no attribute {attr}")
                        });
                        Err(anyhow::anyhow!("no version for {name}: {}", tried.join("; ")))
                    }
                }
            }
        };
        answers.push(answer);
    }
    Ok(answers)
}

/// The version a container's own files declare, if any: no engine, no nixpkgs.
pub(crate) fn declared(root: &Path, packages: &BTreeMap<String, String>, name: &str) -> Option<String> {
    match from_files(Some(root), packages, name, From::Auto, &Progress::new(true, false)) {
        Ok(Lookup::Found(answer)) => Some(answer.version),
        _ => None,
    }
}

fn from_files(
    root: Option<&Path>,
    packages: &BTreeMap<String, String>,
    name: &str,
    from: From,
    progress: &Progress,
) -> Result<Lookup> {
    let attr = packages.get(name).cloned().unwrap_or_else(|| name.to_string());
    let mut tried = Vec::new();
    let dir = match root {
        Some(root) => Some((root, project::container_dir(root, name)?)),
        None => None,
    };
    match dir {
        Some((root, dir)) if dir.is_dir() && from == From::Auto => {
            for (file, source, read) in [
                ("default.nix", "default.nix", from_default_nix as fn(&str) -> Found),
                ("Dockerfile", "Dockerfile", from_dockerfile as fn(&str) -> Found),
            ] {
                let path = dir.join(file);
                let shown = display(root, &path);
                let text = match std::fs::read_to_string(&path) {
                    Ok(text) => text,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        tried.push(format!("no {shown}"));
                        continue;
                    }
                    Err(e) => bail!("cannot read {}: {e}", path.display()),
                };
                match read(&text) {
                    Found::Version(version) => {
                        checked(name, &version, &shown)?;
                        return Ok(Lookup::Found(Answer {
                            name: name.to_string(),
                            version,
                            source,
                            file: Some(shown),
                            nixpkgs: None,
                        }));
                    }
                    Found::Unusable(why) => {
                        progress.debug(format!("{shown}: {why}; trying the next source"));
                        tried.push(format!("{shown}: {why}"));
                    }
                    Found::Absent => tried.push(format!("{shown} declares no version")),
                }
            }
        }
        Some((_, dir)) if !dir.is_dir() => tried.push(format!("no containers/{name}/")),
        None => tried.push("no project".to_string()),
        _ => {}
    }
    Ok(Lookup::Nixpkgs { attr, tried })
}

fn checked(name: &str, version: &str, source: &str) -> Result<()> {
    if let Err(why) = validate(version) {
        bail!("no usable version for {name}: {why} (from {source})");
    }
    Ok(())
}

fn display(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).map(PathBuf::from).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn version(v: &str) -> Found {
        Found::Version(v.to_string())
    }

    pub(crate) fn unusable(why: &str) -> Found {
        Found::Unusable(why.to_string())
    }

    // --- validate ----------------------------------------------------------------------------

    #[test]
    fn validate_accepts_versions() {
        for v in ["2.17.0", "v1.2", "1.0-rc.1+build.5", "2024-01-01", "1.0-ü"] {
            assert_eq!(validate(v), Ok(v));
        }
    }

    #[test]
    fn validate_rejects_empty() {
        assert_eq!(validate(""), Err("version is empty".to_string()));
    }

    #[test]
    fn validate_rejects_whitespace() {
        assert_eq!(validate("2.17 .0"), Err("version \"2.17 .0\" holds whitespace".to_string()));
        assert_eq!(validate("1.0\n"), Err("version \"1.0\\n\" holds whitespace".to_string()));
        assert_eq!(validate("1.0\u{a0}"), Err("version \"1.0\\u{a0}\" holds whitespace".to_string()));
    }

    #[test]
    fn validate_rejects_control_characters() {
        assert_eq!(validate("1.0\u{1b}[31m"), Err("version \"1.0\\u{1b}[31m\" holds a control character".to_string()));
    }
}
