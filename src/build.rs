//! Building containers: one nix container builds every name of a call, and each archive is
//! copied out to its destination (written whole, or not at all).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::engine::Engine;
use crate::nix::{Inputs, NixContainer};
use crate::output::{check_writable, AtomicFile};
use crate::progress::{human_bytes, Progress};
use crate::project;
use crate::settings::Settings;

/// Where one archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    Stdout,
    File(PathBuf),
}

/// One container to build and where its archive goes.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub name: String,
    pub output: Output,
}

/// A built archive on disk.
pub(crate) struct Built {
    pub path: PathBuf,
}

/// Checks names and destinations before any engine work. `output` is `-o`: one file (or `-`
/// for stdout) when one name is built; by default `NAME.tar.gz` in the working directory.
pub(crate) fn plan(root: &Path, names: &[String], output: Option<&Path>, load: bool) -> Result<Vec<Target>> {
    for name in names {
        project::container_file(root, name)?;
    }
    if output.is_some() && names.len() > 1 {
        bail!("-o names one file, but {} containers were given (build them one at a time)", names.len());
    }
    let mut targets = Vec::new();
    for name in names {
        let out = match output {
            Some(p) if p == Path::new("-") => {
                if load {
                    bail!("--load needs the archive in a file: drop -o - or --load");
                }
                Output::Stdout
            }
            Some(p) => Output::File(p.to_path_buf()),
            None => Output::File(PathBuf::from(format!("{name}.tar.gz"))),
        };
        if let Output::File(path) = &out {
            check_writable(path)?;
        }
        targets.push(Target { name: name.clone(), output: out });
    }
    Ok(targets)
}

/// Builds every target in one container; returns the files written (stdout output is not).
pub(crate) async fn build(
    engine: &Engine,
    settings: &Settings,
    targets: &[Target],
    progress: &Progress,
) -> Result<Vec<Built>> {
    let root = settings.project_root()?;
    let nix = NixContainer::start(engine, settings, Inputs { project: Some(root), role: "build" }, progress).await?;
    let result = async {
        let mut built = Vec::new();
        for target in targets {
            let store_path = nix.build(&target.name).await?;
            match &target.output {
                Output::Stdout => {
                    let mut stdout = tokio::io::stdout();
                    nix.copy_out(&store_path, &mut stdout).await?;
                }
                Output::File(path) => {
                    let mut out = AtomicFile::create(path)?;
                    let size = nix.copy_out(&store_path, &mut out.file).await?;
                    out.commit().await?;
                    progress.info(format!("wrote {} ({})", path.display(), human_bytes(size)));
                    built.push(Built { path: path.clone() });
                }
            }
        }
        Ok::<_, anyhow::Error>(built)
    }
    .await;
    let removed = nix.finish().await;
    let built = result?;
    removed?;
    Ok(built)
}
