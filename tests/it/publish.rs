//! `nixctr publish`: build through each engine, push to a real registry, read back with
//! skopeo and the engine.

use crate::harness::*;
use crate::registry_harness::Registry;

#[test]
fn publish_builds_and_pushes_under_the_version_tag() {
    for engine in engines() {
        let fx = Fixture::new();
        let head = fx.git_commit_all();
        let registry = Registry::plain();
        let out = run(fx.nixctr(Some(&engine)).args([
            "publish",
            "ntfy",
            "--registry",
            &registry.host(),
            "--namespace",
            "team",
        ]));
        assert_success(&out);
        let image = format!("{}/team/ntfy:v2.17.0-{}-nix", registry.host(), &head[..7]);
        let printed = stdout(&out);
        let (reference, digest) = printed.trim().split_once('@').expect("REF@DIGEST");
        assert_eq!(reference, image, "{}", engine.name);
        let inspected = registry
            .skopeo_inspect(&format!("team/ntfy:v2.17.0-{}-nix", &head[..7]), false)
            .expect("skopeo reads the pushed image");
        assert_eq!(inspected["Digest"], digest);
        assert_no_containers_left(&engine, &out);

        // The engine pulls what was pushed, and it runs.
        let mut pull = engine.cli();
        pull.arg("pull");
        if engine.name == "podman" {
            pull.arg("--tls-verify=false"); // podman's CLI wants https even on loopback
        }
        assert_success(&run(pull.arg(&image)));
        let ran = run(engine.cli().args(["run", "--rm", "--network", "none", &image]));
        assert_success(&ran);
        assert!(stdout(&ran).contains("2.17.0"), "{}: {}", engine.name, stdout(&ran));
        let _ = run(engine.cli().args(["rmi", &image]));
    }
}

#[test]
fn publish_refuses_a_dirty_container_and_an_existing_tag() {
    let engine = &engines()[0];
    let fx = Fixture::new();
    let head = fx.git_commit_all();
    let registry = Registry::plain();
    let host = registry.host();
    let publish = |extra: &[&str]| {
        let mut cmd = fx.nixctr(Some(engine));
        cmd.args(["publish", "ntfy", "--registry", &host, "--namespace", "team", "--json"]).args(extra);
        run(&mut cmd)
    };

    fx.write(
        "containers/ntfy/default.nix",
        &(std::fs::read_to_string(fx.project().join("containers/ntfy/default.nix")).unwrap() + "\n# edited\n"),
    );
    let out = publish(&[]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("containers/ntfy has uncommitted changes"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--allow-dirty"), "{}", stderr(&out));

    let out = publish(&["--allow-dirty", "--version", "v9.9.9"]);
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let tag = format!("v9.9.9-{}-nix", &head[..7]);
    assert_eq!(json["tag"], tag);
    assert_eq!(json["version"], "v9.9.9");
    assert_eq!(json["name"], "ntfy");
    assert_eq!(json["ref"], format!("{host}/team/ntfy:{tag}"));
    assert!(json["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(json["pushed_bytes"].as_u64().unwrap() > 0);
    let first_digest = json["digest"].clone();

    let out = publish(&["--allow-dirty", "--version", "v9.9.9"]);
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));

    let out = publish(&["--allow-dirty", "--version", "v9.9.9", "--force"]);
    assert_success(&out);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(json["skipped_layers"].as_u64(), Some(3), "every layer was there already: {json}");
    assert_ne!(json["digest"], serde_json::Value::Null);
    let _ = first_digest;
}

#[test]
fn publish_of_a_prebuilt_archive_needs_no_engine() {
    let engine = &engines()[0];
    let fx = Fixture::new();
    let head = fx.git_commit_all();
    assert_success(&run(fx.nixctr(Some(engine)).args(["build", "hello", "-o", "../hello.tar.gz", "-q"])));
    let registry = Registry::plain();
    let out = run(fx.nixctr(None).args([
        "--engine",
        "unix:///nonexistent.sock",
        "publish",
        "hello",
        "--archive",
        "../hello.tar.gz",
        "--registry",
        &registry.host(),
        "--version",
        "2.12.1",
    ]));
    assert_success(&out);
    let image = format!("{}/hello:v2.12.1-{}-nix", registry.host(), &head[..7]);
    assert!(stdout(&out).starts_with(&format!("{image}@sha256:")), "{}", stdout(&out));
    assert!(registry.skopeo_inspect(&format!("hello:v2.12.1-{}-nix", &head[..7]), false).is_some());
}

#[test]
fn publish_without_a_registry_says_how_to_name_one() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let out = run(fx.nixctr(None).args(["publish", "hello", "--version", "1"]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("--registry"), "{}", stderr(&out));
}
