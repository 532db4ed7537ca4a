//! Pinning the deploy: after a push, the GitOps files that name the image (kustomizations'
//! `images:` entries, manifests' `image:` strings) are rewritten to the tag and digest just
//! pushed, and with `--pin-commit` committed. Files come from paths and globs; each is parsed
//! before anything is pushed, and written whole (a temporary file renamed over it, its mode
//! kept) or, when one of them cannot be, none are: those already written are put back.

pub(crate) mod yaml;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

pub(crate) use yaml::{Change, Image};

use crate::project;

/// A path or glob as given, and the directory it is relative to (the working directory for
/// `--pin`, the project root for `pin` in nixctr.toml).
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    pub text: String,
    pub base: PathBuf,
}

/// A file a pattern matched.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The file itself (symbolic links followed: the link stays a link).
    pub path: PathBuf,
    /// As the pattern named it, for messages and `--json`.
    pub shown: String,
}

/// What to pin and how.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub targets: Vec<Target>,
    /// Write `digest` (and `@digest`) even where there was none.
    pub always_digest: bool,
    /// Commit the changed files.
    pub commit: bool,
}

/// A file that changed.
#[derive(Debug, Clone)]
pub(crate) struct Changed {
    pub shown: String,
    pub path: PathBuf,
    pub changes: Vec<Change>,
}

/// What pinning did: the files changed and the commits made (one per git repository).
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub changed: Vec<Changed>,
    pub commits: Vec<String>,
}

/// The files the patterns match, each once, in order; and the patterns that matched none.
pub(crate) fn find(patterns: &[Pattern]) -> Result<(Vec<Target>, Vec<String>)> {
    let mut targets: Vec<Target> = Vec::new();
    let mut unmatched = Vec::new();
    for pattern in patterns {
        let matched = expand(pattern)?;
        if matched.is_empty() {
            unmatched.push(pattern.text.clone());
        }
        for target in matched {
            if !targets.iter().any(|t| t.path == target.path) {
                targets.push(target);
            }
        }
    }
    Ok((targets, unmatched))
}

fn expand(pattern: &Pattern) -> Result<Vec<Target>> {
    let full = pattern.base.join(&pattern.text);
    let is_glob = pattern.text.contains(['*', '?', '[', '{']);
    let mut found = Vec::new();
    if !is_glob {
        if full.is_file() {
            found.push(full.clone());
        }
    } else {
        let glob = globset::GlobBuilder::new(&full.to_string_lossy())
            .literal_separator(true)
            .build()
            .with_context(|| format!("--pin {:?} is not a valid glob", pattern.text))?
            .compile_matcher();
        // Walk only below the part of the pattern without wildcards.
        let mut walk_root = PathBuf::new();
        for component in full.components() {
            if component.as_os_str().to_string_lossy().contains(['*', '?', '[', '{']) {
                break;
            }
            walk_root.push(component);
        }
        if walk_root.is_dir() {
            let walker = ignore::WalkBuilder::new(&walk_root)
                .standard_filters(false)
                .filter_entry(|e| e.file_name() != ".git")
                .sort_by_file_path(|a, b| a.cmp(b))
                .build();
            for entry in walker {
                let entry = entry.with_context(|| format!("cannot read {}", walk_root.display()))?;
                if entry.file_type().is_some_and(|t| t.is_file() || t.is_symlink()) && glob.is_match(entry.path()) {
                    found.push(entry.path().to_path_buf());
                }
            }
        }
    }
    let mut targets = Vec::new();
    for path in found {
        let shown = path.strip_prefix(&pattern.base).unwrap_or(&path).display().to_string();
        let real = std::fs::canonicalize(&path).with_context(|| format!("cannot read {shown}"))?;
        if real.is_file() {
            targets.push(Target { path: real, shown });
        }
    }
    Ok(targets)
}

/// Refuses, before anything is pushed, a file that does not parse, or that names one of the
/// `repositories` and could not be replaced.
pub(crate) fn check(targets: &[Target], repositories: &[String]) -> Result<()> {
    for target in targets {
        let text = read(target)?;
        if yaml::names_any(&text, repositories).map_err(|e| anyhow!("{}: {e}", target.shown))? {
            check_writable(target)?;
        }
    }
    Ok(())
}

fn read(target: &Target) -> Result<String> {
    let bytes = std::fs::read(&target.path).with_context(|| format!("cannot read {}", target.shown))?;
    String::from_utf8(bytes).map_err(|_| anyhow!("{}: not UTF-8 text, so not YAML nixctr can pin", target.shown))
}

/// The file's and its directory's write bits are honoured even by root (who could replace it
/// regardless): a file made read-only is not to be rewritten.
fn check_writable(target: &Target) -> Result<()> {
    let mode = std::fs::metadata(&target.path).with_context(|| format!("cannot read {}", target.shown))?.mode();
    if mode & 0o222 == 0 {
        bail!(
            "{} is read-only (mode {:04o}): make it writable (chmod u+w) or leave it out of --pin",
            target.shown,
            mode & 0o7777
        );
    }
    let dir = target.path.parent().unwrap_or(Path::new("/"));
    let dir_mode = std::fs::metadata(dir).with_context(|| format!("cannot read {}", dir.display()))?.mode();
    if dir_mode & 0o222 == 0 {
        bail!(
            "cannot write {}: its directory {} is read-only (mode {:04o}); nixctr replaces a file by renaming a new one over it",
            target.shown,
            dir.display(),
            dir_mode & 0o7777
        );
    }
    Ok(())
}

/// Pins the images in every target; writes the files that change (all or none), and commits
/// them when asked.
pub(crate) fn pin(request: &Request, images: &[Image]) -> Result<Outcome> {
    if images.is_empty() {
        return Ok(Outcome::default());
    }
    let mut writes = Vec::new();
    let mut changed = Vec::new();
    for target in &request.targets {
        let old = read(target)?;
        let pinned = yaml::pin(&old, images, request.always_digest).map_err(|e| anyhow!("{}: {e}", target.shown))?;
        if pinned.changes.is_empty() {
            continue;
        }
        check_writable(target)?;
        changed.push(Changed { shown: target.shown.clone(), path: target.path.clone(), changes: pinned.changes });
        writes.push(FileWrite { path: target.path.clone(), shown: target.shown.clone(), old, new: pinned.text });
    }
    write_all(&writes)?;
    let commits = if request.commit && !changed.is_empty() { commit(&changed, images)? } else { Vec::new() };
    Ok(Outcome { changed, commits })
}

/// One file's old and new text.
pub(crate) struct FileWrite {
    pub path: PathBuf,
    pub shown: String,
    pub old: String,
    pub new: String,
}

/// Writes each file through a temporary file renamed over it; when one fails, those already
/// written get their old text back, so a failure leaves every file as it was.
pub(crate) fn write_all(writes: &[FileWrite]) -> Result<()> {
    for (done, write) in writes.iter().enumerate() {
        if let Err(e) = replace(&write.path, write.new.as_bytes()) {
            for earlier in &writes[..done] {
                if let Err(undo) = replace(&earlier.path, earlier.old.as_bytes()) {
                    return Err(e.context(format!(
                        "cannot write {}; and {} could not be put back ({undo:#}): it holds the new pins",
                        write.shown, earlier.shown
                    )));
                }
            }
            return Err(e.context(format!("cannot write {}; no file was changed", write.shown)));
        }
    }
    Ok(())
}

/// Replaces the file with `bytes`, keeping its mode.
fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let mode = std::fs::metadata(path)?.permissions().mode();
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut temp = tempfile::Builder::new().prefix(".nixctr-").suffix(".part").tempfile_in(dir)?;
    temp.write_all(bytes)?;
    temp.as_file().sync_all()?;
    std::fs::set_permissions(temp.path(), std::fs::Permissions::from_mode(mode))?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// One commit per git repository holding changed files, of those files only; never pushed.
fn commit(changed: &[Changed], images: &[Image]) -> Result<Vec<String>> {
    let mut by_repository: BTreeMap<PathBuf, Vec<&Changed>> = BTreeMap::new();
    for file in changed {
        let dir = file.path.parent().unwrap_or(Path::new("/"));
        let top = git(dir, &["rev-parse", "--show-toplevel"])
            .with_context(|| format!("--pin-commit: {} is not in a git repository", file.shown))?;
        by_repository.entry(PathBuf::from(top.trim())).or_default().push(file);
    }
    let mut commits = Vec::new();
    for (top, files) in by_repository {
        let pinned: Vec<&Image> = images
            .iter()
            .filter(|i| files.iter().any(|f| f.changes.iter().any(|c| c.repository == i.repository)))
            .collect();
        let message = commit_message(&pinned, &files);
        let paths: Vec<String> = files.iter().map(|f| f.path.to_string_lossy().into_owned()).collect();
        let mut add = vec!["add", "--"];
        add.extend(paths.iter().map(String::as_str));
        git(&top, &add)?;
        // `commit -- PATHS` commits those files only, whatever else is staged.
        let mut args = vec!["commit", "--quiet", "--no-verify", "-m", &message, "--"];
        args.extend(paths.iter().map(String::as_str));
        git(&top, &args).context("--pin-commit: the files are written but not committed")?;
        commits.push(git(&top, &["rev-parse", "HEAD"])?.trim().to_string());
    }
    Ok(commits)
}

fn commit_message(images: &[&Image], files: &[&Changed]) -> String {
    let names: Vec<String> = images
        .iter()
        .map(|i| format!("{}:{}", i.repository.rsplit('/').next().unwrap_or(&i.repository), i.tag))
        .collect();
    let mut message = format!("Pin {}\n\n", names.join(", "));
    for image in images {
        message.push_str(&format!("{}:{}@{}\n", image.repository, image.tag, image.digest));
    }
    message.push('\n');
    for file in files {
        message.push_str(&format!("{}\n", file.shown));
    }
    message.push_str("\nWritten by nixctr --pin-commit.\n");
    message
}

/// git in `dir`; its stdout, or an error with its stderr.
fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = project::git_command("git", dir).args(args).output().context("cannot run git")?;
    if !out.status.success() {
        bail!("git {}: {}", args.first().unwrap_or(&""), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, name: &str, text: &str) -> Target {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        Target { path, shown: name.to_string() }
    }

    #[test]
    fn globs_match_below_their_literal_part_and_unmatched_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        for app in ["ntfy", "web"] {
            std::fs::create_dir_all(dir.path().join(format!("argocd/manifests/{app}"))).unwrap();
            std::fs::write(dir.path().join(format!("argocd/manifests/{app}/kustomization.yaml")), "a: b\n").unwrap();
        }
        std::fs::write(dir.path().join("argocd/manifests/ntfy/deployment.yaml"), "a: b\n").unwrap();
        let pattern = |text: &str| Pattern { text: text.to_string(), base: dir.path().to_path_buf() };
        let (targets, unmatched) = find(&[
            pattern("argocd/manifests/*/kustomization.yaml"),
            pattern("argocd/manifests/ntfy/kustomization.yaml"),
            pattern("argocd/*.yaml"),
            pattern("nothing/here.yaml"),
        ])
        .unwrap();
        let shown: Vec<&str> = targets.iter().map(|t| t.shown.as_str()).collect();
        assert_eq!(shown, ["argocd/manifests/ntfy/kustomization.yaml", "argocd/manifests/web/kustomization.yaml"]);
        assert_eq!(unmatched, ["argocd/*.yaml", "nothing/here.yaml"]);
        let (all, _) = find(&[pattern("argocd/**/*.yaml")]).unwrap();
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn a_read_only_file_or_directory_is_refused_even_for_root() {
        let dir = tempfile::tempdir().unwrap();
        let file = target(dir.path(), "k.yaml", "image: r:5000/team/ntfy:v1\n");
        let ours = ["r:5000/team/ntfy".to_string()];
        check(std::slice::from_ref(&file), &ours).unwrap();
        std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = check(std::slice::from_ref(&file), &ours).unwrap_err().to_string();
        assert!(err.contains("k.yaml is read-only (mode 0444)"), "{err}");
        // A read-only file that names none of the images is no one's concern.
        check(std::slice::from_ref(&file), &["r:5000/team/web".to_string()]).unwrap();
        std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o555)).unwrap();
        let err = check(std::slice::from_ref(&file), &ours).unwrap_err().to_string();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(err.contains("is read-only (mode 0555)"), "{err}");
    }

    #[test]
    fn a_file_that_does_not_parse_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = target(dir.path(), "bad.yaml", "images:\n- name: a\n   newTag: b\n");
        let err = check(&[file], &[]).unwrap_err().to_string();
        assert!(err.starts_with("bad.yaml: line 3 column"), "{err}");
    }

    #[test]
    fn the_mode_is_kept_and_no_temporary_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let file = target(dir.path(), "k.yaml", "old\n");
        std::fs::set_permissions(&file.path, std::fs::Permissions::from_mode(0o640)).unwrap();
        replace(&file.path, b"new\n").unwrap();
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "new\n");
        assert_eq!(std::fs::metadata(&file.path).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A rename that fails (here: onto a directory, which fails for root too) puts the files
    /// written before it back, and leaves no temporary file.
    #[test]
    fn a_failed_write_puts_the_earlier_files_back() {
        let dir = tempfile::tempdir().unwrap();
        let first = target(dir.path(), "a.yaml", "old a\n");
        std::fs::create_dir(dir.path().join("b.yaml")).unwrap();
        std::fs::write(dir.path().join("b.yaml/inside"), "x").unwrap();
        let writes = [
            FileWrite {
                path: first.path.clone(),
                shown: "a.yaml".into(),
                old: "old a\n".into(),
                new: "new a\n".into(),
            },
            FileWrite {
                path: dir.path().join("b.yaml"),
                shown: "b.yaml".into(),
                old: String::new(),
                new: "new b\n".into(),
            },
        ];
        let err = format!("{:#}", write_all(&writes).unwrap_err());
        assert!(err.contains("cannot write b.yaml; no file was changed"), "{err}");
        assert_eq!(std::fs::read_to_string(&first.path).unwrap(), "old a\n");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "a temporary file was left");
    }

    #[test]
    fn the_commit_message_names_the_images_and_files() {
        let image = Image { repository: "r:5000/team/ntfy".into(), tag: "v1".into(), digest: "sha256:ab".into() };
        let file = Changed { shown: "argocd/ntfy/kustomization.yaml".into(), path: PathBuf::new(), changes: vec![] };
        let message = commit_message(&[&image], &[&file]);
        assert!(message.starts_with("Pin ntfy:v1\n\nr:5000/team/ntfy:v1@sha256:ab\n"), "{message}");
        assert!(message.contains("argocd/ntfy/kustomization.yaml"), "{message}");
    }
}
