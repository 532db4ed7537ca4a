//! The ops repository nixctr works on: `containers/<name>/` directories, and the git
//! metadata that names a build's source (HEAD commit, uncommitted changes).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `containers/NAME`, checked: NAME is a plain directory name.
pub(crate) fn container_dir(root: &Path, name: &str) -> Result<PathBuf> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        bail!("container name {name:?} is not a directory name under containers/");
    }
    Ok(root.join("containers").join(name))
}

/// `containers/NAME/default.nix`, or an error listing the names that exist.
pub(crate) fn container_file(root: &Path, name: &str) -> Result<PathBuf> {
    let file = container_dir(root, name)?.join("default.nix");
    if file.is_file() {
        return Ok(file);
    }
    let names = container_names(root);
    let known = if names.is_empty() {
        format!("{} holds no containers/*/default.nix", root.display())
    } else {
        format!("containers: {}", names.join(", "))
    };
    bail!("no containers/{name}/default.nix in {} ({known})", root.display())
}

/// The names under `containers/` that have a `default.nix`, sorted.
pub(crate) fn container_names(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root.join("containers")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("default.nix").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

/// The git directory of the repository holding `root` (following a worktree's `.git` file).
pub(crate) fn git_dir(root: &Path) -> Result<PathBuf> {
    for dir in root.ancestors() {
        let dot_git = dir.join(".git");
        if dot_git.is_dir() {
            return Ok(dot_git);
        }
        if dot_git.is_file() {
            let text =
                std::fs::read_to_string(&dot_git).with_context(|| format!("cannot read {}", dot_git.display()))?;
            let Some(target) = text.trim().strip_prefix("gitdir:") else {
                bail!("{} is not a gitdir link", dot_git.display());
            };
            return Ok(dir.join(target.trim()));
        }
    }
    bail!("{} is not in a git repository (give the tag whole with --tag)", root.display())
}

/// The full commit id HEAD points at, read from the repository's files.
pub(crate) fn head_commit(root: &Path) -> Result<String> {
    let git = git_dir(root)?;
    let head = std::fs::read_to_string(git.join("HEAD"))
        .with_context(|| format!("cannot read {}", git.join("HEAD").display()))?;
    let head = head.trim();
    let Some(reference) = head.strip_prefix("ref:") else {
        return check_commit_id(head); // detached HEAD
    };
    let reference = reference.trim();
    // A worktree keeps its HEAD apart but shares refs with the main repository.
    let common = match std::fs::read_to_string(git.join("commondir")) {
        Ok(rel) => git.join(rel.trim()),
        Err(_) => git.clone(),
    };
    for base in [&git, &common] {
        if let Ok(id) = std::fs::read_to_string(base.join(reference)) {
            return check_commit_id(id.trim());
        }
    }
    if let Ok(packed) = std::fs::read_to_string(common.join("packed-refs")) {
        for line in packed.lines() {
            if let Some((id, name)) = line.split_once(' ') {
                if name == reference {
                    return check_commit_id(id);
                }
            }
        }
    }
    bail!("HEAD names {reference}, which has no commit yet (commit first, or give the tag whole with --tag)")
}

fn check_commit_id(id: &str) -> Result<String> {
    if id.len() >= 40 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(id.to_string())
    } else {
        bail!("HEAD holds {id:?}, not a commit id")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_container_lists_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["b", "a"] {
            std::fs::create_dir_all(dir.path().join("containers").join(n)).unwrap();
            std::fs::write(dir.path().join("containers").join(n).join("default.nix"), "{}").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("containers/empty")).unwrap();
        let err = container_file(dir.path(), "c").unwrap_err().to_string();
        assert!(err.contains("no containers/c/default.nix"), "{err}");
        assert!(err.contains("containers: a, b"), "{err}");
        assert!(container_file(dir.path(), "a").is_ok());
        assert!(container_dir(dir.path(), "../x").is_err());
    }

    #[test]
    fn head_is_read_from_loose_and_packed_refs() {
        let dir = tempfile::tempdir().unwrap();
        let git = dir.path().join(".git");
        std::fs::create_dir_all(git.join("refs/heads")).unwrap();
        std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n").unwrap();
        let id = "0123456789abcdef0123456789abcdef01234567";
        std::fs::write(git.join("packed-refs"), format!("# pack-refs\n{id} refs/heads/main\n")).unwrap();
        assert_eq!(head_commit(dir.path()).unwrap(), id);
        let newer = "89abcdef0123456789abcdef0123456789abcdef";
        std::fs::write(git.join("refs/heads/main"), format!("{newer}\n")).unwrap();
        assert_eq!(head_commit(dir.path()).unwrap(), newer);
        std::fs::write(git.join("HEAD"), "ref: refs/heads/other\n").unwrap();
        assert!(head_commit(dir.path()).is_err());
    }
}
