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
