//! Platforms: `--platform`, the nix image checked per platform, one archive per platform, and
//! several archives pushed as one image index, read back with skopeo.

use crate::harness::*;
use crate::registry_harness::{Registry, TestImage};

#[test]
fn several_archives_push_as_one_index() {
    let home = Sandbox::new();
    let registry = Registry::plain();
    // The same first layer in both: an index's images share what they can.
    let amd = TestImage::new(3, 20_000, 7).write(home.path(), "amd", true);
    let arm = TestImage::new(3, 20_000, 8).for_architecture("arm64").write(home.path(), "arm", false);
    let reference = format!("{}/multi/app:1", registry.host());
    let out = home.nixctr().args(["push"]).arg(&amd).arg(&arm).arg(&reference).run();
    out.success();
    let printed = out.stdout();
    let (shown, digest) = printed.trim().split_once('@').expect("REF@DIGEST");
    assert_eq!(shown, reference);

    let raw = registry.skopeo_inspect("multi/app:1", true).expect("skopeo reads the index");
    assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json", "{raw}");
    let platforms: Vec<String> = raw["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"].as_str().unwrap())
        })
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    // skopeo resolves each platform to its own image, and the index's digest is the one printed.
    let inspected = registry.skopeo_inspect("multi/app:1", false).expect("inspect");
    assert_eq!(inspected["Digest"], digest);
    let mut arm64 = Cmd::tool("skopeo");
    arm64.args(["inspect", "--override-arch", "arm64"]).args(registry.skopeo_flags());
    arm64.arg(format!("docker://{}/multi/app:1", registry.host()));
    let arm64: serde_json::Value = serde_json::from_str(&arm64.run().success().stdout()).unwrap();
    assert_eq!(arm64["Architecture"], "arm64");
    // The shared busybox layer went up once.
    out.stderr_has("[linux/arm64] layer 1/3").stderr_has("already there");

    // --format docker pushes a Docker manifest list.
    let list = format!("{}/multi/app:2", registry.host());
    home.nixctr().args(["push", "--format", "docker"]).arg(&amd).arg(&arm).arg(&list).run().success();
    let raw = registry.skopeo_inspect("multi/app:2", true).expect("skopeo reads the list");
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.list.v2+json", "{raw}");
}

#[test]
fn two_archives_of_one_platform_are_refused_before_anything_is_sent() {
    let home = Sandbox::new();
    let registry = Registry::plain();
    let a = TestImage::new(2, 10_000, 1).write(home.path(), "a", false);
    let b = TestImage::new(2, 10_000, 2).write(home.path(), "b", false);
    let out = home.nixctr().args(["push"]).arg(&a).arg(&b).arg(format!("{}/dup/app:1", registry.host())).run();
    out.assert_exit(1).stderr_has("both linux/amd64");
    assert!(registry.skopeo_inspect("dup/app:1", false).is_none());
    assert_eq!(registry.blob_bytes(), 0, "nothing may be sent");
}

#[test]
fn bad_platforms_are_refused() {
    let fx = Fixture::new();
    fx.nixctr(None).args(["--platform", "linux", "version", "ntfy"]).run().assert_exit(1).stderr_has("OS/ARCH");
    fx.nixctr(None)
        .args(["--platform", "linux/amd64,linux/x86_64", "build", "hello"])
        .run()
        .assert_exit(1)
        .stderr_has("named twice");
    fx.nixctr(None)
        .args(["--platform", "linux/amd64,linux/arm64", "build", "hello", "-o", "x.tar.gz"])
        .run()
        .assert_exit(1)
        .stderr_has("2 platforms");
    fx.nixctr(None)
        .args(["version", "ntfy"])
        .env("DOCKER_DEFAULT_PLATFORM", "nope")
        .run()
        .assert_exit(1)
        .stderr_has("\"nope\"");
}

#[test]
fn a_platform_the_nix_image_lacks_names_those_it_has() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["--platform", "linux/s390x", "build", "hello"]).run();
        out.assert_exit(1).stderr_has("has no linux/s390x image; it has linux/amd64");
        assert_no_containers_left(&engine, &out);
        assert!(!fx.project().join("hello.tar.gz").exists());
        // The engine's own copy still serves native builds.
        fx.nixctr(Some(&engine)).args(["-q", "build", "hello"]).run().success();
    }
}

#[test]
fn an_archive_of_another_platform_is_refused() {
    for engine in engines() {
        let fx = Fixture::new();
        let hello = fx.read("containers/hello/default.nix");
        fx.write(
            "containers/hello/default.nix",
            &hello.replace("tag = \"latest\";", "tag = \"latest\";\n  architecture = \"s390x\";"),
        );
        let out = fx.nixctr(Some(&engine)).args(["build", "hello", "--load"]).run();
        out.assert_exit(1).stderr_has("config says linux/s390x, not linux/amd64");
        assert!(!fx.project().join("hello.tar.gz").exists(), "a refused archive was kept");
        let left: Vec<_> = std::fs::read_dir(fx.project())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".nixctr-"))
            .collect();
        assert!(left.is_empty(), "temporary files left: {left:?}");
        assert_no_containers_left(&engine, &out);
        // Handed to the push as it is copied out, it is refused on the way: no tag.
        fx.git_commit_all();
        let registry = Registry::plain();
        let out =
            fx.nixctr(Some(&engine)).args(["publish", "hello", "--registry", &registry.host(), "--tag", "v1"]).run();
        out.assert_exit(1).stderr_has("config says linux/s390x, not linux/amd64");
        assert!(registry.skopeo_inspect("hello:v1", false).is_none(), "{}: a tag was pushed", engine.name);
        assert_no_containers_left(&engine, &out);
    }
}

/// The mirror image of an arm64 laptop building for amd64: arm64 under QEMU on this amd64
/// machine, loaded and run; then both platforms published as one index and pulled back.
#[test]
fn emulated_builds_and_a_two_platform_publish() {
    for engine in engines() {
        let fx = Fixture::new();
        let head = fx.git_commit_all();
        let out = fx
            .nixctr(Some(&engine))
            .args(["--platform", "linux/arm64", "build", "hello", "--load"])
            .deadline(std::time::Duration::from_secs(900))
            .run();
        out.success().stderr_has("emulated");
        let image = out.stdout().trim().to_string();
        let ran = engine
            .cli()
            .args(["run", "--rm", "--platform", "linux/arm64", "--network", "none", &image, "uname", "-m"])
            .run();
        assert_eq!(ran.success().stdout().trim(), "aarch64", "{}", engine.name);
        engine.cli().args(["rmi", &image]).run();

        let registry = Registry::plain();
        let host = registry.host();
        let out = fx
            .nixctr(Some(&engine))
            .args([
                "--platform",
                "linux/amd64,linux/arm64",
                "publish",
                "ntfy",
                "--registry",
                &host,
                "--namespace",
                "team",
                "--json",
            ])
            .deadline(std::time::Duration::from_secs(900))
            .run();
        out.success();
        let record: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
        let tag = format!("v2.17.0-{}-nix", &head[..7]);
        assert_eq!(record["tag"], tag);
        let raw = registry.skopeo_inspect(&format!("team/ntfy:{tag}"), true).expect("skopeo reads the index");
        assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json", "{raw}");
        assert_eq!(raw["annotations"]["org.opencontainers.image.version"], "2.17.0");
        assert_eq!(raw["annotations"]["org.opencontainers.image.revision"], head);
        for (platform, uname) in [("linux/amd64", "x86_64"), ("linux/arm64", "aarch64")] {
            let listed = raw["manifests"].as_array().unwrap().iter().find(|m| {
                format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"].as_str().unwrap())
                    == platform
            });
            let listed = listed.unwrap_or_else(|| panic!("{platform} missing from {raw}"));
            assert_eq!(record["platforms"][platform], listed["digest"], "{record}");
            let reference = format!("{host}/team/ntfy:{tag}");
            let mut pull = engine.cli();
            pull.args(["pull", "--platform", platform]);
            if engine.name == "podman" {
                pull.arg("--tls-verify=false");
            }
            pull.arg(&reference).run().success();
            let ran = engine
                .cli()
                .args([
                    "run",
                    "--rm",
                    "--platform",
                    platform,
                    "--network",
                    "none",
                    "--entrypoint",
                    "/bin/uname",
                    &reference,
                    "-m",
                ])
                .run();
            assert_eq!(ran.success().stdout().trim(), uname, "{}: {platform}", engine.name);
            engine.cli().args(["rmi", &reference]).run();
        }
        assert_no_containers_left(&engine, &out);
    }
}
