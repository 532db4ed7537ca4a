//! Bad input that needs no engine: each gets one clear error and exit code 1 (2 for usage).

use crate::harness::*;

#[test]
fn unknown_container_lists_the_ones_that_exist() {
    let fx = Fixture::new();
    let out = run(fx.nixctr(None).args(["build", "nope"]));
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("no containers/nope/default.nix"), "{err}");
    assert!(err.contains("hello") && err.contains("nettest"), "{err}");
}

#[test]
fn an_engine_that_does_not_answer_is_named_with_the_fix() {
    let fx = Fixture::new();
    let out = run(fx.nixctr(None).args(["--engine", "unix:///nonexistent/docker.sock", "build", "hello"]));
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("unix:///nonexistent/docker.sock"), "{err}");
    assert!(err.contains("podman system service"), "{err}");
    let out = run(fx.nixctr(None).env("DOCKER_HOST", "tcp://127.0.0.1:1").args(["build", "hello"]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("tcp://127.0.0.1:1"), "{}", stderr(&out));
}

#[test]
fn malformed_config_names_file_line_and_key() {
    let fx = Fixture::new();
    fx.write("nixctr.toml", "nixpkgs = \"../nixpkgs\"\nnix-imag = \"x\"\n");
    let out = run(fx.nixctr(None).args(["build", "hello"]));
    assert_exit(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("nixctr.toml:2:1"), "{err}");
    assert!(err.contains("nix-imag"), "{err}");
}

#[test]
fn a_directory_flag_that_is_not_a_directory_is_refused() {
    let out = run(nixctr_cmd().args(["-C", "/no/such/place", "build", "hello"]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("-C /no/such/place: not a directory"), "{}", stderr(&out));
}

#[test]
fn an_output_that_cannot_be_written_is_refused_before_any_work() {
    let fx = Fixture::new();
    let out = run(fx.nixctr(None).args([
        "--engine",
        "unix:///nonexistent.sock",
        "build",
        "hello",
        "-o",
        "/no/such/dir/x.tar.gz",
    ]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("directory /no/such/dir does not exist"), "{}", stderr(&out));
}

#[test]
fn usage_errors_exit_2() {
    let out = run(nixctr_cmd().args(["build"]));
    assert_exit(&out, 2);
    let out = run(nixctr_cmd().args(["frobnicate"]));
    assert_exit(&out, 2);
}

#[test]
fn a_file_that_is_not_an_archive_is_named_but_not_quoted() {
    let fx = Fixture::new();
    let file = fx.dir.path().join("creds.txt");
    std::fs::write(&file, "user:hunter2-do-not-print:0:0:root:/root:/bin/sh\n".repeat(20)).unwrap();
    let out = run(fx.nixctr(None).args(["push", file.to_str().unwrap(), "127.0.0.1:1/x:y"]));
    assert_exit(&out, 1);
    assert!(stderr(&out).contains("is not a docker-archive"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("hunter2"), "file contents leaked: {}", stderr(&out));
}
