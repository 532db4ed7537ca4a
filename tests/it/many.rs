//! Many containers per run: selection (`NAME…`, `--all`, `--changed REV`), `nixctr list`,
//! and `build`/`publish` of a selection in one run, against a fixture repository with two
//! commits, on both engines and a real registry.

use crate::harness::*;
use crate::registry_harness::Registry;

/// The fixture project, committed, then a second commit the way a push to an ops repository
/// looks: a version bump (ntfy), changed files beside a default.nix (nettest, whose version
/// nothing declares; web, whose version is nixpkgs' nginx), a change in a Dockerfile-only
/// container (legacy), and a container that no longer builds (curl).
fn two_commits() -> Fixture {
    let fx = Fixture::new();
    fx.git_commit_all();
    let ntfy = fx.read("containers/ntfy/default.nix").replace("version = \"2.17.0\";", "version = \"2.17.1\";");
    fx.write("containers/ntfy/default.nix", &ntfy);
    let script = fx.read("containers/nettest/test-connectivity.sh") + "\n# checked again\n";
    fx.write("containers/nettest/test-connectivity.sh", &script);
    fx.write("containers/web/index.html", "<p>hello</p>\n");
    let legacy = fx.read("containers/legacy/Dockerfile").replace("3.1.4", "3.1.5");
    fx.write("containers/legacy/Dockerfile", &legacy);
    fx.write(
        "containers/curl/default.nix",
        &fx.read("containers/broken-build/default.nix").replace("broken-build", "curl"),
    );
    fx.git_commit_all();
    fx
}

fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    out.stdout().lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

fn by_name<'a>(records: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    records.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no record for {name}: {records:?}"))
}

#[test]
fn list_selects_exactly_what_changed() {
    let fx = two_commits();
    let out = fx.nixctr(None).args(["list", "--changed", "HEAD~1"]).run();
    out.success();
    assert_eq!(out.stdout(), "curl\nnettest\nntfy\nweb\n");
    out.stderr_has("skipped legacy: no default.nix (Dockerfile-only)");

    let out = fx.nixctr(None).args(["list", "--changed", "HEAD~1", "--json"]).run();
    out.success();
    assert_eq!(out.stdout().trim(), r#"["curl","nettest","ntfy","web"]"#);

    // Uncommitted and untracked changes count too; nothing changed is no error.
    fx.nixctr(None).args(["list", "--changed", "HEAD"]).run().success().stderr_has("no container changed");
    fx.write("containers/hello/notes.txt", "untracked\n");
    let out = fx.nixctr(None).args(["list", "--changed", "HEAD"]).run();
    assert_eq!(out.success().stdout(), "hello\n");

    // A change to nixctr.toml affects every build.
    let toml = fx.read("nixctr.toml") + "\n# tuned\n";
    fx.write("nixctr.toml", &toml);
    let all = fx.nixctr(None).args(["list", "--all"]).run().success().stdout();
    assert_eq!(fx.nixctr(None).args(["list", "--changed", "HEAD"]).run().success().stdout(), all);
    assert!(all.lines().count() >= 9 && !all.contains("legacy"), "{all}");
}

#[test]
fn selection_errors_name_the_fix() {
    let fx = two_commits();
    fx.nixctr(None)
        .args(["build", "nope", "hello", "gone"])
        .run()
        .assert_exit(1)
        .stderr_has("\"nope\", \"gone\"")
        .stderr_has("containers: ");
    fx.nixctr(None).args(["list", "--changed", "no-such-rev"]).run().assert_exit(1).stderr_has("\"no-such-rev\"");
    fx.nixctr(None)
        .args(["build", "hello", "ntfy", "-o", "x.tar.gz"])
        .run()
        .assert_exit(1)
        .stderr_has("-o names one file");
    fx.nixctr(None).args(["build"]).run().assert_exit(2).stderr_has("--all");

    // A shallow clone has no HEAD~1: say how to fetch it.
    let shallow = fx.path().join("shallow");
    Cmd::tool("git")
        .args(["clone", "-q", "--depth", "1"])
        .arg(format!("file://{}", fx.project().display()))
        .arg(&shallow)
        .run()
        .success();
    fx.nixctr(None)
        .current_dir(&shallow)
        .args(["list", "--changed", "HEAD~1"])
        .run()
        .assert_exit(1)
        .stderr_has("fetch-depth: 2");

    // Outside a git repository, and a project without containers.
    let bare = fx.path().join("bare");
    std::fs::create_dir_all(bare.join("containers")).unwrap();
    std::fs::write(bare.join("nixctr.toml"), "").unwrap();
    fx.nixctr(None).current_dir(&bare).args(["list", "--changed", "HEAD"]).run().assert_exit(1).stderr_has("git");
    fx.nixctr(None).current_dir(&bare).args(["build", "--all"]).run().assert_exit(1).stderr_has("--all found no");
}

#[test]
fn build_changed_builds_the_rest_when_one_fails() {
    for engine in engines() {
        let fx = two_commits();
        let out = fx.nixctr(Some(&engine)).args(["build", "--changed", "HEAD~1", "--json"]).run();
        out.assert_exit(1);
        let records = json_lines(&out);
        assert_eq!(records.len(), 4, "{records:?}");
        for name in ["nettest", "ntfy", "web"] {
            let r = by_name(&records, name);
            assert_eq!(r["status"], "built", "{}: {r}", engine.name);
            let archive = fx.project().join(format!("{name}.tar.gz"));
            assert_eq!(r["archive"], format!("{name}.tar.gz"));
            assert_eq!(std::fs::metadata(&archive).unwrap().len(), r["bytes"].as_u64().unwrap());
        }
        assert_eq!(by_name(&records, "ntfy")["version"], "2.17.1");
        let curl = by_name(&records, "curl");
        assert_eq!(curl["status"], "failed");
        assert!(curl["error"].as_str().unwrap().contains("fails on purpose"), "nix's error for curl: {curl}");
        assert!(!fx.project().join("curl.tar.gz").exists());
        out.stderr_has("error: curl: ").stderr_has("NAME").stderr_has("1 of 4 containers failed: curl");
        assert_no_containers_left(&engine, &out);

        // The built image loads and runs.
        let loaded = fx.nixctr(Some(&engine)).args(["-q", "build", "ntfy", "--load"]).run();
        let image = loaded.success().stdout().trim().to_string();
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &image]).run();
        assert!(ran.success().stdout().contains("ntfy 2.17.1"), "{}", ran.stdout());
        engine.cli().args(["rmi", &image]).run();

        // --fail-fast stops at the first failure: nothing else is reported as built.
        let out =
            fx.nixctr(Some(&engine)).args(["build", "curl", "broken-eval", "hello", "--fail-fast", "--json"]).run();
        out.assert_exit(1);
        let records = json_lines(&out);
        assert_eq!(by_name(&records, "broken-eval")["status"], "failed");
        assert!(records.iter().all(|r| r["status"] != "built"), "{records:?}");
    }
}

#[test]
fn publish_changed_pushes_every_changed_container_in_one_run() {
    for engine in engines() {
        let fx = two_commits();
        let head = fx.git_commit_all();
        let sha = &head[..7];
        let registry = Registry::plain();
        let host = registry.host();
        let publish = |extra: &[&str]| {
            fx.nixctr(Some(&engine))
                .args(["publish", "--changed", "HEAD~2", "--registry", &host, "--namespace", "team", "--json"])
                .args(extra)
                .run()
        };
        let out = publish(&[]);
        out.assert_exit(1);
        let records = json_lines(&out);
        assert_eq!(records.len(), 4, "{records:?}");
        // ntfy's version is in its default.nix, web's is nixpkgs' nginx.
        for (name, version) in [("ntfy", "2.17.1"), ("web", "1.26.2")] {
            let r = by_name(&records, name);
            assert_eq!(r["status"], "pushed", "{}: {r}", engine.name);
            let tag = r["tag"].as_str().unwrap();
            assert!(tag.starts_with(&format!("v{version}")) && tag.ends_with(&format!("-{sha}-nix")), "{tag}");
            let read = registry.skopeo_inspect(&format!("team/{name}:{tag}"), false).expect("skopeo reads it");
            assert_eq!(read["Digest"], r["digest"], "{name}");
        }
        let pushed: std::collections::HashMap<&str, serde_json::Value> =
            ["ntfy", "web"].into_iter().map(|name| (name, by_name(&records, name)["digest"].clone())).collect();
        let curl = by_name(&records, "curl");
        assert_eq!(curl["status"], "failed");
        assert!(curl["error"].as_str().unwrap().contains("fails on purpose"), "{curl}");
        // A failed check leaves a container out, like a failed build.
        let nettest = by_name(&records, "nettest");
        assert_eq!(nettest["status"], "failed");
        assert!(nettest["error"].as_str().unwrap().contains("no version for nettest"), "{nettest}");
        assert!(registry.skopeo_inspect(&format!("team/curl:v8.11.0-{sha}-nix"), false).is_none());
        assert_no_containers_left(&engine, &out);

        // What was pushed pulls and runs.
        let image = format!("{host}/team/ntfy:{}", by_name(&records, "ntfy")["tag"].as_str().unwrap());
        let mut pull = engine.cli();
        pull.arg("pull");
        if engine.name == "podman" {
            pull.arg("--tls-verify=false");
        }
        pull.arg(&image).run().success();
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &image]).run();
        assert!(ran.success().stdout().contains("ntfy 2.17.1"), "{}", ran.stdout());
        engine.cli().args(["rmi", &image]).run();

        // A CI job re-run on the same commit: existing tags count as done.
        let again = publish(&["--skip-existing"]);
        again.assert_exit(1);
        let records = json_lines(&again);
        assert_eq!(by_name(&records, "ntfy")["status"], "skipped");
        assert_eq!(by_name(&records, "web")["status"], "skipped");
        assert_eq!(by_name(&records, "curl")["status"], "failed");
        // Without it, each tag is found naming the image built again: nothing is pushed.
        let rerun = fx
            .nixctr(Some(&engine))
            .args(["publish", "ntfy", "web", "--registry", &host, "--namespace", "team", "--json"])
            .run();
        rerun.success();
        let rerun = json_lines(&rerun);
        for name in ["ntfy", "web"] {
            let r = by_name(&rerun, name);
            assert_eq!((&r["status"], &r["error"]), (&"skipped".into(), &"already published".into()), "{r}");
            assert_eq!(r["digest"], pushed[name], "{}: {name} built again differs", engine.name);
        }
    }
}

#[test]
fn completions_and_man_page_come_from_the_cli() {
    let sandbox = Sandbox::new();
    let bash = Cmd::nixctr(&sandbox).args(["completions", "bash"]).run();
    assert!(bash.success().stdout().contains("_nixctr()"), "{}", bash.stdout());
    assert!(bash.stdout().contains("--changed"));
    let man = Cmd::nixctr(&sandbox).arg("man").run();
    assert!(man.success().stdout().contains(".TH nixctr"), "{}", man.stdout());
    let help = Cmd::nixctr(&sandbox).arg("--help").env("NO_COLOR", "1").run();
    assert!(!help.success().stdout().contains('\u{1b}'));
}
