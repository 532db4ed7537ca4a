//! `nixctr doctor` against the real engines, registries and cache keys, one broken thing at a
//! time: each a named problem with its fix and exit 1; all well is exit 0. The JSON form is
//! read back, so each test says which check failed, not only that something did.

use std::path::Path;

use crate::harness::*;
use crate::registry_harness::{layer_tar, sha256, write_archive, ClosedPort, Registry, TokenServer, PASSWORD, USER};

const KEYS: &str = "/etc/nixctr-test/cache";

/// The JSON report of a run.
fn read_report(out: &Output) -> serde_json::Value {
    serde_json::from_str(out.stdout().trim()).unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e})"))
}

/// Check `name` of section `section`; fails the test when there is none.
fn check<'a>(report: &'a serde_json::Value, section: &str, name: &str) -> &'a serde_json::Value {
    let sections = report["sections"].as_array().expect("sections");
    let found =
        sections.iter().find(|s| s["name"] == section).unwrap_or_else(|| panic!("no section {section}: {report}"));
    let checks = found["checks"].as_array().expect("checks");
    checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {section}/{name}: {report}"))
}

/// The failed checks, as `section/name`.
fn problems(report: &serde_json::Value) -> Vec<String> {
    let mut found = Vec::new();
    for section in report["sections"].as_array().expect("sections") {
        for c in section["checks"].as_array().expect("checks") {
            if c["ok"] == false {
                assert!(c["fix"].as_str().is_some_and(|f| !f.is_empty()), "a problem without a fix: {c}");
                found.push(format!("{}/{}", section["name"].as_str().unwrap(), c["name"].as_str().unwrap()));
            }
        }
    }
    found
}

#[test]
fn all_well_is_exit_0_and_every_section_is_checked() {
    let registry = Registry::plain();
    let public = std::fs::read_to_string(Path::new(KEYS).join("signing-key.pub")).unwrap();
    for engine in engines() {
        let fx = Fixture::new();
        let cache = fx.path().join("binary-cache");
        let cache_flags = [
            "--substituter".to_string(),
            "http://127.0.0.1:5081".to_string(),
            "--trusted-public-key".to_string(),
            public.trim().to_string(),
            "--cache-to".to_string(),
            format!("file://{}", cache.display()),
            "--signing-key".to_string(),
            format!("{KEYS}/signing-key"),
        ];
        let out = fx
            .nixctr(Some(&engine))
            .args(["--platform", "linux/amd64,linux/arm64"])
            .args(&cache_flags)
            .args(["doctor", "--json", "--registry", &registry.host()])
            .deadline(COLD_BUILD_DEADLINE)
            .run();
        out.assert_exit(0);
        let report = read_report(&out);
        assert_eq!(report["ok"], true, "{report}");
        assert!(problems(&report).is_empty());
        let flavor = if engine.name == "docker" { "Docker " } else { "Podman " };
        let detail = check(&report, "engine", "engine")["detail"].as_str().unwrap().to_string();
        assert!(
            detail.starts_with(flavor) && detail.contains("(API 1.") && detail.contains("from --engine"),
            "{detail}"
        );
        // Each platform ran `uname -m` in the nix image: natively, and under emulation.
        let amd64 = check(&report, "engine", "linux/amd64")["detail"].as_str().unwrap();
        assert!(amd64.starts_with("native (uname -m in the nix image: x86_64"), "{amd64}");
        let arm64 = check(&report, "engine", "linux/arm64")["detail"].as_str().unwrap();
        assert!(arm64.starts_with("emulated (uname -m in the nix image: aarch64"), "{arm64}");
        assert_eq!(check(&report, "nix image", "platforms")["detail"], "has linux/amd64, linux/arm64");
        let containers = check(&report, "project", "containers")["detail"].as_str().unwrap();
        assert!(containers.contains("hello") && containers.contains("ntfy"), "{containers}");
        let api = check(&report, "registry", "/v2/")["detail"].as_str().unwrap();
        assert!(api.ends_with("answers 200 OK without a login"), "{api}");
        assert_eq!(check(&report, "binary cache", "signing key")["ok"], true);
        assert_eq!(check(&report, "binary cache", "trusted public key")["ok"], true);
        // The secret never shows; its public name may.
        let secret = std::fs::read_to_string(Path::new(KEYS).join("signing-key")).unwrap();
        let secret = secret.trim().split_once(':').unwrap().1;
        assert!(!out.stdout().contains(secret) && !out.stderr().contains(secret), "the signing key was printed");
        assert!(!cache.exists(), "doctor wrote to the cache");
        assert_no_containers_left(&engine, &out);

        // The screen: a line per check, and the verdict.
        let out = fx.nixctr(Some(&engine)).arg("doctor").run();
        out.assert_exit(0);
        let screen = out.stdout();
        assert!(screen.lines().any(|l| l.starts_with("  ok") && l.contains("linux/amd64")), "{screen}");
        assert_eq!(screen.lines().last(), Some("all well"), "{screen}");
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn no_engine_is_a_named_problem() {
    let fx = Fixture::new();
    let socket = fx.path().join("no-such-engine.sock");
    let url = format!("unix://{}", socket.display());
    let out = fx.nixctr(None).args(["-H", &url, "doctor", "--json"]).run();
    out.assert_exit(1).stderr_has("doctor found 1 problem");
    let report = read_report(&out);
    assert_eq!(report["ok"], false);
    assert_eq!(problems(&report), ["engine/engine"]);
    let engine = check(&report, "engine", "engine");
    assert!(engine["detail"].as_str().unwrap().contains(&url), "{engine}");
    assert!(engine["fix"].as_str().unwrap().starts_with("start one (Docker:"), "{engine}");
    // What needs no engine is still checked.
    assert_eq!(check(&report, "project", "containers")["ok"], true);

    let out = fx.nixctr(None).args(["-H", &url, "doctor"]).run();
    out.assert_exit(1);
    let line = out.stdout().lines().find(|l| l.contains("problem")).unwrap_or_default().to_string();
    assert!(line.contains("engine") && line.contains(&url) && line.contains("fix: start one"), "{line}");
}

#[test]
fn a_platform_the_image_lacks_is_a_named_problem() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["--platform", "linux/riscv64", "doctor", "--json"]).run();
        out.assert_exit(1);
        let report = read_report(&out);
        assert_eq!(problems(&report), ["nix image/platforms"], "{}", engine.name);
        let platforms = check(&report, "nix image", "platforms");
        assert_eq!(
            platforms["detail"], "nixos/nix:2.33.3 has no linux/riscv64 image; it has linux/amd64, linux/arm64",
            "{}",
            engine.name
        );
        assert!(platforms["fix"].as_str().unwrap().contains("--platform"), "{platforms}");
        assert_no_containers_left(&engine, &out);
    }
}

/// An image whose config says arm64 but whose programs are amd64 runs natively on this amd64
/// machine: the run's `uname -m` gives it away, where the image's label alone would not.
#[test]
fn an_image_of_the_wrong_platform_is_a_named_problem() {
    for engine in engines() {
        let fx = Fixture::new();
        let name = format!("localhost/nixctr-it-doctor-wrong:{}", unique("t"));
        let archive = mislabelled_image(fx.path(), &name, "arm64");
        engine.cli().arg("load").arg("-i").arg(&archive).run().success();
        let out = fx
            .nixctr(Some(&engine))
            .args(["--nix-image", &name, "--pull", "never", "--platform", "linux/arm64", "doctor", "--json"])
            .run();
        engine.remove_image(&name);
        out.assert_exit(1);
        let report = read_report(&out);
        assert_eq!(problems(&report), ["engine/linux/arm64"], "{}", engine.name);
        let run = check(&report, "engine", "linux/arm64");
        assert_eq!(
            run["detail"],
            format!("the nix image {name} for linux/arm64 runs amd64 programs (uname -m: x86_64), not arm64"),
            "{}",
            engine.name
        );
        assert_no_containers_left(&engine, &out);
    }
}

/// A docker-archive named `name`, its config saying `architecture`, holding this machine's
/// static busybox as `sleep` and `uname` (what a nixctr container runs).
fn mislabelled_image(dir: &Path, name: &str, architecture: &str) -> std::path::PathBuf {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
    let layer = layer_tar(&[("bin/sleep", &busybox, 0o755), ("bin/uname", &busybox, 0o755)]);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
    }))
    .unwrap();
    let config_name = format!("{}.json", &sha256(&config)[7..]);
    let layer_name = format!("{}/layer.tar", &sha256(&layer)[7..]);
    let manifest =
        serde_json::to_vec(&serde_json::json!([{"Config": config_name, "RepoTags": [name], "Layers": [layer_name]}]))
            .unwrap();
    let bytes =
        layer_tar(&[(&config_name, &config, 0o644), (&layer_name, &layer, 0o644), ("manifest.json", &manifest, 0o644)]);
    write_archive(dir, "mislabelled", &bytes, false)
}

/// A registry that refuses the login: htpasswd over TLS, and bearer tokens. The right
/// password passes; a wrong one is the login's problem, naming the user and where the
/// credentials came from, never the password.
#[test]
fn a_refused_registry_login_is_a_named_problem() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let basic = Registry::tls_with_auth();
    let tokens = TokenServer::start(300);
    let bearer = Registry::with_tokens(&tokens);
    let wrong = "not-the-Pa55word";
    for (registry, extra, how) in [
        (&basic, vec!["--ca-cert".to_string(), basic.ca_cert().display().to_string()], "Basic"),
        (&bearer, Vec::new(), "a token fetch"),
    ] {
        let fx = Fixture::new();
        let run = |password: Option<&str>| {
            let mut cmd = fx.nixctr(Some(engine));
            cmd.args(["doctor", "--json", "--registry", &registry.host()]).args(&extra);
            if let Some(password) = password {
                cmd.env("NIXCTR_REGISTRY_USERNAME", USER).env("NIXCTR_REGISTRY_PASSWORD", password);
            }
            cmd.run()
        };
        let out = run(Some(PASSWORD));
        out.assert_exit(0);
        let login = check(&read_report(&out), "registry", "login").clone();
        assert_eq!(
            login["detail"],
            format!(
                "the credentials of user \"{USER}\" from NIXCTR_REGISTRY_USERNAME/NIXCTR_REGISTRY_PASSWORD are accepted ({how})"
            )
        );

        let out = run(Some(wrong));
        out.assert_exit(1);
        let report = read_report(&out);
        assert_eq!(problems(&report), ["registry/login"], "{how}");
        let login = check(&report, "registry", "login");
        let detail = login["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("rejected the credentials of user \"{USER}\" from NIXCTR_REGISTRY_USERNAME")),
            "{detail}"
        );
        assert_eq!(check(&report, "registry", "credentials")["ok"], true);
        assert!(!out.stdout().contains(wrong) && !out.stderr().contains(wrong), "the password was printed");

        let out = run(None);
        out.assert_exit(1);
        let report = read_report(&out);
        assert_eq!(problems(&report), ["registry/login"], "{how}");
        assert!(check(&report, "registry", "login")["detail"].as_str().unwrap().contains("requires credentials"));
    }
}

#[test]
fn a_registry_that_does_not_answer_is_a_named_problem() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    let closed = ClosedPort::new();
    let host = format!("127.0.0.1:{}", closed.port);
    let out = fx.nixctr(Some(engine)).args(["doctor", "--json", "--registry", &host]).run();
    out.assert_exit(1);
    let report = read_report(&out);
    assert_eq!(problems(&report), ["registry/reachable"]);
    let reach = check(&report, "registry", "reachable");
    assert!(reach["detail"].as_str().unwrap().contains(&host), "{reach}");
    assert_eq!(reach["fix"], "is it running, and is the address right?");
}

#[test]
fn a_bad_signing_key_or_trusted_key_is_a_named_problem() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    let bad = fx.path().join("bad-key");
    let garbage = "nixctr-test-1:bm90IGEga2V5";
    std::fs::write(&bad, garbage).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cache = format!("file://{}", fx.path().join("cache").display());
    let out = fx
        .nixctr(Some(engine))
        .args(["--cache-to", &cache, "--signing-key"])
        .arg(&bad)
        .args(["--trusted-public-key", "nixctr-test-1:short", "doctor", "--json"])
        .run();
    out.assert_exit(1);
    let report = read_report(&out);
    assert_eq!(problems(&report), ["binary cache/trusted public key", "binary cache/signing key"]);
    let key = check(&report, "binary cache", "signing key");
    let detail = key["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("signing key {}", bad.display())) && detail.contains("not a nix secret key"),
        "{detail}"
    );
    assert!(!out.stdout().contains("bm90IGEga2V5"), "the key's text was printed");
    assert_eq!(check(&report, "binary cache", "cache-to")["ok"], true);

    // A key others may read is refused too, with the chmod that fixes it.
    std::fs::set_permissions(&bad, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = fx
        .nixctr(Some(engine))
        .args(["--cache-to", &cache, "--signing-key"])
        .arg(&bad)
        .args(["doctor", "--json"])
        .run();
    out.assert_exit(1);
    let report = read_report(&out);
    assert_eq!(problems(&report), ["binary cache/signing key"]);
    assert!(check(&report, "binary cache", "signing key")["detail"].as_str().unwrap().contains("chmod 600"));
}
