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
use x509_parser::pem::Pem;
use x509_parser::time::ASN1Time;

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

    /// A fresh client (a connection pool of its own) over this transport.
    pub(crate) fn client(&self, timeout_secs: u64, version: &bollard::ClientVersion) -> Result<Docker> {
        let docker = match self {
            Transport::Unix(path) => Docker::connect_with_unix(&path.to_string_lossy(), timeout_secs, version),
            Transport::Ssh(tunnel) => {
                Docker::connect_with_unix(&tunnel.socket.to_string_lossy(), timeout_secs, version)
            }
            Transport::Http(host) => Docker::connect_with_http(&format!("tcp://{host}"), timeout_secs, version),
            Transport::Tls { url, files } => {
                crate::tls::install_crypto_provider();
                Docker::connect_with_ssl(url, &files.key, &files.cert, &files.ca, timeout_secs, version)
            }
        };
        docker.map_err(|e| anyhow!("{}", error_chain(&e)))
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
    let pem = std::fs::read(&files.cert)
        .with_context(|| format!("cannot read the client certificate {}", files.cert.display()))?;
    if let Some(not_after) = certificate_not_after(&pem) {
        if not_after < ASN1Time::now() {
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

/// notAfter of the first certificate in `pem`; `None` when there is none to read (the TLS
/// handshake then says what is wrong).
fn certificate_not_after(pem: &[u8]) -> Option<ASN1Time> {
    let block = Pem::iter_from_buffer(pem).filter_map(Result::ok).find(|p| p.label == "CERTIFICATE")?;
    Some(block.parse_x509().ok()?.validity().not_after)
}

/// `2020-01-02 00:00:00 UTC`.
fn shown_time(t: &ASN1Time) -> String {
    let t = t.to_datetime();
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
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

    /// A self-signed certificate valid from 2020-01-01 to 2020-01-02 (`openssl ca -selfsign`).
    const EXPIRED: &str = "comment lines before the block are allowed
-----BEGIN CERTIFICATE-----
MIIBDDCBswICEAAwCgYIKoZIzj0EAwIwEjEQMA4GA1UEAwwHZXhwaXJlZDAeFw0y
MDAxMDEwMDAwMDBaFw0yMDAxMDIwMDAwMDBaMBIxEDAOBgNVBAMMB2V4cGlyZWQw
WTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAASxrpW03QWzwKcTBX3TAHngI1fhFusp
MCC76BUwQmsgf77p5WRgK8uTAnpncU3hDrg1nLE7ViFy+dTwwbEgGtOnMAoGCCqG
SM49BAMCA0gAMEUCIFULDdrCLCBp8GYcIGCHfontCjgbn3jVQ3MQaK8X/FC+AiEA
0kAY6tJiab7UNt5vzFmJURGtalC/WFKynM+G4VXIbmw=
-----END CERTIFICATE-----
";

    #[test]
    fn the_expiry_of_a_certificate_is_read_and_shown_in_utc() {
        let not_after = certificate_not_after(EXPIRED.as_bytes()).unwrap();
        assert_eq!(shown_time(&not_after), "2020-01-02 00:00:00 UTC");
        assert!(not_after < ASN1Time::now());
        assert!(certificate_not_after(b"not a certificate").is_none());
    }

    #[test]
    fn ssh_failures_name_the_fix() {
        let t = SshTarget::parse("ssh://root@127.0.0.1:2222").unwrap();
        assert!(ssh_advice(&t, "Host key verification failed.").contains("ssh-keygen -R '[127.0.0.1]:2222'"));
        assert!(ssh_advice(&t, "root@127.0.0.1: Permission denied (publickey).").contains("refused the key"));
        assert!(ssh_advice(&t, "connect to host 127.0.0.1 port 2222: Connection refused").contains("does not answer"));
    }
}
