//! Tags: several on one manifest (in one request where the registry answers `OCI-Tag`, one
//! at a time where it ignores `?tag=`), publishing again what a tag already names, a tag that
//! names another image, and a registry that refuses to overwrite a tag. Read back with skopeo
//! from the registry directly, past the proxies in front of it.

use std::sync::{Arc, Mutex};

use crate::harness::*;
use crate::registry_harness::Nginx;
use crate::registry_harness::{Proxy, Registry, TestImage};
use crate::tag_harness::OciTagShim;

/// The digest skopeo reads under `image` (`repo:tag`), if there is one.
fn digest_of(registry: &Registry, image: &str) -> Option<String> {
    registry.skopeo_inspect(image, false).map(|v| v["Digest"].as_str().expect("Digest").to_string())
}

/// A proxy that passes everything on and lists each request as `METHOD path`.
fn recorder(registry: &Registry) -> (Proxy, Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let proxy = Proxy::start(registry.port, move |r| {
        log.lock().expect("log").push(format!("{} {}", r.method, r.path));
        None
    });
    (proxy, seen)
}

/// The requests of `seen` that write something: blob uploads, mounts, manifests.
fn writes(seen: &Mutex<Vec<String>>) -> Vec<String> {
    let seen = seen.lock().expect("seen");
    seen.iter().filter(|l| !l.starts_with("GET ") && !l.starts_with("HEAD ")).cloned().collect()
}

/// A registry that applies `?tag=` itself and says so with `OCI-Tag`: one manifest PUT
/// carries every tag, and each reads back with the one digest.
#[test]
fn several_tags_in_one_request_where_the_registry_answers_oci_tag() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let shim = OciTagShim::start(registry.port);
    let archive = TestImage::new(3, 60_000, 71).write(home.path(), "img", false);
    let reference = format!("{}/team/app:v1-abc-nix", shim.host());
    let out = home
        .nixctr()
        .args(["push", "-v", archive.to_str().expect("path"), &reference, "--tag", "v1-nix", "--tag", "latest"])
        .run();
    out.success().stderr_has("applied 3 tags in one request");
    let digest = printed_digest(&out, &reference);
    for tag in ["v1-abc-nix", "v1-nix", "latest"] {
        assert_eq!(digest_of(&registry, &format!("team/app:{tag}")).as_deref(), Some(digest.as_str()), "{tag}");
    }
    let puts = shim.manifest_puts();
    assert_eq!(
        puts,
        [format!("PUT /v2/team/app/manifests/{digest}?tag=v1-abc-nix&tag=v1-nix&tag=latest")],
        "one manifest PUT, by digest, with every tag"
    );
}

/// docker-registry 2.8 ignores `?tag=` (no `OCI-Tag` in its answer): the manifest is put by
/// digest first, then under each tag; every tag reads back with the one digest. An image
/// index gets the same.
#[test]
fn a_registry_that_ignores_the_tag_query_gets_one_put_per_tag() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let (proxy, seen) = recorder(&registry);
    let archive = TestImage::new(2, 40_000, 72).write(home.path(), "img", false);
    let reference = format!("{}/app:one", proxy.host());
    let out = home.nixctr().args(["push", "-v", archive.to_str().expect("path"), &reference, "--tag", "two"]).run();
    out.success().stderr_has("did not apply 2 of the tags asked for (no OCI-Tag)");
    let digest = printed_digest(&out, &reference);
    assert_eq!(digest_of(&registry, "app:one").as_deref(), Some(digest.as_str()));
    assert_eq!(digest_of(&registry, "app:two").as_deref(), Some(digest.as_str()));
    let puts: Vec<String> = writes(&seen).into_iter().filter(|l| l.contains("/manifests/")).collect();
    assert_eq!(
        puts,
        [
            format!("PUT /v2/app/manifests/{digest}?tag=one&tag=two"),
            "PUT /v2/app/manifests/one".to_string(),
            "PUT /v2/app/manifests/two".to_string(),
        ]
    );

    // Two platforms: the index under both tags.
    let amd = TestImage::new(2, 30_000, 73).write(home.path(), "amd", false);
    let arm = TestImage::new(2, 30_000, 74).for_architecture("arm64").write(home.path(), "arm", false);
    let reference = format!("{}/multi:v2", registry.host());
    let out = home
        .nixctr()
        .args(["push", amd.to_str().expect("path"), arm.to_str().expect("path"), &reference, "--tag", "stable"])
        .run();
    out.success();
    let digest = printed_digest(&out, &reference);
    for tag in ["v2", "stable"] {
        let raw = registry.skopeo_inspect(&format!("multi:{tag}"), true).expect("inspect --raw");
        assert_eq!(raw["mediaType"], "application/vnd.oci.image.index.v1+json", "{tag}: {raw}");
        assert!(digest_of(&registry, &format!("multi:{tag}")).is_some());
    }
    let index_digest = |tag: &str| {
        let out = Cmd::tool("skopeo")
            .args(["inspect", "--tls-verify=false", "--raw"])
            .arg(format!("docker://{}/multi:{tag}", registry.host()))
            .quiet()
            .run();
        out.success();
        crate::registry_harness::sha256(&out.stdout)
    };
    assert_eq!(index_digest("v2"), digest);
    assert_eq!(index_digest("stable"), digest);

    // A bad extra tag is refused before anything is sent.
    home.nixctr()
        .args(["push", archive.to_str().expect("path"), &format!("{}/app:three", registry.host()), "--tag=-x"])
        .run()
        .assert_exit(1)
        .stderr_has("tag \"-x\" is invalid");
    assert!(digest_of(&registry, "app:three").is_none());
}

/// `tags` in nixctr.toml: every template filled in, one manifest under all, `--json` lists
/// them; `--tag` repeated replaces them; `tag` and `tags` together are refused.
#[test]
fn publish_under_several_tags() {
    let fx = Fixture::new();
    let archive = TestImage::new(2, 30_000, 75).write(fx.path(), "prebuilt", false);
    let archive = archive.to_str().expect("path").to_string();
    let registry = Registry::plain();
    let host = registry.host();
    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("tags = [\"v{{version}}-{{sha}}-nix\", \"v{{version}}-nix\"]\n{config}"));
    let head = fx.git_commit_all();
    let publish = |extra: &[&str]| {
        fx.nixctr(None)
            .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive", &archive])
            .args(["--registry", &host, "--namespace", "team", "--version", "2.12.1", "--json"])
            .args(extra)
            .run()
    };
    let out = publish(&[]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("json");
    let first = format!("v2.12.1-{}-nix", &head[..7]);
    assert_eq!(json["tag"], first, "{json}");
    assert_eq!(json["tags"], serde_json::json!([first, "v2.12.1-nix"]), "{json}");
    assert_eq!(json["ref"], format!("{host}/team/hello:{first}"));
    assert_eq!(json["status"], "pushed");
    let digest = json["digest"].as_str().expect("digest").to_string();
    assert_eq!(digest_of(&registry, &format!("team/hello:{first}")).as_deref(), Some(digest.as_str()));
    assert_eq!(digest_of(&registry, "team/hello:v2.12.1-nix").as_deref(), Some(digest.as_str()));

    let out = publish(&["--tag", "a1", "--tag", "a2"]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("json");
    assert_eq!(json["tags"], serde_json::json!(["a1", "a2"]), "--tag replaces the templates: {json}");
    assert_eq!(digest_of(&registry, "team/hello:a2").as_deref(), Some(digest.as_str()));

    // Every tag is checked before anything is sent.
    publish(&["--tag", "good", "--tag", "bad tag"]).assert_exit(1).stderr_has("\"bad tag\" is not a valid image tag");
    assert!(digest_of(&registry, "team/hello:good").is_none());
    fx.write("nixctr.toml", &format!("tags = [\"ok-{{version}}\", \"v{{verison}}\"]\n{config}"));
    publish(&[]).assert_exit(1).stderr_has("\"v{verison}\" has an unknown placeholder");
    assert!(digest_of(&registry, "team/hello:ok-2.12.1").is_none());
    fx.write("nixctr.toml", &format!("tag = \"x\"\ntags = [\"y\"]\n{config}"));
    publish(&[]).assert_exit(1).stderr_has("set `tag` or `tags`, not both");
    fx.write("nixctr.toml", &format!("tags = []\n{config}"));
    publish(&[]).assert_exit(1).stderr_has("`tags` is empty");
}

/// Publishing what the tags name already sends nothing and succeeds, even with no blob
/// cache (the layers compress to the same blobs again); another image under an existing
/// tag is refused, naming both digests, and nothing is sent; `--force` moves the tags;
/// `--skip-existing` leaves an existing tag as it is and pushes the others.
#[test]
fn publish_again_is_already_published_and_another_image_is_refused() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let image = TestImage::new(3, 80_000, 76);
    let same = image.write(fx.path(), "same", true);
    let other = TestImage::new(3, 80_000, 76).with_changed_layer(2, "other").write(fx.path(), "other", true);
    let registry = Registry::plain();
    let (proxy, seen) = recorder(&registry);
    let host = proxy.host();
    let publish = |archive: &std::path::Path, extra: &[&str]| {
        fx.nixctr(None)
            .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive"])
            .arg(archive)
            .args(["--registry", &host, "--tag", "v1", "--tag", "v1-latest", "--json"])
            .args(extra)
            .run()
    };

    let out = publish(&same, &[]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("json");
    assert_eq!(json["status"], "pushed", "{json}");
    let first = json["digest"].as_str().expect("digest").to_string();

    // A re-run on a machine that never pushed it: nothing is written.
    std::fs::remove_dir_all(fx.path().join("cache/nixctr")).expect("remove the blob cache");
    seen.lock().expect("seen").clear();
    let out = publish(&same, &[]);
    out.success().stderr_has("already published");
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("json");
    assert_eq!((&json["status"], &json["error"]), (&"skipped".into(), &"already published".into()), "{json}");
    assert_eq!(json["digest"], first.as_str());
    assert_eq!(json["pushed_bytes"], 0);
    assert_eq!(writes(&seen), Vec::<String>::new(), "an already published image was written again");
    // Without --json: the one line a deploy step reads, as for a push.
    let out = fx
        .nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive"])
        .arg(&same)
        .args(["--registry", &host, "--tag", "v1"])
        .run();
    assert_eq!(printed_digest(out.success(), &format!("{host}/hello:v1")), first);

    // Another image: refused before anything is sent, both digests named.
    seen.lock().expect("seen").clear();
    let refused = publish(&other, &[]);
    refused.assert_exit(1).stderr_has(&first).stderr_has("--force").stderr_has("new version");
    assert_eq!(writes(&seen), Vec::<String>::new(), "a refused publish wrote something");
    assert_eq!(digest_of(&registry, "hello:v1").as_deref(), Some(first.as_str()));

    let out = publish(&other, &["--force"]);
    out.success();
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("json");
    let forced = json["digest"].as_str().expect("digest").to_string();
    assert_ne!(forced, first);
    refused.stderr_has(&forced);
    assert_eq!(digest_of(&registry, "hello:v1").as_deref(), Some(forced.as_str()));
    assert_eq!(digest_of(&registry, "hello:v1-latest").as_deref(), Some(forced.as_str()));

    // --skip-existing: v1 (the other image) stays; the new tag gets this one.
    let out = fx
        .nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive"])
        .arg(&same)
        .args(["--registry", &host, "--tag", "v1", "--tag", "v1-again", "--skip-existing"])
        .run();
    out.success().stderr_has("hello:v1 already exists: left as it is");
    assert_eq!(digest_of(&registry, "hello:v1").as_deref(), Some(forced.as_str()));
    assert_eq!(digest_of(&registry, "hello:v1-again").as_deref(), Some(first.as_str()));
}

/// A create-only registry (nginx answers 403 DENIED to a manifest PUT on the existing tag):
/// `--force` gets one error naming the tag and the policy, and no other tag is made;
/// publishing the image the tag names already works, and adds the new tag.
#[test]
fn a_registry_that_refuses_to_overwrite_a_tag() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let same = TestImage::new(2, 50_000, 77).write(fx.path(), "same", false);
    let other = TestImage::new(2, 50_000, 78).write(fx.path(), "other", false);
    let registry = Registry::plain();
    let nginx = Nginx::create_only(registry.port, "hello", "stable");
    // The tag exists: pushed before the policy (straight to the registry).
    let direct = format!("{}/hello:stable", registry.host());
    let pushed = fx.nixctr(None).args(["push"]).arg(&same).arg(&direct).run();
    let stable = printed_digest(pushed.success(), &direct);

    let publish = |archive: &std::path::Path, extra: &[&str]| {
        fx.nixctr(None)
            .args(["--engine", "unix:///nonexistent.sock", "publish", "hello", "--archive"])
            .arg(archive)
            .args(["--registry", &nginx.host(), "--tag", "stable", "--tag", "next"])
            .args(extra)
            .run()
    };
    let out = publish(&other, &["--force"]);
    out.assert_exit(1)
        .stderr_has("refuses to overwrite tag \"stable\"")
        .stderr_has("DENIED")
        .stderr_has("immutable tags or a create-only policy")
        .stderr_has("--force cannot change that");
    assert_eq!(out.stderr().matches("error:").count(), 1, "one error: {}", out.stderr());
    assert_eq!(digest_of(&registry, "hello:stable").as_deref(), Some(stable.as_str()));
    assert!(digest_of(&registry, "hello:next").is_none(), "a refused push made another tag");

    // `nixctr push` through the policy: the same error.
    let reference = format!("{}/hello:stable", nginx.host());
    let out = fx.nixctr(None).args(["push"]).arg(&other).arg(&reference).run();
    out.assert_exit(1).stderr_has("refuses to overwrite tag \"stable\"");

    // Without --force, another image is refused before the registry is asked to write.
    publish(&other, &[]).assert_exit(1).stderr_has(&stable).stderr_lacks("refuses to overwrite");

    // The image the tag names: already published; the new tag is added.
    let out = publish(&same, &[]);
    out.success().stderr_has("already published");
    assert_eq!(digest_of(&registry, "hello:stable").as_deref(), Some(stable.as_str()));
    assert_eq!(digest_of(&registry, "hello:next").as_deref(), Some(stable.as_str()));
}

/// An image index whose tags name it already is not pushed again; another index under them
/// is refused before anything is sent (the library calls `publish` makes for several
/// platforms).
#[test]
fn an_index_published_again_sends_nothing() {
    use nixctr::registry::{Compression, Destination, ExistingTags, ManifestFormat, PushSession, Reference};
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let config = nixctr::registry::RegistryConfig {
        format: ManifestFormat::Oci,
        compression: Compression::Gzip,
        jobs: 2,
        blob_cache: Some(home.path().join("cache/blobs.json")),
        ..Default::default()
    };
    let amd = TestImage::new(2, 30_000, 79).write(home.path(), "amd", false);
    let arm = TestImage::new(2, 30_000, 80).for_architecture("arm64").write(home.path(), "arm", false);
    let arm2 = TestImage::new(2, 30_000, 81).for_architecture("arm64").write(home.path(), "arm2", false);
    let reference = Reference::parse(&format!("{}/multi:v1", registry.host())).expect("reference");
    let destination =
        Destination::with_tags(reference.clone(), &["v1-nix".to_string()], ExistingTags::MustMatch).expect("tags");
    let notes = std::collections::BTreeMap::from([("org.opencontainers.image.version".to_string(), "1".to_string())]);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let progress = nixctr::progress::Progress::new(true, false);
    let session = runtime.block_on(PushSession::connect(&config, reference.registry(), &progress)).expect("connect");

    let push = |archives: &[std::path::PathBuf]| {
        runtime.block_on(session.push_index(archives, &destination, &notes, &progress))
    };
    let first = push(&[amd.clone(), arm.clone()]).expect("first push");
    assert!(!first.already_published() && first.pushed_bytes > 0, "{first:?}");
    let again = push(&[amd.clone(), arm.clone()]).expect("second push");
    assert!(again.already_published(), "{again:?}");
    assert_eq!((again.digest.as_str(), again.pushed_bytes), (first.digest.as_str(), 0));
    assert_eq!(again.platforms, first.platforms);

    let err = push(&[amd, arm2]).expect_err("another index under the same tags");
    let err = format!("{err:#}");
    assert!(err.contains(&first.digest) && err.contains("--force"), "{err}");
    assert!(digest_of(&registry, "multi:v1-nix").is_some());
    let raw = Cmd::tool("skopeo")
        .args(["inspect", "--tls-verify=false", "--raw"])
        .arg(format!("docker://{}/multi:v1-nix", registry.host()))
        .quiet()
        .run();
    assert_eq!(crate::registry_harness::sha256(&raw.success().stdout), first.digest, "the refused index moved a tag");
}
