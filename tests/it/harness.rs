//! The one harness every integration test runs commands through.
//!
//! - [`Cmd`]: a command builder. [`Cmd::nixctr`] runs the nixctr binary in a hermetic
//!   environment (the environment is cleared; PATH, HOME, DOCKER_CONFIG, XDG_* and
//!   REGISTRY_AUTH_FILE point into the test's own [`Sandbox`]; nothing else is inherited);
//!   [`Cmd::tool`] runs a helper program (docker, podman, skopeo, git, openssl). Every run has
//!   a deadline: past it the process is killed and the test fails naming the command.
//!   [`Cmd::run`] returns an [`Output`] (exit code, stdout, stderr, all echoed so a failing
//!   test shows them); [`Cmd::spawn`] returns a [`Running`] process whose stderr is read line
//!   by line, for tests that signal a live nixctr.
//! - [`engines`]: Docker and Podman, failing (never skipping) when one does not answer. The
//!   value holds a shared lock on the engines for as long as it lives; tests that remove what
//!   others use (`cache rm --all`, `gc --all`) take [`engines_exclusive`] instead.
//! - [`Fixture`]: a fresh copy of fixtures/ per test, with its own sandbox.
//! - Independent readers of engine state: raw API calls over the socket, the engine's CLI.

#![allow(dead_code)]

use std::cell::Cell;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

pub const SETUP_HINT: &str =
    "run `scripts/setup.sh` (as root) to install and start Docker, Podman and the registry mirror";

/// The deadline of a run unless a test names another.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(300);
/// For runs that may build cold (a fresh store, `--no-cache`).
pub const COLD_BUILD_DEADLINE: Duration = Duration::from_secs(600);
/// How long a test waits for an observable state (a log line, a container).
pub const WAIT: Duration = Duration::from_secs(180);

pub const NIX_IMAGE: &str = "nixos/nix:2.33.3";

// ---------------------------------------------------------------------------------------------
// The engine lock: shared by every test that uses an engine, exclusive for the destructive ones.

static ENGINE_LOCK: RwLock<()> = RwLock::new(());

thread_local! {
    /// What this test thread holds of [`ENGINE_LOCK`]: 0 nothing, 1 shared, 2 exclusive.
    static HELD: Cell<u8> = const { Cell::new(0) };
}

/// A hold on the engines; released on drop. `Nested` when the thread held one already. The
/// lock file extends it to other test processes on this machine (a second suite, a developer's
/// run), whose `gc --all` would otherwise remove this one's containers.
pub enum EngineGuard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>, #[allow(dead_code)] std::fs::File),
    Exclusive(#[allow(dead_code)] RwLockWriteGuard<'static, ()>, #[allow(dead_code)] std::fs::File),
    Nested,
}

/// `flock` on the machine-wide lock file, shared or exclusive; released when the file closes.
fn machine_lock(exclusive: bool) -> std::fs::File {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join("nixctr-test-engines.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    let how = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
    while unsafe { libc::flock(file.as_raw_fd(), how) } != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "flock {}: {e}", path.display());
    }
    file
}

impl EngineGuard {
    /// A shared hold (nothing new when this thread already holds one).
    pub fn shared() -> EngineGuard {
        if HELD.with(Cell::get) != 0 {
            return EngineGuard::Nested;
        }
        let guard = ENGINE_LOCK.read().unwrap_or_else(|e| e.into_inner());
        HELD.with(|h| h.set(1));
        EngineGuard::Shared(guard, machine_lock(false))
    }

    /// The engines to this test alone: waits for every other engine test to finish.
    pub fn exclusive() -> EngineGuard {
        match HELD.with(Cell::get) {
            0 => {}
            2 => return EngineGuard::Nested,
            _ => panic!("a test holding the engines shared cannot take them exclusively"),
        }
        let guard = ENGINE_LOCK.write().unwrap_or_else(|e| e.into_inner());
        HELD.with(|h| h.set(2));
        EngineGuard::Exclusive(guard, machine_lock(true))
    }
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        if !matches!(self, EngineGuard::Nested) {
            HELD.with(|h| h.set(0));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Engines

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

    /// A request against the engine's API: (status code, body). An independent reader: no bollard.
    pub fn api(&self, method: &str, path: &str) -> (u16, String) {
        let mut stream = UnixStream::connect(&self.socket)
            .unwrap_or_else(|e| panic!("{} at {} does not answer ({e}): {SETUP_HINT}", self.name, self.socket));
        stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(stream, "{method} {path} HTTP/1.0\r\nHost: d\r\nContent-Length: 0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (code, body.to_string())
    }

    /// A GET that must answer 200; its body.
    pub fn api_get(&self, path: &str) -> String {
        let (code, body) = self.api("GET", path);
        assert_eq!(code, 200, "GET {path} on {}: {body}", self.name);
        body
    }

    pub fn api_json(&self, path: &str) -> serde_json::Value {
        serde_json::from_str(&self.api_get(path)).unwrap()
    }

    /// IDs of containers labelled `label` (`dev.nixctr`, `dev.nixctr.pid=123`), running or not.
    pub fn containers_labelled(&self, label: &str) -> Vec<String> {
        let filters = format!("%7B%22label%22%3A%5B%22{}%22%5D%7D", label.replace('=', "%3D")); // {"label":[LABEL]}
        let list = self.api_json(&format!("/containers/json?all=1&filters={filters}"));
        list.as_array().unwrap().iter().map(|c| c["Id"].as_str().unwrap().to_string()).collect()
    }

    /// IDs of containers labelled dev.nixctr (made by process `pid`, when given).
    pub fn nixctr_containers(&self, pid: Option<u32>) -> Vec<String> {
        match pid {
            Some(pid) => self.containers_labelled(&format!("dev.nixctr.pid={pid}")),
            None => self.containers_labelled("dev.nixctr"),
        }
    }

    /// The command lines of the processes running in container `id`, read from /proc (the
    /// container's cgroup names its ID; Podman 4's compat `top` endpoint answers nothing).
    pub fn processes(&self, id: &str) -> Vec<String> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let path = entry.path();
            if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            let in_container = std::fs::read_to_string(path.join("cgroup")).is_ok_and(|c| c.contains(id));
            if let (true, Ok(cmdline)) = (in_container, std::fs::read(path.join("cmdline"))) {
                found.push(String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string());
            }
        }
        found
    }

    /// The names of all volumes.
    pub fn volumes(&self) -> Vec<String> {
        let list = self.api_json("/volumes");
        let mut names: Vec<String> = list["Volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["Name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        names
    }

    /// The image's ID (`sha256:…`), when the engine has it.
    pub fn image_id(&self, image: &str) -> Option<String> {
        let (code, body) = self.api("GET", &format!("/images/{image}/json"));
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["Id"].as_str().map(|id| if id.starts_with("sha256:") { id.to_string() } else { format!("sha256:{id}") })
    }

    /// The store volume nixctr uses with `image`, by the README's rule.
    pub fn store_volume_of(&self, image: &str) -> String {
        let id = self.image_id(image).unwrap_or_else(|| panic!("{} has no image {image}: {SETUP_HINT}", self.name));
        format!("nixctr-store-{}", &id.trim_start_matches("sha256:")[..12])
    }

    /// The names in /nix/store of a store volume, read by a container of our own.
    pub fn store_listing(&self, volume: &str) -> String {
        self.on_store(volume, &["ls", "/nix/store"])
    }

    /// What `cmd` prints, run in a container of our own with the store volume read-only at
    /// /nix and no network; it must succeed.
    pub fn on_store(&self, volume: &str, cmd: &[&str]) -> String {
        let mount = format!("{volume}:/nix:ro");
        let out =
            self.cli().args(["run", "--rm", "--network", "none", "-v", &mount, NIX_IMAGE]).args(cmd).quiet().run();
        out.success();
        out.stdout()
    }

    /// The engine's own program (docker or podman), run with a deadline.
    pub fn cli(&self) -> Cmd {
        let mut cmd = Cmd::tool(self.name);
        if self.name == "docker" {
            cmd.arg("-H").arg(self.url());
        }
        cmd
    }

    /// Builds an image `FROM` the nix image with a label, so it has an ID (and a store volume)
    /// of its own; returns its name. Remove it with [`TestEngine::remove_image`].
    pub fn derived_nix_image(&self, tag: &str, dir: &Path) -> String {
        let name = format!("localhost/nixctr-it-derived:{tag}");
        let context = dir.join(format!("derived-{}-{tag}", self.name));
        std::fs::create_dir_all(&context).unwrap();
        std::fs::write(context.join("Dockerfile"), format!("FROM {NIX_IMAGE}\nLABEL dev.nixctr.test={tag}\n")).unwrap();
        // An arm64 test may have left the tag naming the arm64 image: FROM takes the native one.
        self.cli().args(["pull", "-q", NIX_IMAGE]).run().success();
        self.cli().args(["build", "-t", &name]).arg(&context).run().success();
        name
    }

    pub fn remove_image(&self, image: &str) {
        self.cli().args(["rmi", "-f", image]).run();
    }
}

/// Every engine the tests run against, held shared (see [`EngineGuard`]) for as long as the
/// value, or an iterator over it, lives. Panics naming the setup when one does not answer.
pub fn engines() -> Engines {
    Engines::new(EngineGuard::shared())
}

/// The engines to this test alone, for tests that remove what others may be using.
pub fn engines_exclusive() -> Engines {
    Engines::new(EngineGuard::exclusive())
}

pub struct Engines {
    list: Vec<TestEngine>,
    guard: EngineGuard,
}

impl Engines {
    fn new(guard: EngineGuard) -> Engines {
        let list = vec![
            TestEngine {
                name: "docker",
                socket: std::env::var("NIXCTR_TEST_DOCKER_SOCKET").unwrap_or_else(|_| "/var/run/docker.sock".into()),
            },
            TestEngine {
                name: "podman",
                socket: std::env::var("NIXCTR_TEST_PODMAN_SOCKET").unwrap_or_else(|_| "/run/podman/podman.sock".into()),
            },
        ];
        for e in &list {
            let ping = e.api_get("/_ping");
            assert_eq!(ping.trim(), "OK", "{} at {}: {SETUP_HINT}", e.name, e.socket);
        }
        Engines { list, guard }
    }

    pub fn iter(&self) -> std::slice::Iter<'_, TestEngine> {
        self.list.iter()
    }

    pub fn by_name(&self, name: &str) -> &TestEngine {
        self.list.iter().find(|e| e.name == name).unwrap()
    }
}

impl std::ops::Index<usize> for Engines {
    type Output = TestEngine;
    fn index(&self, i: usize) -> &TestEngine {
        &self.list[i]
    }
}

pub struct EnginesIter {
    inner: std::vec::IntoIter<TestEngine>,
    _guard: EngineGuard,
}

impl Iterator for EnginesIter {
    type Item = TestEngine;
    fn next(&mut self) -> Option<TestEngine> {
        self.inner.next()
    }
}

impl IntoIterator for Engines {
    type Item = TestEngine;
    type IntoIter = EnginesIter;
    fn into_iter(self) -> EnginesIter {
        EnginesIter { inner: self.list.into_iter(), _guard: self.guard }
    }
}

// ---------------------------------------------------------------------------------------------
// Sandbox and fixture

/// A test's own directory tree: HOME, DOCKER_CONFIG, XDG dirs and REGISTRY_AUTH_FILE of the
/// nixctr runs it makes point in here, so nothing of the machine's user leaks in.
pub struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let dir = tempfile::Builder::new().prefix("nixctr-it-").tempdir().unwrap();
        for sub in [".docker", ".config", "run", "cache"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("run"), std::fs::Permissions::from_mode(0o700)).unwrap();
        Sandbox { dir }
    }

    /// The sandbox root, which is also HOME.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `DOCKER_CONFIG` (empty unless a test writes a config.json).
    pub fn docker_config(&self) -> PathBuf {
        self.path().join(".docker")
    }

    /// A directory at the front of PATH for the runs (credential helpers).
    pub fn bin(&self) -> PathBuf {
        let bin = self.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        bin
    }

    /// nixctr with this sandbox's environment, in its root.
    pub fn nixctr(&self) -> Cmd {
        Cmd::nixctr(self)
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Sandbox::new()
    }
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A temporary copy of fixtures/ (project/ and nixpkgs/ side by side, as nixctr.toml
/// expects) inside the test's sandbox.
pub struct Fixture {
    pub sandbox: Sandbox,
}

impl Fixture {
    pub fn new() -> Fixture {
        let sandbox = Sandbox::new();
        copy_dir(&repo_root().join("fixtures/project"), &sandbox.path().join("project"));
        copy_dir(&repo_root().join("fixtures/nixpkgs"), &sandbox.path().join("nixpkgs"));
        Fixture { sandbox }
    }

    pub fn path(&self) -> &Path {
        self.sandbox.path()
    }

    pub fn project(&self) -> PathBuf {
        self.path().join("project")
    }

    pub fn nixpkgs(&self) -> PathBuf {
        self.path().join("nixpkgs")
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.project().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.project().join(rel)).unwrap()
    }

    /// nixctr run in the project directory, against `engine` (None: no engine flag at all).
    pub fn nixctr(&self, engine: Option<&TestEngine>) -> Cmd {
        let mut cmd = Cmd::nixctr(&self.sandbox);
        cmd.current_dir(self.project());
        if let Some(e) = engine {
            cmd.engine(e);
        }
        cmd
    }

    /// Makes the project a git repository with everything committed; returns HEAD.
    pub fn git_commit_all(&self) -> String {
        let git = |args: &[&str]| {
            let out = Cmd::tool("git")
                .current_dir(self.project())
                .args(["-c", "user.name=nixctr-test", "-c", "user.email=test@nixctr.invalid"])
                .args(args)
                .run();
            out.success();
            out.stdout().trim().to_string()
        };
        if !self.project().join(".git").exists() {
            git(&["init", "-q", "-b", "main"]);
        }
        git(&["add", "-A"]);
        git(&["commit", "-q", "--allow-empty", "-m", "fixture"]);
        git(&["rev-parse", "HEAD"])
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Fixture::new()
    }
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

/// A string no other test (or earlier run) uses: for tags, derivation names, image labels.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{prefix}{}x{:x}x{}", std::process::id(), nanos, N.fetch_add(1, Ordering::SeqCst))
}

// ---------------------------------------------------------------------------------------------
// The command builder

/// A command with a deadline, its output checked in one place. Build it with the `&mut self`
/// methods, then [`Cmd::run`] or [`Cmd::spawn`].
pub struct Cmd {
    cmd: Command,
    shown: String,
    deadline: Duration,
    stdin: Option<Vec<u8>>,
    closed_stdout: bool,
    engine_run: bool,
    quiet: bool,
}

impl Cmd {
    /// The nixctr binary in `sandbox`'s hermetic environment, working in the sandbox root.
    pub fn nixctr(sandbox: &Sandbox) -> Cmd {
        Cmd::hermetic(env!("CARGO_BIN_EXE_nixctr"), "nixctr", sandbox)
    }

    /// `program` in `sandbox`'s hermetic environment.
    fn hermetic(program: &str, shown: &str, sandbox: &Sandbox) -> Cmd {
        let mut cmd = Command::new(program);
        let home = sandbox.path();
        cmd.env_clear()
            .current_dir(home)
            .env(
                "PATH",
                format!("{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", sandbox.bin().display()),
            )
            .env("HOME", home)
            .env("USER", "root")
            .env("LANG", "C.UTF-8")
            .env("TMPDIR", std::env::temp_dir())
            .env("DOCKER_CONFIG", sandbox.docker_config())
            .env("XDG_CACHE_HOME", home.join("cache"))
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_RUNTIME_DIR", home.join("run"))
            .env("REGISTRY_AUTH_FILE", home.join("registry-auth.json"));
        Cmd::wrap(cmd, shown.to_string())
    }

    /// A helper program, with the environment of the test process.
    pub fn tool(program: &str) -> Cmd {
        Cmd::wrap(Command::new(program), program.to_string())
    }

    fn wrap(cmd: Command, shown: String) -> Cmd {
        Cmd {
            cmd,
            shown,
            deadline: DEFAULT_DEADLINE,
            stdin: None,
            closed_stdout: false,
            engine_run: false,
            quiet: false,
        }
    }

    pub fn arg(&mut self, arg: impl AsRef<std::ffi::OsStr>) -> &mut Cmd {
        let arg = arg.as_ref();
        self.shown.push(' ');
        self.shown.push_str(&shell_quote(&arg.to_string_lossy()));
        self.cmd.arg(arg);
        self
    }

    pub fn args<I, S>(&mut self, args: I) -> &mut Cmd
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        for a in args {
            self.arg(a);
        }
        self
    }

    pub fn env(&mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> &mut Cmd {
        let value = value.as_ref();
        self.shown = format!("{key}={} {}", shell_quote(&value.to_string_lossy()), self.shown);
        if ["NIXCTR_ENGINE", "DOCKER_HOST", "CONTAINER_HOST"].contains(&key) {
            self.engine_run = true;
        }
        self.cmd.env(key, value);
        self
    }

    pub fn env_remove(&mut self, key: &str) -> &mut Cmd {
        self.shown = format!("-u {key} {}", self.shown);
        self.cmd.env_remove(key);
        self
    }

    pub fn current_dir(&mut self, dir: impl AsRef<Path>) -> &mut Cmd {
        self.cmd.current_dir(dir);
        self
    }

    /// `--engine URL`; the run holds the engines shared while it lasts.
    pub fn engine(&mut self, engine: &TestEngine) -> &mut Cmd {
        self.engine_run = true;
        self.arg("--engine").arg(engine.url())
    }

    /// Marks a run that reaches an engine by other means (nixctr.toml, probing).
    pub fn uses_engine(&mut self) -> &mut Cmd {
        self.engine_run = true;
        self
    }

    pub fn stdin(&mut self, bytes: impl Into<Vec<u8>>) -> &mut Cmd {
        self.stdin = Some(bytes.into());
        self
    }

    /// stdout is a pipe whose reading end is already closed (`nixctr … | head -0`).
    pub fn stdout_closed(&mut self) -> &mut Cmd {
        self.closed_stdout = true;
        self
    }

    pub fn deadline(&mut self, deadline: Duration) -> &mut Cmd {
        self.deadline = deadline;
        self
    }

    /// Echo the output only when the run fails.
    pub fn quiet(&mut self) -> &mut Cmd {
        self.quiet = true;
        self
    }

    /// Runs to the end (or the deadline, which fails the test) and returns the output.
    #[track_caller]
    pub fn run(&mut self) -> Output {
        self.spawn().wait()
    }

    /// Starts the process; its stdout is collected, its stderr read line by line.
    #[track_caller]
    pub fn spawn(&mut self) -> Running {
        let guard = self.engine_run.then(EngineGuard::shared);
        let stdout = if self.closed_stdout {
            let mut fds = [0; 2];
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
            unsafe { libc::close(fds[0]) };
            Stdio::from(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) })
        } else {
            Stdio::piped()
        };
        self.cmd
            .stdin(if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(stdout)
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = self.cmd.spawn().unwrap_or_else(|e| panic!("cannot run `{}`: {e}", self.shown));
        let pid = child.id();
        if let Some(bytes) = self.stdin.clone() {
            let mut pipe = child.stdin.take().unwrap();
            std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            });
        }
        let stdout = child.stdout.take().map(|mut pipe| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        });
        let stderr_all = Arc::new(Mutex::new(Vec::new()));
        let (line_tx, lines) = mpsc::channel();
        let mut pipe = BufReader::new(child.stderr.take().unwrap());
        let all = stderr_all.clone();
        let stderr = std::thread::spawn(move || loop {
            let mut line = Vec::new();
            match pipe.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    all.lock().unwrap().extend_from_slice(&line);
                    let _ = line_tx.send(String::from_utf8_lossy(&line).trim_end().to_string());
                }
            }
        });
        let (status_tx, status) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = status_tx.send(child.wait().expect("wait for the child"));
        });
        Running {
            shown: self.shown.clone(),
            pid,
            started,
            deadline: self.deadline,
            quiet: self.quiet,
            status,
            exited: None,
            stdout,
            stderr: Some(stderr),
            stderr_all,
            lines,
            _guard: guard,
        }
    }
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A process started by [`Cmd::spawn`]. Dropped before it ends, it is killed.
pub struct Running {
    shown: String,
    pid: u32,
    started: Instant,
    deadline: Duration,
    quiet: bool,
    status: Receiver<ExitStatus>,
    exited: Option<ExitStatus>,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<()>>,
    stderr_all: Arc<Mutex<Vec<u8>>>,
    lines: Receiver<String>,
    _guard: Option<EngineGuard>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn stderr_so_far(&self) -> String {
        String::from_utf8_lossy(&self.stderr_all.lock().unwrap()).into_owned()
    }

    /// Reads stderr lines until one satisfies `pred` and returns it; fails the test (killing
    /// the process) when the process ends first or `within` passes.
    #[track_caller]
    pub fn wait_for_line(&mut self, what: &str, within: Duration, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if pred(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    self.kill();
                    panic!(
                        "`{}`: no stderr line {what} within {within:?}\n--- stderr so far\n{}",
                        self.shown,
                        self.stderr_so_far()
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.status.recv_timeout(Duration::from_secs(30)).ok();
                    self.exited = status;
                    panic!(
                        "`{}` ended ({status:?}) before printing a line {what}\n--- stderr\n{}",
                        self.shown,
                        self.stderr_so_far()
                    );
                }
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        if self.exited.is_none() {
            assert_eq!(unsafe { libc::kill(self.pid as i32, signal) }, 0, "kill -{signal} {}", self.pid);
        }
    }

    /// SIGKILL: no cleanup runs. Returns once the process is gone.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            self.exited = self.status.recv_timeout(Duration::from_secs(30)).ok();
        }
        self.exited
    }

    /// Waits for the end (within the deadline, counted from the start) and returns the output.
    #[track_caller]
    pub fn wait(mut self) -> Output {
        let left = self.deadline.saturating_sub(self.started.elapsed());
        let status = match self.exited {
            Some(status) => status,
            None => match self.status.recv_timeout(left) {
                Ok(status) => status,
                Err(_) => {
                    self.kill();
                    panic!(
                        "`{}` ran over its deadline of {:?} and was killed\n--- stderr\n{}",
                        self.shown,
                        self.deadline,
                        self.stderr_so_far()
                    );
                }
            },
        };
        self.exited = Some(status);
        let stdout = self.stdout.take().map(|t| t.join().unwrap()).unwrap_or_default();
        if let Some(t) = self.stderr.take() {
            t.join().unwrap();
        }
        let out = Output {
            shown: self.shown.clone(),
            pid: self.pid,
            status,
            took: self.started.elapsed(),
            stdout,
            stderr: self.stderr_all.lock().unwrap().clone(),
        };
        if !self.quiet || !status.success() {
            out.echo();
        }
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A finished process.
pub struct Output {
    pub shown: String,
    pub pid: u32,
    pub status: ExitStatus,
    pub took: Duration,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    fn echo(&self) {
        let stdout = match std::str::from_utf8(&self.stdout) {
            Ok(text) if text.len() <= 20_000 => text.to_string(),
            _ => format!("({} bytes)", self.stdout.len()),
        };
        eprintln!(
            "$ {}\n-> {} in {:.2}s\n--- stdout\n{stdout}\n--- stderr\n{}",
            self.shown,
            self.status,
            self.took.as_secs_f64(),
            String::from_utf8_lossy(&self.stderr)
        );
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    #[track_caller]
    pub fn assert_exit(&self, code: i32) -> &Output {
        assert_eq!(
            self.status.code(),
            Some(code),
            "`{}` exited with {} (expected {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.shown,
            self.status,
            if self.stdout.len() > 20_000 { "(long)".to_string() } else { self.stdout() },
            self.stderr()
        );
        self
    }

    #[track_caller]
    pub fn success(&self) -> &Output {
        self.assert_exit(0)
    }

    #[track_caller]
    pub fn stderr_has(&self, text: &str) -> &Output {
        assert!(self.stderr().contains(text), "`{}`: stderr lacks {text:?}:\n{}", self.shown, self.stderr());
        self
    }

    #[track_caller]
    pub fn stderr_lacks(&self, text: &str) -> &Output {
        assert!(!self.stderr().contains(text), "`{}`: stderr has {text:?}:\n{}", self.shown, self.stderr());
        self
    }
}

/// The engine holds no container made by the run.
#[track_caller]
pub fn assert_no_containers_left(engine: &TestEngine, out: &Output) {
    let left = engine.nixctr_containers(Some(out.pid));
    assert!(left.is_empty(), "{} still holds containers of `{}` (pid {}): {left:?}", engine.name, out.shown, out.pid);
}

/// Polls `probe` until it returns Some, failing the test after `within` with `what`.
#[track_caller]
pub fn wait_until<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < until, "{what}: not within {within:?}");
        std::thread::sleep(pause); // a poll interval, not a synchronisation
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------------
// The harness's own promises.

#[test]
#[should_panic(expected = "ran over its deadline of 1s and was killed")]
fn harness_kills_a_run_past_its_deadline() {
    Cmd::tool("sleep").arg("60").deadline(Duration::from_secs(1)).run();
}

#[test]
fn harness_environment_is_hermetic() {
    let sandbox = Sandbox::new();
    // The environment nixctr gets, shown by env(1): only what the harness sets, and a test adds.
    let out = Cmd::hermetic("/usr/bin/env", "env", &sandbox).env("EXTRA", "1").run();
    out.success();
    let mut names: Vec<String> = out.stdout().lines().filter_map(|l| Some(l.split_once('=')?.0.to_string())).collect();
    names.sort();
    let expected = [
        "DOCKER_CONFIG",
        "EXTRA",
        "HOME",
        "LANG",
        "PATH",
        "REGISTRY_AUTH_FILE",
        "TMPDIR",
        "USER",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_RUNTIME_DIR",
    ];
    assert_eq!(names, expected);
    let home = sandbox.path().to_str().unwrap();
    for line in out.stdout().lines() {
        let (var, value) = line.split_once('=').unwrap();
        if ["HOME", "DOCKER_CONFIG", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "REGISTRY_AUTH_FILE"]
            .contains(&var)
        {
            assert!(value.starts_with(home), "{var}={value} is outside the sandbox");
        }
    }
}

#[test]
fn harness_reads_stderr_lines_of_a_live_process() {
    let mut child = Cmd::tool("sh").args(["-c", "echo one >&2; echo two >&2; exec sleep 60"]).spawn();
    assert_eq!(child.wait_for_line("two", Duration::from_secs(30), |l| l == "two"), "two");
    child.signal(libc::SIGTERM);
    let out = child.wait();
    assert_eq!(out.stderr(), "one\ntwo\n");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(libc::SIGTERM));
}

/// The digest of the `REF@DIGEST` line a push or publish printed for `reference`.
#[track_caller]
pub fn printed_digest(out: &Output, reference: &str) -> String {
    let stdout = out.stdout();
    let digest = stdout.trim().strip_prefix(&format!("{reference}@")).unwrap_or_else(|| panic!("{stdout:?}"));
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    digest.to_string()
}
