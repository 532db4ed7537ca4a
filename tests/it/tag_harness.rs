//! Front doors for a test's own [`Registry`](crate::registry_harness::Registry) that play
//! what registries do with tags: [`Nginx`] (the real nginx, started per test on a held port)
//! refusing to overwrite one tag as a create-only policy does, and [`OciTagShim`], a small
//! HTTP proxy that applies the `?tag=` of a manifest PUT itself and answers `OCI-Tag`, as
//! registries implementing OCI distribution 1.1 do (docker-registry 2.8 ignores `?tag=`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::registry_harness::listener_owned_by;

/// nginx in front of a registry: every request passed on, except a manifest PUT on one
/// tag, answered 403 with a distribution `DENIED` body (a create-only policy for a tag that
/// exists). Killed on drop.
pub struct Nginx {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Nginx {
    /// Refuses `PUT /v2/REPO/manifests/TAG`.
    pub fn create_only(upstream: u16, repo: &str, tag: &str) -> Nginx {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nginx = Nginx { port: 0, dir, child: None };
        for _attempt in 0..20 {
            nginx.port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
            std::fs::write(
                nginx.dir.path().join("nginx.conf"),
                config(nginx.dir.path(), nginx.port, upstream, repo, tag),
            )
            .expect("write nginx.conf");
            if nginx.try_start() {
                return nginx;
            }
        }
        panic!("nginx found no free port in 20 tries: {}", nginx.log());
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// Starts nginx and waits until it holds its port; false when another process took
    /// the port first.
    fn try_start(&mut self) -> bool {
        let mut child = Command::new("nginx")
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.dir.path().join("nginx.conf"))
            .spawn()
            .expect("cannot start nginx (apt-get install nginx)");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if listener_owned_by(child.id(), self.port) {
                self.child = Some(child);
                return true;
            }
            if let Some(status) = child.try_wait().expect("wait for nginx") {
                let log = self.log();
                assert!(log.contains("Address already in use"), "nginx exited ({status}): {log}");
                return false;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nginx did not listen on {} within 30s: {}", self.port, self.log());
            }
            std::thread::sleep(Duration::from_millis(20)); // a poll interval
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config(dir: &Path, port: u16, upstream: u16, repo: &str, tag: &str) -> String {
    let dir = dir.display();
    let denied = serde_json::json!({"errors": [{
        "code": "DENIED",
        "message": format!("tag {tag} exists: this repository allows creating tags, not overwriting them"),
    }]})
    .to_string()
    .replace('\'', "\\'");
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 128; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  client_max_body_size 0;
  proxy_request_buffering off;
  proxy_buffering off;
  proxy_http_version 1.1;
  server {{
    listen 127.0.0.1:{port};
    proxy_set_header Host $http_host;
    location = /v2/{repo}/manifests/{tag} {{
      if ($request_method = PUT) {{
        return 403 '{denied}';
      }}
      proxy_pass http://127.0.0.1:{upstream};
    }}
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
    }}
  }}
}}
"#
    )
}

/// A proxy in front of a registry that takes `PUT …/manifests/<digest>?tag=a&tag=b` as an
/// OCI 1.1 registry does: it puts the manifest by digest, then under each tag (upstream,
/// which ignores `?tag=` itself), and answers with one `OCI-Tag` header per tag. Every
/// other request passes through. `seen` lists each request line it got (`PUT /v2/…`).
pub struct OciTagShim {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl OciTagShim {
    pub fn start(upstream: u16) -> OciTagShim {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || {
                    let _ = shim_one(client, upstream, &log);
                });
            }
        });
        OciTagShim { port, seen }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The manifest PUTs it got, as `PUT path`.
    pub fn manifest_puts(&self) -> Vec<String> {
        let seen = self.seen.lock().expect("seen");
        seen.iter().filter(|l| l.starts_with("PUT ") && l.contains("/manifests/")).cloned().collect()
    }
}

/// One request (the proxy answers `Connection: close`).
fn shim_one(mut client: TcpStream, upstream: u16, seen: &Mutex<Vec<String>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" {
            break;
        }
        if !line.to_ascii_lowercase().starts_with("connection:") {
            lines.push(line.trim_end().to_string());
        }
    }
    let length: u64 = lines
        .iter()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = Vec::new();
    (&mut reader).take(length).read_to_end(&mut body)?;
    let mut words = lines[0].split_whitespace();
    let (method, target) = (words.next().unwrap_or("").to_string(), words.next().unwrap_or("").to_string());
    seen.lock().expect("seen").push(format!("{method} {target}"));
    let headers = &lines[1..];

    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let tags: Vec<&str> = query.split('&').filter_map(|kv| kv.strip_prefix("tag=")).collect();
    let answer = if method == "PUT" && path.contains("/manifests/sha256:") && !tags.is_empty() {
        let mut answer = forward(upstream, "PUT", path, headers, &body)?;
        if answer.starts_with(b"HTTP/1.1 2") {
            let repo_manifests = &path[..path.rfind('/').unwrap_or(0)];
            for tag in &tags {
                let tagged = forward(upstream, "PUT", &format!("{repo_manifests}/{tag}"), headers, &body)?;
                assert!(tagged.starts_with(b"HTTP/1.1 2"), "{}", String::from_utf8_lossy(&tagged));
            }
            let extra: String = tags.iter().map(|t| format!("OCI-Tag: {t}\r\n")).collect();
            answer = with_headers(answer, &extra);
        }
        answer
    } else {
        forward(upstream, &method, &target, headers, &body)?
    };
    client.write_all(&with_headers(answer, "Connection: close\r\n"))
}

/// One request to the registry, and its whole raw answer.
fn forward(upstream: u16, method: &str, target: &str, headers: &[String], body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    let mut head = format!("{method} {target} HTTP/1.1\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes())?;
    up.write_all(body)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

/// The raw answer with `extra` header lines added after the status line's headers.
fn with_headers(answer: Vec<u8>, extra: &str) -> Vec<u8> {
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").map_or(answer.len(), |p| p + 2);
    let mut out = answer[..split].to_vec();
    out.extend_from_slice(extra.as_bytes());
    out.extend_from_slice(&answer[split..]);
    out
}
