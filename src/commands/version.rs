//! `nixctr version NAME…`: the version of the app a container ships. In order: a
//! `version = "…"` binding in containers/NAME/default.nix, `ARG CONTAINER_APP_VERSION` in
//! containers/NAME/Dockerfile, then nixpkgs' own version of the package, evaluated in the nix
//! container against the nixpkgs `nixctr build` resolves. The files are read without any
//! engine contact; all nixpkgs lookups share one container and one evaluation.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::cli::{VersionArgs, VersionFrom};
use crate::engine::Engine;
use crate::nix::{Inputs, NixContainer};
use crate::progress::Progress;
use crate::project;
use crate::settings::Settings;
use crate::version_sources::{self, Found};

#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub name: String,
    pub version: String,
    pub source: &'static str,
    pub file: Option<String>,
    pub nixpkgs: Option<crate::nix::ResolvedNixpkgs>,
}

/// One name's lookup: answered from a file, or waiting for nixpkgs.
enum Lookup {
    Found(Answer),
    Nixpkgs { attr: String, tried: Vec<String> },
}

pub async fn run(settings: &Settings, args: VersionArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let answers = versions(settings, &args.names, args.from, &progress).await?;
    let several = answers.len() > 1;
    for answer in &answers {
        if args.json {
            println!("{}", serde_json::to_string(answer)?);
        } else if several {
            println!("{} {}", answer.name, answer.version);
        } else {
            println!("{}", answer.version);
        }
    }
    Ok(())
}

/// Every name's version, in the order given, or the first error.
pub async fn versions(
    settings: &Settings,
    names: &[String],
    from: VersionFrom,
    progress: &Progress,
) -> Result<Vec<Answer>> {
    let lookups = names.iter().map(|name| from_files(settings, name, from, progress)).collect::<Result<Vec<_>>>()?;
    let attrs: Vec<String> = lookups
        .iter()
        .filter_map(|l| match l {
            Lookup::Nixpkgs { attr, .. } => Some(attr.clone()),
            Lookup::Found(_) => None,
        })
        .collect();
    let mut evaluated = Vec::new().into_iter();
    let mut nixpkgs = None;
    if !attrs.is_empty() {
        let engine = Engine::connect(settings.engine.as_deref(), progress).await?;
        let nix = NixContainer::start(&engine, settings, Inputs { project: None, role: "version" }, progress).await?;
        let result = nix.versions(&attrs).await;
        nixpkgs = Some(nix.nixpkgs.clone());
        let removed = nix.finish().await;
        evaluated = result?.into_iter();
        removed?;
    }
    let mut answers = Vec::new();
    for (name, lookup) in names.iter().zip(lookups) {
        let answer = match lookup {
            Lookup::Found(answer) => answer,
            Lookup::Nixpkgs { attr, mut tried } => {
                let Some(found) = evaluated.next() else {
                    bail!("nix eval answered fewer values than names");
                };
                let reference = nixpkgs.as_ref().map(|n| n.reference.clone()).unwrap_or_default();
                let version = match (found.exists, found.version) {
                    (true, Some(v)) => v,
                    (exists, _) => {
                        tried.push(if exists {
                            format!("nixpkgs ({reference}) attribute {attr} has no version")
                        } else {
                            format!("nixpkgs ({reference}) has no attribute {attr}")
                        });
                        bail!("no version for {name}: {}", tried.join("; "));
                    }
                };
                checked(name, &version, "nixpkgs")?;
                Answer { name: name.clone(), version, source: "nixpkgs", file: None, nixpkgs: nixpkgs.clone() }
            }
        };
        answers.push(answer);
    }
    Ok(answers)
}

fn from_files(settings: &Settings, name: &str, from: VersionFrom, progress: &Progress) -> Result<Lookup> {
    let attr = settings.packages.get(name).cloned().unwrap_or_else(|| name.to_string());
    let mut tried = Vec::new();
    let dir = match &settings.root {
        Some(root) => Some(project::container_dir(root, name)?),
        None => None,
    };
    match dir {
        Some(dir) if dir.is_dir() && from == VersionFrom::Auto => {
            let root = settings.project_root()?;
            for (file, source, read) in [
                ("default.nix", "default.nix", version_sources::from_default_nix as fn(&str) -> Found),
                ("Dockerfile", "Dockerfile", version_sources::from_dockerfile as fn(&str) -> Found),
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
        Some(dir) if !dir.is_dir() => tried.push(format!("no containers/{name}/")),
        None => tried.push("no project".to_string()),
        _ => {}
    }
    Ok(Lookup::Nixpkgs { attr, tried })
}

fn checked(name: &str, version: &str, source: &str) -> Result<()> {
    if let Err(why) = version_sources::validate(version) {
        bail!("no usable version for {name}: {why} (from {source})");
    }
    Ok(())
}

fn display(root: &Path, path: &Path) -> String {
    path.strip_prefix(root).map(PathBuf::from).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}
