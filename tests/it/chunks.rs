//! Blob uploads through what stands in front of real registries: nginx proxies that cap
//! request bodies (nixctr goes over to chunks), connections cut mid-blob (it resumes, or
//! starts the blob again when the registry lost the session or says something impossible),
//! and limits nothing can pass. Each pushed image is read back with skopeo, through the
//! proxy and directly, and its digest compared with a direct push of the same archive.

use std::path::Path;
use std::sync::atomic::Ordering;

use crate::harness::*;
use crate::push::{check_with_skopeo, push, OCI_GZIP};
use crate::registry_harness::{error_answer, FaultProxy, Faults, Nginx, Proxy, Registry, TestImage};

/// A multi-layer image of about 50 MB compressed: busybox and four layers of 24 MB, half
/// of each incompressible (so each compressed layer is over 8 MiB).
fn image(seed: u64) -> TestImage {
    TestImage::new(5, 24_000_000, seed)
}

/// The digest of `archive` pushed straight to a registry of its own.
fn direct_digest(home: &Sandbox, archive: &Path) -> String {
    let registry = Registry::plain();
    let reference = format!("{}/direct/app:1", registry.host());
    let run = push(home, &[archive.to_str().expect("path"), &reference]);
    run.success();
    printed_digest(&run, &reference)
}

/// The `sent … in N requests…` line of a push: (requests, the whole line).
#[track_caller]
fn sent_line(run: &Output) -> (u64, String) {
    let stderr = run.stderr();
    let line = stderr.lines().find(|l| l.starts_with("sent ")).unwrap_or_else(|| panic!("no `sent` line: {stderr}"));
    let requests = line
        .split(" in ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {line:?}"));
    (requests, line.to_string())
}

/// The compressed size of every layer and the config of a pushed image, from the registry.
fn blob_bytes(registry: &Registry, image: &str) -> u64 {
    let raw = registry.skopeo_inspect(image, true).expect("inspect --raw");
    let layers: u64 = raw["layers"].as_array().expect("layers").iter().map(|l| l["size"].as_u64().expect("size")).sum();
    layers + raw["config"]["size"].as_u64().expect("config size")
}

/// nginx with its default body limit (1 MiB) and one at 8 MiB: nixctr meets a 413, goes
/// over to chunks of the largest size that passes, and remembers it for the next push.
#[test]
fn pushes_through_proxies_that_cap_request_bodies() {
    let home = Sandbox::new();
    let image = image(61);
    let archive = image.write(home.path(), "img", false);
    let direct = direct_digest(&home, &archive);

    for (limit, chunk) in [(None, "1.0 MiB"), (Some("8m"), "8.0 MiB")] {
        let registry = Registry::plain();
        let nginx = Nginx::start(registry.port, limit);
        let tag = format!("app:{}", chunk.replace([' ', '.'], ""));
        let reference = format!("{}/{tag}", nginx.host());
        let run = push(&home, &["-v", archive.to_str().expect("path"), &reference]);
        run.success().stderr_has("(413 Payload Too Large)").stderr_has(&format!("trying chunks of {chunk}"));
        let hints = std::fs::read_to_string(home.path().join("cache/nixctr/uploads.json")).expect("uploads.json");
        let remembered: serde_json::Value = serde_json::from_str(&hints).expect("uploads.json is JSON");
        let size_of_chunk: u64 = if limit.is_none() { 1 << 20 } else { 8 << 20 };
        assert_eq!(remembered["chunk-sizes"][nginx.host()], size_of_chunk, "{hints}");
        let (requests, line) = sent_line(&run);
        assert!(line.contains(&format!("in chunks of {chunk}")), "{line}");
        let total = blob_bytes(&registry, &tag);
        assert!(requests > total / size_of_chunk, "{total} bytes in {requests} requests: {line}");
        assert_eq!(printed_digest(&run, &reference), direct, "the same archive pushed through {limit:?}");
        // Read back through the proxy and directly.
        let via = nginx.skopeo_inspect(&tag).expect("skopeo through the proxy");
        assert_eq!(via["Digest"], direct);
        let copy = nginx.skopeo_copy_to_dir(&tag, home.path());
        assert!(copy.join("manifest.json").is_file());
        check_with_skopeo(&registry, &tag, &direct, &image, OCI_GZIP, home.path());

        // The next push to that proxy starts with the size that passed: no 413 at all.
        let other = TestImage::new(3, 6_000_000, 62);
        let archive = other.write(home.path(), "other", false);
        let reference = format!("{}/other:{}", nginx.host(), tag.replace("app:", ""));
        let run = push(&home, &["-v", archive.to_str().expect("path"), &reference]);
        run.success().stderr_has(&format!("took chunks of {chunk} last time")).stderr_lacks("refused");
    }
}

/// `[registries."host"] chunk-size` in nixctr.toml sets the size outright (no 413 to learn
/// it from), and `publish --json` says how the blobs went.
#[test]
fn chunk_size_in_nixctr_toml_and_the_json_record() {
    let fx = Fixture::new();
    let registry = Registry::plain();
    let nginx = Nginx::start(registry.port, None);
    let config = fx.read("nixctr.toml");
    fx.write("nixctr.toml", &format!("{config}\n[registries.\"{}\"]\nchunk-size = \"512KiB\"\n", nginx.host()));
    fx.git_commit_all();
    let archive = TestImage::new(3, 4_000_000, 63).write(fx.path(), "prebuilt", false);
    let out = fx
        .nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "-v", "publish", "hello", "--archive"])
        .arg(&archive)
        .args(["--registry", &nginx.host(), "--tag", "chunked", "--json"])
        .run();
    out.success().stderr_lacks("refused");
    let json: serde_json::Value = serde_json::from_str(out.stdout().trim()).expect("one JSON record");
    assert_eq!(json["chunked"], true, "{json}");
    assert_eq!(json["chunk_size"], 512 << 10, "{json}");
    assert_eq!(json["resumes"], 0, "{json}");
    let (sent, pushed) =
        (json["sent_bytes"].as_u64().expect("sent_bytes"), json["pushed_bytes"].as_u64().expect("pushed"));
    assert_eq!(sent, pushed, "nothing refused nor sent twice: {json}");
    assert!(json["requests"].as_u64().expect("requests") > pushed / (512 << 10), "{json}");
    assert_eq!(registry.skopeo_inspect("hello:chunked", false).expect("inspect")["Digest"], json["digest"]);
}

/// The connection drops halfway through the biggest layer; the registry kept what arrived,
/// so the push asks where the upload stands and goes on from there: the bytes that reached
/// the registry show it did not start over.
#[test]
fn a_cut_upload_resumes_where_it_stopped() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let image = image(64);
    let archive = image.write(home.path(), "img", false);
    let direct = direct_digest(&home, &archive);
    let proxy = FaultProxy::start(
        registry.port,
        Faults { cut_after: Some(8_000_000), keep_what_arrived: true, ..Faults::default() },
    );
    let reference = format!("{}/app:resumed", proxy.host());
    let run = push(&home, &["-v", "--jobs", "1", archive.to_str().expect("path"), &reference]);
    run.success().stderr_has("resumed sha256:");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 1);
    assert_eq!(printed_digest(&run, &reference), direct);
    let (_, line) = sent_line(&run);
    assert!(line.contains("1 resumed") && !line.contains("started again"), "{line}");
    let total = blob_bytes(&registry, "app:resumed");
    let forwarded = proxy.forwarded.load(Ordering::SeqCst);
    assert!(forwarded <= total + (1 << 20), "{forwarded} bytes reached the registry for {total}: it started over");
    check_with_skopeo(&registry, "app:resumed", &direct, &image, OCI_GZIP, home.path());
}

/// The connection drops mid-blob and the registry lost the session with it (distribution
/// does: 404 on the next request): that blob starts again in a new session, and the push
/// completes.
#[test]
fn a_lost_upload_session_starts_that_blob_again() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let image = TestImage::new(3, 8_000_000, 65);
    let archive = image.write(home.path(), "img", false);
    let proxy = FaultProxy::start(registry.port, Faults { cut_after: Some(2_000_000), ..Faults::default() });
    let reference = format!("{}/app:again", proxy.host());
    let run = push(&home, &["-v", "--jobs", "1", archive.to_str().expect("path"), &reference]);
    run.success().stderr_has("the upload session expired (404 Not Found): starting it again");
    let (_, line) = sent_line(&run);
    assert!(line.contains("1 started again"), "{line}");
    let total = blob_bytes(&registry, "app:again");
    let forwarded = proxy.forwarded.load(Ordering::SeqCst);
    assert!(forwarded > total + 500_000, "{forwarded} bytes for {total}: the cut bytes were not sent again");
    check_with_skopeo(&registry, "app:again", &printed_digest(&run, &reference), &image, OCI_GZIP, home.path());
}

/// After a cut, the registry's `Range` claims more than was ever sent: it is not believed,
/// and the blob starts again.
#[test]
fn a_range_beyond_what_was_sent_is_not_believed() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let image = TestImage::new(3, 8_000_000, 66);
    let archive = image.write(home.path(), "img", false);
    let proxy = FaultProxy::start(
        registry.port,
        Faults { cut_after: Some(2_000_000), keep_what_arrived: true, status_range: Some("0-999999999".to_string()) },
    );
    let reference = format!("{}/app:range", proxy.host());
    let run = push(&home, &["-v", "--jobs", "1", archive.to_str().expect("path"), &reference]);
    run.success()
        .stderr_has("says it holds 1000000000 bytes (Range 0-999999999), more than the")
        .stderr_has("starting it again")
        .stderr_lacks("resumed sha256:");
    check_with_skopeo(&registry, "app:range", &printed_digest(&run, &reference), &image, OCI_GZIP, home.path());
}

/// A proxy that refuses any body, a size it cannot take set outright, and sizes that make
/// no sense: one clear error each, and no tag.
#[test]
fn limits_nothing_can_pass_and_bad_sizes_are_clear_errors() {
    let (registry, home) = (Registry::plain(), Sandbox::new());
    let image = TestImage::new(2, 6_000_000, 67);
    let archive = image.write(home.path(), "img", false);
    let archive = archive.to_str().expect("path");
    let walls = Proxy::start(registry.port, |r| {
        (r.method == "PATCH").then(|| error_answer("413 Request Entity Too Large", "SIZE_INVALID", "body too large"))
    });
    let run = push(&home, &[archive, &format!("{}/app:wall", walls.host())]);
    run.assert_exit(1)
        .stderr_has("in one request (413 Payload Too Large")
        .stderr_has("nixctr sends no chunk smaller than 64.0 KiB")
        .stderr_has("client_max_body_size");
    assert!(registry.skopeo_inspect("app:wall", false).is_none(), "a tag for blobs that never arrived");

    let nginx = Nginx::start(registry.port, None);
    let run = push(&home, &["--chunk-size", "2MiB", archive, &format!("{}/app:toobig", nginx.host())]);
    run.assert_exit(1).stderr_has("refused a chunk of ").stderr_has("set a smaller --chunk-size");
    assert!(registry.skopeo_inspect("app:toobig", false).is_none());

    for bad in ["0", "1TB", "8 parsecs"] {
        let run = push(&home, &["--chunk-size", bad, archive, &format!("{}/app:bad", registry.host())]);
        run.assert_exit(1)
            .stderr_has(&format!("error: --chunk-size \"{bad}\": "))
            .stderr_has("give a size from 64.0 KiB to 1.0 GiB, such as 8MiB");
    }
    let project = home.path().join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(project.join("nixctr.toml"), "[registries.\"127.0.0.1\"]\nchunk-size = \"0\"\n").expect("write");
    let run =
        home.nixctr().arg("-C").arg(&project).args(["push", archive, &format!("{}/app:bad", registry.host())]).run();
    run.assert_exit(1)
        .stderr_has("nixctr.toml: [registries.\"127.0.0.1\"] chunk-size \"0\": give a size from 64.0 KiB");
    assert!(registry.skopeo_inspect("app:bad", false).is_none());
}
