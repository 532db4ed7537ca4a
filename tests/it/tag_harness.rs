//! A front door for a test's own [`Registry`](crate::registry_harness::Registry) that plays
//! what OCI 1.1 registries do with tags (the create-only nginx is
//! `registry_harness::Nginx::create_only`): [`OciTagShim`], a small HTTP proxy that applies the `?tag=` of a manifest PUT itself and answers `OCI-Tag`, as
//! registries implementing OCI distribution 1.1 do (docker-registry 2.8 ignores `?tag=`).

use std::io::{BufReader, Read, Write};

use crate::registry_harness::read_request_head;
use std::net::{TcpListener, TcpStream};

use std::sync::{Arc, Mutex};

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
    let Some(mut lines) = read_request_head(&mut reader)? else { return Ok(()) };
    lines.retain(|l| !l.to_ascii_lowercase().starts_with("connection:"));
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
