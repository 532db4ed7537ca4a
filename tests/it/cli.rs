//! The command line itself: bad input that needs no engine (one clear error, exit code 1, or
//! 2 for usage), how the engine address and the project root are chosen, and a closed stdout.

use crate::harness::*;
use crate::registry_harness::ClosedPort;

#[test]
fn unknown_container_lists_the_ones_that_exist() {
    let fx = Fixture::new();
    fx.nixctr(None)
        .args(["build", "nope"])
        .run()
        .assert_exit(1)
        .stderr_has("no containers/nope/default.nix")
        .stderr_has("hello")
        .stderr_has("nettest");
}

#[test]
fn an_engine_that_does_not_answer_is_named_with_the_fix() {
    let fx = Fixture::new();
    fx.nixctr(None)
        .args(["--engine", "unix:///nonexistent/docker.sock", "build", "hello"])
        .run()
        .assert_exit(1)
        .stderr_has("unix:///nonexistent/docker.sock")
        .stderr_has("podman system service");
    let closed = ClosedPort::new();
    let address = format!("tcp://127.0.0.1:{}", closed.port);
    fx.nixctr(None).env("DOCKER_HOST", &address).args(["build", "hello"]).run().assert_exit(1).stderr_has(&address);
}

#[test]
fn malformed_config_names_file_line_and_key() {
    let fx = Fixture::new();
    fx.write("nixctr.toml", "nixpkgs = \"../nixpkgs\"\nnix-imag = \"x\"\n");
    fx.nixctr(None).args(["build", "hello"]).run().assert_exit(1).stderr_has("nixctr.toml:2:1").stderr_has("nix-imag");
}

#[test]
fn a_directory_flag_that_is_not_a_directory_is_refused() {
    let sandbox = Sandbox::new();
    sandbox
        .nixctr()
        .args(["-C", "/no/such/place", "build", "hello"])
        .run()
        .assert_exit(1)
        .stderr_has("-C /no/such/place: not a directory");
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_any_work() {
    let fx = Fixture::new();
    fx.nixctr(None)
        .args(["--engine", "unix:///nonexistent.sock", "build", "hello", "-o", "/no/such/dir/x.tar.gz"])
        .run()
        .assert_exit(1)
        .stderr_has("directory /no/such/dir does not exist");
}

#[test]
fn usage_errors_exit_2() {
    let sandbox = Sandbox::new();
    sandbox.nixctr().args(["build"]).run().assert_exit(2);
    sandbox.nixctr().args(["frobnicate"]).run().assert_exit(2);
}

#[test]
fn a_file_that_is_not_an_archive_is_named_but_not_quoted() {
    let fx = Fixture::new();
    let file = fx.path().join("creds.txt");
    std::fs::write(&file, "user:hunter2-do-not-print:0:0:root:/root:/bin/sh\n".repeat(20)).unwrap();
    let closed = ClosedPort::new();
    fx.nixctr(None)
        .arg("push")
        .arg(&file)
        .arg(format!("127.0.0.1:{}/x:y", closed.port))
        .run()
        .assert_exit(1)
        .stderr_has("is not a docker-archive")
        .stderr_lacks("hunter2");
}

/// stdout is a pipe nobody reads any more (`nixctr version ntfy | head -0`): nothing to
/// report, so exit 0 without a word (no panic) on stderr.
#[test]
fn a_closed_stdout_is_not_an_error() {
    let fx = Fixture::new();
    let out = fx.nixctr(None).args(["--engine", "unix:///nonexistent.sock", "version", "ntfy"]).stdout_closed().run();
    out.assert_exit(0).stderr_lacks("panicked").stderr_lacks("Broken pipe");
    assert_eq!(out.stderr(), "", "a closed stdout is worth no message");
}

/// `-C DIR` names the project from anywhere: its nixctr.toml is read (the fixture's local
/// nixpkgs), and the archive lands in the working directory.
#[test]
fn directory_flag_works_from_another_working_directory() {
    let fx = Fixture::new();
    let elsewhere = fx.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let project = fx.project();
    let out = fx
        .sandbox
        .nixctr()
        .current_dir(&elsewhere)
        .arg("-C")
        .arg(&project)
        .args(["--engine", "unix:///nonexistent.sock", "version", "ntfy", "authentik"])
        .run();
    assert_eq!(out.success().stdout(), "ntfy 2.17.0\nauthentik 2025.10.1\n");
    // Without -C there is no project here.
    fx.sandbox
        .nixctr()
        .current_dir(&elsewhere)
        .args(["--engine", "unix:///nonexistent.sock", "version", "ntfy"])
        .run()
        .assert_exit(1);

    for engine in engines() {
        let out = fx
            .sandbox
            .nixctr()
            .current_dir(&elsewhere)
            .arg("-C")
            .arg(&project)
            .engine(&engine)
            .args(["build", "hello"])
            .run();
        out.success();
        assert!(elsewhere.join("hello.tar.gz").is_file(), "{}: no hello.tar.gz in the working directory", engine.name);
        assert!(!project.join("hello.tar.gz").exists(), "{}: the archive went to the project", engine.name);
        std::fs::remove_file(elsewhere.join("hello.tar.gz")).unwrap();
    }
}

/// `--engine` > `NIXCTR_ENGINE` > `--context` > `DOCKER_HOST` > `DOCKER_CONTEXT` >
/// `currentContext` > `CONTAINER_HOST` > `engine` in nixctr.toml: every loser points at a
/// socket that does not exist, so only the winner can answer. `-v` names the engine used and
/// why. Contexts are made with the real `docker context create`.
#[test]
fn engine_address_precedence() {
    for engine in engines() {
        let fx = Fixture::new();
        let good = engine.url();
        let bad = |what: &str| format!("unix:///nonexistent/{what}.sock");
        let config = fx.read("nixctr.toml");
        let set_config = |engine: &str| fx.write("nixctr.toml", &format!("engine = \"{engine}\"\n{config}"));
        let flavor = if engine.name == "docker" { "Docker" } else { "Podman" };
        let expect_used = |out: &Output, address: &str| {
            out.success().stderr_has(&format!("engine: {flavor} at {address}"));
        };

        set_config(&bad("toml"));
        let cache_ls = || {
            let mut cmd = fx.nixctr(None);
            cmd.args(["cache", "ls", "-v"]).uses_engine();
            cmd
        };
        // --engine over all the others.
        let out = cache_ls()
            .args(["--engine", &good])
            .env("NIXCTR_ENGINE", bad("nixctr-engine"))
            .env("DOCKER_HOST", bad("docker-host"))
            .env("CONTAINER_HOST", bad("container-host"))
            .run();
        expect_used(&out, &good);
        out.stderr_has(&format!("engine: {good} from --engine"));
        // NIXCTR_ENGINE over DOCKER_HOST and below; and --engine beats it (a bad flag fails).
        let out = cache_ls()
            .env("NIXCTR_ENGINE", &good)
            .env("DOCKER_HOST", bad("docker-host"))
            .env("CONTAINER_HOST", bad("container-host"))
            .run();
        expect_used(&out, &good);
        out.stderr_has(&format!("engine: {good} from NIXCTR_ENGINE"));
        cache_ls()
            .args(["--engine", &bad("flag")])
            .env("NIXCTR_ENGINE", &good)
            .run()
            .assert_exit(1)
            .stderr_has(&bad("flag"));
        // DOCKER_HOST over CONTAINER_HOST and the file; NIXCTR_ENGINE beats it.
        let out = cache_ls().env("DOCKER_HOST", &good).env("CONTAINER_HOST", bad("container-host")).run();
        expect_used(&out, &good);
        cache_ls()
            .env("NIXCTR_ENGINE", bad("nixctr-engine"))
            .env("DOCKER_HOST", &good)
            .run()
            .assert_exit(1)
            .stderr_has(&bad("nixctr-engine"));
        // CONTAINER_HOST over the file; DOCKER_HOST beats it.
        let out = cache_ls().env("CONTAINER_HOST", &good).run();
        expect_used(&out, &good);
        cache_ls()
            .env("DOCKER_HOST", bad("docker-host"))
            .env("CONTAINER_HOST", &good)
            .run()
            .assert_exit(1)
            .stderr_has(&bad("docker-host"));
        // The file, when nothing else names one; CONTAINER_HOST beats it.
        cache_ls().run().assert_exit(1).stderr_has(&bad("toml"));
        set_config(&good);
        expect_used(&cache_ls().run(), &good);
        cache_ls().env("CONTAINER_HOST", bad("container-host")).run().assert_exit(1).stderr_has(&bad("container-host"));

        // Docker contexts: "good" and "bad" in the sandbox's DOCKER_CONFIG.
        set_config(&bad("toml"));
        for (name, address) in [("good", good.clone()), ("bad", bad("context"))] {
            Cmd::tool("docker")
                .env("DOCKER_CONFIG", fx.sandbox.docker_config())
                .args(["context", "create", name, "--docker", &format!("host={address}")])
                .quiet()
                .run()
                .success();
        }
        let from = |why: &str| format!("engine: {good} from {why}");
        // --context over DOCKER_HOST, DOCKER_CONTEXT, CONTAINER_HOST; --engine beats it.
        let out = cache_ls()
            .args(["--context", "good"])
            .env("DOCKER_HOST", bad("docker-host"))
            .env("DOCKER_CONTEXT", "bad")
            .env("CONTAINER_HOST", bad("container-host"))
            .run();
        expect_used(&out, &good);
        out.stderr_has(&from("Docker context \"good\" (--context)"));
        cache_ls().args(["--engine", &bad("flag"), "--context", "good"]).run().assert_exit(1).stderr_has(&bad("flag"));
        // DOCKER_HOST over DOCKER_CONTEXT; --context beats it.
        expect_used(&cache_ls().env("DOCKER_HOST", &good).env("DOCKER_CONTEXT", "bad").run(), &good);
        cache_ls()
            .args(["--context", "bad"])
            .env("DOCKER_HOST", &good)
            .run()
            .assert_exit(1)
            .stderr_has(&bad("context"))
            .stderr_has("Docker context \"bad\" (--context)");
        // DOCKER_CONTEXT over currentContext and CONTAINER_HOST; DOCKER_HOST beats it.
        let config_json = fx.sandbox.docker_config().join("config.json");
        std::fs::write(&config_json, r#"{"currentContext": "bad"}"#).unwrap();
        let out = cache_ls().env("DOCKER_CONTEXT", "good").env("CONTAINER_HOST", bad("container-host")).run();
        expect_used(&out, &good);
        out.stderr_has(&from("Docker context \"good\" (DOCKER_CONTEXT)"));
        cache_ls()
            .env("DOCKER_HOST", bad("docker-host"))
            .env("DOCKER_CONTEXT", "good")
            .run()
            .assert_exit(1)
            .stderr_has(&bad("docker-host"));
        // currentContext over CONTAINER_HOST and the file; DOCKER_CONTEXT beats it, and
        // DOCKER_CONTEXT=default means no context at all.
        std::fs::write(&config_json, r#"{"currentContext": "good"}"#).unwrap();
        let out = cache_ls().env("CONTAINER_HOST", bad("container-host")).run();
        expect_used(&out, &good);
        out.stderr_has(&from(&format!("Docker context \"good\" (currentContext in {})", config_json.display())));
        cache_ls().env("DOCKER_CONTEXT", "bad").run().assert_exit(1).stderr_has(&bad("context"));
        cache_ls()
            .env("DOCKER_CONTEXT", "default")
            .env("CONTAINER_HOST", bad("container-host"))
            .run()
            .assert_exit(1)
            .stderr_has(&bad("container-host"));
        // currentContext "default", or a config.json without one: down to CONTAINER_HOST.
        std::fs::write(&config_json, r#"{"currentContext": "default"}"#).unwrap();
        expect_used(&cache_ls().env("CONTAINER_HOST", &good).run(), &good);
        // A repeated --engine is a list; the first is used for a single-engine command.
        expect_used(&cache_ls().args(["--engine", &good, "-H", &bad("second")]).run(), &good);
    }
}
