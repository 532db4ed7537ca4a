//! `nixctr push` against real registries; what it pushed is read back with skopeo and the
//! engines, which nixctr did not write.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;
use crate::registry_harness::{
    error_answer, run_ok, sha256, write_archive, ClosedPort, Proxy, Registry, TestImage, TokenServer, PASSWORD, USER,
};

/// `nixctr push ARGS…` in `home`'s sandbox.
#[track_caller]
pub(crate) fn push(home: &Sandbox, args: &[&str]) -> Output {
    home.nixctr().arg("push").args(args).run()
}

/// What the push tests read from a run's output.
trait PushOutput {
    fn failure(&self) -> &Self;
    fn digest(&self, reference: &str) -> String;
    fn counts(&self) -> (usize, usize, usize);
    fn reads(&self) -> (usize, usize);
}

impl PushOutput for Output {
    /// Exit code 1 with an `error: ` line.
    #[track_caller]
    fn failure(&self) -> &Output {
        self.assert_exit(1);
        let err = self.stderr();
        assert!(err.starts_with("error: ") || err.contains("\nerror: "), "{err}");
        self
    }

    /// The digest from the `REF@sha256:…` line.
    #[track_caller]
    fn digest(&self, reference: &str) -> String {
        let stdout = self.stdout();
        let line = stdout.trim();
        let digest = line
            .strip_prefix(&format!("{reference}@"))
            .unwrap_or_else(|| panic!("stdout {line:?} is not {reference}@sha256:…"));
        assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
        digest.to_string()
    }

    /// (pushed, already there, mounted) from the summary line.
    #[track_caller]
    fn counts(&self) -> (usize, usize, usize) {
        let stderr = self.stderr();
        let line = stderr
            .lines()
            .find(|l| l.starts_with("pushed ") && l.contains("already there"))
            .unwrap_or_else(|| panic!("no summary line in {stderr}"));
        let line = line.split(';').next().unwrap_or(line);
        let numbers: Vec<usize> = line
            .split(|c: char| !c.is_ascii_digit() && c != '.')
            .filter(|s| !s.is_empty() && !s.contains('.'))
            .filter_map(|s| s.parse().ok())
            .collect();
        // "pushed N layers (X MB), M already there, K mounted": sizes have a '.', or are bytes.
        let pushed = numbers[0];
        let n = numbers.len();
        (pushed, numbers[n - 2], numbers[n - 1])
    }

    /// (layers read, layers in the image) from the summary line's `; read N of M layers`.
    #[track_caller]
    fn reads(&self) -> (usize, usize) {
        let stderr = self.stderr();
        let part = stderr
            .lines()
            .find(|l| l.starts_with("pushed ") && l.contains("already there"))
            .and_then(|l| l.split_once("; read "))
            .map(|(_, r)| r.to_string())
            .unwrap_or_else(|| panic!("no read count in {stderr}"));
        let numbers: Vec<usize> = part.split(|c: char| !c.is_ascii_digit()).filter_map(|s| s.parse().ok()).collect();
        (numbers[0], numbers[1])
    }
}

/// Reads the pushed image back with skopeo: the manifest names the digest nixctr printed,
/// the config is the archive's, and every layer decompresses to its diff_id.
pub(crate) fn check_with_skopeo(
    registry: &Registry,
    image: &str,
    digest: &str,
    expected: &TestImage,
    layer_type: &str,
    work: &Path,
) {
    let inspect = registry.skopeo_inspect(image, false).unwrap_or_else(|| panic!("skopeo cannot inspect {image}"));
    assert_eq!(inspect["Digest"], digest, "{inspect}");
    assert_eq!(inspect["Layers"].as_array().map(Vec::len), Some(expected.layers.len()));
    let raw = registry.skopeo_inspect(image, true).expect("skopeo inspect --raw");
    let layers = raw["layers"].as_array().expect("layers");
    assert!(layers.iter().all(|l| l["mediaType"] == layer_type), "{raw}");
    assert_eq!(raw["config"]["digest"], sha256(&expected.config()));

    let dir = registry.skopeo_copy_to_dir(image, work);
    let config = std::fs::read(dir.join(&sha256(&expected.config())[7..])).expect("config blob in skopeo's copy");
    assert_eq!(config, expected.config());
    for (layer, diff_id) in layers.iter().zip(expected.diff_ids()) {
        let digest = layer["digest"].as_str().expect("digest");
        let blob = std::fs::read(dir.join(&digest[7..])).expect("layer blob in skopeo's copy");
        assert_eq!(sha256(&blob), digest);
        let mut plain = Vec::new();
        if layer_type.ends_with("zstd") {
            zstd::stream::read::Decoder::new(&blob[..]).expect("zstd").read_to_end(&mut plain).expect("unzstd");
        } else {
            flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut plain).expect("gunzip");
        }
        assert_eq!(sha256(&plain), diff_id);
    }
}

pub(crate) const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// The test's sandbox: HOME, caches and credential files of its nixctr runs.
fn home() -> Sandbox {
    Sandbox::new()
}

#[test]
fn pushes_plain_tar_readable_by_skopeo() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(4, 200_000, 1);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/team/app:v1", registry.host());
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.success();
    let digest = run.digest(&reference);
    assert_eq!(run.counts(), (4, 0, 0));
    check_with_skopeo(&registry, "team/app:v1", &digest, &image, OCI_GZIP, home.path());
}

#[test]
fn pushes_gzip_archive_readable_by_skopeo() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 100_000, 2);
    let archive = image.write(home.path(), "img", true);
    let reference = format!("{}/app:gz", registry.host());
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.success();
    check_with_skopeo(&registry, "app:gz", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

/// Pulls and runs through `engine`.
fn engine_runs(engine: &TestEngine, reference: &str) {
    let mut pull = engine.cli();
    pull.arg("pull").arg("-q");
    if engine.name == "podman" {
        pull.arg("--tls-verify=false"); // podman's CLI wants https even on loopback
    }
    run_ok(pull.arg(reference));
    let out = run_ok(engine.cli().args(["run", "--rm", "--network", "none", reference, "/bin/busybox", "echo", "ok"]));
    engine.cli().args(["rmi", "-f", reference]).run();
    assert_eq!(out.stdout().trim(), "ok", "{}", engine.name);
}

#[test]
fn engines_pull_and_run_oci_and_docker_formats() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 50_000, 3);
    let archive = image.write(home.path(), "img", true);
    let archive = archive.to_str().expect("path");
    let oci = format!("{}/engine/oci:1", registry.host());
    push(&home, &[archive, &oci]).success();
    let docker = format!("{}/engine/docker:1", registry.host());
    let run = push(&home, &["--format", "docker", archive, &docker]);
    run.success();
    let raw = registry.skopeo_inspect("engine/docker:1", true).expect("inspect");
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    check_with_skopeo(&registry, "engine/docker:1", &run.digest(&docker), &image, DOCKER_GZIP, home.path());
    for engine in engines() {
        engine_runs(&engine, &oci);
        engine_runs(&engine, &docker);
    }
}

#[test]
fn zstd_layers() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 100_000, 4);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/app:zstd", registry.host());
    let run = push(&home, &["--compression", "zstd", archive.to_str().expect("path"), &reference]);
    run.success();
    check_with_skopeo(&registry, "app:zstd", &run.digest(&reference), &image, OCI_ZSTD, home.path());
    let run =
        push(&home, &["--compression", "zstd", "--format", "docker", archive.to_str().expect("path"), &reference]);
    run.failure().stderr_has("--compression zstd needs --format oci");
}

#[test]
fn repush_skips_and_one_changed_layer_sends_one() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(5, 300_000, 5);
    let archive = image.write(home.path(), "img", false);
    let first = format!("{}/app:1", registry.host());
    push(&home, &[archive.to_str().expect("path"), &first]).success();

    // Same layers, new tag: nothing but the manifest goes over.
    let second = format!("{}/app:2", registry.host());
    let run = push(&home, &["-v", archive.to_str().expect("path"), &second]);
    run.success();
    assert_eq!(run.counts(), (0, 5, 0), "{}", run.stderr());
    run.stderr_has("unchanged since nixctr last checked it");

    // Without the cache the registry still has every blob: compression is deterministic.
    std::fs::remove_dir_all(home.path().join("cache")).expect("remove cache");
    let run = push(&home, &[archive.to_str().expect("path"), &second]);
    run.success();
    assert_eq!(run.counts(), (0, 5, 0), "{}", run.stderr());

    let changed = TestImage::new(5, 300_000, 5).with_changed_layer(3, "once");
    let archive = changed.write(home.path(), "changed", false);
    let third = format!("{}/app:3", registry.host());
    let before = registry.blob_bytes();
    let run = push(&home, &[archive.to_str().expect("path"), &third]);
    run.success();
    assert_eq!(run.counts(), (1, 4, 0), "{}", run.stderr());
    // Only the changed layer was read: the others are known blobs the registry confirmed.
    assert_eq!(run.reads(), (1, 5), "{}", run.stderr());
    let grown = registry.blob_bytes() - before;
    assert!(grown < 300_000, "one ~160 kB layer and a config should be new, got {grown} bytes");
    check_with_skopeo(&registry, "app:3", &run.digest(&third), &changed, OCI_GZIP, home.path());
}

/// A layer whose bytes do not match the config's diff_id: never read, and so harmless, where
/// the registry has the diff_id's proven blob (the manifest names that blob, consistent with
/// the config); refused, with nothing tagged, wherever it must be sent.
#[test]
fn a_tampered_layer_is_refused_whenever_it_must_be_sent() {
    let (registry, other, home) = (Registry::plain(), Registry::plain(), home());
    let image = TestImage::new(5, 200_000, 31);
    let archive = image.write(home.path(), "img", false);
    push(&home, &[archive.to_str().expect("path"), &format!("{}/app:1", registry.host())]).success();

    // Layer 3's bytes changed, the config still naming the old ones.
    let tampered = TestImage::new(5, 200_000, 31).with_changed_layer(2, "tampered");
    let bytes = tampered.archive_bytes(Some(image.diff_ids()));
    let plain = write_archive(home.path(), "tampered", &bytes, false);
    let plain = plain.to_str().expect("path");

    let reference = format!("{}/app:2", registry.host());
    let run = push(&home, &[plain, &reference]);
    run.success();
    assert_eq!(run.counts(), (0, 5, 0), "{}", run.stderr());
    assert_eq!(run.reads(), (0, 5), "{}", run.stderr());
    check_with_skopeo(&registry, "app:2", &run.digest(&reference), &image, OCI_GZIP, home.path());

    // Another registry has none of the blobs: layer 3 must be sent, and is refused.
    let run = push(&home, &[plain, &format!("{}/app:1", other.host())]);
    run.failure().stderr_has("layer 3").stderr_has(&format!("not to the diff_id {}", image.diff_ids()[2]));
    assert!(other.skopeo_inspect("app:1", false).is_none(), "a failed push left a tag");

    // A compressed archive is read whole: refused before anything is sent.
    let gz = write_archive(home.path(), "tampered", &bytes, true);
    let run = push(&home, &[gz.to_str().expect("path"), &format!("{}/app:3", registry.host())]);
    run.failure().stderr_has("layer 3").stderr_has("diff_id");
    assert!(registry.skopeo_inspect("app:3", false).is_none(), "a failed push left a tag");
}

#[test]
fn mounts_from_another_repository() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 200_000, 6);
    let archive = image.write(home.path(), "img", false);
    push(&home, &[archive.to_str().expect("path"), &format!("{}/one/app:1", registry.host())]).success();
    let reference = format!("{}/two/app:1", registry.host());
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.success();
    assert_eq!(run.counts(), (0, 0, 3), "{}", run.stderr());
    run.stderr_has("mounted from one/app");
    check_with_skopeo(&registry, "two/app:1", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

#[test]
fn quiet_prints_only_the_reference() {
    let (registry, home) = (Registry::plain(), home());
    let archive = TestImage::new(2, 10_000, 7).write(home.path(), "img", false);
    let reference = format!("{}/app:q", registry.host());
    let run = push(&home, &["-q", archive.to_str().expect("path"), &reference]);
    run.success();
    assert_eq!(run.stderr(), "");
    run.digest(&reference);
}

/// Bad input is refused before anything is sent: the registry ends up with no repository.
#[test]
fn bad_archives_and_references_are_clear_errors() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 100_000, 8);
    let good = image.archive_bytes(None);
    let reference = format!("{}/app:bad", registry.host());

    let truncated = write_archive(home.path(), "truncated", &good[..good.len() / 2], false);
    let run = push(&home, &[truncated.to_str().expect("path"), &reference]);
    run.failure().stderr_has("truncated").stderr_has("truncated.tar");

    let truncated_gz = write_archive(home.path(), "truncated", &good[..good.len() - 5000], true);
    let gz = std::fs::read(&truncated_gz).expect("read");
    std::fs::write(&truncated_gz, &gz[..gz.len() * 2 / 3]).expect("write");
    let run = push(&home, &[truncated_gz.to_str().expect("path"), &reference]);
    run.failure();
    assert!(run.stderr().contains("truncated") || run.stderr().contains("corrupt"), "{}", run.stderr());

    let mut ids = image.diff_ids();
    ids[1] = sha256(b"something else");
    let mismatch = write_archive(home.path(), "mismatch", &image.archive_bytes(Some(ids)), true);
    let run = push(&home, &[mismatch.to_str().expect("path"), &reference]);
    run.failure().stderr_has("layer 2").stderr_has("diff_id");

    let text = home.path().join("notes.txt");
    std::fs::write(&text, "these are not the layers you are looking for\n".repeat(40)).expect("write");
    push(&home, &[text.to_str().expect("path"), &reference]).failure().stderr_has("not a docker-archive");

    let missing = home.path().join("missing.tar");
    let run = push(&home, &[missing.to_str().expect("path"), &reference]);
    run.failure().stderr_has("cannot open archive").stderr_has("missing.tar");

    let archive = image.write(home.path(), "good", false);
    for bad in ["app:1", "team/app:1", &format!("{}/Team/app:1", registry.host())] {
        push(&home, &[archive.to_str().expect("path"), bad]).failure().stderr_has(&format!("{bad:?}"));
    }

    let catalog = reqwest_free_get(&format!("{}/v2/_catalog", registry.host()));
    assert!(catalog.contains("\"repositories\":[]"), "{catalog}");
}

/// A tiny HTTP GET over a TcpStream, so the test reads the catalog with no client of ours.
fn reqwest_free_get(host_path: &str) -> String {
    use std::io::Write;
    let (host, path) = host_path.split_once('/').expect("host/path");
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let home = home();
    let archive = TestImage::new(2, 10_000, 9).write(home.path(), "img", false);
    let closed = ClosedPort::new();
    let port = closed.port;
    let reference = format!("127.0.0.1:{port}/app:1");
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.failure().stderr_has(&format!("cannot reach registry 127.0.0.1:{port}")).stderr_has("refused");
}

#[track_caller]
fn assert_no_password(run: &Output) {
    assert!(
        !run.stdout().contains(PASSWORD) && !run.stderr().contains(PASSWORD),
        "password leaked: {}{}",
        run.stdout(),
        run.stderr()
    );
}

/// Each credential source, against TLS + htpasswd.
#[test]
fn credential_sources_and_tls() {
    let (registry, home) = (Registry::tls_with_auth(), home());
    let image = TestImage::new(2, 50_000, 10);
    let archive = image.write(home.path(), "img", false);
    let archive = archive.to_str().expect("path").to_string();
    let ca = registry.ca_cert();
    let ca = ca.to_str().expect("path");
    let target = |tag: &str| format!("{}/secure/app:{tag}", registry.host());

    // No CA: the certificate check fails and says how to fix it.
    push(&home, &[&archive, &target("noca")]).failure().stderr_has("--ca-cert");

    // Anonymous: told to log in.
    push(&home, &["--ca-cert", ca, &archive, &target("anon")]).failure().stderr_has("requires credentials");

    // --username + --password-stdin.
    let with_stdin = |password: &str, tag: &str| {
        let args = ["push", "--ca-cert", ca, "--username", USER, "--password-stdin", &archive, &target(tag)];
        home.nixctr().args(args).stdin(password).run()
    };
    let run = with_stdin(&format!("{PASSWORD}\n"), "stdin");
    run.success();
    assert_no_password(&run);
    check_with_skopeo(&registry, "secure/app:stdin", &run.digest(&target("stdin")), &image, OCI_GZIP, home.path());

    // Wrong password: a 401 naming the user and the source, never the password.
    let run = with_stdin("not-the-password", "wrong");
    run.failure().stderr_has("401").stderr_has(USER).stderr_has("--password-stdin");
    run.stderr_lacks("not-the-password");
    assert!(registry.skopeo_inspect("secure/app:wrong", false).is_none());

    // A push with the CA and `env` set: it must succeed without showing the password.
    let push_as = |env: &[(&str, &std::ffi::OsStr)], tag: &str| {
        let mut cmd = home.nixctr();
        for (key, value) in env {
            cmd.env(key, value);
        }
        let run = cmd.args(["push", "--ca-cert", ca, &archive, &target(tag)]).run();
        run.success();
        assert_no_password(&run);
        run
    };

    // Environment variables.
    push_as(&[("NIXCTR_REGISTRY_USERNAME", USER.as_ref()), ("NIXCTR_REGISTRY_PASSWORD", PASSWORD.as_ref())], "env");

    let basic = base64_encode(&format!("{USER}:{PASSWORD}"));
    // Podman's auth file: REGISTRY_AUTH_FILE, then $XDG_CONFIG_HOME (default ~/.config).
    let podman = home.path().join("podman-auth.json");
    std::fs::write(&podman, format!(r#"{{"auths": {{"{}": {{"auth": "{basic}"}}}}}}"#, registry.host()))
        .expect("write");
    push_as(&[("REGISTRY_AUTH_FILE", podman.as_os_str())], "podman");
    let config_home = home.path().join("xdg");
    std::fs::create_dir_all(config_home.join("containers")).expect("mkdir");
    std::fs::copy(&podman, config_home.join("containers/auth.json")).expect("copy");
    push_as(&[("XDG_CONFIG_HOME", config_home.as_os_str())], "xdg");
    // $XDG_RUNTIME_DIR/containers/auth.json.
    let runtime = home.path().join("run2");
    std::fs::create_dir_all(runtime.join("containers")).expect("mkdir");
    std::fs::copy(&podman, runtime.join("containers/auth.json")).expect("copy");
    push_as(&[("XDG_RUNTIME_DIR", runtime.as_os_str())], "runtime");

    // Docker's config: `auths` with username/password fields.
    let docker_dir = home.path().join("docker");
    std::fs::create_dir_all(&docker_dir).expect("mkdir");
    std::fs::write(
        docker_dir.join("config.json"),
        format!(
            r#"{{"auths": {{"https://{}": {{"username": "{USER}", "password": "{PASSWORD}"}}}}}}"#,
            registry.host()
        ),
    )
    .expect("write");
    push_as(&[("DOCKER_CONFIG", docker_dir.as_os_str())], "docker");
    // … and ~/.docker/config.json when DOCKER_CONFIG is not set.
    std::fs::copy(docker_dir.join("config.json"), home.docker_config().join("config.json")).expect("copy");
    let run =
        home.nixctr().env_remove("DOCKER_CONFIG").args(["push", "--ca-cert", ca, &archive, &target("home")]).run();
    run.success();
    std::fs::remove_file(home.docker_config().join("config.json")).expect("rm");

    // Docker's config: credHelpers, with a helper on PATH for the child only.
    let log = home.path().join("helper-stdin");
    write_credential_helper(&home, "test", &log);
    let helper_config = home.path().join("docker-helper");
    std::fs::create_dir_all(&helper_config).expect("mkdir");
    std::fs::write(
        helper_config.join("config.json"),
        format!(r#"{{"credHelpers": {{"{}": "test"}}}}"#, registry.host()),
    )
    .expect("write");
    let run = push_as(&[("DOCKER_CONFIG", helper_config.as_os_str())], "helper");
    assert_eq!(std::fs::read_to_string(&log).expect("helper ran").trim(), registry.host());
    check_with_skopeo(&registry, "secure/app:helper", &run.digest(&target("helper")), &image, OCI_GZIP, home.path());

    // No CA, but --insecure, or the registry listed in nixctr.toml: the certificate goes unchecked.
    home.nixctr()
        .env("REGISTRY_AUTH_FILE", &podman)
        .args(["push", "--insecure", &archive, &target("insecure")])
        .run()
        .success();
    let project = home.path().join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(project.join("nixctr.toml"), format!("insecure-registries = [\"{}\"]\n", registry.host()))
        .expect("write");
    home.nixctr()
        .current_dir(&project)
        .env("REGISTRY_AUTH_FILE", &podman)
        .args(["push", &archive, &target("listed")])
        .run()
        .success();
}

/// `docker-credential-NAME` in the sandbox's bin (first on the runs' PATH): logs the server
/// URL it is asked about to `log`, answers [`USER`]/[`PASSWORD`].
fn write_credential_helper(home: &Sandbox, name: &str, log: &Path) {
    let helper = home.bin().join(format!("docker-credential-{name}"));
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\ncat > {}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$(cat {})\"\n",
            log.display(),
            log.display()
        ),
    )
    .expect("write helper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// Docker's config naming a `credsStore`: the helper of that name on PATH logs nixctr in.
#[test]
fn creds_store_helper_logs_in() {
    let (registry, home) = (Registry::tls_with_auth(), home());
    let image = TestImage::new(2, 20_000, 17);
    let archive = image.write(home.path(), "img", false);
    let ca = registry.ca_cert();
    let log = home.path().join("store-stdin");
    write_credential_helper(&home, "teststore", &log);
    std::fs::write(home.docker_config().join("config.json"), r#"{"credsStore": "teststore"}"#).expect("write");
    let reference = format!("{}/store/app:1", registry.host());
    let run = home.nixctr().args(["push", "--ca-cert"]).arg(&ca).arg(&archive).arg(&reference).run();
    run.success();
    assert_no_password(&run);
    assert_eq!(std::fs::read_to_string(&log).expect("the credsStore helper ran").trim(), registry.host());
    check_with_skopeo(&registry, "store/app:1", &run.digest(&reference), &image, OCI_GZIP, home.path());

    // Without the helper on PATH the push is anonymous, and refused.
    std::fs::remove_file(home.bin().join("docker-credential-teststore")).expect("rm");
    let reference = format!("{}/store/app:2", registry.host());
    home.nixctr().args(["push", "--ca-cert"]).arg(&ca).arg(&archive).arg(&reference).run().failure();
    assert!(registry.skopeo_inspect("store/app:2", false).is_none());
}

fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The registry dies mid-push: the push fails and leaves no tag; once the registry is back
/// the same command completes, sending only what was missing.
#[test]
fn registry_killed_mid_push_then_rerun_sends_the_rest() {
    let (mut registry, home) = (Registry::plain(), home());
    let image = TestImage::new(8, 6_000_000, 11);
    let archive = image.write(home.path(), "big", false);
    let reference = format!("{}/app:crash", registry.host());
    let mut child = home.nixctr().args(["push", "--jobs", "1", archive.to_str().expect("path"), &reference]).spawn();
    child.wait_for_line("saying a layer was pushed", WAIT, |l| l.contains(" pushed ("));
    registry.kill();
    let out = child.wait();
    out.assert_exit(1).stderr_has("error: ").stderr_lacks("panicked");

    registry.start();
    assert!(registry.skopeo_inspect("app:crash", false).is_none(), "a failed push left a tag");
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.success();
    let (pushed, already, _) = run.counts();
    assert!(already >= 1 && pushed < 8 && pushed + already == 8, "{}", run.stderr());
    check_with_skopeo(&registry, "app:crash", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

/// Bearer tokens: the registry points at a token server whose first token allows pulls only
/// and runs out in seconds, so the push meets a 401 partway (as when a token expires) and
/// must fetch a new token and go on.
#[test]
fn bearer_token_renewed_mid_push() {
    let tokens = TokenServer::start(2);
    let (registry, home) = (Registry::with_tokens(&tokens), home());
    let image = TestImage::new(6, 4_000_000, 12);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/bearer/app:1", registry.host());
    let run = home
        .nixctr()
        .env("NIXCTR_REGISTRY_USERNAME", USER)
        .env("NIXCTR_REGISTRY_PASSWORD", PASSWORD)
        .args(["push", "--jobs", "1", archive.to_str().expect("path"), &reference])
        .run();
    run.success();
    assert_no_password(&run);
    let issued = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("push took {:?}; {issued} tokens issued", run.took);
    assert!(issued >= 2, "the first token stopped working mid-push, yet no new one was asked for");
    check_with_skopeo(&registry, "bearer/app:1", &run.digest(&reference), &image, OCI_GZIP, home.path());

    // Wrong password: the token server says no, and the error says whose credentials.
    let run = home
        .nixctr()
        .env("NIXCTR_REGISTRY_USERNAME", USER)
        .env("NIXCTR_REGISTRY_PASSWORD", "wrong-password")
        .args(["push", archive.to_str().expect("path"), &format!("{}/bearer/app:2", registry.host())])
        .run();
    run.failure().stderr_has("rejected the credentials").stderr_has(USER).stderr_lacks("wrong-password");
}

/// A registry that refuses OCI manifests (as zot does unless configured): the push says so
/// and pushes a Docker schema 2 manifest instead.
#[test]
fn refused_manifest_type_falls_back_to_the_other() {
    let (registry, home) = (Registry::plain(), home());
    let proxy = Proxy::start(registry.port, |r| {
        (r.method == "PUT"
            && r.path.contains("/manifests/")
            && r.head.contains("application/vnd.oci.image.manifest.v1+json"))
        .then(|| error_answer("400 Bad Request", "MANIFEST_INVALID", "manifest invalid: unsupported media type"))
    });
    let image = TestImage::new(2, 50_000, 13);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/app:fallback", proxy.host());
    let run = push(&home, &[archive.to_str().expect("path"), &reference]);
    run.success().stderr_has("refused the OCI manifest").stderr_has("Docker schema 2");
    let raw = registry.skopeo_inspect("app:fallback", true).expect("inspect");
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    check_with_skopeo(&registry, "app:fallback", &run.digest(&reference), &image, DOCKER_GZIP, home.path());
}

/// 503, 429 and 408 answers are retried with backoff; a registry that keeps failing is an error.
#[test]
fn transient_failures_are_retried() {
    let (registry, home) = (Registry::plain(), home());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    let proxy = Proxy::start(registry.port, move |r| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match (r.method, n % 3) {
            (_, _) if r.path == "/v2/" => None,
            ("HEAD", 0) => Some(error_answer("503 Service Unavailable", "UNAVAILABLE", "try later")),
            ("POST", 0) => Some(error_answer("429 Too Many Requests", "TOOMANYREQUESTS", "slow down")),
            ("PUT", 0) => Some(error_answer("408 Request Timeout", "UNKNOWN", "timeout")),
            _ => None,
        }
    });
    let image = TestImage::new(3, 50_000, 14);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/app:flaky", proxy.host());
    let run = push(&home, &["-v", archive.to_str().expect("path"), &reference]);
    run.success().stderr_has("retrying");
    check_with_skopeo(&registry, "app:flaky", &run.digest(&reference), &image, OCI_GZIP, home.path());

    let broken = Proxy::start(registry.port, |r| {
        (r.path != "/v2/").then(|| error_answer("500 Internal Server Error", "UNKNOWN", "disk on fire"))
    });
    let run = push(&home, &[archive.to_str().expect("path"), &format!("{}/app:broken", broken.host())]);
    run.failure().stderr_has("answered 500 Internal Server Error");
    assert!(registry.skopeo_inspect("app:broken", false).is_none());
}

/// Ctrl-C mid-push: exit 130, and no temporary file is left behind.
#[test]
fn interrupted_push_leaves_no_temporary_files() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(6, 6_000_000, 15);
    let archive = image.write(home.path(), "big", true);
    let tmp = home.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let mut child = home
        .nixctr()
        .env("TMPDIR", &tmp)
        .args(["push", "--jobs", "1", archive.to_str().expect("path"), &format!("{}/app:int", registry.host())])
        .spawn();
    child.wait_for_line("saying a layer was pushed", WAIT, |l| l.contains(" pushed ("));
    let listed = std::fs::read_dir(&tmp).expect("read tmp").count();
    assert!(listed > 0, "expected temporary files while pushing a compressed archive");
    child.signal(libc::SIGINT);
    let out = child.wait();
    out.assert_exit(130).stderr_has("interrupted");
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("read tmp").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(registry.skopeo_inspect("app:int", false).is_none());
}

/// The library calls `publish` uses: `tag_exists` before and after a push, in one session.
#[test]
fn tag_exists_sees_pushed_tags() {
    use nixctr::registry::{self, Compression, ManifestFormat, PushSession, Reference, RegistryConfig};
    let (registry, home) = (Registry::tls_with_auth(), home());
    let reference = Reference::parse(&format!("{}/lib/app:1", registry.host())).expect("reference");
    let config = RegistryConfig {
        format: ManifestFormat::Oci,
        compression: Compression::Gzip,
        insecure: false,
        insecure_registries: Vec::new(),
        ca_cert: Some(registry.ca_cert()),
        credentials: Some(registry::Credentials {
            username: USER.to_string(),
            password: registry::Secret::new(PASSWORD),
            source: "test".to_string(),
        }),
        jobs: 2,
        blob_cache: Some(home.path().join("cache/blobs.json")),
        chunk_size: None,
        chunk_sizes: Default::default(),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let progress = nixctr::progress::Progress::new(true, false);
    let session = runtime.block_on(PushSession::connect(&config, reference.registry(), &progress)).expect("connect");
    assert!(!runtime.block_on(session.tag_exists(&reference)).expect("tag_exists"));
    let image = TestImage::new(2, 20_000, 16);
    let archive = image.write(home.path(), "img", false);
    let outcome = runtime.block_on(session.push(&archive, &reference, &progress)).expect("push");
    assert_eq!(outcome.reference, reference.to_string());
    assert_eq!((outcome.pushed_layers, outcome.skipped_layers, outcome.mounted_layers), (2, 0, 0));
    assert!(runtime.block_on(session.tag_exists(&reference)).expect("tag_exists"));
    let other = Reference::parse(&format!("{}/lib/app:2", registry.host())).expect("reference");
    assert!(!runtime.block_on(session.tag_exists(&other)).expect("tag_exists"));
    assert_eq!(registry.skopeo_inspect("lib/app:1", false).expect("inspect")["Digest"], outcome.digest);
}

/// `push_reader`, as publish calls it for a streamed image: a docker-archive read once through
/// a pipe, layers first and manifest.json last, comes out as the file archive would (skopeo
/// reads it back); a stream whose layer does not match its diff_id leaves no tag.
#[test]
fn pushes_a_stream_read_once_through_a_pipe() {
    use nixctr::registry::{Compression, Destination, ManifestFormat, PushSession, Reference, RegistryConfig};
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(4, 400_000, 51);
    let bytes = image.archive_bytes(None);
    let names: Vec<String> = tar::Archive::new(&bytes[..])
        .entries()
        .expect("entries")
        .map(|e| e.expect("entry").path().expect("path").display().to_string())
        .collect();
    assert!(names[0].ends_with("/layer.tar") && names.last().map(String::as_str) == Some("manifest.json"), "{names:?}");
    let path = write_archive(home.path(), "img", &bytes, false);
    let config = RegistryConfig {
        format: ManifestFormat::Oci,
        compression: Compression::Gzip,
        jobs: 2,
        blob_cache: Some(home.path().join("cache/blobs.json")),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let progress = nixctr::progress::Progress::new(true, false);
    let stream = |path: &Path| -> (std::process::Child, Box<dyn Read + Send>) {
        let mut cat =
            std::process::Command::new("cat").arg(path).stdout(std::process::Stdio::piped()).spawn().expect("cat");
        let pipe = cat.stdout.take().expect("pipe");
        (cat, Box::new(pipe))
    };
    let reference = Reference::parse(&format!("{}/stream/app:1", registry.host())).expect("reference");
    let session = runtime.block_on(PushSession::connect(&config, reference.registry(), &progress)).expect("connect");
    let (mut cat, pipe) = stream(&path);
    let outcome = runtime
        .block_on(session.push_reader(pipe, &Destination::new(reference.clone()), &progress))
        .expect("push_reader");
    cat.wait().expect("cat");
    assert_eq!((outcome.pushed_layers, outcome.read_layers, outcome.total_layers), (4, 4, 4), "{outcome:?}");
    check_with_skopeo(&registry, "stream/app:1", &outcome.digest, &image, OCI_GZIP, home.path());
    // The same image from its file: the same manifest.
    let again = push(&home, &[path.to_str().expect("path"), &format!("{}/stream/app:2", registry.host())]);
    assert_eq!(again.success().digest(&format!("{}/stream/app:2", registry.host())), outcome.digest);

    let tampered = TestImage::new(4, 400_000, 51).with_changed_layer(1, "tampered");
    let bad = write_archive(home.path(), "bad", &tampered.archive_bytes(Some(image.diff_ids())), false);
    let (mut cat, pipe) = stream(&bad);
    let bad_ref = Reference::parse(&format!("{}/stream/app:bad", registry.host())).expect("reference");
    let err = runtime
        .block_on(session.push_reader(pipe, &Destination::new(bad_ref), &progress))
        .expect_err("a layer that does not match its diff_id");
    cat.wait().expect("cat");
    let err = format!("{err:#}");
    assert!(err.contains("layer 2") && err.contains("diff_id"), "{err}");
    assert!(registry.skopeo_inspect("stream/app:bad", false).is_none(), "a failed push left a tag");

    // The command line's `-`: standard input, with the time per phase under -v.
    let reference = format!("{}/stream/app:3", registry.host());
    let run = home.nixctr().args(["push", "-v", "-", &reference]).stdin(bytes.clone()).run();
    run.success().stderr_has("push phases: read/hash ");
    assert_eq!(run.digest(&reference), outcome.digest);
}

// ---------------------------------------------------------------------------------------------
// Cache files are hints; untrusted input is bounded

/// The blob cache of `home`'s runs.
fn blob_cache(home: &Sandbox) -> std::path::PathBuf {
    home.path().join("cache/nixctr/blobs.json")
}

/// HMAC-SHA256 as nixctr signs blob cache entries, with the sandbox's key: lets the test
/// write entries nixctr trusts, to reach the registry checks behind the signature.
fn signed(home: &Sandbox, diff_id: &str, digest: &str, size: u64) -> String {
    use sha2::{Digest, Sha256};
    let key = hex::decode(std::fs::read_to_string(home.path().join("cache/nixctr/blobs.key")).expect("key").trim())
        .expect("hex key");
    let message = format!("nixctr blob cache\0gzip\0{diff_id}\0{digest}\0{size}");
    let pad = |byte: u8| -> Vec<u8> {
        let mut block = vec![byte; 64];
        block.iter_mut().zip(&key).for_each(|(b, k)| *b ^= k);
        block
    };
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    hex::encode(Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize())
}

/// A `blobs.json` whose entries were swapped between layers, or point at a blob that is not
/// there or has another size, costs time but never puts a wrong layer in a manifest: skopeo
/// reads back every layer decompressing to its diff_id.
#[test]
fn a_wrong_blob_cache_never_mixes_up_layers() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(4, 200_000, 21);
    let archive = image.write(home.path(), "img", false);
    let archive = archive.to_str().expect("path");
    push(&home, &[archive, &format!("{}/hint/app:1", registry.host())]).success();

    let ids = image.diff_ids();
    let key = |n: usize| format!("gzip:{}", ids[n]);
    let read = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(blob_cache(&home)).expect("blobs.json")).expect("JSON")
    };
    let pristine = read();
    let host = registry.host();
    let mut edited = pristine.clone();
    let entries = &mut edited["registries"][&host];
    assert_eq!(entries.as_object().map(|o| o.len()), Some(4), "{pristine}");
    let first = entries[&key(1)].clone();
    entries[&key(1)] = entries[&key(2)].clone();
    entries[&key(2)] = first;
    entries[&key(3)]["digest"] = serde_json::json!(sha256(b"no such blob"));
    let size = entries[&key(0)]["size"].as_u64().expect("size");
    entries[&key(0)]["size"] = serde_json::json!(size + 1);
    std::fs::write(blob_cache(&home), edited.to_string()).expect("write blobs.json");
    let reference = format!("{host}/hint/app:2");
    let run = push(&home, &["-v", archive, &reference]);
    run.success().stderr_has("ignored 4 entries not signed by this machine's key");
    // Compressed again, found in the registry by the right digests: nothing is uploaded.
    assert_eq!(run.counts(), (0, 4, 0), "{}", run.stderr());
    check_with_skopeo(&registry, "hint/app:2", &run.digest(&reference), &image, OCI_GZIP, home.path());

    // Signed entries the registry contradicts: a blob it does not have, one it has at
    // another size. The registry's answer wins.
    let mut edited = read();
    let entries = &mut edited["registries"][&host];
    let missing = sha256(b"no such blob");
    entries[&key(3)]["digest"] = serde_json::json!(missing);
    entries[&key(3)]["mac"] = serde_json::json!(signed(&home, &ids[3], &missing, 1234));
    entries[&key(3)]["size"] = serde_json::json!(1234);
    let digest = entries[&key(0)]["digest"].as_str().expect("digest").to_string();
    entries[&key(0)]["size"] = serde_json::json!(size + 1);
    entries[&key(0)]["mac"] = serde_json::json!(signed(&home, &ids[0], &digest, size + 1));
    std::fs::write(blob_cache(&home), edited.to_string()).expect("write blobs.json");
    let reference = format!("{host}/hint/app:3");
    let run = push(&home, &["-v", archive, &reference]);
    run.success().stderr_lacks("not signed").stderr_has(&format!("expected {} bytes: not using it", size + 1));
    check_with_skopeo(&registry, "hint/app:3", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

/// The file's identity as nixctr's archive memory keys it.
fn file_key(path: &Path) -> serde_json::Value {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).expect("stat");
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    serde_json::json!({
        "path": path.canonicalize().expect("canonicalize"),
        "dev": m.dev(), "ino": m.ino(), "size": m.size(),
        "mtime_ns": ns(m.mtime(), m.mtime_nsec()), "ctime_ns": ns(m.ctime(), m.ctime_nsec()),
    })
}

/// `archives.json` remembers an archive; the file is then replaced by another build of the
/// same size, and the memory made to match its identity (as a reused inode and a coarse
/// clock could): the push reads the new archive and pushes it, not the remembered one.
#[test]
fn a_stale_archive_memory_is_not_trusted() {
    let (registry, home) = (Registry::plain(), home());
    let old = TestImage::new(3, 100_000, 22);
    let new = TestImage::new(3, 100_000, 23);
    let archive = old.write(home.path(), "img", false);
    let path = archive.to_str().expect("path");
    push(&home, &[path, &format!("{}/stale/app:1", registry.host())]).success();
    let size = std::fs::metadata(&archive).expect("stat").len();
    assert_eq!(new.write(home.path(), "img", false), archive);
    assert_eq!(std::fs::metadata(&archive).expect("stat").len(), size, "the two builds should be the same size");

    let memory = home.path().join("cache/nixctr/archives.json");
    let mut remembered: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&memory).expect("archives.json")).expect("JSON");
    assert_eq!(remembered.as_array().map(Vec::len), Some(1), "{remembered}");
    remembered[0]["key"] = file_key(&archive);
    std::fs::write(&memory, remembered.to_string()).expect("write archives.json");

    let reference = format!("{}/stale/app:2", registry.host());
    let run = push(&home, &["-v", path, &reference]);
    run.success().stderr_lacks("unchanged since nixctr last checked it");
    check_with_skopeo(&registry, "stale/app:2", &run.digest(&reference), &new, OCI_GZIP, home.path());
    // And what it now remembers is the new build, recalled as such.
    let reference = format!("{}/stale/app:3", registry.host());
    let run = push(&home, &["-v", path, &reference]);
    run.success().stderr_has("unchanged since nixctr last checked it");
    check_with_skopeo(&registry, "stale/app:3", &run.digest(&reference), &new, OCI_GZIP, home.path());
}

/// Gzipped zeros decompress to far more than the tar in them declares: one error naming
/// the file, exit 1, no temporary file left, nothing pushed.
#[test]
fn a_gzip_bomb_is_refused() {
    let (registry, home) = (Registry::plain(), home());
    let mut member = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut member, &vec![0u8; 1 << 20]).expect("gzip");
    // 4 GiB of zeros in about 4 MB, as gzip members of 1 MiB each.
    let bomb = member.finish().expect("gzip").repeat(4096);
    let path = home.path().join("bomb.tar.gz");
    std::fs::write(&path, &bomb).expect("write bomb");
    let tmp = home.path().join("tmp");
    std::fs::create_dir_all(&tmp).expect("mkdir");
    let run = home
        .nixctr()
        .env("TMPDIR", &tmp)
        .args(["push", path.to_str().expect("path"), &format!("{}/bomb/app:1", registry.host())])
        .run();
    run.failure()
        .stderr_has("bomb.tar.gz: decompresses to more than it says")
        .stderr_has("refusing a possible gzip bomb");
    assert_eq!(run.stderr().matches("error: ").count(), 1, "{}", run.stderr());
    let left: Vec<_> = std::fs::read_dir(&tmp).expect("read tmp").flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(registry.skopeo_inspect("bomb/app:1", false).is_none());
}

/// Whether process `pid` is gone (or a zombie waiting for a reaper).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// A credential helper that never answers: one error naming it and the registry, exit 1,
/// and the helper and what it started are killed.
#[test]
fn a_hanging_credential_helper_is_an_error() {
    let (registry, home) = (Registry::plain(), home());
    let archive = TestImage::new(2, 10_000, 24).write(home.path(), "img", false);
    let pids = home.path().join("helper-pids");
    let helper = home.bin().join("docker-credential-hang");
    std::fs::write(
        &helper,
        format!("#!/bin/sh\necho $$ > {0}\nsleep 100000 &\necho $! >> {0}\nwait\n", pids.display()),
    )
    .expect("write helper");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(home.docker_config().join("config.json"), r#"{"credsStore": "hang"}"#).expect("write");
    let reference = format!("{}/hang/app:1", registry.host());
    let run = home
        .nixctr()
        .env("NIXCTR_CREDENTIAL_HELPER_TIMEOUT", "2")
        .args(["push", archive.to_str().expect("path"), &reference])
        .run();
    run.failure().stderr_has(&format!(
        "credential helper docker-credential-hang did not answer within 2s for registry {}",
        registry.host()
    ));
    run.stderr_has("remove credsStore from");
    assert_eq!(run.stderr().matches("error: ").count(), 1, "{}", run.stderr());
    let pids = std::fs::read_to_string(&pids).expect("the helper ran");
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in &pids {
        wait_until(&format!("process {pid} to be gone"), WAIT, || process_gone(pid).then_some(()));
    }
    assert!(registry.skopeo_inspect("hang/app:1", false).is_none());

    let run = home
        .nixctr()
        .env("NIXCTR_CREDENTIAL_HELPER_TIMEOUT", "soon")
        .args(["push", archive.to_str().expect("path"), &reference])
        .run();
    run.failure().stderr_has("NIXCTR_CREDENTIAL_HELPER_TIMEOUT=\"soon\"");
}
