//! `--pin`: publish writes the image it pushed into a GitOps tree (fixtures/gitops), and
//! `nixctr pin` does the same for an image already pushed. The results are read back with a
//! YAML parser and with `git diff`, which must show only the tag and digest lines changed.

use std::path::Path;

use crate::harness::*;
use crate::registry_harness::{ClosedPort, Registry, TestImage};

const NTFY_KUSTOMIZATION: &str = "deploy/argocd/manifests/ntfy/kustomization.yaml";
const WEB_KUSTOMIZATION: &str = "deploy/argocd/manifests/web/kustomization.yaml";
const DEPLOYMENT: &str = "deploy/argocd/manifests/ntfy/deployment.yaml";
const KUSTOMIZATIONS: &str = "deploy/argocd/manifests/*/kustomization.yaml";

/// A project with the GitOps tree under `deploy/`, naming `host` as the registry, all committed.
fn gitops(host: &str) -> Fixture {
    let fx = Fixture::new();
    let from = repo_root().join("fixtures/gitops");
    copy_dir(&from, &fx.project().join("deploy"));
    for file in [NTFY_KUSTOMIZATION, WEB_KUSTOMIZATION, DEPLOYMENT] {
        fx.write(file, &fx.read(file).replace("__REGISTRY__", host));
    }
    fx.git_commit_all();
    fx
}

fn archive(fx: &Fixture) -> String {
    TestImage::new(2, 10_000, 41).write(fx.path(), "pinned", false).to_str().unwrap().to_string()
}

fn git(fx: &Fixture, args: &[&str]) -> String {
    let out = Cmd::tool("git").current_dir(fx.project()).args(args).run();
    out.success();
    out.stdout()
}

/// `publish hello --archive … --tag TAG` with the extra flags; git can commit as a test user.
fn publish(fx: &Fixture, archive: &str, host: &str, tag: &str, extra: &[&str]) -> Output {
    fx.nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive", archive])
        .args(["--registry", host, "--namespace", "team", "--tag", tag])
        .args(extra)
        .env("GIT_AUTHOR_NAME", "nixctr-test")
        .env("GIT_AUTHOR_EMAIL", "test@nixctr.invalid")
        .env("GIT_COMMITTER_NAME", "nixctr-test")
        .env("GIT_COMMITTER_EMAIL", "test@nixctr.invalid")
        .run()
}

/// The file read with a YAML parser: each document as JSON.
fn yaml(fx: &Fixture, rel: &str) -> Vec<serde_json::Value> {
    use saphyr_parser::{Event, Parser};
    use serde_json::Value;
    fn node<'a>(first: Event<'a>, events: &mut impl Iterator<Item = Event<'a>>) -> Value {
        match first {
            Event::Scalar(value, ..) => Value::String(value.into_owned()),
            Event::SequenceStart(..) => {
                let mut items = Vec::new();
                while let Some(e) = events.next() {
                    if matches!(e, Event::SequenceEnd) {
                        break;
                    }
                    items.push(node(e, events));
                }
                Value::Array(items)
            }
            Event::MappingStart(..) => {
                let mut map = serde_json::Map::new();
                while let Some(e) = events.next() {
                    if matches!(e, Event::MappingEnd) {
                        break;
                    }
                    let key = node(e, events);
                    let value = node(events.next().expect("a value"), events);
                    map.insert(key.as_str().expect("string keys").to_string(), value);
                }
                Value::Object(map)
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let text = fx.read(rel);
    let mut events = Parser::new_from_str(&text).map(|e| e.expect("the file parses").0);
    let mut documents = Vec::new();
    while let Some(e) = events.next() {
        if matches!(e, Event::DocumentStart(_)) {
            let first = events.next().expect("a node");
            documents.push(node(first, &mut events));
        }
    }
    documents
}

/// The changed lines `git diff -U0` shows, without the file headers.
fn changed_lines(fx: &Fixture) -> Vec<String> {
    git(fx, &["diff", "-U0"])
        .lines()
        .filter(|l| (l.starts_with('+') || l.starts_with('-')) && !l.starts_with("+++") && !l.starts_with("---"))
        .map(str::to_string)
        .collect()
}

#[test]
fn publish_pins_the_kustomizations_and_the_deployment() {
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let archive = archive(&fx);
    let out = publish(&fx, &archive, &host, "v2.0.0-pin", &["--json", "--pin", KUSTOMIZATIONS, "--pin", DEPLOYMENT]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    let digest = json["digest"].as_str().expect("digest").to_string();
    assert_eq!(registry.skopeo_inspect("team/hello:v2.0.0-pin", false).expect("pushed")["Digest"], digest.as_str());
    assert_eq!(json["pinned"], serde_json::json!([NTFY_KUSTOMIZATION, WEB_KUSTOMIZATION, DEPLOYMENT]), "{json}");
    out.stderr_has(&format!("pinned {NTFY_KUSTOMIZATION}:11: newTag v0.0.0-0000000-nix -> v2.0.0-pin"));

    // Read back as YAML.
    let repository = format!("{host}/team/hello");
    let ntfy = &yaml(&fx, NTFY_KUSTOMIZATION)[0]["images"];
    assert_eq!(ntfy[0]["name"], repository.as_str());
    assert_eq!(ntfy[0]["newTag"], "v2.0.0-pin");
    assert!(ntfy[0].get("digest").is_none(), "no digest was asked for: {ntfy}");
    assert_eq!(ntfy[1]["newTag"], "7.2.4", "redis moved: {ntfy}");
    assert_eq!(ntfy[2]["newTag"], "v0.0.0-0000000-nix", "another registry's entry moved: {ntfy}");
    let web = &yaml(&fx, WEB_KUSTOMIZATION)[0]["images"];
    assert_eq!(web[0]["newTag"], "v2.0.0-pin");
    assert_eq!(web[0]["digest"], digest.as_str(), "an entry with a digest gets the new one");
    let containers = &yaml(&fx, DEPLOYMENT)[0]["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], format!("{repository}:v2.0.0-pin@{digest}").as_str());
    assert_eq!(containers[1]["image"], "docker.io/library/redis:7.2.4");
    assert_eq!(containers[2]["image"], "ghcr.io/team/hello:v0");

    // git sees three files changed, one line each, only tag and digest lines.
    let stat = git(&fx, &["diff", "--stat"]);
    assert!(stat.contains("3 files changed, 4 insertions(+), 4 deletions(-)"), "{stat}");
    let changed = changed_lines(&fx);
    assert_eq!(
        changed,
        [
            format!("-          image: {repository}:v0@sha256:{}", "0".repeat(64)),
            format!("+          image: {repository}:v2.0.0-pin@{digest}"),
            "-    newTag: v0.0.0-0000000-nix  # bumped on every publish".to_string(),
            "+    newTag: v2.0.0-pin  # bumped on every publish".to_string(),
            "-  newTag: \"v0\"          # pinned by digest below".to_string(),
            format!("-  digest: \"sha256:{}\"", "0".repeat(64)),
            "+  newTag: \"v2.0.0-pin\"          # pinned by digest below".to_string(),
            format!("+  digest: \"{digest}\""),
        ],
    );

    // Published again (already published: the same digest), nothing changes.
    let again = publish(&fx, &archive, &host, "v2.0.0-pin", &["--pin", KUSTOMIZATIONS, "--pin", DEPLOYMENT]);
    again.success().stderr_has("already published").stderr_has("no file needed a change");
    assert_eq!(changed_lines(&fx), changed);
}

/// `pin` in nixctr.toml (relative to the project root, whatever the working directory) with
/// `--pin-digest`: a digest is added where there was none.
#[test]
fn pin_in_nixctr_toml_with_pin_digest() {
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("pin = [\"{KUSTOMIZATIONS}\"]\n{config}"));
    fx.git_commit_all();
    let archive = archive(&fx);
    let out = publish(&fx, &archive, &host, "v3", &["--pin-digest", "--json"]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    let digest = json["digest"].as_str().unwrap();
    let ntfy = &yaml(&fx, NTFY_KUSTOMIZATION)[0]["images"];
    assert_eq!(ntfy[0]["digest"], digest);
    assert!(ntfy[1].get("digest").is_none() && ntfy[2].get("digest").is_none(), "{ntfy}");
    let changed = changed_lines(&fx);
    assert!(changed.contains(&format!("+    digest: {digest}")), "{changed:?}");
    assert_eq!(changed.len(), 7, "newTag in both files, the web digest, the added digest: {changed:?}");
    let files = git(&fx, &["diff", "--name-only"]);
    assert_eq!(files.lines().collect::<Vec<_>>(), [NTFY_KUSTOMIZATION, WEB_KUSTOMIZATION], "only `pin` of nixctr.toml");
}

/// `nixctr pin REF@DIGEST` for an image pushed earlier, with `--pin-commit`: one commit of
/// the changed files only, naming the image; a second run changes and commits nothing.
#[test]
fn pin_command_commits_once() {
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let archive = archive(&fx);
    let pushed = publish(&fx, &archive, &host, "v4", &[]);
    let reference = pushed.success().stdout().trim().to_string();
    let digest = reference.split_once('@').unwrap().1.to_string();
    fx.write("unrelated.txt", "not to be committed\n");
    git(&fx, &["add", "unrelated.txt"]);
    let before = git(&fx, &["rev-parse", "HEAD"]);
    let pin = || {
        fx.nixctr(None)
            .current_dir(fx.project().join("deploy"))
            .args(["pin", &reference, "--pin", "argocd/manifests/*/kustomization.yaml", "--pin-commit", "--json"])
            .env("GIT_AUTHOR_NAME", "nixctr-test")
            .env("GIT_AUTHOR_EMAIL", "test@nixctr.invalid")
            .env("GIT_COMMITTER_NAME", "nixctr-test")
            .env("GIT_COMMITTER_EMAIL", "test@nixctr.invalid")
            .run()
    };
    let out = pin();
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(
        json["pinned"],
        serde_json::json!(["argocd/manifests/ntfy/kustomization.yaml", "argocd/manifests/web/kustomization.yaml"])
    );
    let head = git(&fx, &["rev-parse", "HEAD"]);
    assert_eq!(json["commits"], serde_json::json!([head.trim()]));
    assert_eq!(git(&fx, &["rev-list", "--count", &format!("{}..HEAD", before.trim())]).trim(), "1");
    let files = git(&fx, &["show", "--name-only", "--format=", "HEAD"]);
    assert_eq!(files.lines().collect::<Vec<_>>(), [NTFY_KUSTOMIZATION, WEB_KUSTOMIZATION]);
    let message = git(&fx, &["log", "-1", "--format=%B"]);
    assert!(message.starts_with("Pin hello:v4"), "{message}");
    assert!(message.contains(&format!("{host}/team/hello:v4@{digest}")), "{message}");
    assert_eq!(git(&fx, &["diff", "--cached", "--name-only"]).trim(), "unrelated.txt", "the staged file was committed");
    assert_eq!(yaml(&fx, WEB_KUSTOMIZATION)[0]["images"][0]["digest"], digest.as_str());

    let again = pin();
    again.success().stderr_has("no file needed a change");
    assert_eq!(git(&fx, &["rev-parse", "HEAD"]), head, "a second run committed");
}

#[test]
fn a_glob_that_matches_nothing_is_a_warning() {
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let archive = archive(&fx);
    let out = publish(&fx, &archive, &host, "v5", &["--pin", "deploy/nowhere/*.yaml", "--pin", KUSTOMIZATIONS]);
    out.success().stderr_has("warning: --pin \"deploy/nowhere/*.yaml\" matches no file");
    assert_eq!(changed_lines(&fx).len(), 6, "three lines, each removed and added");
}

/// A file that does not parse: refused before anything is pushed, named with its line.
#[test]
fn a_file_that_does_not_parse_stops_the_publish_before_the_push() {
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let broken =
        fx.read(WEB_KUSTOMIZATION).replace("- name: docker.io/library/redis", "- name: [docker.io/library/redis");
    fx.write(WEB_KUSTOMIZATION, &broken);
    fx.git_commit_all();
    let archive = archive(&fx);
    let out = publish(&fx, &archive, &host, "v6", &["--pin", KUSTOMIZATIONS]);
    out.assert_exit(1).stderr_has(&format!("{WEB_KUSTOMIZATION}: line 10 column"));
    assert!(registry.skopeo_inspect("team/hello:v6", false).is_none(), "pushed despite the broken file");
    assert_eq!(fx.read(WEB_KUSTOMIZATION), broken);
    assert!(changed_lines(&fx).is_empty());
}

/// A push that fails, or that the registry's tag refuses, writes nothing.
#[test]
fn a_failed_or_refused_push_pins_nothing() {
    let nowhere = ClosedPort::new();
    let host = format!("127.0.0.1:{}", nowhere.port);
    let fx = gitops(&host);
    let first = archive(&fx);
    publish(&fx, &first, &host, "v7", &["--pin", KUSTOMIZATIONS, "--pin-digest"]).assert_exit(1);
    assert!(changed_lines(&fx).is_empty(), "{:?}", changed_lines(&fx));

    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    publish(&fx, &archive(&fx), &host, "v7", &[]).success();
    let other = TestImage::new(2, 10_000, 42).write(fx.path(), "other", false);
    let refused = publish(&fx, other.to_str().unwrap(), &host, "v7", &["--pin", KUSTOMIZATIONS, "--pin-digest"]);
    refused.assert_exit(1).stderr_has("--force");
    assert!(changed_lines(&fx).is_empty(), "{:?}", changed_lines(&fx));
}

/// A read-only file (mode 0444) is refused even for root, before the push; a file whose
/// rename fails (immutable, which stops root too) fails the pin after the push, and the other
/// file, already written, is put back.
#[test]
fn read_only_and_unreplaceable_files_leave_everything_as_it_was() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::plain();
    let host = registry.host();
    let fx = gitops(&host);
    let archive = archive(&fx);
    let web = fx.project().join(WEB_KUSTOMIZATION);
    std::fs::set_permissions(&web, std::fs::Permissions::from_mode(0o444)).unwrap();
    let out = publish(&fx, &archive, &host, "v8", &["--pin", KUSTOMIZATIONS]);
    out.assert_exit(1).stderr_has(&format!("{WEB_KUSTOMIZATION} is read-only (mode 0444)"));
    assert!(registry.skopeo_inspect("team/hello:v8", false).is_none());
    std::fs::set_permissions(&web, std::fs::Permissions::from_mode(0o644)).unwrap();

    let immutable = Immutable::set(&web);
    let out = publish(&fx, &archive, &host, "v8", &["--pin", KUSTOMIZATIONS]);
    out.assert_exit(1).stderr_has(&format!("cannot write {WEB_KUSTOMIZATION}; no file was changed"));
    // The image is in the registry and said on stdout: only the files are not written.
    assert!(out.stdout().starts_with(&format!("{host}/team/hello:v8@sha256:")), "{}", out.stdout());
    drop(immutable);
    assert!(changed_lines(&fx).is_empty(), "{:?}", changed_lines(&fx));
    let leftovers: Vec<_> = std::fs::read_dir(web.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".nixctr-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// `chattr +i` for the length of a test: not even root can rename over the file.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        Cmd::tool("chattr").arg("+i").arg(path).run().success();
        Immutable(path.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}
