//! Helpers shared by the integration tests: the engines, a fresh copy of the fixture
//! project per test, a command builder for the nixctr binary, and independent readers of
//! engine state (raw API calls over the socket, the docker/podman programs).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const SETUP_HINT: &str =
    "run `scripts/setup.sh` (as root) to install and start Docker, Podman and the registry mirror";

#[derive(Debug, Clone)]
pub struct TestEngine {
    pub name: &'static str,
    /// unix socket path
    pub socket: String,
}

impl TestEngine {
    pub fn url(&self) -> String {
        format!("unix://{}", self.socket)
    }

    /// A GET against the engine's API, answered body (an independent reader: no bollard).
    pub fn api_get(&self, path: &str) -> String {
        let mut stream = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("{} at {} does not answer ({e}): {SETUP_HINT}", self.name, self.socket));
        write!(stream, "GET {path} HTTP/1.0\r\nHost: d\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "GET {path} on {}: {head}", self.name);
        body.to_string()
    }

    /// IDs of containers labelled dev.nixctr (made by process `pid`, when given).
    pub fn nixctr_containers(&self, pid: Option<u32>) -> Vec<String> {
        let label = match pid {
            Some(pid) => format!("dev.nixctr.pid={pid}"),
            None => "dev.nixctr".to_string(),
        };
        let filters = format!("%7B%22label%22%3A%5B%22{}%22%5D%7D", label.replace('=', "%3D")); // {"label":[LABEL]}
        let body = self.api_get(&format!("/containers/json?all=1&filters={filters}"));
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        list.as_array().unwrap().iter().map(|c| c["Id"].as_str().unwrap().to_string()).collect()
    }

    /// The engine's own program, for running images nixctr loaded.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(self.name);
        if self.name == "docker" {
            cmd.arg("-H").arg(self.url());
        }
        cmd
    }
}

/// Every engine the tests run against; panics naming the setup when one does not answer.
pub fn engines() -> Vec<TestEngine> {
    let engines = vec![
        TestEngine {
            name: "docker",
            socket: std::env::var("NIXCTR_TEST_DOCKER_SOCKET").unwrap_or_else(|_| "/var/run/docker.sock".into()),
        },
        TestEngine {
            name: "podman",
            socket: std::env::var("NIXCTR_TEST_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into()),
        },
    ];
    for e in &engines {
        let ping = e.api_get("/_ping");
        assert_eq!(ping.trim(), "OK", "{} at {}: {SETUP_HINT}", e.name, e.socket);
    }
    engines
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary copy of fixtures/ (project/ and nixpkgs/ side by side, as nixctr.toml expects).
pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::Builder::new().prefix("nixctr-it-").tempdir().unwrap();
        copy_dir(&repo_root().join("fixtures/project"), &dir.path().join("project"));
        copy_dir(&repo_root().join("fixtures/nixpkgs"), &dir.path().join("nixpkgs"));
        Fixture { dir }
    }

    pub fn project(&self) -> PathBuf {
        self.dir.path().join("project")
    }

    pub fn nixpkgs(&self) -> PathBuf {
        self.dir.path().join("nixpkgs")
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.project().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// nixctr run in the project directory against `engine` (None: no engine flag at all),
    /// with its own cache directory.
    pub fn nixctr(&self, engine: Option<&TestEngine>) -> Command {
        let mut cmd = nixctr_cmd();
        cmd.current_dir(self.project()).env("XDG_CACHE_HOME", self.dir.path().join("cache"));
        if let Some(e) = engine {
            cmd.arg("--engine").arg(e.url());
        }
        cmd
    }

    /// Makes the project a git repository with everything committed; returns HEAD.
    pub fn git_commit_all(&self) -> String {
        let git = |args: &[&str]| {
            let out = Command::new("git")
                .current_dir(self.project())
                .args(["-c", "user.name=nixctr-test", "-c", "user.email=test@nixctr.invalid"])
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        if !self.project().join(".git").exists() {
            git(&["init", "-q", "-b", "main"]);
        }
        git(&["add", "-A"]);
        git(&["commit", "-q", "--allow-empty", "-m", "fixture"]);
        git(&["rev-parse", "HEAD"])
    }
}

pub fn nixctr_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nixctr"));
    for var in [
        "DOCKER_HOST",
        "CONTAINER_HOST",
        "NIXCTR_ENGINE",
        "NIXCTR_NIX_IMAGE",
        "NIXCTR_NIXPKGS",
        "NIXCTR_REGISTRY",
        "NIXCTR_REGISTRY_USERNAME",
        "NIXCTR_REGISTRY_PASSWORD",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let ft = entry.file_type().unwrap();
        if ft.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), target).unwrap();
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A finished nixctr (or other) process.
pub struct Run {
    pub pid: u32,
    pub out: Output,
}

impl std::ops::Deref for Run {
    type Target = Output;
    fn deref(&self) -> &Output {
        &self.out
    }
}

/// Runs a command and returns its output (echoed, so a failing test shows it).
pub fn run(cmd: &mut Command) -> Run {
    cmd.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    eprintln!(
        "$ {cmd:?}\n-> {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Run { pid, out }
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
pub fn assert_success(out: &Output) {
    assert!(out.status.success(), "expected success, got {}:\n{}", out.status, stderr(out));
}

#[track_caller]
pub fn assert_exit(out: &Output, code: i32) {
    assert_eq!(out.status.code(), Some(code), "stderr:\n{}", stderr(out));
}

/// The engine holds no container made by the run.
#[track_caller]
pub fn assert_no_containers_left(engine: &TestEngine, run: &Run) {
    let left = engine.nixctr_containers(Some(run.pid));
    assert!(left.is_empty(), "{} still holds containers of nixctr run {}: {left:?}", engine.name, run.pid);
}
