//! The shared nix binary cache: Docker builds and uploads to the nginx cache `scripts/setup.sh`
//! runs on 127.0.0.1:5081 (WebDAV PUT, a basic-auth location), Podman — its own store, standing
//! in for a second machine — substitutes from it. Each test writes to a directory of the cache
//! of its own, and builds derivations no earlier run built.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::*;

const CACHE: &str = "http://127.0.0.1:5081";
const CACHE_DIR: &str = "/var/lib/nixctr-test/cache";
const KEYS: &str = "/etc/nixctr-test/cache";

fn signing_key() -> PathBuf {
    let key = PathBuf::from(KEYS).join("signing-key");
    assert!(key.is_file(), "no signing key at {}: {SETUP_HINT}", key.display());
    key
}

fn public_key() -> String {
    std::fs::read_to_string(Path::new(KEYS).join("signing-key.pub")).unwrap().trim().to_string()
}

/// The secret part of the signing key: what must appear nowhere.
fn secret_bytes() -> String {
    let key = std::fs::read_to_string(signing_key()).unwrap();
    key.trim().split_once(':').unwrap().1.to_string()
}

/// A cache directory of the test's own under nginx's root, removed when the test ends.
struct CacheDir(PathBuf);

impl std::ops::Deref for CacheDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for CacheDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cache of the test's own: (URL, directory on this machine).
fn fresh_cache(tag: &str) -> (String, CacheDir) {
    let name = unique(&format!("it-{tag}-"));
    (format!("{CACHE}/{name}"), CacheDir(Path::new(CACHE_DIR).join("public").join(name)))
}

/// `containers/CONTAINER`: an image holding busybox and `work`, a derivation named `work` that
/// burns some CPU (sha256 rounds) — the slow build the cache saves.
fn write_slow_container(fx: &Fixture, container: &str, work: &str) {
    fx.write(
        &format!("containers/{work}.nix"),
        &format!(
            "{{ pkgs }}:\npkgs.runCommand \"{work}\" {{ }} ''\n  yes {work} | head -c 33554432 > data\n  \
             i=0; while [ \"$i\" -lt 6 ]; do sha256sum data >> sums; i=$((i + 1)); done\n  \
             mkdir -p $out/share; sha256sum < sums > $out/share/{work}; rm -f data\n''\n"
        ),
    );
    fx.write(
        &format!("containers/{container}/default.nix"),
        &format!(
            "{{ pkgs ? import <nixpkgs> {{ }} }}:\nlet work = import ../{work}.nix {{ inherit pkgs; }}; in\n\
             pkgs.dockerTools.buildLayeredImage {{ name = \"{container}\"; tag = \"latest\"; contents = [ pkgs.busybox work ]; }}\n"
        ),
    );
}

fn builds_of(stderr: &str, name: &str) -> usize {
    stderr.lines().filter(|l| l.contains("building '") && l.contains(&format!("-{name}.drv"))).count()
}

/// The `.narinfo` texts of the cache directory whose StorePath is `/nix/store/HASH-name`.
fn narinfos(dir: &Path, name: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .filter(|text| text.lines().any(|l| l.starts_with("StorePath:") && l.trim_end().ends_with(&format!("-{name}"))))
        .collect()
}

fn gunzip(path: &Path) -> Vec<u8> {
    let out = Cmd::tool("gzip").arg("-dc").arg(path).quiet().run();
    out.success();
    out.stdout.clone()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Docker builds with `--cache-to`: signed narinfos for the image and its build inputs, and
/// the key nowhere. Podman, on a throwaway store, substitutes the image instead of building it
/// (byte-identical archive), substitutes the shared build input of another container, and with
/// a wrong key builds everything itself.
#[test]
fn docker_uploads_signed_closures_and_podman_substitutes_them() {
    let engines = engines();
    let (docker, podman) = (engines.by_name("docker"), engines.by_name("podman"));
    let fx = Fixture::new();
    let work = unique("cachework");
    let (container, other) = (unique("cached"), unique("sibling"));
    write_slow_container(&fx, &container, &work);
    write_slow_container(&fx, &other, &work);
    let (url, dir) = fresh_cache("slow");
    let secret = secret_bytes();
    let key = signing_key();

    // Docker: build and upload; its containers' create configs, read while it runs, hold no key.
    let docker_tar = fx.path().join("docker.tar.gz");
    let mut run = fx
        .nixctr(Some(docker))
        .args(["-v", "build", &container, "-o"])
        .arg(&docker_tar)
        .args(["--network", "host", "--cache-to", &url, "--signing-key"])
        .arg(&key)
        .deadline(COLD_BUILD_DEADLINE)
        .spawn();
    run.wait_for_line("building", WAIT, |l| l.contains("building '/nix/store/"));
    let made = docker.nixctr_containers(Some(run.pid()));
    assert!(!made.is_empty(), "no nixctr container while the build runs");
    for id in &made {
        let inspect = docker.api_get(&format!("/containers/{id}/json"));
        assert!(!inspect.contains(&secret), "docker inspect shows the signing key");
        let v: serde_json::Value = serde_json::from_str(&inspect).unwrap();
        assert_eq!(v["HostConfig"]["NetworkMode"], "host", "{inspect}");
    }
    let out = run.wait();
    out.success();
    out.stderr_has("paths uploaded").stderr_has("uploaded /nix/store/");
    assert_eq!(builds_of(&out.stderr(), &work), 1, "the slow derivation is new to this run");
    for text in [out.stdout(), out.stderr()] {
        assert!(!text.contains(&secret), "the signing key is in nixctr's output");
    }
    assert!(!contains(&gunzip(&docker_tar), secret.as_bytes()), "the signing key is in the archive");
    assert_no_containers_left(docker, &out);
    for name in [format!("{container}.tar.gz"), work.clone(), "busybox-1.35.0".to_string()] {
        let infos = narinfos(&dir, &name);
        assert_eq!(infos.len(), 1, "the cache has no narinfo for {name} in {}", dir.display());
        assert!(infos[0].lines().any(|l| l.starts_with("Sig: nixctr-test-1:")), "unsigned: {}", infos[0]);
    }
    assert!(!narinfos(&dir, &format!("{work}.drv")).is_empty(), "the build's derivations are not in the cache");

    // Podman, a throwaway store: the image comes from the cache, the slow derivation is not built.
    let podman_tar = fx.path().join("podman.tar.gz");
    let out = fx
        .nixctr(Some(podman))
        .args(["-v", "--no-cache", "build", &container, "-o"])
        .arg(&podman_tar)
        .args(["--network", "host", "--substituter", &url, "--trusted-public-key", &public_key()])
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out.success();
    out.stderr_has(&format!("{container}.tar.gz' from '{url}'"));
    out.stderr_has(&format!("1 from {url}"));
    assert_eq!(builds_of(&out.stderr(), &work), 0, "podman built the slow derivation");
    assert_eq!(std::fs::read(&podman_tar).unwrap(), std::fs::read(&docker_tar).unwrap(), "archives differ");
    assert_no_containers_left(podman, &out);

    // Another container with the same slow input: the input comes from the cache, only the
    // image is built.
    let out = fx
        .nixctr(Some(podman))
        .args(["-v", "--no-cache", "build", &other, "-o"])
        .arg(fx.path().join("other.tar.gz"))
        .args(["--network", "host", "--substituter", &url, "--trusted-public-key", &public_key()])
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out.success();
    out.stderr_has(&format!("-{work}' from '{url}'"));
    assert_eq!(builds_of(&out.stderr(), &work), 0, "podman built the shared slow input");
    assert_eq!(builds_of(&out.stderr(), &format!("{other}.tar.gz")), 1);

    // A key that did not sign them: nix refuses the downloads and builds; nixctr says why.
    let wrong = "nixctr-test-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    let wrong_tar = fx.path().join("wrong.tar.gz");
    let out = fx
        .nixctr(Some(podman))
        .args(["-v", "--no-cache", "build", &container, "-o"])
        .arg(&wrong_tar)
        .args(["--network", "host", "--substituter", &url, "--trusted-public-key", wrong])
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out.success();
    out.stderr_has("not signed by any key in trusted-public-keys").stderr_has(&format!("cache {url}"));
    assert_eq!(builds_of(&out.stderr(), &work), 1, "with a wrong key the slow derivation is built");
    assert_eq!(std::fs::read(&wrong_tar).unwrap(), std::fs::read(&docker_tar).unwrap(), "archives differ");
}

/// A file holding `text`, mode `mode`, in the fixture's sandbox.
fn secret_file(fx: &Fixture, name: &str, text: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = fx.path().join(name);
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

/// Bad input refused before any build: nothing written, the fix named, no secret shown.
#[test]
fn bad_cache_settings_are_refused_before_building() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let key = std::fs::read_to_string(signing_key()).unwrap();
    let open_key = secret_file(&fx, "open-key", &key, 0o644);
    let garbage = secret_file(&fx, "garbage-key", "nixctr-test-1:this-is-not-a-key-sekrit", 0o600);
    let open_netrc = secret_file(&fx, "open-netrc", "machine 127.0.0.1 login a password b\n", 0o640);
    let url = format!("{CACHE}/unused");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--cache-to".into(), url.clone(), "--signing-key".into(), open_key.display().to_string()], "chmod 600"),
        (vec!["--cache-to".into(), url.clone(), "--signing-key".into(), "/nonexistent/key".into()], "/nonexistent/key"),
        (vec!["--cache-to".into(), url.clone()], "needs a signing key"),
        (
            vec!["--cache-to".into(), url.clone(), "--signing-key".into(), garbage.display().to_string()],
            "not a nix secret key",
        ),
        (
            vec![
                "--cache-to".into(),
                "ftp://cache.example".into(),
                "--signing-key".into(),
                signing_key().display().to_string(),
            ],
            "does not know how to open a ftp:// store",
        ),
        (vec!["--netrc".into(), open_netrc.display().to_string(), "--substituter".into(), url.clone()], "chmod 600"),
        (vec!["--trusted-public-key".into(), "nixctr-test-1:short".into(), "--substituter".into(), url], "NAME:BASE64"),
    ];
    for (args, says) in cases {
        let out = fx.nixctr(Some(docker)).args(["build", "hello"]).args(&args).run();
        out.assert_exit(1).stderr_has(says).stderr_lacks("sekrit").stderr_lacks(&secret_bytes());
        assert!(!fx.project().join("hello.tar.gz").exists(), "an archive was written");
        assert_no_containers_left(docker, &out);
    }
}

/// A cache that does not answer, or refuses the login: a warning naming it, the archive written;
/// `--cache-required` makes it exit 1 (the archive is still there). The right netrc uploads.
#[test]
fn failing_uploads_warn_and_the_right_netrc_uploads() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let key = signing_key().display().to_string();
    let archive = fx.project().join("hello.tar.gz");
    let dead = "http://127.0.0.1:9/nixctr-dead";
    let build = |extra: &[&str]| {
        let _ = std::fs::remove_file(&archive);
        let mut cmd = fx.nixctr(Some(docker));
        cmd.args(["build", "hello", "--network", "host", "--signing-key", &key]).args(extra);
        cmd.run()
    };

    let out = build(&["--cache-to", dead]);
    // The warning names the cache (and nix's own error); the hint that it does not answer
    // depends on nix's wording of a refused connection.
    out.success().stderr_has(&format!("the upload to the cache {dead} failed"));
    assert!(archive.is_file());
    let out = build(&["--cache-to", dead, "--cache-required"]);
    out.assert_exit(1).stderr_has(&format!("the upload to the cache {dead} failed"));
    assert!(archive.is_file(), "--cache-required: the archive is still written");

    let name = unique("it-private-");
    let private = format!("{CACHE}/private/{name}");
    let _private_dir = CacheDir(Path::new(CACHE_DIR).join("private").join(&name));
    let wrong = secret_file(&fx, "wrong-netrc", "machine 127.0.0.1\nlogin nixctr\npassword wrong-pw\n", 0o600);
    let out = build(&["--cache-to", &private, "--netrc", wrong.to_str().unwrap()]);
    out.success().stderr_has(&format!("the upload to the cache {private} failed")).stderr_has("--netrc");
    out.stderr_lacks("wrong-pw");
    assert!(archive.is_file());
    let right = Path::new(KEYS).join("netrc");
    let out = build(&["--cache-to", &private, "--netrc", right.to_str().unwrap()]);
    out.success().stderr_has("paths uploaded");
    let password = std::fs::read_to_string(&right).unwrap();
    let password = password.split_whitespace().last().unwrap();
    out.stderr_lacks(password);
    assert_eq!(narinfos(&Path::new(CACHE_DIR).join("private").join(&name), "hello.tar.gz").len(), 1);

    // A substituter that does not answer: the build (of something new) goes on, nixctr names it.
    let fresh = unique("fresh");
    write_slow_container(&fx, &fresh, &unique("freshwork"));
    let out = fx
        .nixctr(Some(docker))
        .args(["build", &fresh, "--network", "host", "--substituter", dead, "--trusted-public-key", &public_key()])
        .run();
    out.success().stderr_has(&format!("cache {dead} does not answer"));
}

/// `--network none` with a cache: a warning; the build (warm) still works.
#[test]
fn network_none_with_a_cache_warns() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let out = fx
        .nixctr(Some(docker))
        .args(["build", "hello", "--network", "none", "--substituter", &format!("{CACHE}/x")])
        .deadline(Duration::from_secs(300))
        .run();
    out.success().stderr_has("--network none: the build container has no network");
}

/// `cache push` copies a built container without building; one not built fails clearly.
/// `cache ls` says which containers' outputs the cache has.
#[test]
fn cache_push_and_ls() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let (url, dir) = fresh_cache("push");
    let key = signing_key().display().to_string();
    fx.nixctr(Some(docker)).args(["build", "hello", "-q"]).run().success();
    let flags = ["--network", "host", "--cache-to", &url, "--signing-key", &key];

    let out = fx.nixctr(Some(docker)).args(["cache", "ls", "hello", "web"]).args(flags).run();
    out.success();
    assert!(out.stdout().contains("hello\tmissing\t/nix/store/"), "{}", out.stdout());

    let out = fx.nixctr(Some(docker)).args(["cache", "push", "hello"]).args(flags).run();
    out.success().stderr_lacks("building '");
    assert!(out.stdout().starts_with("hello\t/nix/store/"), "{}", out.stdout());
    assert_eq!(narinfos(&dir, "hello.tar.gz").len(), 1);

    let out = fx.nixctr(Some(docker)).args(["cache", "ls", "hello"]).args(flags).run();
    out.success();
    assert!(out.stdout().contains("hello\tcached\t/nix/store/"), "{}", out.stdout());

    let never = unique("neverbuilt");
    write_slow_container(&fx, &never, &unique("neverwork"));
    let out = fx.nixctr(Some(docker)).args(["cache", "push", &never]).args(flags).run();
    out.assert_exit(1).stderr_has("not built in the store volume").stderr_has(&format!("nixctr build {never}"));
    assert_no_containers_left(docker, &out);
}

/// A streamed image's output is its stream program, whose closure is the image: `cache push`
/// sends the program, its customisation layer and every store path of the image.
#[test]
fn cache_push_sends_a_streamed_images_closure() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let (url, dir) = fresh_cache("stream");
    let key = signing_key().display().to_string();
    fx.nixctr(Some(docker)).args(["build", "streamed", "-q"]).run().success();
    let flags = ["--network", "host", "--cache-to", &url, "--signing-key", &key];
    let out = fx.nixctr(Some(docker)).args(["cache", "push", "streamed"]).args(flags).run();
    out.success().stderr_lacks("building '");
    assert!(out.stdout().starts_with("streamed\t/nix/store/"), "{}", out.stdout());
    assert!(out.stdout().trim_end().ends_with("-stream-streamed"), "{}", out.stdout());
    for path in ["stream-streamed", "streamed-customisation-layer.tar", "busybox-1.35.0", "hello-2.12.1"] {
        assert_eq!(narinfos(&dir, path).len(), 1, "{path} is not in the cache");
    }
    let out = fx.nixctr(Some(docker)).args(["cache", "ls", "streamed"]).args(flags).run();
    assert!(out.success().stdout().contains("streamed\tcached\t/nix/store/"), "{}", out.stdout());
    assert_no_containers_left(docker, &out);
}
