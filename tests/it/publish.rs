//! `nixctr publish`: build through each engine, push to a real registry, read back with
//! skopeo and the engine.

use crate::harness::*;
use crate::registry_harness::{Registry, TestImage};

#[test]
fn publish_builds_and_pushes_under_the_version_tag() {
    for engine in engines() {
        let fx = Fixture::new();
        let head = fx.git_commit_all();
        let registry = Registry::plain();
        let out = fx
            .nixctr(Some(&engine))
            .args(["publish", "ntfy", "--registry", &registry.host(), "--namespace", "team"])
            .run();
        out.success();
        let image = format!("{}/team/ntfy:v2.17.0-{}-nix", registry.host(), &head[..7]);
        let printed = out.stdout();
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
        pull.arg(&image).run().success();
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &image]).run();
        ran.success();
        assert!(ran.stdout().contains("2.17.0"), "{}: {}", engine.name, ran.stdout());
        engine.cli().args(["rmi", &image]).run();
    }
}

/// A dirty container is refused; publishing the same commit again rebuilds the same image,
/// finds its tag naming it already and succeeds without pushing; a changed image under the
/// same tag is refused (both digests named) unless `--force`.
#[test]
fn publish_refuses_a_dirty_container_and_publishes_once() {
    for engine in engines() {
        let fx = Fixture::new();
        let head = fx.git_commit_all();
        let registry = Registry::plain();
        let host = registry.host();
        let publish = |extra: &[&str]| {
            fx.nixctr(Some(&engine))
                .args(["publish", "ntfy", "--registry", &host, "--namespace", "team", "--json"])
                .args(extra)
                .run()
        };

        let original = fx.read("containers/ntfy/default.nix");
        fx.write("containers/ntfy/default.nix", &(original.clone() + "\n# edited\n"));
        publish(&[]).assert_exit(1).stderr_has("containers/ntfy has uncommitted changes").stderr_has("--allow-dirty");

        let out = publish(&["--allow-dirty", "--version", "v9.9.9"]);
        out.success();
        let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
        let tag = format!("v9.9.9-{}-nix", &head[..7]);
        assert_eq!(json["tag"], tag);
        assert_eq!(json["tags"], serde_json::json!([tag]));
        assert_eq!(json["version"], "v9.9.9");
        assert_eq!(json["name"], "ntfy");
        assert_eq!(json["status"], "pushed");
        assert_eq!(json["ref"], format!("{host}/team/ntfy:{tag}"));
        assert!(json["digest"].as_str().unwrap().starts_with("sha256:"));
        assert!(json["pushed_bytes"].as_u64().unwrap() > 0);
        let first_digest = json["digest"].as_str().unwrap().to_string();
        let read_back =
            || registry.skopeo_inspect(&format!("team/ntfy:{tag}"), false).expect("inspect")["Digest"].clone();
        assert_eq!(read_back(), first_digest.as_str());

        // A CI re-run of the same commit, without the blob cache: built again, the same image.
        std::fs::remove_dir_all(fx.path().join("cache/nixctr")).expect("remove the blob cache");
        let out = publish(&["--allow-dirty", "--version", "v9.9.9"]);
        out.success().stderr_has("already published");
        let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
        assert_eq!(json["status"], "skipped", "{}: {json}", engine.name);
        assert_eq!(json["error"], "already published");
        assert_eq!(json["digest"], first_digest.as_str(), "{}: the rebuilt image differs", engine.name);
        assert_eq!(json["pushed_bytes"], 0);

        // A changed image config (same layers) under the same tag: refused, then --force.
        fx.write(
            "containers/ntfy/default.nix",
            &original.replace("Cmd = [ \"serve\" ];", "Cmd = [ \"serve\" \"--forced\" ];"),
        );
        let refused = publish(&["--allow-dirty", "--version", "v9.9.9"]);
        refused.assert_exit(1).stderr_has(&first_digest).stderr_has("--force");
        assert_eq!(read_back(), first_digest.as_str(), "a refused publish moved the tag");

        let out = publish(&["--allow-dirty", "--version", "v9.9.9", "--force"]);
        out.success();
        let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
        assert_eq!(json["skipped_layers"].as_u64(), Some(3), "every layer was there already: {json}");
        let forced = json["digest"].as_str().expect("digest").to_string();
        assert!(forced.starts_with("sha256:"), "{json}");
        assert_ne!(forced, first_digest, "{}: the forced publish pushed the same image", engine.name);
        refused.stderr_has(&forced);
        assert_eq!(read_back(), forced.as_str(), "{}: the tag does not point at the forced push", engine.name);
    }
}

#[test]
fn publish_of_a_prebuilt_archive_needs_no_engine() {
    let engine = &engines()[0];
    let fx = Fixture::new();
    let head = fx.git_commit_all();
    fx.nixctr(Some(engine)).args(["build", "hello", "-o", "../hello.tar.gz", "-q"]).run().success();
    let registry = Registry::plain();
    let out = fx
        .nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive", "../hello.tar.gz"])
        .args(["--registry", &registry.host(), "--version", "2.12.1"])
        .run();
    out.success();
    let image = format!("{}/hello:v2.12.1-{}-nix", registry.host(), &head[..7]);
    assert!(out.stdout().starts_with(&format!("{image}@sha256:")), "{}", out.stdout());
    assert!(registry.skopeo_inspect(&format!("hello:v2.12.1-{}-nix", &head[..7]), false).is_some());
}

#[test]
fn publish_without_a_registry_says_how_to_name_one() {
    let fx = Fixture::new();
    fx.git_commit_all();
    fx.nixctr(None).args(["publish", "hello", "--version", "1"]).run().assert_exit(1).stderr_has("--registry");
}

/// A small archive for the publish tests that need no engine.
fn test_archive(fx: &Fixture) -> String {
    TestImage::new(2, 10_000, 40).write(fx.path(), "prebuilt", false).to_str().unwrap().to_string()
}

/// `--tag` gives the tag whole; `tag` in nixctr.toml is the template; `--tag` beats it.
#[test]
fn publish_tag_flag_and_the_tag_template() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let archive = test_archive(&fx);
    let registry = Registry::plain();
    let host = registry.host();
    let publish = |extra: &[&str]| {
        fx.nixctr(None)
            .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive", &archive])
            .args(["--registry", &host])
            .args(extra)
            .run()
    };

    let out = publish(&["--tag", "custom-1"]);
    assert!(out.success().stdout().starts_with(&format!("{host}/hello:custom-1@sha256:")), "{}", out.stdout());
    assert!(registry.skopeo_inspect("hello:custom-1", false).is_some());

    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("tag = \"{{version}}-build-{{sha}}\"\n{config}"));
    let head = fx.git_commit_all();
    let out = publish(&["--version", "v2.12.1", "--json"]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    let tag = format!("v2.12.1-build-{}", &head[..7]);
    assert_eq!(json["tag"], tag, "{json}");
    assert_eq!(json["ref"], format!("{host}/hello:{tag}"));
    assert_eq!(registry.skopeo_inspect(&format!("hello:{tag}"), false).expect("inspect")["Digest"], json["digest"]);

    let out = publish(&["--version", "v2.12.1", "--tag", "custom-2", "--json"]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
    assert_eq!(json["tag"], "custom-2", "--tag beats the template: {json}");
    assert!(registry.skopeo_inspect("hello:custom-2", false).is_some());
}

/// `NIXCTR_REGISTRY` names the registry: over `registry` in nixctr.toml, under `--registry`.
#[test]
fn nixctr_registry_environment_variable() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let archive = test_archive(&fx);
    let registry = Registry::plain();
    let nowhere = crate::registry_harness::ClosedPort::new();
    let bad = format!("127.0.0.1:{}", nowhere.port);
    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("registry = \"{bad}\"\n{config}"));
    fx.git_commit_all();
    let publish = |tag: &str| {
        let mut cmd = fx.nixctr(None);
        cmd.args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive", &archive, "--tag", tag]);
        cmd
    };

    // The file alone: its registry is tried (and is not there).
    publish("from-file").run().assert_exit(1).stderr_has(&bad);
    // The environment over the file.
    let out = publish("from-env").env("NIXCTR_REGISTRY", registry.host()).run();
    assert!(out.success().stdout().starts_with(&format!("{}/hello:from-env@", registry.host())), "{}", out.stdout());
    assert!(registry.skopeo_inspect("hello:from-env", false).is_some());
    // The flag over the environment.
    let out = publish("from-flag").env("NIXCTR_REGISTRY", &bad).args(["--registry", &registry.host()]).run();
    assert!(out.success().stdout().starts_with(&format!("{}/hello:from-flag@", registry.host())), "{}", out.stdout());
    assert!(registry.skopeo_inspect("hello:from-flag", false).is_some());
}
