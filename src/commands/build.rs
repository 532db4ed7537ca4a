//! `nixctr build NAME…`: one nix container builds every name, each archive is copied out
//! to a temporary file beside its destination and renamed into place, so the destination
//! holds a whole archive or keeps what it had.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::BuildArgs;
use crate::engine::Engine;
use crate::nix::{Inputs, NixContainer};
use crate::progress::{human_bytes, Progress};
use crate::project;
use crate::settings::Settings;

/// Where one archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout,
    File(PathBuf),
}

/// A built archive on disk.
pub struct Built {
    pub name: String,
    pub path: PathBuf,
}

pub async fn run(settings: &Settings, args: BuildArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let outputs = plan(settings, &args.names, args.output.as_deref(), args.load)?;
    let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
    let built = build(&engine, settings, &outputs, &progress).await?;
    for b in built {
        if args.load {
            for image in engine.load_archive(&b.path).await? {
                progress.info(format!("loaded {image} from {}", b.path.display()));
                println!("{image}");
            }
        } else {
            println!("{}", b.path.display());
        }
    }
    Ok(())
}

/// Checks names and destinations before any engine work.
pub fn plan(settings: &Settings, names: &[String], output: Option<&Path>, load: bool) -> Result<Vec<(String, Output)>> {
    let root = settings.project_root()?;
    for name in names {
        project::container_file(root, name)?;
    }
    if output.is_some() && names.len() > 1 {
        bail!("-o names one file, but {} containers were given (build them one at a time)", names.len());
    }
    let mut outputs = Vec::new();
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
        outputs.push((name.clone(), out));
    }
    Ok(outputs)
}

/// Builds each name in one container; returns the files written (stdout output is not).
pub async fn build(
    engine: &Engine,
    settings: &Settings,
    outputs: &[(String, Output)],
    progress: &Progress,
) -> Result<Vec<Built>> {
    let root = settings.project_root()?;
    let nix = NixContainer::start(engine, settings, Inputs { project: Some(root), role: "build" }, progress).await?;
    let result = async {
        let mut built = Vec::new();
        for (name, out) in outputs {
            let store_path = nix.build(name).await?;
            match out {
                Output::Stdout => {
                    let mut stdout = tokio::io::stdout();
                    nix.copy_out(&store_path, &mut stdout).await?;
                }
                Output::File(path) => {
                    let mut out = AtomicFile::create(path)?;
                    let size = nix.copy_out(&store_path, &mut out.file).await?;
                    out.commit().await?;
                    progress.info(format!("wrote {} ({})", path.display(), human_bytes(size)));
                    built.push(Built { name: name.clone(), path: path.clone() });
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

/// A file written through a temporary file in the destination's directory, renamed over
/// the destination only by [`AtomicFile::commit`]; dropped uncommitted, it leaves nothing.
pub struct AtomicFile {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
    pub file: tokio::fs::File,
}

impl AtomicFile {
    pub fn create(path: &Path) -> Result<AtomicFile> {
        let dir = parent_dir(path);
        let temp = tempfile::Builder::new()
            .prefix(".nixctr-")
            .suffix(".part")
            .tempfile_in(&dir)
            .with_context(|| format!("cannot write in {}", dir.display()))?;
        let file =
            tokio::fs::File::from_std(temp.reopen().with_context(|| format!("cannot write in {}", dir.display()))?);
        Ok(AtomicFile { path: path.to_path_buf(), temp, file })
    }

    pub async fn commit(self) -> Result<()> {
        self.file.sync_all().await.with_context(|| format!("cannot write {}", self.path.display()))?;
        drop(self.file);
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(self.temp.path(), std::fs::Permissions::from_mode(0o644))?;
        self.temp.persist(&self.path).with_context(|| format!("cannot write {}", self.path.display()))?;
        Ok(())
    }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Fails early, with the path, when the archive could not be written later.
fn check_writable(path: &Path) -> Result<()> {
    if path.is_dir() {
        bail!("output {} is a directory (name a file, e.g. {}/NAME.tar.gz)", path.display(), path.display());
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        bail!("cannot write {}: directory {} does not exist", path.display(), dir.display());
    }
    tempfile::Builder::new()
        .prefix(".nixctr-check-")
        .tempfile_in(&dir)
        .map(drop)
        .with_context(|| format!("cannot write {}: directory {} is not writable", path.display(), dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.tar.gz");
        std::fs::write(&path, "old").unwrap();
        use tokio::io::AsyncWriteExt;
        let mut half = AtomicFile::create(&path).unwrap();
        half.file.write_all(b"half").await.unwrap();
        drop(half);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary file left behind");
        let mut whole = AtomicFile::create(&path).unwrap();
        whole.file.write_all(b"new").await.unwrap();
        whole.commit().await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new");
    }

    #[test]
    fn unwritable_outputs_are_refused_early() {
        assert!(check_writable(Path::new("/no/such/dir/x.tar.gz")).unwrap_err().to_string().contains("does not exist"));
        let dir = tempfile::tempdir().unwrap();
        assert!(check_writable(dir.path()).unwrap_err().to_string().contains("is a directory"));
    }
}
