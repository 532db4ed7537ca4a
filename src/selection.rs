//! Which containers a command works on: the names given, `--all` (every
//! `containers/*/default.nix`), or `--changed REV` (the containers whose directory changed between
//! REV and the working tree, read with git).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Output;

use anyhow::{anyhow, bail, Result};

use crate::project::{self, git_command};

/// Files at the project root that every build reads: a change to one selects every container.
const AFFECTS_ALL: [&str; 3] = ["nixctr.toml", "flake.lock", "flake.nix"];

/// How the containers were chosen on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Select {
    /// `NAME…`: each must have a `containers/NAME/default.nix`.
    Names(Vec<String>),
    /// `--all`: every `containers/*/default.nix`.
    All,
    /// `--changed REV`: the containers whose directory changed since REV.
    Changed(String),
}

/// The containers to work on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Selection {
    /// Names with a `containers/NAME/default.nix`: in the order given (without repeats) for
    /// [`Select::Names`], sorted for [`Select::All`] and [`Select::Changed`]. Empty only for
    /// `--changed` when nothing changed: not an error.
    pub names: Vec<String>,
    /// `--changed` only: changed directories under `containers/` that cannot be built, sorted.
    pub skipped: Vec<Skipped>,
    /// `--changed` only: the changed root files (of `nixctr.toml`, `flake.lock`, `flake.nix`)
    /// that made `names` every container, sorted; empty when only container directories count.
    pub affects_all: Vec<String>,
}

/// A changed container directory that is left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Skipped {
    pub name: String,
    /// "removed", "no default.nix (Dockerfile-only)", "no default.nix" or "name is not UTF-8".
    pub reason: String,
}

/// The containers `how` selects in the project at `root`.
pub(crate) fn select(root: &Path, how: &Select) -> Result<Selection> {
    select_with("git", root, how)
}

fn select_with(git: &str, root: &Path, how: &Select) -> Result<Selection> {
    match how {
        Select::Names(names) => named(root, names),
        Select::All => all(root),
        Select::Changed(rev) => changed(&Git { program: git, root }, rev),
    }
}

fn has_default_nix(root: &Path, name: &str) -> bool {
    root.join("containers").join(name).join("default.nix").is_file()
}

fn named(root: &Path, given: &[String]) -> Result<Selection> {
    if given.is_empty() {
        bail!("no containers selected: name some, or pass --all or --changed REV");
    }
    let mut names: Vec<String> = Vec::new();
    for name in given {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    let bad: Vec<String> =
        names.iter().filter(|n| project::container_dir(root, n).is_err()).map(|n| format!("{n:?}")).collect();
    match bad.as_slice() {
        [] => {}
        [one] => bail!("container name {one} is not a directory name under containers/"),
        _ => bail!("container names {} are not directory names under containers/", bad.join(", ")),
    }
    let unknown: Vec<&String> = names.iter().filter(|n| !has_default_nix(root, n)).collect();
    if !unknown.is_empty() {
        let known = project::container_names(root);
        let known = if known.is_empty() {
            format!("{} holds no containers/*/default.nix", root.display())
        } else {
            format!("containers: {}", known.join(", "))
        };
        // One unknown name reads as `project::container_file` says it.
        match unknown.as_slice() {
            [one] => bail!("no containers/{one}/default.nix in {} ({known})", root.display()),
            _ => {
                let quoted: Vec<String> = unknown.iter().map(|n| format!("{n:?}")).collect();
                bail!("no containers/NAME/default.nix in {} for {} ({known})", root.display(), quoted.join(", "))
            }
        }
    }
    Ok(Selection { names, ..Selection::default() })
}

fn all(root: &Path) -> Result<Selection> {
    let names = project::container_names(root);
    if names.is_empty() {
        bail!(
            "--all found no containers/*/default.nix in {} (run nixctr in the project root, or pass -C DIR)",
            root.display()
        );
    }
    Ok(Selection { names, ..Selection::default() })
}

fn changed(git: &Git, rev: &str) -> Result<Selection> {
    git.check_work_tree()?;
    let commit = git.resolve(rev)?;
    // `git diff REV` compares REV with the working tree, committed or not, but leaves out
    // untracked files: ls-files adds those git does not ignore. Both give paths relative to the
    // root (`--relative`, and ls-files's default), and only those under it. `--no-renames`: a
    // rename changes both the old and the new directory.
    let diff =
        ["diff", "--name-only", "--no-renames", "--relative", "--no-color", "--no-ext-diff", "-z", &commit, "--"];
    let tracked = git.stdout(&diff)?;
    let untracked = git.stdout(&["ls-files", "--others", "--exclude-standard", "-z"])?;
    let paths: Vec<&[u8]> = split_z(&tracked).into_iter().chain(split_z(&untracked)).collect();
    Ok(from_paths(git.root, &paths))
}

/// The selection that changed `paths` (relative to the root, `/`-separated) make.
fn from_paths(root: &Path, paths: &[&[u8]]) -> Selection {
    let mut dirs: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut affects_all: BTreeSet<String> = BTreeSet::new();
    for path in paths {
        if let Some(file) = AFFECTS_ALL.iter().find(|f| f.as_bytes() == *path) {
            affects_all.insert(file.to_string());
            continue;
        }
        let mut parts = path.split(|&b| b == b'/');
        let (Some(b"containers"), Some(dir)) = (parts.next(), parts.next()) else { continue };
        if dir.is_empty() {
            continue;
        }
        // `containers/X` itself is a file beside the container directories, or a submodule.
        if parts.next().is_none() && !std::str::from_utf8(dir).is_ok_and(|d| root.join("containers").join(d).is_dir()) {
            continue;
        }
        dirs.insert(dir.to_vec());
    }
    let mut names = Vec::new();
    let mut skipped = Vec::new();
    for dir in dirs {
        let Ok(name) = String::from_utf8(dir.clone()) else {
            let name = String::from_utf8_lossy(&dir).into_owned();
            skipped.push(Skipped { name, reason: "name is not UTF-8".to_string() });
            continue;
        };
        let path = root.join("containers").join(&name);
        if has_default_nix(root, &name) {
            names.push(name);
        } else if !path.is_dir() {
            skipped.push(Skipped { name, reason: "removed".to_string() });
        } else if path.join("Dockerfile").is_file() {
            skipped.push(Skipped { name, reason: "no default.nix (Dockerfile-only)".to_string() });
        } else {
            skipped.push(Skipped { name, reason: "no default.nix".to_string() });
        }
    }
    if !affects_all.is_empty() {
        names = project::container_names(root);
    }
    Selection { names, skipped, affects_all: affects_all.into_iter().collect() }
}

fn split_z(out: &[u8]) -> Vec<&[u8]> {
    out.split(|&b| b == 0).filter(|p| !p.is_empty()).collect()
}

/// git, run in the project root for `--changed`.
struct Git<'a> {
    program: &'a str,
    root: &'a Path,
}

impl Git<'_> {
    fn output(&self, args: &[&str]) -> Result<Output> {
        git_command(self.program, self.root).args(args).output().map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow!("--changed needs git, which is not installed ({e}): install git, or select containers by name or with --all")
            } else {
                anyhow!("--changed: cannot run git ({e})")
            }
        })
    }

    fn stdout(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = self.output(args)?;
        if !out.status.success() {
            bail!(
                "--changed: git {} failed in {}: {}",
                args.join(" "),
                self.root.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    fn check_work_tree(&self) -> Result<()> {
        let out = self.output(&["rev-parse", "--is-inside-work-tree"])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && out.stdout.trim_ascii() == b"true" {
            return Ok(());
        }
        if out.status.success() || stderr.contains("not a git repository") {
            bail!(
                "--changed needs a git repository, and {} is not in one (select containers by name or with --all)",
                self.root.display()
            );
        }
        bail!("--changed: git cannot read the repository at {}: {}", self.root.display(), stderr.trim())
    }

    /// The full commit id `rev` names.
    fn resolve(&self, rev: &str) -> Result<String> {
        // A leading `-` would read as an option.
        if !rev.is_empty() && !rev.starts_with('-') {
            let out = self.output(&["rev-parse", "--verify", "--quiet", &format!("{rev}^{{commit}}")])?;
            if out.status.success() {
                return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
            }
        }
        let shallow = self.stdout(&["rev-parse", "--is-shallow-repository"])?;
        if shallow.trim_ascii() != b"true" {
            bail!(
                "--changed {rev:?}: no commit {rev:?} in the git repository at {} (give a commit, branch or tag \
                 that exists, e.g. HEAD~1 or origin/main; fetch a remote branch first)",
                self.root.display()
            );
        }
        let fix = match commits_back(rev) {
            Some(n) => format!("fetch-depth: {} in actions/checkout, or git fetch --deepen {n}", n + 1),
            None => format!(
                "fetch-depth: 0 in actions/checkout, or git fetch --unshallow, and fetch {rev} if it is a branch"
            ),
        };
        bail!(
            "--changed {rev:?}: no commit {rev:?} in {}, a shallow clone without the history before its newest \
             commits (fetch more: {fix})",
            self.root.display()
        )
    }
}

/// N for `HEAD~N`, `HEAD^…`, `@~N`: how far back from HEAD `rev` reaches.
fn commits_back(rev: &str) -> Option<u32> {
    let rest = rev.strip_prefix("HEAD").or_else(|| rev.strip_prefix('@'))?;
    if let Some(n) = rest.strip_prefix('~') {
        return if n.is_empty() { Some(1) } else { n.parse().ok().filter(|&n| n > 0) };
    }
    if !rest.is_empty() && rest.chars().all(|c| c == '^') {
        return u32::try_from(rest.len()).ok();
    }
    None
}

/// The uncommitted changes under `containers/NAME` (untracked files included, ignored ones not),
/// as `git status --porcelain` lines (`XY PATH`, PATH relative to the repository's top); empty
/// when the directory is clean.
pub(crate) fn dirty_files(root: &Path, name: &str) -> Result<Vec<String>> {
    project::container_dir(root, name)?;
    let dir = format!("containers/{name}");
    let out = git_command("git", root).args(["status", "--porcelain", "--untracked-files=all", "--", &dir]).output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => bail!(
            "cannot check {dir} for uncommitted changes: git said {} (pass --allow-dirty to publish anyway)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!(
            "cannot check {dir} for uncommitted changes: cannot run git ({e}); pass --allow-dirty to publish anyway"
        ),
    };
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::project::tests::git;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// The skipped directories as name → reason, for short assertions.
    fn reasons(skipped: &[Skipped]) -> BTreeMap<&str, &str> {
        skipped.iter().map(|s| (s.name.as_str(), s.reason.as_str())).collect()
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    fn strings(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn names(root: &Path, how: Select) -> Vec<String> {
        select(root, &how).unwrap().names
    }

    fn err(root: &Path, how: Select) -> String {
        format!("{:#}", select(root, &how).unwrap_err())
    }

    /// A repository with two commits and changes in the working tree:
    /// - app: version bumped in the second commit
    /// - web: a file beside default.nix changed in the working tree
    /// - legacy: Dockerfile-only, its Dockerfile changed in the second commit
    /// - tool: an untracked new file
    /// - src → dst: a file moved from one to the other in the second commit
    /// - gone: removed in the second commit
    /// - quiet: unchanged, but for an ignored file
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        git(root, &["init", "-q"]);
        write(root, ".gitignore", "result\n");
        write(root, "README.md", "ops\n");
        write(root, "containers/app/default.nix", "{ version = \"1.0\"; }\n");
        write(root, "containers/web/default.nix", "{ }\n");
        write(root, "containers/web/config.json", "{}\n");
        write(root, "containers/legacy/Dockerfile", "FROM debian\nARG CONTAINER_APP_VERSION=1\n");
        write(root, "containers/tool/default.nix", "{ }\n");
        write(root, "containers/src/default.nix", "{ }\n");
        write(root, "containers/src/shared.patch", "--- a\n+++ b\n");
        write(root, "containers/dst/default.nix", "{ }\n");
        write(root, "containers/gone/default.nix", "{ }\n");
        write(root, "containers/quiet/default.nix", "{ }\n");
        git(root, &["add", "-A"]);
        git(root, &["commit", "-q", "-m", "first"]);

        write(root, "containers/app/default.nix", "{ version = \"1.1\"; }\n");
        write(root, "containers/legacy/Dockerfile", "FROM debian\nARG CONTAINER_APP_VERSION=2\n");
        git(root, &["mv", "containers/src/shared.patch", "containers/dst/shared.patch"]);
        git(root, &["rm", "-q", "-r", "containers/gone"]);
        write(root, "README.md", "ops, changed\n");
        git(root, &["add", "-A"]);
        git(root, &["commit", "-q", "-m", "second"]);

        write(root, "containers/web/config.json", "{\"port\": 80}\n");
        write(root, "containers/tool/new.patch", "+\n");
        write(root, "containers/quiet/result", "ignored\n");
        dir
    }

    #[test]
    fn changed_since_the_previous_commit() {
        let dir = fixture();
        let selection = select(dir.path(), &Select::Changed("HEAD~1".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["app", "dst", "src", "tool", "web"]));
        assert_eq!(
            reasons(&selection.skipped),
            BTreeMap::from([("gone", "removed"), ("legacy", "no default.nix (Dockerfile-only)")])
        );
        assert!(selection.affects_all.is_empty());
    }

    #[test]
    fn changed_since_head_is_the_uncommitted_work() {
        let dir = fixture();
        let selection = select(dir.path(), &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["tool", "web"]));
        assert!(selection.skipped.is_empty());
        // A full commit id and a branch name work too.
        let head = git(dir.path(), &["rev-parse", "HEAD~1"]);
        assert_eq!(names(dir.path(), Select::Changed(head.trim().to_string())).len(), 5);
        assert_eq!(names(dir.path(), Select::Changed("main".to_string())), strings(&["tool", "web"]));
    }

    #[test]
    fn nothing_changed_is_an_empty_selection() {
        let dir = fixture();
        git(dir.path(), &["add", "-A"]);
        git(dir.path(), &["commit", "-q", "-m", "third"]);
        let selection = select(dir.path(), &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection, Selection::default());
    }

    #[test]
    fn uncommitted_deletions_and_staged_files_count() {
        let dir = fixture();
        let root = dir.path();
        git(root, &["add", "-A"]);
        git(root, &["commit", "-q", "-m", "third"]);
        std::fs::remove_dir_all(root.join("containers/quiet")).unwrap();
        std::fs::remove_file(root.join("containers/app/default.nix")).unwrap();
        write(root, "containers/fresh/default.nix", "{ }\n");
        git(root, &["add", "containers/fresh"]);
        let selection = select(root, &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["fresh"]));
        assert_eq!(reasons(&selection.skipped), BTreeMap::from([("app", "no default.nix"), ("quiet", "removed")]));
    }

    #[test]
    fn a_root_file_that_every_build_reads_selects_all() {
        let every = strings(&["app", "dst", "quiet", "src", "tool", "web"]);
        for file in AFFECTS_ALL {
            let dir = fixture();
            let root = dir.path();
            // Uncommitted (untracked) ...
            write(root, file, "x\n");
            let selection = select(root, &Select::Changed("HEAD".to_string())).unwrap();
            assert_eq!(selection.names, every, "{file}");
            assert_eq!(selection.affects_all, strings(&[file]));
            assert!(selection.skipped.is_empty());
            // ... or committed; the skipped directories are still reported.
            git(root, &["add", file]);
            git(root, &["commit", "-q", "-m", file]);
            let selection = select(root, &Select::Changed("HEAD~2".to_string())).unwrap();
            assert_eq!(selection.names, every, "{file}");
            assert_eq!(selection.skipped.len(), 2);
        }
        // The same name deeper down is an ordinary file.
        let dir = fixture();
        write(dir.path(), "nested/flake.lock", "x\n");
        write(dir.path(), "containers/web/flake.nix", "x\n");
        let selection = select(dir.path(), &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["tool", "web"]));
        assert!(selection.affects_all.is_empty());
    }

    #[test]
    fn a_file_directly_in_containers_selects_nothing() {
        let dir = fixture();
        write(dir.path(), "containers/README.md", "x\n");
        assert_eq!(names(dir.path(), Select::Changed("HEAD".to_string())), strings(&["tool", "web"]));
    }

    #[test]
    fn a_rev_that_does_not_resolve_is_named() {
        let dir = fixture();
        let e = err(dir.path(), Select::Changed("nope".to_string()));
        assert!(e.starts_with("--changed \"nope\": no commit \"nope\" in the git repository at "), "{e}");
        assert!(e.contains("HEAD~1 or origin/main"), "{e}");
        assert!(!e.contains("shallow"), "{e}");
        // Not read as an option, nor as a path.
        let e = err(dir.path(), Select::Changed("--output=/tmp/x".to_string()));
        assert!(e.contains("no commit \"--output=/tmp/x\""), "{e}");
        let e = err(dir.path(), Select::Changed("README.md".to_string()));
        assert!(e.contains("no commit \"README.md\""), "{e}");
        let e = err(dir.path(), Select::Changed(String::new()));
        assert!(e.contains("no commit \"\""), "{e}");
        let e = err(dir.path(), Select::Changed("HEAD~5".to_string()));
        assert!(e.contains("no commit \"HEAD~5\""), "{e}");
    }

    #[test]
    fn a_shallow_clone_names_the_fetch_depth() {
        let dir = fixture();
        let clones = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        git(clones.path(), &["clone", "-q", "--depth", "1", &url, "shallow"]);
        let root = clones.path().join("shallow");
        let e = err(&root, Select::Changed("HEAD~1".to_string()));
        assert!(e.starts_with("--changed \"HEAD~1\": no commit \"HEAD~1\" in "), "{e}");
        assert!(e.contains("shallow clone"), "{e}");
        assert!(e.contains("fetch-depth: 2"), "{e}");
        assert!(e.contains("git fetch --deepen 1"), "{e}");
        let e = err(&root, Select::Changed("HEAD~3".to_string()));
        assert!(e.contains("fetch-depth: 4") && e.contains("git fetch --deepen 3"), "{e}");
        let e = err(&root, Select::Changed("origin/nope".to_string()));
        assert!(e.contains("shallow clone") && e.contains("fetch-depth: 0"), "{e}");
        // HEAD itself is there: nothing changed.
        assert_eq!(select(&root, &Select::Changed("HEAD".to_string())).unwrap(), Selection::default());
    }

    #[test]
    fn changed_outside_a_git_repository_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "containers/a/default.nix", "{ }\n");
        let e = err(dir.path(), Select::Changed("HEAD~1".to_string()));
        assert_eq!(
            e,
            format!(
                "--changed needs a git repository, and {} is not in one (select containers by name or with --all)",
                dir.path().display()
            )
        );
        // Names and --all need no git.
        assert_eq!(names(dir.path(), Select::All), strings(&["a"]));
    }

    #[test]
    fn changed_without_git_says_to_install_it() {
        let dir = fixture();
        let e = format!(
            "{:#}",
            select_with("nixctr-test-no-such-git", dir.path(), &Select::Changed("HEAD".into())).unwrap_err()
        );
        assert!(e.starts_with("--changed needs git, which is not installed ("), "{e}");
        assert!(e.ends_with("): install git, or select containers by name or with --all"), "{e}");
    }

    #[test]
    fn a_root_below_the_top_of_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path();
        git(top, &["init", "-q"]);
        write(top, "flake.lock", "top\n");
        write(top, "nixctr.toml", "top\n");
        write(top, "containers/outside/default.nix", "{ }\n");
        for name in ["a", "b", "c"] {
            write(top, &format!("ops/containers/{name}/default.nix"), "{ }\n");
        }
        git(top, &["add", "-A"]);
        git(top, &["commit", "-q", "-m", "first"]);
        let root = top.join("ops");

        // Changes above the root, even in files named like the ones that select all, count for nothing.
        write(top, "flake.lock", "top, changed\n");
        write(top, "nixctr.toml", "top, changed\n");
        write(top, "containers/outside/new", "x\n");
        write(top, "containers/c/default.nix", "{ }\n");
        write(top, "ops/containers/a/default.nix", "{ version = \"2\"; }\n");
        write(top, "ops/containers/b/new.patch", "x\n");
        let selection = select(&root, &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["a", "b"]));
        assert!(selection.skipped.is_empty() && selection.affects_all.is_empty());

        // Committed changes, and a rename out of the root.
        git(top, &["add", "-A"]);
        git(top, &["commit", "-q", "-m", "second"]);
        git(top, &["mv", "ops/containers/c", "containers/c2"]);
        let selection = select(&root, &Select::Changed("HEAD~1".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["a", "b"]));
        assert_eq!(reasons(&selection.skipped), BTreeMap::from([("c", "removed")]));

        // The root's own flake.lock selects all of the root's containers.
        write(top, "ops/flake.lock", "x\n");
        let selection = select(&root, &Select::Changed("HEAD".to_string())).unwrap();
        assert_eq!(selection.names, strings(&["a", "b"]));
        assert_eq!(selection.affects_all, strings(&["flake.lock"]));
    }

    #[test]
    fn named_containers_keep_their_order_without_repeats() {
        let dir = fixture();
        let how = Select::Names(strings(&["web", "app", "web", "tool"]));
        assert_eq!(names(dir.path(), how), strings(&["web", "app", "tool"]));
    }

    #[test]
    fn unknown_names_are_listed_together() {
        let dir = fixture();
        let root = dir.path().display();
        let e = err(dir.path(), Select::Names(strings(&["app", "nope", "legacy", "nope", "gone"])));
        assert_eq!(
            e,
            format!(
                "no containers/NAME/default.nix in {root} for \"nope\", \"legacy\", \"gone\" \
                 (containers: app, dst, quiet, src, tool, web)"
            )
        );
        // One unknown name reads as project::container_file says it.
        let e = err(dir.path(), Select::Names(strings(&["app", "nope"])));
        assert_eq!(e, format!("{:#}", project::container_file(dir.path(), "nope").unwrap_err()));
        let empty = tempfile::tempdir().unwrap();
        let e = err(empty.path(), Select::Names(strings(&["a", "b"])));
        let root = empty.path().display();
        assert_eq!(
            e,
            format!(
                "no containers/NAME/default.nix in {root} for \"a\", \"b\" ({root} holds no containers/*/default.nix)"
            )
        );
    }

    #[test]
    fn names_that_are_not_directory_names_are_refused() {
        let dir = fixture();
        let e = err(dir.path(), Select::Names(strings(&["app", "../app", "", "a/b", "nope"])));
        assert_eq!(e, "container names \"../app\", \"\", \"a/b\" are not directory names under containers/");
        let e = err(dir.path(), Select::Names(strings(&[".."])));
        assert_eq!(e, "container name \"..\" is not a directory name under containers/");
        let e = err(dir.path(), Select::Names(Vec::new()));
        assert_eq!(e, "no containers selected: name some, or pass --all or --changed REV");
    }

    #[test]
    fn all_is_every_default_nix_sorted() {
        let dir = fixture();
        assert_eq!(names(dir.path(), Select::All), strings(&["app", "dst", "quiet", "src", "tool", "web"]));
        let empty = tempfile::tempdir().unwrap();
        write(empty.path(), "containers/legacy/Dockerfile", "FROM debian\n");
        let e = err(empty.path(), Select::All);
        assert_eq!(
            e,
            format!(
                "--all found no containers/*/default.nix in {} (run nixctr in the project root, or pass -C DIR)",
                empty.path().display()
            )
        );
    }

    #[test]
    fn dirty_files_lists_the_uncommitted_changes_of_one_container() {
        let dir = fixture();
        let root = dir.path();
        assert_eq!(dirty_files(root, "web").unwrap(), strings(&["M containers/web/config.json"]));
        assert_eq!(dirty_files(root, "tool").unwrap(), strings(&["?? containers/tool/new.patch"]));
        // Ignored files do not count.
        assert!(dirty_files(root, "quiet").unwrap().is_empty());
        assert!(dirty_files(root, "app").unwrap().is_empty());
        let e = dirty_files(root, "../web").unwrap_err().to_string();
        assert_eq!(e, "container name \"../web\" is not a directory name under containers/");
        let outside = tempfile::tempdir().unwrap();
        let e = dirty_files(outside.path(), "web").unwrap_err().to_string();
        assert!(e.starts_with("cannot check containers/web for uncommitted changes: git said "), "{e}");
        assert!(e.ends_with("(pass --allow-dirty to publish anyway)"), "{e}");
    }

    #[test]
    fn how_far_back_a_rev_reaches() {
        for (rev, n) in [("HEAD~1", Some(1)), ("HEAD~", Some(1)), ("HEAD^", Some(1)), ("HEAD^^", Some(2))] {
            assert_eq!(commits_back(rev), n, "{rev}");
        }
        for (rev, n) in [("@~3", Some(3)), ("HEAD", None), ("HEAD~0", None), ("main~1", None), ("HEAD~x", None)] {
            assert_eq!(commits_back(rev), n, "{rev}");
        }
    }

    #[test]
    fn paths_map_to_directories() {
        let dir = tempfile::tempdir().unwrap();
        let root: PathBuf = dir.path().to_path_buf();
        write(&root, "containers/a/default.nix", "{ }\n");
        let paths: Vec<&[u8]> =
            vec![b"containers/a/x", b"containers/a/y/z", b"containers/\xff/x", b"containers", b"x/a"];
        let selection = from_paths(&root, &paths);
        assert_eq!(selection.names, strings(&["a"]));
        assert_eq!(reasons(&selection.skipped), BTreeMap::from([("\u{fffd}", "name is not UTF-8")]));
    }
}
