//! The build context: project directories turned into one tar stream, produced while it is
//! sent, never buffered whole. `.git`, files ignored by `.gitignore`/`.ignore`, and those
//! listed in `.nixctrignore` stay out.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::Stream;
use tokio::task::JoinHandle;

/// A directory on this machine and where it lands in the container (`workspace`).
pub(crate) struct Source {
    pub(crate) dir: PathBuf,
    pub(crate) prefix: String,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
}

/// Starts walking `sources` on a blocking thread and returns the tar stream, plus the walk's
/// outcome: when the upload fails, the walk's error (if any) is the real cause.
pub(crate) fn tar_stream(
    sources: Vec<Source>,
) -> (impl Stream<Item = std::io::Result<Bytes>> + Send + 'static, JoinHandle<Result<Stats>>) {
    crate::pipe::spawn_writer(move |out| write_tar(&sources, out))
}

/// Writes the whole tar into `out` (also used by the benchmark and tests through `tar_stream`).
fn write_tar<W: Write>(sources: &[Source], out: W) -> Result<Stats> {
    let mut tar = tar::Builder::new(out);
    tar.follow_symlinks(false);
    let mut stats = Stats::default();
    for source in sources {
        append_dir_header(&mut tar, &source.dir, &source.prefix)?;
        for entry in walker(&source.dir) {
            let entry =
                entry.with_context(|| format!("cannot read the project tree under {}", source.dir.display()))?;
            let path = entry.path();
            let Ok(rel) = path.strip_prefix(&source.dir) else { continue };
            if rel.as_os_str().is_empty() {
                continue;
            }
            let name = Path::new(&source.prefix).join(rel);
            let meta = std::fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
            let ft = meta.file_type();
            if ft.is_dir() {
                tar.append_data(&mut header, &name, std::io::empty())
            } else if ft.is_symlink() {
                let target =
                    std::fs::read_link(path).with_context(|| format!("cannot read link {}", path.display()))?;
                tar.append_link(&mut header, &name, &target)
            } else if ft.is_file() {
                let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
                stats.files += 1;
                stats.bytes += meta.len();
                tar.append_data(&mut header, &name, file)
            } else {
                continue; // sockets, fifos, devices: nothing a nix build reads
            }
            .with_context(|| format!("cannot send {}", path.display()))?;
        }
    }
    tar.into_inner().context("cannot finish the tar stream")?.flush()?;
    Ok(stats)
}

fn append_dir_header<W: Write>(tar: &mut tar::Builder<W>, dir: &Path, prefix: &str) -> Result<()> {
    let meta = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
    tar.append_data(&mut header, prefix, std::io::empty()).context("cannot start the tar stream")
}

/// The files that go into the context, in a stable order.
pub(crate) fn walker(dir: &Path) -> ignore::Walk {
    ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .ignore(true)
        .require_git(false)
        .follow_links(false)
        .add_custom_ignore_filename(".nixctrignore")
        .filter_entry(|e| e.file_name() != ".git")
        .sort_by_file_name(|a, b| a.cmp(b))
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        write_tar(&[Source { dir: dir.to_path_buf(), prefix: "workspace".into() }], &mut out).unwrap();
        let mut archive = tar::Archive::new(out.as_slice());
        archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().trim_end_matches('/').to_string())
            .collect()
    }

    #[test]
    fn ignore_files_and_git_stay_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref").unwrap();
        std::fs::create_dir_all(root.join("containers/a")).unwrap();
        std::fs::write(root.join("containers/a/default.nix"), "{}").unwrap();
        std::fs::write(root.join("containers/a/result.tar.gz"), "x").unwrap();
        std::fs::write(root.join("secret.env"), "x").unwrap();
        std::fs::write(root.join(".gitignore"), "*.tar.gz\n").unwrap();
        std::fs::write(root.join(".nixctrignore"), "secret.env\n").unwrap();
        std::os::unix::fs::symlink("containers/a/default.nix", root.join("link.nix")).unwrap();
        let names = names(root);
        assert!(names.contains(&"workspace/containers/a/default.nix".to_string()), "{names:?}");
        assert!(names.contains(&"workspace/link.nix".to_string()), "{names:?}");
        assert!(names.contains(&"workspace/.gitignore".to_string()), "{names:?}");
        assert!(!names.iter().any(|n| n.contains(".git/") || n.ends_with(".git")), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with(".tar.gz")), "{names:?}");
        assert!(!names.iter().any(|n| n.ends_with("secret.env")), "{names:?}");
    }

    #[test]
    fn symlinks_stay_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("l")).unwrap();
        let mut out = Vec::new();
        write_tar(&[Source { dir: dir.path().to_path_buf(), prefix: "w".into() }], &mut out).unwrap();
        let mut archive = tar::Archive::new(out.as_slice());
        let link = archive.entries().unwrap().map(|e| e.unwrap()).find(|e| e.path().unwrap().ends_with("l")).unwrap();
        assert_eq!(link.header().entry_type(), tar::EntryType::Symlink);
        assert_eq!(link.link_name().unwrap().unwrap().to_str(), Some("/etc/passwd"));
    }
}
