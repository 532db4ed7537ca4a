//! `nixctr version`: files first (no engine contact), then nixpkgs evaluated in the nix
//! container, on both engines.

use crate::harness::*;

const NO_ENGINE: &str = "unix:///nonexistent/engine.sock";

#[test]
fn file_sources_answer_without_an_engine() {
    let fx = Fixture::new();
    let out = fx.nixctr(None).args(["--engine", NO_ENGINE, "version", "ntfy"]).run();
    out.success();
    assert_eq!(out.stdout(), "2.17.0\n");
    let out = fx.nixctr(None).args(["--engine", NO_ENGINE, "version", "authentik"]).run();
    out.success();
    assert_eq!(out.stdout(), "2025.10.1\n");
    let out = fx.nixctr(None).args(["--engine", NO_ENGINE, "version", "ntfy", "authentik", "--json"]).run();
    out.success();
    let lines: Vec<serde_json::Value> = out.stdout().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["source"], "default.nix");
    assert_eq!(lines[0]["file"], "containers/ntfy/default.nix");
    assert_eq!(lines[1]["name"], "authentik");
    assert_eq!(lines[1]["source"], "Dockerfile");
    assert_eq!(lines[1]["version"], "2025.10.1");
}

#[test]
fn an_expression_falls_through_to_the_dockerfile_and_says_why() {
    let fx = Fixture::new();
    fx.write(
        "containers/app/default.nix",
        "{ pkgs ? import <nixpkgs> { } }:\nlet version = pkgs.curl.version; in pkgs.hello\n",
    );
    fx.write("containers/app/Dockerfile", "FROM scratch\r\nARG CONTAINER_APP_VERSION=\"v3.1.4\"\r\n");
    let out = fx.nixctr(None).args(["--engine", NO_ENGINE, "-v", "version", "app"]).run();
    out.success();
    assert_eq!(out.stdout(), "v3.1.4\n");
    assert!(out.stderr().contains("expression"), "{}", out.stderr());
}

#[test]
fn a_version_holding_whitespace_is_an_error_not_a_line() {
    let fx = Fixture::new();
    fx.write(
        "containers/app/default.nix",
        "{ pkgs ? import <nixpkgs> { } }:\nlet version = \"1.0 beta\"; in pkgs.hello\n",
    );
    let out = fx.nixctr(None).args(["--engine", NO_ENGINE, "version", "app"]).run();
    out.assert_exit(1);
    assert!(out.stdout().is_empty());
    assert!(out.stderr().contains("1.0 beta"), "{}", out.stderr());
}

#[test]
fn nixpkgs_versions_are_evaluated_in_one_container() {
    for engine in engines() {
        let fx = Fixture::new();
        // curl: no binding, no Dockerfile; web: mapped to nginx in nixctr.toml; ntfy-sh: not a container.
        let out = fx.nixctr(Some(&engine)).args(["version", "curl", "web", "ntfy-sh", "ntfy"]).run();
        out.success();
        assert_eq!(out.stdout(), "curl 8.11.0\nweb 1.26.2\nntfy-sh 2.11.0\nntfy 2.17.0\n", "{}", engine.name);
        assert_no_containers_left(&engine, &out);

        let out = fx.nixctr(Some(&engine)).args(["version", "curl", "--json"]).run();
        out.success();
        let v: serde_json::Value = serde_json::from_str(out.stdout().trim()).unwrap();
        assert_eq!(v["source"], "nixpkgs");
        assert_eq!(v["version"], "8.11.0");
        assert!(v["nixpkgs"]["path"].as_str().unwrap().starts_with("/nix/store/"), "{v}");
        assert!(v["nixpkgs"]["ref"].as_str().unwrap().ends_with("nixpkgs"), "{v}");
    }
}

#[test]
fn from_nixpkgs_and_the_packages_map() {
    for engine in engines() {
        let fx = Fixture::new();
        fx.write("nixctr.toml", "nixpkgs = \"../nixpkgs\"\n[packages]\nntfy = \"ntfy-sh\"\n");
        let out = fx.nixctr(Some(&engine)).args(["version", "ntfy", "--from", "nixpkgs"]).run();
        out.success();
        assert_eq!(out.stdout(), "2.11.0\n", "{}", engine.name);
        let out = fx.nixctr(Some(&engine)).args(["version", "ntfy"]).run();
        assert_eq!(out.stdout(), "2.17.0\n", "default.nix still wins without --from");
    }
}

#[test]
fn names_nixpkgs_cannot_answer_say_what_was_tried() {
    for engine in engines() {
        let fx = Fixture::new();
        let out = fx.nixctr(Some(&engine)).args(["version", "no-such-thing"]).run();
        out.assert_exit(1);
        let err = out.stderr();
        assert!(err.contains("no version for no-such-thing"), "{err}");
        assert!(
            err.contains("no containers/no-such-thing/") && err.contains("has no attribute no-such-thing"),
            "{err}"
        );
        assert_no_containers_left(&engine, &out);

        let out = fx.nixctr(Some(&engine)).args(["version", "novers"]).run();
        out.assert_exit(1);
        assert!(out.stderr().contains("attribute novers has no version"), "{}", out.stderr());
    }
}

#[test]
fn evaluation_errors_show_nix_message() {
    for engine in engines() {
        let fx = Fixture::new();
        // A nixpkgs whose evaluation aborts: tryEval cannot catch abort, nix says why.
        std::fs::write(fx.nixpkgs().join("default.nix"), "{ ... }: abort \"fixture nixpkgs is broken on purpose\"\n")
            .unwrap();
        std::fs::write(
            fx.nixpkgs().join("flake.nix"),
            "{ outputs = { self }: { legacyPackages.x86_64-linux = import ./. { }; }; }\n",
        )
        .unwrap();
        let out = fx.nixctr(Some(&engine)).args(["version", "curl"]).run();
        out.assert_exit(1).stderr_has("broken on purpose");
        assert_no_containers_left(&engine, &out);
    }
}
