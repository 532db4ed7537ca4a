//! Engines that accept a request and then go silent. A proxy on a unix socket sits in front of
//! the real Docker or Podman socket and forwards every connection, except that the first one
//! carrying a chosen request freezes: nothing more of it reaches either side, while every
//! other connection (probes, the container's removal) keeps working. nixctr, pointed at the
//! proxy with a short `NIXCTR_STALL_TIMEOUT`, must fail naming the engine and the step, and
//! leave no container behind.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

use crate::harness::*;

/// Where a frozen connection stops.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Freeze {
    /// The request itself never reaches the engine (an engine that stopped reading).
    Request,
    /// The engine's answer stops after its head (a stream that went silent).
    AfterAnswerHead,
}

/// A connection's state, for its two pumps.
const OPEN: u8 = 0;
const HEAD_ONLY: u8 = 1;
const FROZEN: u8 = 2;

struct StallingProxy {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    froze: Arc<AtomicBool>,
}

impl StallingProxy {
    /// Forwards to `engine`; freezes the first connection with a request `METHOD /v…` whose
    /// request line holds every one of `parts`.
    fn start(engine: &TestEngine, method: &'static str, parts: &'static [&'static str], how: Freeze) -> StallingProxy {
        let dir = tempfile::Builder::new().prefix("nixctr-stall-").tempdir().unwrap();
        let socket = dir.path().join("engine.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let froze = Arc::new(AtomicBool::new(false));
        let upstream = engine.socket.clone();
        let fired = froze.clone();
        // Ends with the test process; a connection's threads end when nixctr closes its side.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(engine) = UnixStream::connect(&upstream) else { return };
                let state = Arc::new(AtomicU8::new(OPEN));
                let (c, e) = (client.try_clone().unwrap(), engine.try_clone().unwrap());
                let (s, f) = (state.clone(), fired.clone());
                std::thread::spawn(move || requests(c, e, &s, &f, method, parts, how));
                std::thread::spawn(move || answers(engine, client, &state));
            }
        });
        StallingProxy { _dir: dir, socket, froze }
    }

    fn url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Whether a connection was frozen (else the test proved nothing).
    fn froze(&self) -> bool {
        self.froze.load(Ordering::SeqCst)
    }
}

/// Client to engine: forwards until the chosen request shows, then (per `how`) withholds it.
fn requests(
    mut from: UnixStream,
    mut to: UnixStream,
    state: &AtomicU8,
    fired: &AtomicBool,
    method: &str,
    parts: &[&str],
    how: Freeze,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if state.load(Ordering::SeqCst) == OPEN
            && is_request(chunk, method, parts)
            && !fired.swap(true, Ordering::SeqCst)
        {
            state.store(if how == Freeze::Request { FROZEN } else { HEAD_ONLY }, Ordering::SeqCst);
        }
        // A frozen connection still reads (and drops) what comes, so it notices nixctr leaving.
        if state.load(Ordering::SeqCst) != FROZEN && to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// Engine to client: forwards; on a connection that shows only an answer's head, stops after
/// the head's blank line.
fn answers(mut from: UnixStream, mut to: UnixStream, state: &AtomicU8) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        match state.load(Ordering::SeqCst) {
            FROZEN => continue,
            HEAD_ONLY => {
                head.extend_from_slice(chunk);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let taken = head.len() - chunk.len();
                    chunk = &chunk[..(end + 4).saturating_sub(taken)];
                    state.store(FROZEN, Ordering::SeqCst);
                }
            }
            _ => {}
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    // Leave the client's side open: a frozen connection stays silent, it does not end.
    if state.load(Ordering::SeqCst) != FROZEN {
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}

/// Whether `chunk` holds a request line `METHOD /…` with all of `parts`.
fn is_request(chunk: &[u8], method: &str, parts: &[&str]) -> bool {
    let text = String::from_utf8_lossy(chunk);
    text.lines().any(|line| {
        line.starts_with(&format!("{method} /")) && line.ends_with("HTTP/1.1") && parts.iter().all(|p| line.contains(p))
    })
}

/// Runs `nixctr build hello` through a proxy that freezes the chosen request, on each engine,
/// and checks the failure.
fn stalls(method: &'static str, parts: &'static [&'static str], how: Freeze, extra: &[&str], step: &str) {
    for engine in engines() {
        let fx = Fixture::new();
        let proxy = StallingProxy::start(&engine, method, parts, how);
        let out = fx
            .nixctr(None)
            .args(["--engine", &proxy.url()])
            .args(extra)
            .args(["build", "hello"])
            .env("NIXCTR_STALL_TIMEOUT", "5")
            .uses_engine()
            .run();
        assert!(proxy.froze(), "{}: no {method} {parts:?} request passed the proxy", engine.name);
        out.assert_exit(1);
        out.stderr_has(&format!("engine {} stopped answering while {step}", proxy.url()));
        out.stderr_has("(no progress for 5s)");
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn a_pull_that_goes_silent_fails_naming_the_engine_and_the_image() {
    let step = format!("pulling {NIX_IMAGE}");
    stalls("POST", &["/images/create"], Freeze::AfterAnswerHead, &["--pull", "always"], &step);
}

#[test]
fn an_exec_whose_output_stops_fails_and_its_container_is_removed() {
    // The first exec resolves nixpkgs with `nix flake metadata`: it ends at once, its output
    // never arrives, and the engine, probed, says it is no longer running.
    stalls("POST", &["/exec/", "/start"], Freeze::AfterAnswerHead, &[], "running nix in the container");
}

#[test]
fn an_upload_the_engine_stops_taking_fails_and_its_container_is_removed() {
    stalls("PUT", &["/archive"], Freeze::Request, &[], "uploading into the container");
}

#[test]
fn a_quiet_build_on_an_engine_that_answers_is_waited_for() {
    // Silence alone is no stall: a build step quiet for longer than the interval succeeds,
    // the engine having been asked (on another connection) whether it still runs.
    for engine in engines() {
        let fx = Fixture::new();
        let marker = unique("quiet");
        fx.write(
            "containers/quiet/default.nix",
            &format!(
                r#"{{ pkgs ? import <nixpkgs> {{ }} }}:
let
  quiet = pkgs.runCommand "{marker}" {{ }} ''
    sleep 8
    mkdir -p $out
    echo quiet > $out/quiet
  '';
in
pkgs.dockerTools.buildLayeredImage {{ name = "quiet"; tag = "latest"; contents = [ quiet ]; }}
"#
            ),
        );
        let out = fx.nixctr(Some(&engine)).args(["build", "quiet", "-v"]).env("NIXCTR_STALL_TIMEOUT", "2").run();
        out.success();
        out.stderr_has("engine: no output for 2s; the engine answers, the process still runs: waiting");
        assert_no_containers_left(&engine, &out);
    }
}
