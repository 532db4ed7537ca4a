//! `nixctr push` against real registries; what it pushed is read back with skopeo and the
//! Docker engine, which nixctr did not write.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::registry_harness::{
    error_answer, nixctr, run_ok, sha256, write_archive, Proxy, Registry, TestImage, TokenServer, PASSWORD, USER,
};

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn push(home: &Path, args: &[&str]) -> Run {
    push_with(nixctr(home).arg("push").args(args), None)
}

/// Runs nixctr; a run that outlives [`DEADLINE`] is killed and fails the test, so a hang
/// shows as a failure rather than a stuck suite.
fn push_with(cmd: &mut Command, stdin: Option<&str>) -> Run {
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run nixctr");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).expect("write stdin");
    }
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = collect(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = collect(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for nixctr") {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("nixctr ran over {DEADLINE:?}: {cmd:?}\nstderr: {}", stderr.join().unwrap_or_default());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    Run {
        ok: status.success(),
        code: status.code(),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

const DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

impl Run {
    #[track_caller]
    fn success(self) -> Run {
        assert!(self.ok, "nixctr push failed ({:?})\nstdout: {}\nstderr: {}", self.code, self.stdout, self.stderr);
        self
    }

    #[track_caller]
    fn failure(self) -> Run {
        assert!(!self.ok, "nixctr push should have failed\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        assert_eq!(self.code, Some(1), "exit code; stderr: {}", self.stderr);
        assert!(self.stderr.starts_with("error: ") || self.stderr.contains("\nerror: "), "{}", self.stderr);
        self
    }

    /// The digest from the `REF@sha256:…` line.
    #[track_caller]
    fn digest(&self, reference: &str) -> String {
        let line = self.stdout.trim();
        let digest = line
            .strip_prefix(&format!("{reference}@"))
            .unwrap_or_else(|| panic!("stdout {line:?} is not {reference}@sha256:…"));
        assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
        digest.to_string()
    }

    /// (pushed, already there, mounted) from the summary line.
    #[track_caller]
    fn counts(&self) -> (usize, usize, usize) {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("pushed ") && l.contains("already there"))
            .unwrap_or_else(|| panic!("no summary line in {}", self.stderr));
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
}

/// Reads the pushed image back with skopeo: the manifest names the digest nixctr printed,
/// the config is the archive's, and every layer decompresses to its diff_id.
fn check_with_skopeo(
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

const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

fn home() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn pushes_plain_tar_readable_by_skopeo() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(4, 200_000, 1);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/team/app:v1", registry.host());
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).success();
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
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).success();
    check_with_skopeo(&registry, "app:gz", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

/// Pulls and runs through the Docker engine. Fails (does not skip) without an engine.
fn docker_runs(reference: &str) {
    let version = Command::new("docker").args(["version", "--format", "{{.Server.Version}}"]).output();
    match version {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "no Docker engine answers at unix:///var/run/docker.sock ({other:?}); start one with scripts/setup.sh"
        ),
    }
    run_ok(Command::new("docker").args(["pull", "-q", reference]));
    let out = run_ok(Command::new("docker").args(["run", "--rm", reference, "/bin/busybox", "echo", "ok"]));
    let _ = Command::new("docker").args(["rmi", "-f", reference]).output();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn docker_engine_pulls_and_runs_oci_and_docker_formats() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 50_000, 3);
    let archive = image.write(home.path(), "img", true);
    let archive = archive.to_str().expect("path");
    let oci = format!("{}/engine/oci:1", registry.host());
    push(home.path(), &[archive, &oci]).success();
    docker_runs(&oci);
    let docker = format!("{}/engine/docker:1", registry.host());
    let run = push(home.path(), &["--format", "docker", archive, &docker]).success();
    let raw = registry.skopeo_inspect("engine/docker:1", true).expect("inspect");
    assert_eq!(raw["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    check_with_skopeo(&registry, "engine/docker:1", &run.digest(&docker), &image, DOCKER_GZIP, home.path());
    docker_runs(&docker);
}

#[test]
fn zstd_layers() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 100_000, 4);
    let archive = image.write(home.path(), "img", false);
    let reference = format!("{}/app:zstd", registry.host());
    let run = push(home.path(), &["--compression", "zstd", archive.to_str().expect("path"), &reference]).success();
    check_with_skopeo(&registry, "app:zstd", &run.digest(&reference), &image, OCI_ZSTD, home.path());
    let run = push(
        home.path(),
        &["--compression", "zstd", "--format", "docker", archive.to_str().expect("path"), &reference],
    )
    .failure();
    assert!(run.stderr.contains("--compression zstd needs --format oci"), "{}", run.stderr);
}

#[test]
fn repush_skips_and_one_changed_layer_sends_one() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(5, 300_000, 5);
    let archive = image.write(home.path(), "img", false);
    let first = format!("{}/app:1", registry.host());
    push(home.path(), &[archive.to_str().expect("path"), &first]).success();

    // Same layers, new tag: nothing but the manifest goes over.
    let second = format!("{}/app:2", registry.host());
    let run = push(home.path(), &["-v", archive.to_str().expect("path"), &second]).success();
    assert_eq!(run.counts(), (0, 5, 0), "{}", run.stderr);
    assert!(run.stderr.contains("unchanged since nixctr last checked it"), "{}", run.stderr);

    // Without the cache the registry still has every blob: compression is deterministic.
    std::fs::remove_dir_all(home.path().join("cache")).expect("remove cache");
    let run = push(home.path(), &[archive.to_str().expect("path"), &second]).success();
    assert_eq!(run.counts(), (0, 5, 0), "{}", run.stderr);

    let changed = TestImage::new(5, 300_000, 5).with_changed_layer(3, "once");
    let archive = changed.write(home.path(), "changed", false);
    let third = format!("{}/app:3", registry.host());
    let before = registry.blob_bytes();
    let run = push(home.path(), &[archive.to_str().expect("path"), &third]).success();
    assert_eq!(run.counts(), (1, 4, 0), "{}", run.stderr);
    let grown = registry.blob_bytes() - before;
    assert!(grown < 300_000, "one ~160 kB layer and a config should be new, got {grown} bytes");
    check_with_skopeo(&registry, "app:3", &run.digest(&third), &changed, OCI_GZIP, home.path());
}

#[test]
fn mounts_from_another_repository() {
    let (registry, home) = (Registry::plain(), home());
    let image = TestImage::new(3, 200_000, 6);
    let archive = image.write(home.path(), "img", false);
    push(home.path(), &[archive.to_str().expect("path"), &format!("{}/one/app:1", registry.host())]).success();
    let reference = format!("{}/two/app:1", registry.host());
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).success();
    assert_eq!(run.counts(), (0, 0, 3), "{}", run.stderr);
    assert!(run.stderr.contains("mounted from one/app"), "{}", run.stderr);
    check_with_skopeo(&registry, "two/app:1", &run.digest(&reference), &image, OCI_GZIP, home.path());
}

#[test]
fn quiet_prints_only_the_reference() {
    let (registry, home) = (Registry::plain(), home());
    let archive = TestImage::new(2, 10_000, 7).write(home.path(), "img", false);
    let reference = format!("{}/app:q", registry.host());
    let run = push(home.path(), &["-q", archive.to_str().expect("path"), &reference]).success();
    assert_eq!(run.stderr, "");
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
    let run = push(home.path(), &[truncated.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains("truncated") && run.stderr.contains("truncated.tar"), "{}", run.stderr);

    let truncated_gz = write_archive(home.path(), "truncated", &good[..good.len() - 5000], true);
    let gz = std::fs::read(&truncated_gz).expect("read");
    std::fs::write(&truncated_gz, &gz[..gz.len() * 2 / 3]).expect("write");
    let run = push(home.path(), &[truncated_gz.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains("truncated") || run.stderr.contains("corrupt"), "{}", run.stderr);

    let mut ids = image.diff_ids();
    ids[1] = sha256(b"something else");
    let mismatch = write_archive(home.path(), "mismatch", &image.archive_bytes(Some(ids)), true);
    let run = push(home.path(), &[mismatch.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains("layer 2") && run.stderr.contains("diff_id"), "{}", run.stderr);

    let text = home.path().join("notes.txt");
    std::fs::write(&text, "these are not the layers you are looking for\n".repeat(40)).expect("write");
    let run = push(home.path(), &[text.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains("not a docker-archive"), "{}", run.stderr);

    let missing = home.path().join("missing.tar");
    let run = push(home.path(), &[missing.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains("cannot open archive") && run.stderr.contains("missing.tar"), "{}", run.stderr);

    let archive = image.write(home.path(), "good", false);
    for bad in ["app:1", "team/app:1", &format!("{}/Team/app:1", registry.host())] {
        let run = push(home.path(), &[archive.to_str().expect("path"), bad]).failure();
        assert!(run.stderr.contains(&format!("{bad:?}")), "{}", run.stderr);
    }

    let catalog = reqwest_free_get(&format!("{}/v2/_catalog", registry.host()));
    assert!(catalog.contains("\"repositories\":[]"), "{catalog}");
}

/// A tiny HTTP GET over a TcpStream, so the test reads the catalog with no client of ours.
fn reqwest_free_get(host_path: &str) -> String {
    let (host, path) = host_path.split_once('/').expect("host/path");
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read");
    answer
}

#[test]
fn unreachable_registry_is_a_clear_error() {
    let home = home();
    let archive = TestImage::new(2, 10_000, 9).write(home.path(), "img", false);
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let reference = format!("127.0.0.1:{port}/app:1");
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).failure();
    assert!(run.stderr.contains(&format!("cannot reach registry 127.0.0.1:{port}")), "{}", run.stderr);
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
}

fn assert_no_password(run: &Run) {
    assert!(
        !run.stdout.contains(PASSWORD) && !run.stderr.contains(PASSWORD),
        "password leaked: {}{}",
        run.stdout,
        run.stderr
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
    let run = push(home.path(), &[&archive, &target("noca")]).failure();
    assert!(run.stderr.contains("--ca-cert"), "{}", run.stderr);

    // Anonymous: told to log in.
    let run = push(home.path(), &["--ca-cert", ca, &archive, &target("anon")]).failure();
    assert!(run.stderr.contains("requires credentials"), "{}", run.stderr);

    // --username + --password-stdin.
    let with_stdin = |password: &str, tag: &str| {
        let args = ["push", "--ca-cert", ca, "--username", USER, "--password-stdin", &archive, &target(tag)];
        push_with(nixctr(home.path()).args(args), Some(password))
    };
    let run = with_stdin(&format!("{PASSWORD}\n"), "stdin").success();
    assert_no_password(&run);
    check_with_skopeo(&registry, "secure/app:stdin", &run.digest(&target("stdin")), &image, OCI_GZIP, home.path());

    // Wrong password: a 401 naming the user and the source, never the password.
    let run = with_stdin("not-the-password", "wrong").failure();
    assert!(
        run.stderr.contains("401") && run.stderr.contains(USER) && run.stderr.contains("--password-stdin"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("not-the-password"), "{}", run.stderr);
    assert!(registry.skopeo_inspect("secure/app:wrong", false).is_none());

    // A push with the CA and `env` set: it must succeed without showing the password.
    let push_as = |env: &[(&str, &std::ffi::OsStr)], tag: &str| {
        let mut cmd = nixctr(home.path());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let run = push_with(cmd.args(["push", "--ca-cert", ca, &archive, &target(tag)]), None).success();
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

    // Docker's config: credHelpers, with a helper on PATH for the child only.
    let helper_dir = home.path().join("bin");
    std::fs::create_dir_all(&helper_dir).expect("mkdir");
    let helper = helper_dir.join("docker-credential-test");
    let log = home.path().join("helper-stdin");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\ncat > {}\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$(cat {})\"\n",
            log.display(),
            log.display()
        ),
    )
    .expect("write helper");
    run_ok(Command::new("chmod").arg("+x").arg(&helper));
    let helper_config = home.path().join("docker-helper");
    std::fs::create_dir_all(&helper_config).expect("mkdir");
    std::fs::write(
        helper_config.join("config.json"),
        format!(r#"{{"credHelpers": {{"{}": "test"}}}}"#, registry.host()),
    )
    .expect("write");
    let path = format!("{}:{}", helper_dir.display(), std::env::var("PATH").unwrap_or_default());
    let run = push_as(&[("DOCKER_CONFIG", helper_config.as_os_str()), ("PATH", path.as_ref())], "helper");
    assert_eq!(std::fs::read_to_string(&log).expect("helper ran").trim(), registry.host());
    check_with_skopeo(&registry, "secure/app:helper", &run.digest(&target("helper")), &image, OCI_GZIP, home.path());

    // No CA, but --insecure, or the registry listed in nixctr.toml: the certificate goes unchecked.
    push_with(
        nixctr(home.path()).env("REGISTRY_AUTH_FILE", &podman).args([
            "push",
            "--insecure",
            &archive,
            &target("insecure"),
        ]),
        None,
    )
    .success();
    let project = home.path().join("project");
    std::fs::create_dir_all(&project).expect("mkdir");
    std::fs::write(project.join("nixctr.toml"), format!("insecure-registries = [\"{}\"]\n", registry.host()))
        .expect("write");
    push_with(
        nixctr(home.path()).current_dir(&project).env("REGISTRY_AUTH_FILE", &podman).args([
            "push",
            &archive,
            &target("listed"),
        ]),
        None,
    )
    .success();
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
    let mut child = nixctr(home.path())
        .args(["push", "--jobs", "1", archive.to_str().expect("path"), &reference])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nixctr");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stderr, &mut line).expect("read stderr");
        assert!(n > 0, "push ended before a layer went up: {seen}");
        seen.push_str(&line);
        if line.contains(" pushed (") {
            break;
        }
    }
    registry.kill();
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("read stderr");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "push should fail once the registry is gone: {seen}{rest}");
    assert!(rest.contains("error: "), "{rest}");
    assert!(!rest.contains("panicked"), "{rest}");

    registry.start();
    assert!(registry.skopeo_inspect("app:crash", false).is_none(), "a failed push left a tag");
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).success();
    let (pushed, already, _) = run.counts();
    assert!(already >= 1 && pushed < 8 && pushed + already == 8, "{}", run.stderr);
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
    let started = std::time::Instant::now();
    let run = push_with(
        nixctr(home.path()).env("NIXCTR_REGISTRY_USERNAME", USER).env("NIXCTR_REGISTRY_PASSWORD", PASSWORD).args([
            "push",
            "--jobs",
            "1",
            archive.to_str().expect("path"),
            &reference,
        ]),
        None,
    )
    .success();
    let took = started.elapsed();
    assert_no_password(&run);
    let issued = tokens.issued.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("push took {took:?}; {issued} tokens issued");
    assert!(issued >= 2, "the first token stopped working mid-push, yet no new one was asked for");
    check_with_skopeo(&registry, "bearer/app:1", &run.digest(&reference), &image, OCI_GZIP, home.path());

    // Wrong password: the token server says no, and the error says whose credentials.
    let run = push_with(
        nixctr(home.path())
            .env("NIXCTR_REGISTRY_USERNAME", USER)
            .env("NIXCTR_REGISTRY_PASSWORD", "wrong-password")
            .args(["push", archive.to_str().expect("path"), &format!("{}/bearer/app:2", registry.host())]),
        None,
    )
    .failure();
    assert!(run.stderr.contains("rejected the credentials") && run.stderr.contains(USER), "{}", run.stderr);
    assert!(!run.stderr.contains("wrong-password"), "{}", run.stderr);
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
    let run = push(home.path(), &[archive.to_str().expect("path"), &reference]).success();
    assert!(
        run.stderr.contains("refused the OCI manifest") && run.stderr.contains("Docker schema 2"),
        "{}",
        run.stderr
    );
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
    let run = push(home.path(), &["-v", archive.to_str().expect("path"), &reference]).success();
    assert!(run.stderr.contains("retrying"), "{}", run.stderr);
    check_with_skopeo(&registry, "app:flaky", &run.digest(&reference), &image, OCI_GZIP, home.path());

    let broken = Proxy::start(registry.port, |r| {
        (r.path != "/v2/").then(|| error_answer("500 Internal Server Error", "UNKNOWN", "disk on fire"))
    });
    let run = push(home.path(), &[archive.to_str().expect("path"), &format!("{}/app:broken", broken.host())]).failure();
    assert!(run.stderr.contains("answered 500 Internal Server Error"), "{}", run.stderr);
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
    let mut child = nixctr(home.path())
        .env("TMPDIR", &tmp)
        .args(["push", "--jobs", "1", archive.to_str().expect("path"), &format!("{}/app:int", registry.host())])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nixctr");
    let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut seen = String::new();
    while !seen.contains(" pushed (") {
        let mut line = String::new();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut line).expect("read") > 0, "push ended early: {seen}");
        seen.push_str(&line);
    }
    let listed = std::fs::read_dir(&tmp).expect("read tmp").count();
    assert!(listed > 0, "expected temporary files while pushing a compressed archive");
    run_ok(Command::new("kill").args(["-INT", &child.id().to_string()]));
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("read");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
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
