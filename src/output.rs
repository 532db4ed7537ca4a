//! Where results go. stdout carries results only, and a closed stdout
//! (`nixctr version x | head -0`) ends the command quietly rather than in a panic. Files are
//! written whole or not at all: a temporary file beside the destination, renamed over it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Prints one result line on stdout; a closed pipe comes back as a `BrokenPipe` error, which
/// `exit::report` turns into a quiet success.
pub(crate) fn line(text: impl std::fmt::Display) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}").and_then(|()| out.flush())?;
    Ok(())
}

/// Writes a whole result (a script, a page) to stdout, as [`line`] does.
pub(crate) fn bytes(data: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(data).and_then(|()| out.flush())?;
    Ok(())
}

/// A file written through a temporary file in the destination's directory, renamed over
/// the destination only by [`AtomicFile::commit`]; dropped uncommitted, it leaves nothing.
pub(crate) struct AtomicFile {
    path: PathBuf,
    temp: tempfile::NamedTempFile,
    pub(crate) file: tokio::fs::File,
}

impl AtomicFile {
    pub(crate) fn create(path: &Path) -> Result<AtomicFile> {
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

    /// Where the bytes are until [`AtomicFile::commit`].
    pub(crate) fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// Makes what was written readable through [`AtomicFile::temp_path`].
    pub(crate) async fn flush(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await.with_context(|| format!("cannot write {}", self.path.display()))
    }

    pub(crate) async fn commit(self) -> Result<()> {
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
pub(crate) fn check_writable(path: &Path) -> Result<()> {
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
