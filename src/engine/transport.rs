//! How bytes reach an engine: a unix socket, plain tcp, tcp with TLS (client certificate,
//! the server's certificate verified against the given CA), or an ssh tunnel made with the
//! system's `ssh` (so `~/.ssh/config`, agents and known_hosts apply) forwarding a local
//! socket to the engine's socket on the remote machine.
//!
//! The tunnel is owned by the [`Transport`] (shared by every clone of the engine): the ssh
//! process is killed and its socket removed when the last owner goes, and it dies with
//! nixctr (`PR_SET_PDEATHSIG`) even on `kill -9`. It runs in a process group of its own, so
//! a terminal's Ctrl-C reaches nixctr, which still needs the tunnel to remove its container.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bollard::Docker;

use super::address::{EngineAddress, SshTarget, TlsFiles};
use crate::progress::Progress;

/// ssh's own limit for the TCP connection.
const SSH_CONNECT_TIMEOUT_SECS: u64 = 10;
/// The whole tunnel setup: connection, host key, authentication, forwarding.
const SSH_SETUP_DEADLINE: Duration = Duration::from_secs(25);

pub(crate) enum Transport {
    Unix(PathBuf),
    /// Plain `tcp://` or `http://`: `host:port`.
    Http(String),
    Tls {
        url: String,
        files: TlsFiles,
    },
    Ssh(SshTunnel),
}

impl Transport {
    /// Opens the way to `address` (for ssh: starts the tunnel). Errors say what to fix.
    pub(crate) async fn open(address: &EngineAddress, progress: &Progress) -> Result<Transport> {
        let url = address.url.as_str();
        if let Some(path) = url.strip_prefix("unix://") {
            if !Path::new(path).exists() {
                bail!("no socket there");
            }
            return Ok(Transport::Unix(PathBuf::from(path)));
        }
        if url.starts_with("ssh://") {
            let target = SshTarget::parse(url)?;
            let tunnel = SshTunnel::open(&target, address.identity.as_deref()).await?;
            return Ok(Transport::Ssh(tunnel));
        }
        if let Some(files) = &address.tls {
            if !url.starts_with("tcp://") {
                bail!("TLS files are given (from {}), but {url} is not a tcp:// address", files.source);
            }
            check_tls_files(files)?;
            return Ok(Transport::Tls { url: url.to_string(), files: files.clone() });
        }
        if url.starts_with("tcp://") || url.starts_with("http://") {
            let host = url.trim_start_matches("tcp://").trim_start_matches("http://").trim_end_matches('/');
            warn_if_exposed(url, host, progress);
            return Ok(Transport::Http(host.to_string()));
        }
        bail!("engine address {url:?} is not unix://PATH, tcp://HOST:PORT, http://HOST:PORT or ssh://USER@HOST")
    }

    /// A fresh client over this transport.
    pub(crate) fn client(&self, timeout_secs: u64) -> Result<Docker> {
        let version = bollard::API_DEFAULT_VERSION;
        let docker = match self {
            Transport::Unix(path) => Docker::connect_with_unix(&path.to_string_lossy(), timeout_secs, version),
            Transport::Ssh(tunnel) => {
                Docker::connect_with_unix(&tunnel.socket.to_string_lossy(), timeout_secs, version)
            }
            Transport::Http(host) => Docker::connect_with_http(&format!("tcp://{host}"), timeout_secs, version),
            Transport::Tls { url, files } => {
                Docker::connect_with_ssl(url, &files.key, &files.cert, &files.ca, timeout_secs, version)
            }
        };
        docker.map_err(|e| anyhow!("{}", error_chain(&e)))
    }

    /// The local socket that speaks the engine API unencrypted, when there is one.
    pub(crate) fn local_socket(&self) -> Option<&Path> {
        match self {
            Transport::Unix(path) => Some(path),
            Transport::Ssh(tunnel) => Some(&tunnel.socket),
            _ => None,
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls { .. })
    }

    /// What to do when the engine behind this transport failed to answer `error`.
    pub(crate) fn explain(&self, address: &EngineAddress, error: &str) -> String {
        match self {
            Transport::Tls { files, .. } => tls_advice(files, error),
            Transport::Ssh(_) => format!(
                "{error}\n  the ssh tunnel is up, but the engine's socket on the remote machine does not answer: \
                 check that the engine runs there and that {} is its socket (Podman: ssh://USER@HOST/run/podman/podman.sock)",
                SshTarget::parse(&address.url).map(|t| t.socket).unwrap_or_default()
            ),
            Transport::Http(_) if error.contains("HTTPS") || error.contains("HTTP/0.9") || error.contains("malformed") => {
                format!(
                    "{error}\n  the engine seems to want TLS: set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH (ca.pem, \
                     cert.pem, key.pem), use a Docker context, or [engine-tls] in nixctr.toml"
                )
            }
            _ => error.to_string(),
        }
    }
}

/// An error with its causes, `a: b: c` (bollard hides the TLS reason in the chain).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

fn warn_if_exposed(url: &str, host: &str, progress: &Progress) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    let loopback = name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback && !WARNED.swap(true, Ordering::SeqCst) {
        progress.warn(format!(
            "engine {url} is plain tcp without TLS: whoever reaches that port is root on that machine \
             (use TLS: DOCKER_TLS_VERIFY with DOCKER_CERT_PATH, a Docker context, [engine-tls]; or ssh://)"
        ));
    }
}

// ---------------------------------------------------------------------------------------------
// TLS

/// A private key file must be the owner's alone, as ssh insists.
pub(crate) fn check_private_file(path: &Path, what: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "the {what} {} is readable by others (mode {:o}): refusing to use it; fix: chmod 600 {}",
            path.display(),
            meta.permissions().mode() & 0o777,
            path.display()
        );
    }
    Ok(())
}

fn check_tls_files(files: &TlsFiles) -> Result<()> {
    for (path, what) in [(&files.ca, "CA certificate"), (&files.cert, "client certificate"), (&files.key, "client key")]
    {
        if !path.is_file() {
            bail!(
                "the {what} {} (from {}) does not exist; fix: put ca.pem, cert.pem and key.pem there (the engine's \
                 CA, and a client certificate it signed with its key), or name other files",
                path.display(),
                files.source
            );
        }
    }
    check_private_file(&files.key, "TLS client key")?;
    let pem = std::fs::read_to_string(&files.cert)
        .with_context(|| format!("cannot read the client certificate {}", files.cert.display()))?;
    if let Some(not_after) = certificate_not_after(&pem) {
        if not_after < now_utc() {
            bail!(
                "the client certificate {} (from {}) expired on {}; fix: get a new one signed by the engine's CA",
                files.cert.display(),
                files.source,
                shown_time(&not_after)
            );
        }
    }
    Ok(())
}

fn tls_advice(files: &TlsFiles, error: &str) -> String {
    let lower = error.to_ascii_lowercase();
    let fix = if lower.contains("unknownissuer") || lower.contains("unknown issuer") || lower.contains("badsignature") {
        format!(
            "the engine's certificate is not signed by the CA in {} (from {}); fix: use the CA that signed the engine's \
             certificate (its --tlscacert)",
            files.ca.display(),
            files.source
        )
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        "the engine's certificate does not name this host; fix: reach it by a name or IP in its certificate".to_string()
    } else if lower.contains("expired") {
        "a certificate has expired (the engine's, or the client certificate as the engine sees it); fix: renew it"
            .to_string()
    } else if lower.contains("certificate") || lower.contains("alert") || lower.contains("handshake") {
        format!(
            "the engine refused the client certificate {} (from {}); fix: use a client certificate signed by the CA \
             the engine trusts (its --tlscacert), current, with its key",
            files.cert.display(),
            files.source
        )
    } else {
        return error.to_string();
    };
    format!("{error}\n  {fix}")
}

/// notAfter of the first certificate in `pem`, as `YYYYMMDDHHMMSS` (UTC).
fn certificate_not_after(pem: &str) -> Option<String> {
    use base64::Engine as _;
    let body = pem.split("-----BEGIN CERTIFICATE-----").nth(1)?.split("-----END CERTIFICATE-----").next()?;
    let der = base64::engine::general_purpose::STANDARD.decode(body.split_whitespace().collect::<String>()).ok()?;
    let (_, cert, _) = der_item(&der)?;
    let (_, mut tbs, _) = der_item(cert)?;
    // [0] version (optional), serial, signature algorithm, issuer, validity
    let (tag, _, rest) = der_item(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        let (_, _, rest) = der_item(tbs)?; // serial
        tbs = rest;
    } else {
        tbs = rest; // that was the serial
    }
    let (_, _, rest) = der_item(tbs)?; // signature algorithm
    let (_, _, rest) = der_item(rest)?; // issuer
    let (_, validity, _) = der_item(rest)?;
    let (_, _, rest) = der_item(validity)?; // notBefore
    let (tag, time, _) = der_item(rest)?;
    let text = std::str::from_utf8(time).ok()?.trim_end_matches('Z');
    match (tag, text.len()) {
        // UTCTime: YYMMDDHHMMSS, years 1950-2049
        (0x17, 12) => {
            let century = if text[..2].parse::<u32>().ok()? < 50 { "20" } else { "19" };
            Some(format!("{century}{text}"))
        }
        (0x18, 14) => Some(text.to_string()),
        _ => None,
    }
}

/// (tag, content, rest) of the DER item at the start of `buf`.
fn der_item(buf: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *buf.first()?;
    let first = *buf.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let len = buf.get(2..2 + n)?.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize);
        (len, 2 + n)
    };
    let content = buf.get(header..header + len)?;
    Some((tag, content, &buf[header + len..]))
}

/// Now as `YYYYMMDDHHMMSS` (UTC).
fn now_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

fn shown_time(t: &str) -> String {
    if t.len() != 14 {
        return t.to_string();
    }
    format!("{}-{}-{} {}:{}:{} UTC", &t[..4], &t[4..6], &t[6..8], &t[8..10], &t[10..12], &t[12..])
}

// ---------------------------------------------------------------------------------------------
// ssh

/// `ssh -N -L LOCAL.sock:REMOTE.sock`, alive as long as this value.
pub(crate) struct SshTunnel {
    child: Mutex<Option<std::process::Child>>,
    /// The local end of the forwarding.
    pub(crate) socket: PathBuf,
    /// A private directory (mode 700) holding the socket and ssh's stderr.
    dir: Option<tempfile::TempDir>,
}

impl SshTunnel {
    async fn open(target: &SshTarget, identity: Option<&Path>) -> Result<SshTunnel> {
        if let Some(identity) = identity {
            if !identity.is_file() {
                bail!("the ssh identity file {} does not exist; fix: name an existing private key", identity.display());
            }
            check_private_file(identity, "ssh identity file")?;
        }
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("nixctr-ssh-")
            .tempdir_in(&base)
            .with_context(|| format!("cannot make a directory for the ssh tunnel in {}", base.display()))?;
        let socket = dir.path().join("engine.sock");
        let log_path = dir.path().join("ssh.log");
        let log = std::fs::File::create(&log_path).context("cannot make the ssh log file")?;
        let mut command = std::process::Command::new("ssh");
        command.args([
            "-o",
            "BatchMode=yes",
            "-o",
            &format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_SECS}"),
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "StreamLocalBindUnlink=yes",
            // A multiplexing master of the user's config would outlive nixctr and own the socket.
            "-o",
            "ControlMaster=no",
            "-o",
            "ControlPath=none",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=3",
        ]);
        if let Some(port) = target.port {
            command.arg("-p").arg(port.to_string());
        }
        if let Some(identity) = identity {
            command.arg("-i").arg(identity).args(["-o", "IdentitiesOnly=yes"]);
        }
        command
            .arg("-N")
            .arg("-L")
            .arg(format!("{}:{}", socket.display(), target.socket))
            .arg("--")
            .arg(&target.destination)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                // Its own process group: a terminal's Ctrl-C is nixctr's to handle.
                libc::setpgid(0, 0);
                // Gone with nixctr, even on kill -9.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow!("`ssh` is not installed; fix: install OpenSSH's client (Debian: apt install openssh-client)")
            } else {
                anyhow!("cannot run ssh: {e}")
            }
        })?;
        let tunnel = SshTunnel { child: Mutex::new(Some(child)), socket, dir: Some(dir) };
        let started = Instant::now();
        loop {
            if tunnel.socket.exists() {
                return Ok(tunnel);
            }
            let exited = tunnel
                .child
                .lock()
                .map_err(|_| anyhow!("ssh tunnel lock poisoned"))?
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() {
                let said = read_log(&log_path);
                return Err(anyhow!("{}", ssh_advice(target, &said)));
            }
            if started.elapsed() > SSH_SETUP_DEADLINE {
                let said = read_log(&log_path);
                return Err(anyhow!(
                    "ssh did not set up the tunnel within {}s{}\n  fix: check that {} answers ssh on port {} (`ssh -p {} {}`)",
                    SSH_SETUP_DEADLINE.as_secs(),
                    if said.is_empty() { String::new() } else { format!(": {said}") },
                    target.destination,
                    target.port.unwrap_or(22),
                    target.port.unwrap_or(22),
                    target.destination
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SshTunnel {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            if let Some(mut child) = child.take() {
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let until = Instant::now() + Duration::from_secs(5);
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if Instant::now() > until => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }
        }
        let _ = std::fs::remove_file(&self.socket);
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

/// ssh's last words, without its warnings about known hosts being added.
fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(16 * 1024).read_to_string(&mut text);
    }
    let lines: Vec<&str> = text
        .lines()
        .map(|l| l.trim().trim_start_matches("ssh: ").trim_end_matches('.'))
        .filter(|l| !l.is_empty() && !l.starts_with("Warning: Permanently added") && !l.starts_with('@'))
        .collect();
    lines.iter().rev().take(3).rev().copied().collect::<Vec<_>>().join("; ")
}

fn ssh_advice(target: &SshTarget, said: &str) -> String {
    let port = target.port.unwrap_or(22);
    let host = target.destination.rsplit_once('@').map_or(target.destination.as_str(), |(_, h)| h);
    let known = if port == 22 { host.to_string() } else { format!("[{host}]:{port}") };
    let fix = if said.contains("Host key verification failed") || said.contains("IDENTIFICATION HAS CHANGED") {
        format!(
            "the host key of {known} is unknown or does not match ~/.ssh/known_hosts; fix: check the host's key and \
             add it (`ssh -p {port} {}` once, interactively), or remove a stale one with `ssh-keygen -R '{known}'`",
            target.destination
        )
    } else if said.contains("Permission denied") || said.contains("Too many authentication failures") {
        format!(
            "{} refused the key; fix: use a key whose public half is in the remote authorized_keys (the \
             connection's Identity, CONTAINER_SSHKEY, IdentityFile in ~/.ssh/config, or ssh-agent)",
            target.destination
        )
    } else if said.contains("Connection refused")
        || said.contains("timed out")
        || said.contains("No route to host")
        || said.contains("Could not resolve")
        || said.contains("Network is unreachable")
        || said.contains("Connection closed")
        || said.contains("Connection reset")
    {
        format!("{known} does not answer ssh; fix: check the host and port, and that sshd runs there")
    } else if said.contains("forwarding") || said.contains("open failed") {
        format!(
            "the server refused to forward {}; fix: allow it in the remote sshd_config (AllowStreamLocalForwarding yes)",
            target.socket
        )
    } else {
        "fix: check that `ssh -p PORT USER@HOST true` works without a prompt".to_string()
    };
    let said = if said.is_empty() { "ssh exited".to_string() } else { format!("ssh: {said}") };
    format!("{said}\n  {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_date_of_now_is_plausible() {
        let now = now_utc();
        assert_eq!(now.len(), 14);
        assert!(now.as_str() > "20240101000000", "{now}");
    }

    #[test]
    fn ssh_failures_name_the_fix() {
        let t = SshTarget::parse("ssh://root@127.0.0.1:2222").unwrap();
        assert!(ssh_advice(&t, "Host key verification failed.").contains("ssh-keygen -R '[127.0.0.1]:2222'"));
        assert!(ssh_advice(&t, "root@127.0.0.1: Permission denied (publickey).").contains("refused the key"));
        assert!(ssh_advice(&t, "connect to host 127.0.0.1 port 2222: Connection refused").contains("does not answer"));
    }
}
