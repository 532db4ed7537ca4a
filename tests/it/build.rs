//! `nixctr build` against the real engines, the real nix image and the fixture project.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::harness::*;

#[test]
fn build_loads_an_image_that_runs_and_leaves_no_container() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = run(fx.nixctr(Some(&engine)).args(["build", "hello", "--load"]));
        assert_success(&out);
        let image = stdout(&out).trim().to_string();
        assert!(image.ends_with("hello:latest"), "{}: loaded {image:?}", engine.name);
        let archive = fx.project().join("hello.tar.gz");
        let bytes = std::fs::read(&archive).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "hello.tar.gz is gzip");
        let ran = run(engine.cli().args(["run", "--rm", "--network", "none", &image]));
        assert_success(&ran);
        assert!(stdout(&ran).contains("Hello, world!"), "{}: {}", engine.name, stdout(&ran));
        assert_no_containers_left(&engine, &out);
        assert!(!std::fs::read_dir(fx.project()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".part")));
    }
}

#[test]
fn build_reads_files_beside_default_nix_and_honours_config() {
    for engine in engines() {
        let fx = Fixture::new();
        std::fs::create_dir(fx.project().join("out")).unwrap();
        let out = run(fx.nixctr(Some(&engine)).args(["build", "nettest", "-o", "out/nettest.tar.gz", "--load"]));
        assert_success(&out);
        assert!(fx.project().join("out/nettest.tar.gz").is_file());
        let image = stdout(&out).trim().to_string();
        let ran = run(engine.cli().args(["run", "--rm", "--network", "none", &image]));
        assert_success(&ran);
        assert!(stdout(&ran).contains("nettest: checking 127.0.0.1"), "{}: {}", engine.name, stdout(&ran));
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn build_to_stdout_writes_the_archive_and_no_file() {
    let engine = &engines()[0];
    let fx = Fixture::new();
    let out = run(fx.nixctr(Some(engine)).args(["build", "hello", "-o", "-", "-q"]));
    assert_success(&out);
    assert_eq!(&out.stdout[..2], &[0x1f, 0x8b]);
    assert!(out.stderr.is_empty(), "-q printed: {}", stderr(&out));
    assert!(!fx.project().join("hello.tar.gz").exists());
}

#[test]
fn nix_build_failure_shows_nix_error_and_keeps_the_old_file() {
    for engine in engines() {
        let fx = Fixture::new();
        let dest = fx.project().join("broken-build.tar.gz");
        std::fs::write(&dest, "older archive").unwrap();
        let out = run(fx.nixctr(Some(&engine)).args(["-q", "build", "broken-build"]));
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.contains("nix-build containers/broken-build/default.nix failed"), "{err}");
        assert!(err.contains("fails on purpose"), "nix's message missing: {err}");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "older archive");
        assert_no_containers_left(&engine, &out);

        let out = run(fx.nixctr(Some(&engine)).args(["build", "broken-eval"]));
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("fails on purpose"), "{}", stderr(&out));
        assert!(!fx.project().join("broken-eval.tar.gz").exists());
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn ignored_files_stay_out_of_the_context() {
    let engine = &engines()[0];
    let fx = Fixture::new();
    fx.write("secret.txt", "s3cret");
    fx.write("local.env", "x");
    fx.write(".nixctrignore", "secret.txt\n");
    fx.write(".gitignore", "*.env\n");
    fx.write(
        "containers/ctx/default.nix",
        r#"{ pkgs ? import <nixpkgs> { } }:
assert !(builtins.pathExists ../../secret.txt) || throw "ctx: secret.txt was uploaded";
assert !(builtins.pathExists ../../local.env) || throw "ctx: local.env was uploaded";
assert builtins.pathExists ../../nixctr.toml || throw "ctx: nixctr.toml is missing";
pkgs.dockerTools.buildLayeredImage { name = "ctx"; tag = "latest"; contents = [ pkgs.hello ]; }
"#,
    );
    let out = run(fx.nixctr(Some(engine)).args(["build", "ctx"]));
    assert_success(&out);
    // And the check itself can fail: once the ignore rule is gone, the file goes up.
    fx.write(".nixctrignore", "");
    let out = run(fx.nixctr(Some(engine)).args(["build", "ctx"]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("secret.txt was uploaded"), "{}", stderr(&out));
}

#[test]
fn two_builds_at_once_share_the_cache() {
    for engine in engines() {
        let fx = Fixture::new();
        let spawn = |name: &str| {
            fx.nixctr(Some(&engine))
                .args(["build", name, "-q"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let a = spawn("hello");
        let b = spawn("nettest");
        for child in [a, b] {
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "{}: {}", engine.name, String::from_utf8_lossy(&out.stderr));
        }
        assert!(fx.project().join("hello.tar.gz").is_file());
        assert!(fx.project().join("nettest.tar.gz").is_file());
    }
}

#[test]
fn no_cache_builds_in_a_throwaway_store() {
    let engine = &engines()[1];
    let fx = Fixture::new();
    let out = run(fx.nixctr(Some(engine)).args(["build", "hello", "--no-cache", "-v"]));
    assert_success(&out);
    assert!(!stderr(&out).contains("nix store: volume"), "{}", stderr(&out));
    assert!(fx.project().join("hello.tar.gz").is_file());
}

#[test]
fn pull_always_pulls_and_a_missing_tag_says_what_to_do() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = run(fx.nixctr(Some(&engine)).args(["build", "hello", "--pull", "always"]));
        assert_success(&out);
        assert!(stderr(&out).contains("pulling nixos/nix:2.33.3"), "{}", stderr(&out));

        let out = run(fx.nixctr(Some(&engine)).args(["build", "hello", "--nix-image", "nixos/nix:0.0.0-no-such-tag"]));
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.contains("cannot pull image \"nixos/nix:0.0.0-no-such-tag\""), "{err}");
        assert!(err.contains("--nix-image") && err.contains("--pull never"), "{err}");
        assert_no_containers_left(&engine, &out);

        let out = run(fx.nixctr(Some(&engine)).args([
            "build",
            "hello",
            "--nix-image",
            "nixctr-test/absent:1",
            "--pull",
            "never",
        ]));
        assert_exit(&out, 1);
        assert!(stderr(&out).contains("--pull never"), "{}", stderr(&out));
    }
}

/// Waits until run `pid` has a container and nix is building in it.
fn wait_for_container(engine: &TestEngine, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while engine.nixctr_containers(Some(pid)).is_empty() {
        assert!(Instant::now() < deadline, "no container appeared for run {pid}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cold build of `heavy` (seconds of CPU) in the background, once its container exists.
fn start_slow_build(fx: &Fixture, engine: &TestEngine) -> std::process::Child {
    let child = fx
        .nixctr(Some(engine))
        .args(["build", "heavy", "--no-cache"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_container(engine, child.id());
    child
}

#[test]
fn interrupted_builds_exit_130_and_remove_their_container() {
    for engine in engines() {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let fx = Fixture::new();
            let child = start_slow_build(&fx, &engine);
            let pid = child.id();
            std::thread::sleep(Duration::from_millis(1500));
            unsafe { libc::kill(pid as i32, signal) };
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(130), "{} signal {signal}: {err}", engine.name);
            assert!(err.contains("interrupted"), "{err}");
            let left = engine.nixctr_containers(Some(pid));
            assert!(left.is_empty(), "{}: container left after signal {signal}: {left:?}", engine.name);
            assert!(!fx.project().join("heavy.tar.gz").exists());
        }
    }
}

#[test]
fn gc_keeps_live_runs_and_removes_what_a_killed_run_left() {
    for engine in engines() {
        let fx = Fixture::new();
        let mut child = start_slow_build(&fx, &engine);
        let pid = child.id();
        let out = run(fx.nixctr(Some(&engine)).args(["gc"]));
        assert_success(&out);
        assert!(!engine.nixctr_containers(Some(pid)).is_empty(), "{}: gc removed a live run's container", engine.name);
        assert!(stderr(&out).contains(&format!("nixctr run {pid} is still going")), "{}", stderr(&out));

        child.kill().unwrap(); // SIGKILL: no cleanup runs
        child.wait().unwrap();
        assert!(!engine.nixctr_containers(Some(pid)).is_empty(), "SIGKILL should leave the container");
        let out = run(fx.nixctr(Some(&engine)).args(["gc"]));
        assert_success(&out);
        assert!(engine.nixctr_containers(Some(pid)).is_empty(), "{}: gc left it", engine.name);
    }
}

#[test]
fn cache_ls_lists_the_store_volume_of_the_nix_image() {
    for engine in engines() {
        let fx = Fixture::new();
        assert_success(&run(fx.nixctr(Some(&engine)).args(["build", "hello", "-q"])));
        let out = run(fx.nixctr(Some(&engine)).args(["cache", "ls"]));
        assert_success(&out);
        let inspect = engine.api_get("/images/nixos/nix:2.33.3/json");
        let id = serde_json::from_str::<serde_json::Value>(&inspect).unwrap()["Id"].as_str().unwrap().to_string();
        let short = &id.trim_start_matches("sha256:")[..12];
        assert!(stdout(&out).contains(&format!("nixctr-store-{short}\t{id}")), "{}: {}", engine.name, stdout(&out));
    }
}

#[test]
fn unresolvable_nixpkgs_is_an_error_and_the_container_goes() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = run(fx.nixctr(Some(&engine)).args(["build", "hello", "--nixpkgs", "path:/no/such/nixpkgs"]));
        assert_exit(&out, 1);
        let err = stderr(&out);
        assert!(err.contains("cannot resolve nixpkgs \"path:/no/such/nixpkgs\""), "{err}");
        assert!(err.contains("--nixpkgs"), "{err}");
        assert_no_containers_left(&engine, &out);
        assert!(!fx.project().join("hello.tar.gz").exists());
    }
}

#[test]
fn gc_removes_created_and_exited_leftovers() {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for engine in engines() {
        let fx = Fixture::new();
        let labels = ["--label", "dev.nixctr=true", "--label", "dev.nixctr.pid=999999999", "--label"];
        let host_label = format!("dev.nixctr.host={host}");
        let created =
            run(engine.cli().arg("create").args(labels).arg(&host_label).args(["nixos/nix:2.33.3", "sleep", "600"]));
        assert_success(&created);
        let started = run(engine.cli().args(["run", "-d"]).args(labels).arg(&host_label).args([
            "nixos/nix:2.33.3",
            "sleep",
            "600",
        ]));
        assert_success(&started);
        let exited = stdout(&started).trim().to_string();
        assert_success(&run(engine.cli().args(["stop", "-t", "0", &exited])));

        let out = run(fx.nixctr(Some(&engine)).args(["gc", "-v"]));
        assert_success(&out);
        let left = engine.nixctr_containers(Some(999_999_999));
        assert!(left.is_empty(), "{}: gc left {left:?}", engine.name);
    }
}
