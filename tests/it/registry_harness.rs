//! Real registries and test images for the push tests.
//!
//! [`Registry`] runs Debian's CNCF distribution registry (`docker-registry serve`) on
//! 127.0.0.1 with its own storage, plain http or TLS + htpasswd; it can be killed and started
//! again on the same storage and port, and is killed on drop. It cannot be handed a listening
//! socket, so a port is tried and kept only once the registry process itself is seen holding
//! it (another port is tried when it was taken meanwhile). The token server and the proxy
//! bind their listener first and keep it. [`TestImage`] writes docker-archives with the tar
//! crate.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::harness::{Cmd, Output};

pub const USER: &str = "pusher";
pub const PASSWORD: &str = "s3cret-Pa55word";

pub struct Registry {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    tls: bool,
    /// Whether reading back needs [`USER`]'s credentials.
    auth: bool,
}

impl Registry {
    /// Plain http, no auth.
    pub fn plain() -> Registry {
        Registry::start_new(false, None)
    }

    /// TLS with a CA made here, and htpasswd basic auth for [`USER`]/[`PASSWORD`].
    pub fn tls_with_auth() -> Registry {
        Registry::start_new(true, None)
    }

    /// Plain http, with bearer tokens from `tokens`.
    pub fn with_tokens(tokens: &TokenServer) -> Registry {
        Registry::start_new(false, Some(tokens))
    }

    fn start_new(tls: bool, tokens: Option<&TokenServer>) -> Registry {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("storage dir");
        let mut extra = String::new();
        if tls {
            make_certs(dir.path());
            let htpasswd = run_ok(Cmd::tool("htpasswd").args(["-Bbn", USER, PASSWORD]));
            std::fs::write(dir.path().join("htpasswd"), htpasswd.stdout).expect("write htpasswd");
            extra.push_str(&format!(
                "  tls:\n    certificate: {0}/server.pem\n    key: {0}/server.key\nauth:\n  htpasswd:\n    realm: nixctr-test\n    path: {0}/htpasswd\n",
                dir.path().display()
            ));
        }
        if let Some(tokens) = tokens {
            extra.push_str(&format!(
                "auth:\n  token:\n    realm: http://127.0.0.1:{}/token\n    service: {TOKEN_SERVICE}\n    issuer: {TOKEN_ISSUER}\n    rootcertbundle: {}\n",
                tokens.port,
                tokens.cert.display()
            ));
        }
        let mut registry = Registry { port: 0, dir, child: None, tls, auth: tls || tokens.is_some() };
        for _attempt in 0..20 {
            registry.port = candidate_port();
            let config = format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n{extra}",
                storage.display(),
                registry.port
            );
            std::fs::write(registry.dir.path().join("config.yml"), config).expect("write registry config");
            if registry.try_start() {
                return registry;
            }
        }
        panic!("docker-registry found no free port in 20 tries: {}", registry.log());
    }

    /// Starts the registry (again) on the same storage and port.
    pub fn start(&mut self) {
        assert!(self.try_start(), "docker-registry could not listen on {} again: {}", self.port, self.log());
    }

    /// Starts the registry and waits until it holds its port; false when it could not bind
    /// it (another process took the port first).
    fn try_start(&mut self) -> bool {
        assert!(self.child.is_none(), "registry already running");
        let log = std::fs::File::create(self.dir.path().join("registry.log")).expect("registry log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start docker-registry (apt-get install docker-registry)");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if listener_owned_by(child.id(), self.port) {
                self.child = Some(child);
                return true;
            }
            if let Some(status) = child.try_wait().expect("wait for docker-registry") {
                let log = self.log();
                assert!(
                    log.contains("address already in use"),
                    "docker-registry exited ({status}) without listening on {}: {log}",
                    self.port
                );
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("docker-registry did not listen on {} within 30s: {}", self.port, self.log());
            }
            std::thread::sleep(Duration::from_millis(20)); // a poll interval
        }
    }

    /// SIGKILL, as a crash or a pulled plug would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn ca_cert(&self) -> PathBuf {
        assert!(self.tls);
        self.dir.path().join("ca.pem")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Bytes of all blobs in storage.
    pub fn blob_bytes(&self) -> u64 {
        fn walk(dir: &Path) -> u64 {
            std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| {
                            let path = e.path();
                            if path.is_dir() {
                                walk(&path)
                            } else if e.file_name() == "data" {
                                e.metadata().map(|m| m.len()).unwrap_or(0)
                            } else {
                                0
                            }
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&self.dir.path().join("storage/docker/registry/v2/blobs"))
    }

    /// skopeo's flags to reach this registry.
    pub fn skopeo_flags(&self) -> Vec<String> {
        let mut flags = vec!["--tls-verify=false".to_string()];
        if self.auth {
            flags.push(format!("--creds={USER}:{PASSWORD}"));
        }
        flags
    }

    /// `skopeo inspect` of `repo:tag`, as JSON; `None` when it fails (no such tag).
    pub fn skopeo_inspect(&self, image: &str, raw: bool) -> Option<serde_json::Value> {
        let mut cmd = Cmd::tool("skopeo");
        cmd.arg("inspect").args(self.skopeo_flags());
        if raw {
            cmd.arg("--raw");
        }
        let out = cmd.arg(format!("docker://{}/{image}", self.host())).quiet().run();
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("skopeo printed JSON"))
    }

    /// The image config of `repo:tag`, read by `skopeo inspect --config`; it must be there.
    pub fn skopeo_config(&self, image: &str) -> serde_json::Value {
        let out = Cmd::tool("skopeo")
            .args(["inspect", "--config"])
            .args(self.skopeo_flags())
            .arg(format!("docker://{}/{image}", self.host()))
            .run();
        out.success();
        serde_json::from_slice(&out.stdout).expect("skopeo printed JSON")
    }

    /// `skopeo copy` to a `dir:` layout, returning the directory.
    pub fn skopeo_copy_to_dir(&self, image: &str, into: &Path) -> PathBuf {
        let dest = into.join(format!("copy-{}", image.replace(['/', ':'], "-")));
        let mut cmd = Cmd::tool("skopeo");
        cmd.arg("copy").arg("--src-tls-verify=false");
        if self.auth {
            cmd.arg(format!("--src-creds={USER}:{PASSWORD}"));
        }
        cmd.arg(format!("docker://{}/{image}", self.host())).arg(format!("dir:{}", dest.display()));
        run_ok(cmd.quiet());
        dest
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port that was free a moment ago: only a candidate, checked by [`listener_owned_by`].
fn candidate_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (read from
/// /proc/net/tcp and the process's file descriptors), rather than some other process.
pub fn listener_owned_by(pid: u32, port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else { return false };
    let local = format!("0100007F:{port:04X}");
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// A port nothing listens on and nothing else can take while this lives: a socket bound to
/// it that never listens, so connecting is refused.
pub struct ClosedPort {
    _fd: std::os::fd::OwnedFd,
    pub port: u16,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        use std::os::fd::FromRawFd;
        unsafe {
            let raw = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket");
            let fd = std::os::fd::OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(libc::bind(raw, &addr as *const _ as *const libc::sockaddr, len), 0, "bind");
            let mut len = len;
            assert_eq!(libc::getsockname(raw, &mut addr as *mut _ as *mut libc::sockaddr, &mut len), 0);
            ClosedPort { _fd: fd, port: u16::from_be(addr.sin_port) }
        }
    }
}

impl Default for ClosedPort {
    fn default() -> Self {
        ClosedPort::new()
    }
}

fn make_certs(dir: &Path) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run_ok(Cmd::tool("openssl").current_dir(dir).args(["req", "-x509"]).args(ec).args([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=nixctr test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]));
    run_ok(Cmd::tool("openssl").current_dir(dir).arg("req").args(ec).args([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]));
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    run_ok(Cmd::tool("openssl").current_dir(dir).args([
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]));
}

/// Runs a helper program (with a deadline) that must succeed.
#[track_caller]
pub fn run_ok(cmd: &mut Cmd) -> Output {
    let out = cmd.run();
    out.success();
    out
}

/// A docker-archive written by the test: layer 1 holds the static /bin/busybox, the others
/// a mix of text and pseudo-random bytes (so compressed sizes are predictable).
pub struct TestImage {
    pub layers: Vec<Vec<u8>>,
    /// The config's `architecture` (`amd64` unless set).
    pub architecture: String,
}

impl TestImage {
    /// `count` layers of about `size` bytes; `seed` varies the content.
    pub fn new(count: usize, size: usize, seed: u64) -> TestImage {
        let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (apt-get install busybox-static)");
        let mut layers = vec![layer_tar(&[("bin/busybox", &busybox, 0o755)])];
        for n in 1..count {
            let mut data = format!("layer {n} of a test image\n").repeat(size / 50).into_bytes();
            data.extend(noise(size / 2, seed.wrapping_mul(1000).wrapping_add(n as u64)));
            layers.push(layer_tar(&[(&format!("data/layer{n}.bin"), &data, 0o644)]));
        }
        TestImage { layers, architecture: "amd64".to_string() }
    }

    /// The same layers, its config saying another architecture (`arm64`).
    pub fn for_architecture(mut self, architecture: &str) -> TestImage {
        self.architecture = architecture.to_string();
        self
    }

    /// The same image with layer `index` (0-based) holding one more file.
    pub fn with_changed_layer(mut self, index: usize, salt: &str) -> TestImage {
        let extra = format!("changed: {salt}\n");
        let mut archive = tar::Archive::new(&self.layers[index][..]);
        let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
        for entry in archive.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut data).expect("read");
            let mode = entry.header().mode().expect("mode");
            files.push((entry.path().expect("path").display().to_string(), data, mode));
        }
        files.push(("etc/changed".to_string(), extra.into_bytes(), 0o644));
        let refs: Vec<(&str, &[u8], u32)> = files.iter().map(|(p, d, m)| (p.as_str(), d.as_slice(), *m)).collect();
        self.layers[index] = layer_tar(&refs);
        self
    }

    pub fn diff_ids(&self) -> Vec<String> {
        self.layers.iter().map(|l| sha256(l)).collect()
    }

    pub fn config(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "architecture": self.architecture,
            "os": "linux",
            "config": {"Cmd": ["/bin/busybox", "echo", "ok"]},
            "rootfs": {"type": "layers", "diff_ids": self.diff_ids()},
        }))
        .expect("config JSON")
    }

    /// The docker-archive bytes; `diff_ids` overrides the config's list (for corrupt archives).
    pub fn archive_bytes(&self, diff_ids: Option<Vec<String>>) -> Vec<u8> {
        let config = match diff_ids {
            None => self.config(),
            Some(ids) => {
                let mut c: serde_json::Value = serde_json::from_slice(&self.config()).expect("config");
                c["rootfs"]["diff_ids"] = serde_json::json!(ids);
                serde_json::to_vec(&c).expect("config")
            }
        };
        let config_name = format!("{}.json", &sha256(&config)[7..]);
        let names: Vec<String> = self.diff_ids().iter().map(|d| format!("{}/layer.tar", &d[7..])).collect();
        let manifest = serde_json::to_vec(&serde_json::json!([
            {"Config": config_name, "RepoTags": ["test:latest"], "Layers": names}
        ]))
        .expect("manifest");
        let mut entries: Vec<(&str, &[u8], u32)> =
            names.iter().zip(&self.layers).map(|(n, l)| (n.as_str(), l.as_slice(), 0o644)).collect();
        entries.push((&config_name, &config, 0o644));
        entries.push(("manifest.json", &manifest, 0o644));
        layer_tar(&entries)
    }

    /// Writes `name.tar` (or `name.tar.gz` when `gzip`) under `dir`.
    pub fn write(&self, dir: &Path, name: &str, gzip: bool) -> PathBuf {
        let bytes = self.archive_bytes(None);
        write_archive(dir, name, &bytes, gzip)
    }
}

pub fn write_archive(dir: &Path, name: &str, bytes: &[u8], gzip: bool) -> PathBuf {
    let path = dir.join(if gzip { format!("{name}.tar.gz") } else { format!("{name}.tar") });
    if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).expect("gzip");
        std::fs::write(&path, enc.finish().expect("gzip")).expect("write archive");
    } else {
        std::fs::write(&path, bytes).expect("write archive");
    }
    path
}

pub fn layer_tar(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).expect("tar entry");
    }
    builder.into_inner().expect("tar")
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// xorshift bytes: incompressible, and the same for the same seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

const TOKEN_SERVICE: &str = "nixctr-test";
const TOKEN_ISSUER: &str = "nixctr-test-issuer";

/// A bearer-token server for the registry's `auth: token`: checks [`USER`]/[`PASSWORD`]
/// and signs RS256 JWTs (with `openssl`) granting what was asked. The first token it hands
/// out grants pull only and runs out `first_token_secs` after it is issued (the registry
/// allows 60 s of clock skew on top of `exp`): the first upload, or any request after that
/// time, gets a 401, as with a token expiring mid-push. Later tokens last five minutes.
pub struct TokenServer {
    pub port: u16,
    cert: PathBuf,
    pub issued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl TokenServer {
    pub fn start(first_token_secs: i64) -> TokenServer {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().expect("temp dir");
        run_ok(Cmd::tool("openssl").current_dir(dir.path()).args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "token.key",
            "-out",
            "token.pem",
            "-days",
            "2",
            "-subj",
            "/CN=nixctr test token signer",
        ]));
        let der =
            run_ok(Cmd::tool("openssl").current_dir(dir.path()).args(["x509", "-in", "token.pem", "-outform", "DER"]));
        let x5c = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let issued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (count, key) = (issued.clone(), dir.path().join("token.key"));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let lifetime = if n == 0 { first_token_secs - 60 } else { 300 };
                let _ = serve_token(stream, &key, &x5c, lifetime, n == 0, &count);
            }
        });
        TokenServer { port, cert: dir.path().join("token.pem"), issued, _dir: dir }
    }
}

fn serve_token(
    mut stream: TcpStream,
    key: &Path,
    x5c: &str,
    lifetime: i64,
    pull_only: bool,
    count: &std::sync::atomic::AtomicUsize,
) -> std::io::Result<()> {
    use base64::Engine;
    use std::io::{BufRead, BufReader};
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorized = false;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("authorization") {
                let expected = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
                authorized = value.trim() == format!("Basic {expected}");
            }
        }
    }
    if !authorized {
        count.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        return stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("/");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let access: Vec<serde_json::Value> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "scope")
        .flat_map(|(_, v)| percent_decode(v).split(' ').map(str::to_string).collect::<Vec<_>>())
        .filter_map(|scope| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            let actions: Vec<&str> = actions.split(',').filter(|a| !pull_only || *a == "pull").collect();
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions}))
        })
        .collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs() as i64;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
    let claims = serde_json::json!({
        "iss": TOKEN_ISSUER, "sub": USER, "aud": TOKEN_SERVICE, "exp": now + lifetime, "nbf": now - 10,
        "iat": now, "jti": format!("t{now}{}", access.len()), "access": access,
    });
    let signing_input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
    let mut openssl = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    openssl.stdin.take().expect("stdin").write_all(signing_input.as_bytes())?;
    let signature = openssl.wait_with_output()?.stdout;
    let token = format!("{signing_input}.{}", b64(&signature));
    let body = serde_json::json!({"token": token, "expires_in": lifetime.max(1)}).to_string();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a [`Proxy`] rule sees of a request.
pub struct Seen<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The request head, lowercased.
    pub head: &'a str,
    /// The request body.
    pub body: &'a [u8],
}

/// An HTTP proxy in front of a registry that answers some requests itself (per `rule`),
/// to play a registry that refuses a manifest type or fails now and then. One request per
/// connection; `Connection: close` on every answer.
pub struct Proxy {
    pub port: u16,
}

impl Proxy {
    pub fn start(upstream: u16, rule: impl Fn(&Seen) -> Option<String> + Send + Sync + 'static) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let rule = std::sync::Arc::new(rule);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let rule = rule.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(client, upstream, &*rule);
                });
            }
        });
        Proxy { port }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

fn proxy_one(mut client: TcpStream, upstream: u16, rule: &dyn Fn(&Seen) -> Option<String>) -> std::io::Result<()> {
    use std::io::{BufRead, BufReader, Read};
    let mut reader = BufReader::new(client.try_clone()?);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let end = line == "\r\n";
        if !line.to_ascii_lowercase().starts_with("connection:") {
            head.push_str(&line);
        }
        if end {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let length: u64 =
        lower.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let mut body = Vec::new();
    (&mut reader).take(length).read_to_end(&mut body)?;
    if let Some(answer) = rule(&Seen { method, path, head: &lower, body: &body }) {
        return client.write_all(answer.as_bytes());
    }
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let head = head.trim_end_matches("\r\n");
    write!(up, "{head}\r\nConnection: close\r\n\r\n")?;
    up.write_all(&body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    // Say `Connection: close`, so the client does not reuse a connection this proxy drops.
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 2);
    client.write_all(&answer[..split])?;
    client.write_all(b"Connection: close\r\n")?;
    client.write_all(&answer[split..])?;
    Ok(())
}

/// A raw HTTP answer with a distribution-style error body.
pub fn error_answer(status: &str, code: &str, message: &str) -> String {
    let body = serde_json::json!({"errors": [{"code": code, "message": message}]}).to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// nginx as a reverse proxy in front of a registry, as registries are often run: with
/// `client_max_body_size` left at nginx's default (1 MiB) or set, so bigger request bodies
/// get 413. Its own config, temp dirs and logs; stopped on drop.
pub struct Nginx {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// `body_limit`: nginx's `client_max_body_size` (`"8m"`); `None` leaves nginx's default.
    pub fn start(upstream: u16, body_limit: Option<&str>) -> Nginx {
        let limit = body_limit.map(|l| format!("client_max_body_size {l};")).unwrap_or_default();
        Nginx::start_with(upstream, &limit)
    }

    /// Refuses `PUT /v2/REPO/manifests/TAG` with 403 and a distribution `DENIED` body, as a
    /// create-only policy does for a tag that exists; passes on everything else.
    pub fn create_only(upstream: u16, repo: &str, tag: &str) -> Nginx {
        let denied = serde_json::json!({"errors": [{
            "code": "DENIED",
            "message": format!("tag {tag} exists: this repository allows creating tags, not overwriting them"),
        }]})
        .to_string()
        .replace('\'', "\\'");
        Nginx::start_with(
            upstream,
            &format!(
                "client_max_body_size 0;\n    location = /v2/{repo}/manifests/{tag} {{\n      \
                 if ($request_method = PUT) {{ return 403 '{denied}'; }}\n      \
                 proxy_pass http://127.0.0.1:{upstream};\n      proxy_set_header Host $http_host;\n    }}"
            ),
        )
    }

    /// nginx with `server` directives of its own before the pass-everything location.
    fn start_with(upstream: u16, server: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("nginx temp dir");
        }
        // Workers run as root when the tests do: they must reach the temp dirs made here.
        let user = if unsafe { libc::geteuid() } == 0 { "user root;" } else { "" };
        for _attempt in 0..20 {
            let port = candidate_port();
            let d = dir.path().display();
            let config = format!(
                "{user}\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
                 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                 server {{\n    listen 127.0.0.1:{port};\n    {server}\n    location / {{\n      \
                 proxy_pass http://127.0.0.1:{upstream};\n      proxy_set_header Host $http_host;\n      \
                 proxy_http_version 1.1;\n      proxy_read_timeout 900s;\n    }}\n  }}\n}}\n"
            );
            std::fs::write(dir.path().join("nginx.conf"), config).expect("write nginx.conf");
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg(dir.path().join("error.log"))
                .arg("-c")
                .arg(dir.path().join("nginx.conf"))
                .args(["-g", "daemon off;"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("cannot start nginx (apt-get install nginx)");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if listener_owned_by(child.id(), port) {
                    return Nginx { port, dir, child };
                }
                if child.try_wait().expect("wait for nginx").is_some() {
                    break;
                }
                assert!(Instant::now() < deadline, "nginx did not listen on {port} within 30s");
                std::thread::sleep(Duration::from_millis(20)); // a poll interval
            }
            let log = std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
            assert!(log.contains("Address already in use"), "nginx exited without listening on {port}: {log}");
        }
        panic!("nginx found no free port in 20 tries");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// skopeo's flags to reach the registry through this proxy.
    pub fn skopeo_inspect(&self, image: &str) -> Option<serde_json::Value> {
        let out = Cmd::tool("skopeo")
            .args(["inspect", "--tls-verify=false"])
            .arg(format!("docker://{}/{image}", self.host()))
            .quiet()
            .run();
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("skopeo printed JSON"))
    }

    /// `skopeo copy` through this proxy to a `dir:` layout.
    pub fn skopeo_copy_to_dir(&self, image: &str, into: &Path) -> PathBuf {
        let dest = into.join(format!("via-proxy-{}", image.replace(['/', ':'], "-")));
        run_ok(
            Cmd::tool("skopeo")
                .args(["copy", "--src-tls-verify=false"])
                .arg(format!("docker://{}/{image}", self.host()))
                .arg(format!("dir:{}", dest.display()))
                .quiet(),
        );
        dest
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop; the workers go with the master.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGQUIT);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // a poll interval
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.dir;
    }
}

/// What a [`FaultProxy`] does to the traffic it passes.
#[derive(Clone, Default)]
pub struct Faults {
    /// Cut the client's connection once this many bytes of PATCH bodies have passed (once).
    pub cut_after: Option<u64>,
    /// Play a registry that keeps what arrived before a cut. distribution binds an upload's
    /// offset into its `Location` (`_state`), so after a cut PATCH it knows the session no
    /// more (404 on the next request): so the proxy sends the cut request on as a complete,
    /// shorter one, and sends every later request of that session to the newest `Location`
    /// the registry gave. Without this, a cut session is lost, as it is with distribution.
    pub keep_what_arrived: bool,
    /// Put this in place of the `Range` of upload-status answers (GET on an upload).
    pub status_range: Option<String>,
}

/// An HTTP proxy that streams what passes (one request per connection) and injects
/// [`Faults`] into blob uploads; it counts the PATCH body bytes it sends on to the registry.
pub struct FaultProxy {
    pub port: u16,
    /// PATCH body bytes passed on to the registry.
    pub forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Connections cut.
    pub cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

struct FaultState {
    faults: Faults,
    upstream: u16,
    /// PATCH body bytes seen so far, for `cut_after`.
    seen: std::sync::atomic::AtomicU64,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cuts: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Upload UUID -> the newest path and query the registry gave for it.
    sessions: std::sync::Mutex<std::collections::HashMap<String, String>>,
}

impl FaultProxy {
    pub fn start(upstream: u16, faults: Faults) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let state = std::sync::Arc::new(FaultState {
            faults,
            upstream,
            seen: Default::default(),
            forwarded: Default::default(),
            cuts: Default::default(),
            sessions: Default::default(),
        });
        let proxy = FaultProxy { port, forwarded: state.forwarded.clone(), cuts: state.cuts.clone() };
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let state = state.clone();
                std::thread::spawn(move || {
                    let _ = fault_one(client, &state);
                });
            }
        });
        proxy
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The UUID in an upload URL (`…/blobs/uploads/<uuid>?…`).
fn upload_uuid(path: &str) -> Option<String> {
    let rest = path.split("/blobs/uploads/").nth(1)?;
    let uuid = rest.split(['?', '/']).next()?;
    (!uuid.is_empty()).then(|| uuid.to_string())
}

/// The request line and headers of one HTTP request, without their line ends; `None` when
/// the client closed the connection first.
pub fn read_request_head(reader: &mut impl std::io::BufRead) -> std::io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        if line == "\r\n" {
            return Ok(Some(lines));
        }
        lines.push(line.trim_end().to_string());
    }
}

fn fault_one(client: TcpStream, state: &FaultState) -> std::io::Result<()> {
    use std::io::{BufReader, Read};
    use std::sync::atomic::Ordering;
    let mut reader = BufReader::with_capacity(256 << 10, client.try_clone()?);
    let Some(mut lines) = read_request_head(&mut reader)? else { return Ok(()) };
    let request_line = lines.remove(0);
    let mut words = request_line.split_whitespace();
    let (method, mut path) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
    let header = |name: &str| {
        lines
            .iter()
            .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
    };
    let length: u64 = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    let uuid = upload_uuid(&path);
    if state.faults.keep_what_arrived {
        if let Some(newest) = uuid.as_ref().and_then(|u| state.sessions.lock().ok()?.get(u).cloned()) {
            // The newest state, and the client's own parameters (`digest=`).
            let own: Vec<&str> = path
                .split_once('?')
                .map(|(_, q)| q.split('&').filter(|kv| !kv.starts_with("_state=")).collect())
                .unwrap_or_default();
            let mut mapped = newest;
            for kv in own {
                mapped.push(if mapped.contains('?') { '&' } else { '?' });
                mapped.push_str(kv);
            }
            path = mapped;
        }
    }
    // How much of this body goes on before the cut, if the cut falls within it.
    let mut cut_at = None;
    if method == "PATCH" {
        let before = state.seen.fetch_add(length, Ordering::SeqCst);
        if let Some(limit) = state.faults.cut_after {
            if before <= limit && limit < before + length && state.cuts.fetch_add(1, Ordering::SeqCst) == 0 {
                cut_at = Some(limit - before);
            }
        }
    }
    let sent_length = match cut_at {
        Some(n) if state.faults.keep_what_arrived => n,
        _ => length,
    };
    let mut up = TcpStream::connect(("127.0.0.1", state.upstream))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    for line in &lines {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        if name == "connection" || name == "content-length" {
            continue;
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    if length > 0 || header("content-length").is_some() {
        head.push_str(&format!("Content-Length: {sent_length}\r\n"));
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    let mut body = (&mut reader).take(cut_at.unwrap_or(length));
    let copied = std::io::copy(&mut body, &mut up)?;
    if method == "PATCH" {
        state.forwarded.fetch_add(copied, Ordering::SeqCst);
    }
    if cut_at.is_some() {
        // The client's connection goes first, as a broken network would take it.
        let _ = client.shutdown(std::net::Shutdown::Both);
        if !state.faults.keep_what_arrived {
            let _ = up.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
    }
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 4);
    let (answer_head, answer_body) = answer.split_at(split);
    let answer_head = String::from_utf8_lossy(answer_head).to_string();
    let mut out = String::new();
    for line in answer_head.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').map_or((line, ""), |(n, v)| (n, v.trim()));
        match name.to_ascii_lowercase().as_str() {
            "connection" => continue,
            "location" => {
                if let (Some(uuid), Some(at)) = (upload_uuid(value), value.find("/v2/")) {
                    if let Ok(mut sessions) = state.sessions.lock() {
                        sessions.insert(uuid, value[at..].to_string());
                    }
                }
            }
            "range" if method == "GET" && uuid.is_some() => {
                if let Some(range) = &state.faults.status_range {
                    out.push_str(&format!("Range: {range}\r\n"));
                    continue;
                }
            }
            _ => {}
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    if cut_at.is_some() {
        return Ok(());
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut client = client;
    client.write_all(out.as_bytes())?;
    client.write_all(answer_body)?;
    Ok(())
}
