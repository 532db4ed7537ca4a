//! nix's remote builders (`--builder ssh-ng://…`) against the setup's real ones: containers of
//! the nix image (amd64, and arm64 under qemu) behind the sshd on 127.0.0.1:2222, whose key's
//! forced command is `docker exec -i <builder> nix-daemon --stdio` (scripts/setup.sh, section 9).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::harness::*;

/// nix 2.26 cannot parse this port itself: nixctr's ssh config must carry it.
const BUILDER: &str = "ssh-ng://root@127.0.0.1:2222";
const BUILDER_DIR: &str = "/etc/nixctr-test/builders";
const AMD64_BUILDER: &str = "nixctr-builder";
const ARM64_BUILDER: &str = "nixctr-builder-arm64";

fn key() -> PathBuf {
    Path::new(BUILDER_DIR).join("id_builder")
}

fn arm64_key() -> PathBuf {
    Path::new(BUILDER_DIR).join("id_builder_arm64")
}

fn known_hosts() -> PathBuf {
    Path::new(BUILDER_DIR).join("known_hosts")
}

/// The key's secret part: the base64 lines between the PEM armour.
fn key_body(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}: {SETUP_HINT}", path.display()));
    text.lines().filter(|l| !l.starts_with("-----") && l.len() > 20).map(str::to_string).collect()
}

/// `containers/NAME`: an image with a derivation no earlier run built (its nonce).
fn write_fresh(fx: &Fixture, name: &str) -> String {
    let nonce = unique("nonce");
    fx.write(
        &format!("containers/{name}/default.nix"),
        &format!(
            r#"{{ pkgs ? import <nixpkgs> {{ }} }}:
let
  step = pkgs.runCommand "remote-step" {{ nonce = "{nonce}"; }} ''
    mkdir -p $out/share
    echo "{nonce}" > $out/share/nonce
  '';
in
pkgs.dockerTools.buildLayeredImage {{
  name = "{name}";
  tag = "latest";
  contents = [ pkgs.busybox step ];
  config.Cmd = [ "/bin/cat" "/share/nonce" ];
}}
"#
        ),
    );
    nonce
}

/// The derivations `-v` says were built on a builder (`built DRV on URI`), and here.
fn built_lines(stderr: &str) -> (Vec<String>, Vec<String>) {
    let mut remote = Vec::new();
    let mut here = Vec::new();
    for line in stderr.lines() {
        let Some(rest) = line.split("built /nix/store/").nth(1) else { continue };
        let drv = format!("/nix/store/{}", rest.split_whitespace().next().unwrap());
        if rest.contains(&format!(" on {BUILDER}")) {
            remote.push(drv);
        } else if rest.ends_with(" here") {
            here.push(drv);
        }
    }
    (remote, here)
}

/// Runs `cmd`, inspecting every container it makes (and the command lines in them) meanwhile.
fn run_inspecting(engine: &TestEngine, cmd: &mut Cmd) -> (Output, Vec<String>) {
    let running = cmd.spawn();
    let pid = running.pid();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let poller = scope.spawn(|| {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Acquire) {
                for id in engine.nixctr_containers(Some(pid)) {
                    // It may be gone by now: what was seen of it counts.
                    let (code, body) = engine.api("GET", &format!("/containers/{id}/json"));
                    if code == 200 {
                        seen.push(body);
                    }
                    seen.extend(engine.processes(&id));
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            seen
        });
        let out = running.wait();
        stop.store(true, Ordering::Release);
        (out, poller.join().unwrap())
    })
}

/// The builder container's store holds an output of each of `drvs` (by name; the `-v` log
/// names the derivations) and this run's step, whose file holds `nonce`.
#[track_caller]
fn assert_builder_holds(builder: &str, drvs: &[String], nonce: &str) {
    let listing = Cmd::tool("docker").args(["exec", builder, "ls", "/nix/store"]).quiet().run();
    listing.success();
    let listing = listing.stdout();
    for drv in drvs {
        let name = drv.trim_end_matches(".drv").split_once('-').unwrap().1;
        assert!(
            listing.lines().any(|l| l.ends_with(&format!("-{name}"))),
            "{builder}'s store lacks the output of {drv}"
        );
    }
    let step = Cmd::tool("docker")
        .args(["exec", builder, "sh", "-c", "cat /nix/store/*-remote-step/share/nonce"])
        .quiet()
        .run();
    assert!(step.stdout().lines().any(|l| l == nonce), "{builder} did not build this run's step");
}

/// `--builders-only` with the amd64 builder: nix sends every derivation there (the local store
/// builds none), the builder's store holds their outputs, `--json` counts them, the archive is
/// byte for byte what a local build makes, and the key is nowhere to be seen.
#[test]
fn builders_only_builds_everything_on_the_builder() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let name = unique("remote");
    let nonce = write_fresh(&fx, &name);
    let remote = fx.path().join("remote.tar.gz");
    let mut cmd = fx.nixctr(Some(docker));
    cmd.args(["-v", "build", &name, "--json", "--network", "host", "--builders-only", "--builder", BUILDER])
        .arg("--builder-key")
        .arg(key())
        .arg("--builder-known-hosts")
        .arg(known_hosts())
        .arg("-o")
        .arg(&remote)
        .deadline(COLD_BUILD_DEADLINE);
    let (out, inspected) = run_inspecting(docker, &mut cmd);
    out.success().stderr_has("builders: derivations built").stderr_has(" on ssh-ng://root@127.0.0.1:2222");
    let (on_builder, here) = built_lines(&out.stderr());
    assert!(here.is_empty(), "built in the local container: {here:?}\n{}", out.stderr());
    assert!(on_builder.len() >= 2, "the step and the image were not built remotely:\n{}", out.stderr());
    assert!(on_builder.iter().any(|d| d.ends_with("-remote-step.drv")), "{on_builder:?}");
    out.stderr_has(", 0 here");

    // The builder's store holds the outputs of what it built, this run's step among them.
    assert_builder_holds(AMD64_BUILDER, &on_builder, &nonce);

    // --json: each builder and what of this image's closure it built.
    let record: serde_json::Value = serde_json::from_str(out.stdout().lines().next().unwrap()).unwrap();
    let counted = record["builders"][BUILDER].as_u64().unwrap_or_else(|| panic!("no builders count: {record}"));
    assert_eq!(counted as usize, on_builder.len(), "{record}");

    // The same image built here from scratch (a throwaway store) is byte-identical.
    let local = fx.path().join("local.tar.gz");
    let out_local = fx
        .nixctr(Some(docker))
        .args(["build", &name, "--no-cache", "-o"])
        .arg(&local)
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out_local.success();
    assert!(std::fs::read(&remote).unwrap() == std::fs::read(&local).unwrap(), "the remote build's archive differs");

    // The key: not in the log, nor in any container's config or command lines.
    for line in key_body(&key()) {
        assert!(!out.stderr().contains(&line) && !out.stdout().contains(&line), "nixctr printed the key");
        assert!(!inspected.iter().any(|i| i.contains(&line)), "a container's config or process holds the key");
        for builder in [AMD64_BUILDER, ARM64_BUILDER] {
            let inspect = Cmd::tool("docker").args(["inspect", builder]).quiet().run();
            assert!(!inspect.stdout().contains(&line), "docker inspect {builder} holds the key");
        }
    }
    assert!(!inspected.is_empty(), "no container of the build was seen");
    assert_no_containers_left(docker, &out);
}

/// `--platform linux/arm64` on the amd64 engine with an aarch64-linux builder: evaluated in a
/// native container (no qemu, no `filter-syscalls`), every arm64 derivation built there.
#[test]
fn arm64_goes_to_the_arm64_builder_without_emulation() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let name = unique("remote-arm64");
    let nonce = write_fresh(&fx, &name);
    let archive = fx.path().join("arm64.tar.gz");
    let spec = format!("{BUILDER} aarch64-linux");
    let mut cmd = fx.nixctr(Some(docker));
    cmd.args(["-v", "build", &name, "--platform", "linux/arm64", "--network", "host", "--builder", &spec])
        .arg("--builder-key")
        .arg(arm64_key())
        .arg("--builder-known-hosts")
        .arg(known_hosts())
        .arg("-o")
        .arg(&archive)
        .deadline(COLD_BUILD_DEADLINE);
    let (out, inspected) = run_inspecting(docker, &mut cmd);
    out.success()
        .stderr_has("evaluated here, built by the aarch64-linux builder ssh-ng://root@127.0.0.1:2222 (no emulation)")
        .stderr_lacks("emulated");
    let (on_builder, here) = built_lines(&out.stderr());
    assert!(here.is_empty(), "built in the local container: {here:?}");
    assert!(on_builder.iter().any(|d| d.ends_with("-remote-step.drv")), "{}", out.stderr());
    assert_builder_holds(ARM64_BUILDER, &on_builder, &nonce);
    // The local container ran natively, without the emulation settings.
    assert!(!inspected.is_empty(), "no container of the build was seen");
    for text in &inspected {
        assert!(!text.contains("filter-syscalls"), "the local container has emulation settings: {text}");
    }
    let config = Cmd::tool("sh")
        .arg("-c")
        .arg(format!("tar -xzOf {} --wildcards '*.json' --exclude manifest.json", archive.display()))
        .quiet()
        .run();
    assert!(config.stdout().contains("\"architecture\":\"arm64\""), "{}", config.stdout());
    assert_no_containers_left(docker, &out);
}

/// Bad builders: a wrong key, an unknown host key, a dead port. Each fails the build (nothing
/// else may build it: `--builders-only`) with nix's error, the builder's URI and the fix; a
/// dead builder without `--builders-only` is a warning, and the container builds here.
#[test]
fn bad_builders_are_named_with_the_fix() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let wrong_key = fx.path().join("wrong_key");
    Cmd::tool("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&wrong_key).run().success();
    let empty_known = fx.path().join("known_hosts");
    std::fs::write(&empty_known, "").unwrap();
    let dead = "ssh-ng://root@127.0.0.1:1";
    let cases: [(&str, &str, &Path, &Path, &str); 3] = [
        ("wrong key", BUILDER, &wrong_key, &known_hosts(), "it refused the ssh key"),
        ("unknown host key", BUILDER, &key(), &empty_known, "its host key is not in"),
        ("dead port", dead, &key(), &known_hosts(), "it does not answer within 10 s"),
    ];
    for (what, uri, key, known, says) in cases {
        let name = unique("bad-builder");
        write_fresh(&fx, &name);
        let out = fx
            .nixctr(Some(docker))
            .args(["build", &name, "--network", "host", "--builders-only", "--builder", uri, "--builder-key"])
            .arg(key)
            .arg("--builder-known-hosts")
            .arg(known)
            .arg("-o")
            .arg(fx.path().join("bad.tar.gz"))
            .run();
        out.assert_exit(1).stderr_has(&format!("builder {uri}: {says}")).stderr_has("cannot build on");
        out.stderr_lacks("no builder builds");
        // nix's own log names its alias; nixctr's words name the builder as the user wrote it.
        let named = out.stderr().lines().find(|l| l.contains(&format!("builder {uri}: "))).unwrap().to_string();
        assert!(!named.contains("nixctr-builder-"), "{what}: nix's alias shown instead of the builder: {named}");
        assert!(!fx.path().join("bad.tar.gz").exists(), "{what}: an archive was written");
        assert_no_containers_left(docker, &out);
    }
    // Without --builders-only the local engine builds it; the dead builder is a warning.
    let name = unique("bad-builder");
    write_fresh(&fx, &name);
    let out = fx
        .nixctr(Some(docker))
        .args(["build", &name, "--network", "host", "--builder", dead, "--builder-key"])
        .arg(key())
        .arg("--builder-known-hosts")
        .arg(known_hosts())
        .arg("-o")
        .arg(fx.path().join("local.tar.gz"))
        .run();
    out.success().stderr_has(&format!("builder {dead}: it does not answer")).stderr_has("built elsewhere instead");
    assert!(fx.path().join("local.tar.gz").exists());
}

/// A key that others may read is refused before any build.
#[test]
fn a_readable_builder_key_is_refused() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let open = fx.path().join("open_key");
    std::fs::copy(key(), &open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let out = fx.nixctr(Some(docker)).args(["build", "hello", "--builder", BUILDER, "--builder-key"]).arg(&open).run();
    out.assert_exit(1).stderr_has("builder key").stderr_has("may be read by group or others").stderr_has("chmod 600");
    assert_no_containers_left(docker, &out);
}

/// The trust issue's leaking `default.nix`, built here while a builder's key is staged for the
/// build (the builder serves only aarch64-linux, so everything builds in the container): it
/// sees the staged directory at build time, and reads nothing in it; the image, the store and
/// the log hold no part of the key.
#[test]
fn project_code_cannot_read_the_builder_key() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let name = unique("leaky");
    let text = std::fs::read_to_string(repo_root().join("fixtures/leaky/default.nix")).unwrap();
    fx.write(&format!("containers/{name}/default.nix"), &text.replace("@NONCE@", &unique("nonce")));
    let archive = fx.path().join("leaky.tar.gz");
    let spec = format!("{BUILDER} aarch64-linux");
    let out = fx
        .nixctr(Some(docker))
        .args(["-v", "build", &name, "--network", "host", "--builder", &spec, "--builder-key"])
        .arg(arm64_key())
        .arg("--builder-known-hosts")
        .arg(known_hosts())
        .arg("-o")
        .arg(&archive)
        .deadline(COLD_BUILD_DEADLINE)
        .run();
    out.success().stderr_has("0 on ssh-ng://root@127.0.0.1:2222");
    let image = Cmd::tool("gzip").arg("-dc").arg(&archive).quiet().run();
    image.success();
    let bytes = String::from_utf8_lossy(&image.stdout).to_string();
    assert!(bytes.contains("builders-"), "the build did not see the staged directory");
    assert!(bytes.contains("Permission denied"), "the build user was not refused");
    // The volume this build used (`-v` names it): the image's tag may name another by now.
    let volume = out
        .stderr()
        .lines()
        .find_map(|l| l.split("nix store: volume ").nth(1))
        .expect("-v names the volume")
        .trim()
        .to_string();
    for line in key_body(&arm64_key()) {
        assert!(!bytes.contains(&line), "the image holds the builder key");
        assert!(!out.stderr().contains(&line), "the log holds the builder key");
        let grep = format!("grep -rlF -e '{line}' /nix/store /nix/var/nix/db 2>/dev/null; echo searched");
        assert_eq!(docker.on_store(&volume, &["sh", "-c", &grep]).trim(), "searched", "the store holds the key");
    }
}

/// `nixctr doctor` reaches each builder as a build would: the daemon answers through ssh, each
/// system its spec lists builds there; a dead one is a problem with its fix.
#[test]
fn doctor_checks_each_builder() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let good = format!("{BUILDER} x86_64-linux");
    let out = fx
        .nixctr(Some(docker))
        .args(["doctor", "--network", "host", "--builder", &good, "--builder", "ssh-ng://root@127.0.0.1:1"])
        .arg("--builder-key")
        .arg(key())
        .arg("--builder-known-hosts")
        .arg(known_hosts())
        .run();
    out.assert_exit(1);
    let text = out.stdout() + &out.stderr();
    let line = |start: &str| {
        text.lines().find(|l| l.trim_start().starts_with(start) && l.contains(BUILDER)).map(str::to_string)
    };
    let answers = line("ok").unwrap_or_else(|| panic!("no ok line for {BUILDER}:\n{text}"));
    assert!(answers.contains("key accepted: nix 2.26"), "{answers}");
    assert!(
        text.lines().any(|l| l.contains("x86_64-linux") && l.contains("builds a derivation of this system")),
        "{text}"
    );
    let dead = text.lines().find(|l| l.contains("ssh-ng://root@127.0.0.1:1")).unwrap_or_else(|| panic!("{text}"));
    assert!(dead.trim_start().starts_with("problem") && dead.contains("it does not answer"), "{dead}");
    assert_no_containers_left(docker, &out);
}
