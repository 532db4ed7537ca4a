//! `nixctr build`, `cache` and `gc` against the real engines, the real nix image and the
//! fixture project.

use std::sync::Mutex;

use crate::harness::*;

/// Held by the tests that run a plain `gc`: each removes what dead runs left, which would
/// include the leftovers another such test is looking at.
static GC: Mutex<()> = Mutex::new(());

#[test]
fn build_loads_an_image_that_runs_and_leaves_no_container() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["build", "hello", "--load"]).run();
        out.success();
        let image = out.stdout().trim().to_string();
        assert!(image.ends_with("hello:latest"), "{}: loaded {image:?}", engine.name);
        let archive = fx.project().join("hello.tar.gz");
        let bytes = std::fs::read(&archive).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "hello.tar.gz is gzip");
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &image]).run();
        ran.success();
        assert!(ran.stdout().contains("Hello, world!"), "{}: {}", engine.name, ran.stdout());
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
        let out = fx.nixctr(Some(&engine)).args(["build", "nettest", "-o", "out/nettest.tar.gz", "--load"]).run();
        out.success();
        assert!(fx.project().join("out/nettest.tar.gz").is_file());
        let image = out.stdout().trim().to_string();
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &image]).run();
        ran.success();
        assert!(ran.stdout().contains("nettest: checking 127.0.0.1"), "{}: {}", engine.name, ran.stdout());
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn build_to_stdout_writes_the_archive_and_no_file() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["build", "hello", "-o", "-", "-q"]).run();
        out.success();
        assert_eq!(&out.stdout[..2], &[0x1f, 0x8b], "{}", engine.name);
        assert!(out.stderr.is_empty(), "-q printed: {}", out.stderr());
        assert!(!fx.project().join("hello.tar.gz").exists());
    }
}

#[test]
fn nix_build_failure_shows_nix_error_and_keeps_the_old_file() {
    for engine in engines() {
        let fx = Fixture::new();
        let dest = fx.project().join("broken-build.tar.gz");
        std::fs::write(&dest, "older archive").unwrap();
        let out = fx.nixctr(Some(&engine)).args(["-q", "build", "broken-build"]).run();
        out.assert_exit(1)
            .stderr_has("nix-build containers/broken-build/default.nix failed")
            .stderr_has("fails on purpose");
        assert_eq!(std::fs::read_to_string(&dest).unwrap(), "older archive");
        assert_no_containers_left(&engine, &out);

        let out = fx.nixctr(Some(&engine)).args(["build", "broken-eval"]).run();
        out.assert_exit(1).stderr_has("fails on purpose");
        assert!(!fx.project().join("broken-eval.tar.gz").exists());
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn ignored_files_stay_out_of_the_context() {
    for engine in engines() {
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
        fx.nixctr(Some(&engine)).args(["build", "ctx"]).run().success();
        // And the check itself can fail: once the ignore rule is gone, the file goes up.
        fx.write(".nixctrignore", "");
        fx.nixctr(Some(&engine)).args(["build", "ctx"]).run().assert_exit(1).stderr_has("secret.txt was uploaded");
    }
}

/// A derivation named `NAME-NONCE` (so its store path is new to every store), and a container
/// `containers/CONTAINER` whose image holds it.
fn write_unique_container(fx: &Fixture, container: &str, derivation: &str) {
    fx.write(
        &format!("containers/{derivation}.nix"),
        &format!(
            "{{ pkgs }}:\npkgs.runCommand \"{derivation}\" {{ }} ''\n  mkdir -p $out/share\n  echo {derivation} > $out/share/{derivation}\n''\n"
        ),
    );
    fx.write(
        &format!("containers/{container}/default.nix"),
        &format!(
            "{{ pkgs ? import <nixpkgs> {{ }} }}:\nlet unique = import ../{derivation}.nix {{ inherit pkgs; }}; in\n\
             pkgs.dockerTools.buildLayeredImage {{ name = \"{container}\"; tag = \"latest\"; contents = [ pkgs.busybox unique ]; }}\n"
        ),
    );
}

/// The lines of nix's log saying it builds derivation `name`.
fn builds_of(stderr: &str, name: &str) -> usize {
    stderr.lines().filter(|l| l.contains("building '") && l.contains(&format!("-{name}.drv"))).count()
}

/// Two builds at once use the one store volume: a derivation both need is built by one of
/// them, and the other finds it in the store (nix locks the path while it is built).
#[test]
fn two_builds_at_once_share_the_cache() {
    for engine in engines() {
        let fx = Fixture::new();
        let shared = unique("shared-");
        write_unique_container(&fx, "share-a", &shared);
        fx.write(
            "containers/share-b/default.nix",
            &fx.read("containers/share-a/default.nix").replace("share-a", "share-b"),
        );
        let volume = engine.store_volume_of(NIX_IMAGE);
        let mut a = fx.nixctr(Some(&engine));
        let a = a.args(["build", "share-a", "-v"]).deadline(COLD_BUILD_DEADLINE).spawn();
        let mut b = fx.nixctr(Some(&engine));
        let b = b.args(["build", "share-b", "-v"]).deadline(COLD_BUILD_DEADLINE).spawn();
        let (a, b) = (a.wait(), b.wait());
        a.success().stderr_has(&format!("nix store: volume {volume}"));
        b.success().stderr_has(&format!("nix store: volume {volume}"));
        assert!(fx.project().join("share-a.tar.gz").is_file());
        assert!(fx.project().join("share-b.tar.gz").is_file());
        let built = builds_of(&a.stderr(), &shared) + builds_of(&b.stderr(), &shared);
        assert_eq!(built, 1, "{}: {shared} was built {built} times, not once in the shared store", engine.name);
        assert!(engine.store_listing(&volume).contains(&shared), "{}: {shared} is not in {volume}", engine.name);
        assert_no_containers_left(&engine, &a);
        assert_no_containers_left(&engine, &b);
    }
}

/// `--no-cache` builds in the container's own /nix: the store volume gains nothing, no volume
/// is made for it, and its container goes. Building the same with the cache then does put the
/// path in the volume, so the check can fail.
#[test]
fn no_cache_builds_in_a_throwaway_store() {
    for engine in engines() {
        let fx = Fixture::new();
        let marker = unique("nocache-");
        write_unique_container(&fx, "nocache", &marker);
        let volume = engine.store_volume_of(NIX_IMAGE);
        let volumes_before = engine.volumes();
        let out =
            fx.nixctr(Some(&engine)).args(["build", "nocache", "--no-cache", "-v"]).deadline(COLD_BUILD_DEADLINE).run();
        out.success().stderr_lacks("nix store: volume");
        assert_eq!(builds_of(&out.stderr(), &marker), 1, "{}: nix did not build {marker}", engine.name);
        assert!(fx.project().join("nocache.tar.gz").is_file());
        assert_no_containers_left(&engine, &out);
        assert!(
            !engine.store_listing(&volume).contains(&marker),
            "{}: --no-cache wrote {marker} into {volume}",
            engine.name
        );
        let new: Vec<String> = engine
            .volumes()
            .into_iter()
            .filter(|v| !volumes_before.contains(v) && !v.starts_with("nixctr-store-"))
            .collect();
        assert!(new.is_empty(), "{}: --no-cache left volumes behind: {new:?}", engine.name);

        let out = fx.nixctr(Some(&engine)).args(["build", "nocache", "-v"]).run();
        out.success().stderr_has(&format!("nix store: volume {volume}"));
        assert!(
            engine.store_listing(&volume).contains(&marker),
            "{}: {marker} not in {volume} after a cached build",
            engine.name
        );
    }
}

/// One container's build shows nix's log, but not nix's warning about a result without a gc
/// root, which a user can do nothing about: nixctr roots what it builds (in the container's
/// /tmp) and still finds the output.
#[test]
fn a_build_shows_nix_log_but_no_nix_warning() {
    for engine in engines() {
        let fx = Fixture::new();
        let marker = unique("rooted-");
        write_unique_container(&fx, "rooted", &marker);
        let out = fx.nixctr(Some(&engine)).args(["build", "rooted"]).deadline(COLD_BUILD_DEADLINE).run();
        out.success().stderr_lacks("warning:");
        assert_eq!(builds_of(&out.stderr(), &marker), 1, "{}: nix's log of {marker} not shown", engine.name);
        assert!(fx.project().join("rooted.tar.gz").is_file());
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn pull_always_pulls_and_a_missing_tag_says_what_to_do() {
    for engine in engines() {
        let fx = Fixture::new();
        fx.nixctr(Some(&engine))
            .args(["build", "hello", "--pull", "always"])
            .run()
            .success()
            .stderr_has("pulling nixos/nix:2.33.3");

        let out = fx.nixctr(Some(&engine)).args(["build", "hello", "--nix-image", "nixos/nix:0.0.0-no-such-tag"]).run();
        out.assert_exit(1)
            .stderr_has("cannot pull image \"nixos/nix:0.0.0-no-such-tag\"")
            .stderr_has("--nix-image")
            .stderr_has("--pull never");
        assert_no_containers_left(&engine, &out);

        fx.nixctr(Some(&engine))
            .args(["build", "hello", "--nix-image", "nixctr-test/absent:1", "--pull", "never"])
            .run()
            .assert_exit(1)
            .stderr_has("--pull never");
    }
}

/// A cold build of `heavy` (seconds of CPU) in the background, returned once nixctr says it
/// runs nix-build in its container.
fn start_slow_build(fx: &Fixture, engine: &TestEngine) -> Running {
    let mut child =
        fx.nixctr(Some(engine)).args(["build", "heavy", "--no-cache"]).deadline(COLD_BUILD_DEADLINE).spawn();
    child.wait_for_line("`building containers/heavy/default.nix`", WAIT, |l| {
        l.contains("building containers/heavy/default.nix")
    });
    child
}

/// The one container of run `pid`.
#[track_caller]
fn container_of(engine: &TestEngine, pid: u32) -> String {
    let ids = engine.nixctr_containers(Some(pid));
    assert_eq!(ids.len(), 1, "{}: containers of run {pid}: {ids:?}", engine.name);
    ids[0].clone()
}

#[test]
fn interrupted_builds_exit_130_and_remove_their_container() {
    for engine in engines() {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            let fx = Fixture::new();
            let mut child = start_slow_build(&fx, &engine);
            let pid = child.pid();
            // nix is building the slow derivation: its log says so, and the container runs it.
            child.wait_for_line("saying nix builds busywork", WAIT, |l| {
                l.contains("building '") && l.contains("busywork-1.0.drv")
            });
            let id = container_of(&engine, pid);
            wait_until("nix-store --realise running in the container", WAIT, || {
                engine.processes(&id).iter().any(|p| p.contains("nix-store --realise")).then_some(())
            });
            child.signal(signal);
            let out = child.wait();
            out.assert_exit(130).stderr_has("interrupted");
            let left = engine.nixctr_containers(Some(pid));
            assert!(left.is_empty(), "{}: container left after signal {signal}: {left:?}", engine.name);
            assert!(!fx.project().join("heavy.tar.gz").exists());
        }
    }
}

/// A run held still with SIGSTOP is alive (gc keeps its container); killed, it leaves the
/// container behind, and gc removes it.
#[test]
fn gc_keeps_live_runs_and_removes_what_a_killed_run_left() {
    let _gc = GC.lock().unwrap_or_else(|e| e.into_inner());
    for engine in engines() {
        let fx = Fixture::new();
        let mut child = start_slow_build(&fx, &engine);
        let pid = child.pid();
        child.signal(libc::SIGSTOP);
        let id = container_of(&engine, pid);
        let out = fx.nixctr(Some(&engine)).args(["gc"]).run();
        out.success().stderr_has(&format!("nixctr run {pid} is still going"));
        assert_eq!(
            engine.nixctr_containers(Some(pid)),
            vec![id.clone()],
            "{}: gc removed a live run's container",
            engine.name
        );

        child.kill(); // SIGKILL: no cleanup runs
        assert_eq!(engine.nixctr_containers(Some(pid)), vec![id], "SIGKILL should leave the container");
        fx.nixctr(Some(&engine)).args(["gc"]).run().success();
        assert!(engine.nixctr_containers(Some(pid)).is_empty(), "{}: gc left it", engine.name);
    }
}

/// `gc --all` removes the container of a run that is still going, too. It may remove other
/// tests' containers, so it has the engines to itself.
#[test]
fn gc_all_removes_the_containers_of_live_runs_too() {
    for engine in engines_exclusive() {
        let fx = Fixture::new();
        let child = start_slow_build(&fx, &engine);
        let pid = child.pid();
        child.signal(libc::SIGSTOP);
        container_of(&engine, pid);
        fx.nixctr(Some(&engine)).args(["gc", "--all", "-v"]).run().success();
        assert!(
            engine.nixctr_containers(Some(pid)).is_empty(),
            "{}: gc --all kept a live run's container",
            engine.name
        );
        assert!(engine.nixctr_containers(None).is_empty(), "{}: gc --all left containers", engine.name);
        // The run, woken, finds its container gone: an error, not a hang or a panic.
        child.signal(libc::SIGCONT);
        let out = child.wait();
        assert_ne!(out.code(), Some(0), "{}: the build succeeded without its container", engine.name);
        out.stderr_lacks("panicked");
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn cache_ls_lists_the_store_volume_of_the_nix_image() {
    for engine in engines() {
        let fx = Fixture::new();
        fx.nixctr(Some(&engine)).args(["build", "hello", "-q"]).run().success();
        let out = fx.nixctr(Some(&engine)).args(["cache", "ls"]).run();
        out.success();
        let id = engine.image_id(NIX_IMAGE).unwrap();
        let volume = engine.store_volume_of(NIX_IMAGE);
        assert!(out.stdout().contains(&format!("{volume}\t{id}\n")), "{}: {}", engine.name, out.stdout());
    }
}

/// `cache rm` removes the store volume of the current nix image only. The image here is one
/// the test builds `FROM` the nix image (its own ID, so its own volume), so no other test's
/// store goes.
#[test]
fn cache_rm_removes_the_current_images_volume_only() {
    for engine in engines() {
        let fx = Fixture::new();
        let derived = engine.derived_nix_image(&unique("rm"), fx.path());
        let main_volume = engine.store_volume_of(NIX_IMAGE);
        fx.nixctr(Some(&engine)).args(["version", "curl"]).run().success();
        fx.nixctr(Some(&engine)).args(["--nix-image", &derived, "version", "curl"]).run().success();
        let volume = engine.store_volume_of(&derived);
        assert_ne!(volume, main_volume);
        let id = engine.image_id(&derived).unwrap();
        let listed = fx.nixctr(Some(&engine)).args(["cache", "ls"]).run();
        listed.success();
        assert!(listed.stdout().contains(&format!("{volume}\t{id}\n")), "{}: {}", engine.name, listed.stdout());
        assert!(engine.volumes().contains(&volume));

        let out = fx.nixctr(Some(&engine)).args(["--nix-image", &derived, "cache", "rm"]).run();
        out.success();
        assert_eq!(out.stdout(), format!("{volume}\n"), "{}", engine.name);
        let volumes = engine.volumes();
        assert!(!volumes.contains(&volume), "{}: {volume} is still there", engine.name);
        assert!(volumes.contains(&main_volume), "{}: cache rm took {main_volume} too", engine.name);
        let listed = fx.nixctr(Some(&engine)).args(["cache", "ls"]).run();
        assert!(!listed.success().stdout().contains(&volume), "{}", listed.stdout());

        // Nothing left to remove: an error that says how to see what there is.
        fx.nixctr(Some(&engine))
            .args(["--nix-image", &derived, "cache", "rm"])
            .run()
            .assert_exit(1)
            .stderr_has("no store volume for")
            .stderr_has("cache ls");
        engine.remove_image(&derived);
    }
}

/// `cache rm --all` removes every store volume, whatever image it belongs to. Other tests'
/// builds use those volumes, so this one has the engines to itself.
#[test]
fn cache_rm_all_removes_every_store_volume() {
    for engine in engines_exclusive() {
        let fx = Fixture::new();
        let derived = engine.derived_nix_image(&unique("rmall"), fx.path());
        fx.nixctr(Some(&engine)).args(["version", "curl"]).run().success();
        fx.nixctr(Some(&engine)).args(["--nix-image", &derived, "version", "curl"]).run().success();
        let expected = [engine.store_volume_of(NIX_IMAGE), engine.store_volume_of(&derived)];
        let out = fx.nixctr(Some(&engine)).args(["cache", "rm", "--all"]).run();
        out.success();
        for volume in &expected {
            assert!(
                out.stdout().lines().any(|l| l == volume),
                "{}: {volume} not listed: {}",
                engine.name,
                out.stdout()
            );
        }
        let left: Vec<String> = engine.volumes().into_iter().filter(|v| v.starts_with("nixctr-store-")).collect();
        assert!(left.is_empty(), "{}: cache rm --all left {left:?}", engine.name);
        let listed = fx.nixctr(Some(&engine)).args(["cache", "ls"]).run();
        assert_eq!(listed.success().stdout(), "", "{}", engine.name);
        engine.remove_image(&derived);
        // The next build makes a fresh store again.
        fx.nixctr(Some(&engine)).args(["build", "hello", "-q"]).deadline(COLD_BUILD_DEADLINE).run().success();
        assert!(engine.volumes().contains(&expected[0]), "{}: no fresh store volume", engine.name);
    }
}

#[test]
fn unresolvable_nixpkgs_is_an_error_and_the_container_goes() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["build", "hello", "--nixpkgs", "path:/no/such/nixpkgs"]).run();
        out.assert_exit(1).stderr_has("cannot resolve nixpkgs \"path:/no/such/nixpkgs\"").stderr_has("--nixpkgs");
        assert_no_containers_left(&engine, &out);
        assert!(!fx.project().join("hello.tar.gz").exists());
    }
}

#[test]
fn gc_removes_created_and_exited_leftovers() {
    let _gc = GC.lock().unwrap_or_else(|e| e.into_inner());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_string();
    for engine in engines() {
        let fx = Fixture::new();
        let labels = ["--label", "dev.nixctr=true", "--label", "dev.nixctr.pid=999999999", "--label"];
        let host_label = format!("dev.nixctr.host={host}");
        engine.cli().arg("create").args(labels).arg(&host_label).args([NIX_IMAGE, "sleep", "600"]).run().success();
        let started =
            engine.cli().args(["run", "-d"]).args(labels).arg(&host_label).args([NIX_IMAGE, "sleep", "600"]).run();
        started.success();
        let exited = started.stdout().trim().to_string();
        engine.cli().args(["stop", "-t", "0", &exited]).run().success();
        assert_eq!(engine.nixctr_containers(Some(999_999_999)).len(), 2, "{}", engine.name);

        fx.nixctr(Some(&engine)).args(["gc", "-v"]).run().success();
        let left = engine.nixctr_containers(Some(999_999_999));
        assert!(left.is_empty(), "{}: gc left {left:?}", engine.name);
    }
}
