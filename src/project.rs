//! The ops repository nixctr works on: `containers/<name>/` directories, and the git
//! metadata that names a build's source (HEAD commit, uncommitted changes).

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Result};

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

/// `git -C root`, for the repository that holds root whatever the environment names.
pub(crate) fn git_command(program: &str, root: &Path) -> Command {
    let mut command = Command::new(program);
    command.arg("-C").arg(root).stdin(Stdio::null());
    for var in ["GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_COMMON_DIR"] {
        command.env_remove(var);
    }
    command
}

/// The full commit id HEAD points at, as git reads it (worktrees, packed refs and all).
pub(crate) fn head_commit(root: &Path) -> Result<String> {
    head_commit_with("git", root)
}

fn head_commit_with(git: &str, root: &Path) -> Result<String> {
    let out = git_command(git, root).args(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"]).output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            bail!("the commit to tag needs git, which is not installed ({e}): install git, or give the tag whole with --tag")
        }
        Err(e) => bail!("cannot run git to read the HEAD commit ({e})"),
    };
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() && id.len() >= 40 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(id);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("not a git repository") {
        bail!("{} is not in a git repository (give the tag whole with --tag)", root.display());
    }
    if stderr.trim().is_empty() {
        // --quiet: HEAD names a branch without a commit yet.
        bail!("HEAD has no commit yet in {} (commit first, or give the tag whole with --tag)", root.display());
    }
    bail!("git cannot read the HEAD commit in {}: {}", root.display(), stderr.trim())
}

#[cfg(test)]
pub(crate) mod tests {
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

    /// git in `dir`, configured for tests only (no user config, a fixed identity); its stdout.
    pub(crate) fn git(dir: &Path, args: &[&str]) -> String {
        let out = git_command("git", dir)
            .args(["-c", "user.name=nixctr test", "-c", "user.email=test@nixctr.invalid", "-c", "commit.gpgsign=false"])
            .args(["-c", "init.defaultBranch=main", "-c", "protocol.file.allow=always"])
            .args(args)
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn head_commit_is_what_git_says() {
        let dir = tempfile::tempdir().unwrap();
        git(dir.path(), &["init", "-q"]);
        let err = head_commit(dir.path()).unwrap_err().to_string();
        assert!(err.contains("HEAD has no commit yet"), "{err}");
        git(dir.path(), &["commit", "-q", "--allow-empty", "-m", "one"]);
        let first = git(dir.path(), &["rev-parse", "HEAD"]).trim().to_string();
        assert_eq!(head_commit(dir.path()).unwrap(), first);
        // Packed refs, a second commit, and a subdirectory of the repository.
        git(dir.path(), &["pack-refs", "--all"]);
        git(dir.path(), &["commit", "-q", "--allow-empty", "-m", "two"]);
        std::fs::create_dir_all(dir.path().join("containers")).unwrap();
        let second = head_commit(&dir.path().join("containers")).unwrap();
        assert_eq!(second, git(dir.path(), &["rev-parse", "HEAD"]).trim());
        assert_ne!(second, first);
        // A detached HEAD.
        git(dir.path(), &["checkout", "-q", "--detach", &first]);
        assert_eq!(head_commit(dir.path()).unwrap(), first);
    }

    #[test]
    fn head_commit_outside_a_repository_or_without_git_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = head_commit(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not in a git repository") && err.contains("--tag"), "{err}");
        let err = head_commit_with("nixctr-no-such-git", dir.path()).unwrap_err().to_string();
        assert!(err.contains("needs git, which is not installed"), "{err}");
    }
}
