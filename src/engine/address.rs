//! Where the engine is: the address precedence of the Docker CLI, then Podman's, then
//! nixctr.toml, resolved once (by `settings`) into [`EngineAddress`] values.
//!
//! `--engine`/`-H` (`NIXCTR_ENGINE`) > `--context NAME` > `DOCKER_HOST` > `DOCKER_CONTEXT` >
//! `currentContext` in `$DOCKER_CONFIG/config.json` > `CONTAINER_CONNECTION` / `CONTAINER_HOST`
//! > `engine`/`engines` in nixctr.toml > the usual sockets (an empty list: probe them).
//!
//! Nothing here reads a key: TLS keys and ssh identities are paths, and only paths are shown.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use sha2::Digest;

/// Client certificate, key and CA for `tcp://` with TLS, and where they were named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    /// `DOCKER_CERT_PATH=/x`, `Docker context "remote"`, `[engine-tls] in nixctr.toml`.
    pub(crate) source: String,
}

impl TlsFiles {
    /// `ca.pem`, `cert.pem` and `key.pem` in `dir`.
    pub(crate) fn in_dir(dir: &Path, source: String) -> TlsFiles {
        TlsFiles { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem"), source }
    }
}

/// One engine address, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EngineAddress {
    /// `unix:///path`, `tcp://host:port`, `http://host:port`, `ssh://user@host[:port][/socket]`.
    pub(crate) url: String,
    /// Set: `tcp://` is spoken over TLS with these files.
    pub(crate) tls: Option<TlsFiles>,
    /// The ssh private key file for `ssh://` (else ssh's own config and agent decide).
    pub(crate) identity: Option<PathBuf>,
    /// Why this address: `--engine`, `DOCKER_HOST`, `Docker context "remote" (currentContext in …)`.
    pub(crate) why: String,
}

impl EngineAddress {
    pub(crate) fn new(url: impl Into<String>, why: impl Into<String>) -> EngineAddress {
        let url = url.into();
        // A bare path is a unix socket.
        let url = if url.starts_with('/') { format!("unix://{url}") } else { url };
        EngineAddress { url, tls: None, identity: None, why: why.into() }
    }

    /// `url (why)`, for messages.
    pub(crate) fn described(&self) -> String {
        format!("{} (from {})", self.url, self.why)
    }
}

/// What the address is resolved from: the command line, the environment, nixctr.toml and
/// the user's Docker/Podman configuration. No parser types: `settings` fills this in.
#[derive(Debug, Default, Clone)]
pub(crate) struct Inputs {
    /// `--engine`/`-H`, repeated; the flag's value and whether it came from `NIXCTR_ENGINE`.
    pub(crate) flag: Vec<String>,
    pub(crate) flag_from_env: bool,
    /// `--context NAME`.
    pub(crate) context: Option<String>,
    /// The environment variables read here (only non-empty ones).
    pub(crate) env: BTreeMap<String, String>,
    /// `$HOME`, for `~/.docker` and `~/.config`.
    pub(crate) home: Option<PathBuf>,
    /// `engine` and `engines` in nixctr.toml.
    pub(crate) file_engines: Vec<String>,
    /// `[engine-tls]` in nixctr.toml.
    pub(crate) file_tls: Option<TlsFiles>,
}

/// The environment variables [`Inputs::env`] holds.
pub(crate) const ENV_VARS: &[&str] = &[
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_CONFIG",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "CONTAINER_HOST",
    "CONTAINER_CONNECTION",
    "CONTAINER_SSHKEY",
    "XDG_CONFIG_HOME",
];

impl Inputs {
    /// The environment of this process (non-empty values of [`ENV_VARS`]) and its HOME.
    pub(crate) fn from_env() -> Inputs {
        let env = ENV_VARS
            .iter()
            .filter_map(|name| Some((name.to_string(), std::env::var(name).ok().filter(|v| !v.is_empty())?)))
            .collect();
        Inputs { env, home: dirs::home_dir(), ..Inputs::default() }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    fn docker_config_dir(&self) -> PathBuf {
        match self.var("DOCKER_CONFIG") {
            Some(dir) => PathBuf::from(dir),
            None => self.home.clone().unwrap_or_default().join(".docker"),
        }
    }

    /// TLS files for a `tcp://` address not from a context: `DOCKER_TLS_VERIFY` with
    /// `DOCKER_CERT_PATH` (default `~/.docker`), else `[engine-tls]`.
    fn env_tls(&self, url: &str) -> Option<TlsFiles> {
        if !url.starts_with("tcp://") {
            return None;
        }
        if self.var("DOCKER_TLS_VERIFY").is_some() {
            let (dir, source) = match self.var("DOCKER_CERT_PATH") {
                Some(dir) => (PathBuf::from(dir), format!("DOCKER_TLS_VERIFY with DOCKER_CERT_PATH={dir}")),
                None => {
                    let dir = self.docker_config_dir();
                    let source = format!("DOCKER_TLS_VERIFY with the default DOCKER_CERT_PATH {}", dir.display());
                    (dir, source)
                }
            };
            return Some(TlsFiles::in_dir(&dir, source));
        }
        self.file_tls.clone()
    }

    fn plain(&self, url: &str, why: String) -> EngineAddress {
        let mut address = EngineAddress::new(url, why);
        address.tls = self.env_tls(&address.url);
        address
    }
}

/// The engines to use, in order (several when `--engine` is repeated or nixctr.toml names
/// `engines`); empty: probe the usual sockets.
pub(crate) fn resolve(inputs: &Inputs) -> Result<Vec<EngineAddress>> {
    // 1. --engine / -H (NIXCTR_ENGINE).
    if !inputs.flag.is_empty() {
        let why = if inputs.flag_from_env { "NIXCTR_ENGINE" } else { "--engine" };
        return inputs.flag.iter().map(|url| checked(inputs.plain(url, why.to_string()))).collect();
    }
    // 2. --context NAME ("default": no context, as the Docker CLI has it).
    let mut contexts_done = false;
    if let Some(name) = &inputs.context {
        if name != "default" {
            return Ok(vec![docker_context(inputs, name, "--context")?]);
        }
        contexts_done = true;
    }
    // 3. DOCKER_HOST.
    if let Some(url) = inputs.var("DOCKER_HOST") {
        return Ok(vec![checked(inputs.plain(url, "DOCKER_HOST".to_string()))?]);
    }
    if !contexts_done {
        // 4. DOCKER_CONTEXT.
        if let Some(name) = inputs.var("DOCKER_CONTEXT") {
            if name != "default" {
                return Ok(vec![docker_context(inputs, name, "DOCKER_CONTEXT")?]);
            }
            contexts_done = true;
        }
    }
    if !contexts_done {
        // 5. currentContext in config.json.
        let config = inputs.docker_config_dir().join("config.json");
        if let Some(name) = current_context(&config)? {
            if name != "default" {
                let why = format!("currentContext in {}", config.display());
                return Ok(vec![docker_context(inputs, &name, &why)?]);
            }
        }
    }
    // 6. Podman: CONTAINER_CONNECTION (a named connection), CONTAINER_HOST (a URL).
    if let Some(name) = inputs.var("CONTAINER_CONNECTION") {
        return Ok(vec![podman_connection(inputs, name)?]);
    }
    if let Some(url) = inputs.var("CONTAINER_HOST") {
        let mut address = inputs.plain(url, "CONTAINER_HOST".to_string());
        address.identity = inputs.var("CONTAINER_SSHKEY").map(PathBuf::from);
        return Ok(vec![checked(address)?]);
    }
    // 7. nixctr.toml.
    inputs
        .file_engines
        .iter()
        .map(|url| checked(inputs.plain(url, format!("{} in nixctr.toml", file_key(inputs)))))
        .collect()
}

/// An address named in nixctr.toml outside `engine`/`engines` (`[platform-engines]`).
pub(crate) fn configured(inputs: &Inputs, url: &str, why: String) -> Result<EngineAddress> {
    checked(inputs.plain(url, why))
}

fn file_key(inputs: &Inputs) -> &'static str {
    if inputs.file_engines.len() > 1 {
        "engines"
    } else {
        "engine"
    }
}

/// Refuses what no transport takes, naming where the address came from.
fn checked(address: EngineAddress) -> Result<EngineAddress> {
    let url = &address.url;
    let known = ["unix://", "tcp://", "http://", "ssh://"].iter().any(|scheme| url.starts_with(scheme));
    if !known {
        bail!(
            "engine address {url:?} (from {}) is not unix://PATH, tcp://HOST:PORT, http://HOST:PORT or \
             ssh://USER@HOST[:PORT][/SOCKET]",
            address.why
        );
    }
    if url.starts_with("ssh://") {
        SshTarget::parse(url).with_context(|| format!("engine address from {}", address.why))?;
    }
    Ok(address)
}

/// `ssh://user@host:port/path` taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SshTarget {
    /// `user@host` or `host`.
    pub(crate) destination: String,
    pub(crate) port: Option<u16>,
    /// The engine's socket on the remote machine.
    pub(crate) socket: String,
}

/// Where Docker listens when an `ssh://` address names no socket.
pub(crate) const REMOTE_DOCKER_SOCKET: &str = "/var/run/docker.sock";

impl SshTarget {
    pub(crate) fn parse(url: &str) -> Result<SshTarget> {
        let rest = url.strip_prefix("ssh://").ok_or_else(|| anyhow!("{url:?} is not an ssh:// address"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains(':') && authority.rsplit_once('@').is_some_and(|(user, _)| user.contains(':')) {
            bail!("{url:?}: a password in an ssh:// address is not supported (use a key or an agent)");
        }
        let (host_part, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.ends_with(']') || host.starts_with('[') => {
                let port = port.parse::<u16>().map_err(|_| anyhow!("{url:?}: the port {port:?} is not a number"))?;
                (host, Some(port))
            }
            _ => (authority, None),
        };
        let host = host_part.rsplit_once('@').map_or(host_part, |(_, h)| h);
        if host.is_empty() || host.starts_with('-') {
            bail!("{url:?}: no host (expected ssh://USER@HOST[:PORT][/SOCKET])");
        }
        let socket = if path.is_empty() || path == "/" { REMOTE_DOCKER_SOCKET.to_string() } else { path.to_string() };
        Ok(SshTarget { destination: host_part.trim_start_matches('[').trim_end_matches(']').to_string(), port, socket })
    }
}

// ---------------------------------------------------------------------------------------------
// Docker contexts

/// The sha256 hex of a context name: its directory in the context store.
fn context_dir_name(name: &str) -> String {
    hex::encode(sha2::Sha256::digest(name.as_bytes()))
}

fn current_context(config: &Path) -> Result<Option<String>> {
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", config.display())),
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", config.display()))?;
    Ok(value["currentContext"].as_str().filter(|s| !s.is_empty()).map(str::to_string))
}

/// The names of the contexts in the store (`default` included, as `docker context ls` has it).
fn context_names(store: &Path) -> Vec<String> {
    let mut names = vec!["default".to_string()];
    for entry in std::fs::read_dir(store.join("contexts/meta")).into_iter().flatten().flatten() {
        let meta = entry.path().join("meta.json");
        if let Some(name) = std::fs::read_to_string(meta)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["Name"].as_str().map(str::to_string))
        {
            names.push(name);
        }
    }
    names.sort();
    names.dedup();
    names
}

fn docker_context(inputs: &Inputs, name: &str, chosen_by: &str) -> Result<EngineAddress> {
    let store = inputs.docker_config_dir();
    let hash = context_dir_name(name);
    let meta_path = store.join("contexts/meta").join(&hash).join("meta.json");
    let why = format!("Docker context {name:?} ({chosen_by})");
    let text = match std::fs::read_to_string(&meta_path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "Docker context {name:?} (from {chosen_by}) does not exist; the contexts in {} are: {} \
             (`docker context ls`; make one with `docker context create`)",
            store.display(),
            context_names(&store).join(", ")
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", meta_path.display())),
    };
    let meta: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", meta_path.display()))?;
    let endpoint = &meta["Endpoints"]["docker"];
    let Some(host) = endpoint["Host"].as_str().filter(|h| !h.is_empty()) else {
        bail!("Docker context {name:?} ({}) has no docker endpoint Host", meta_path.display());
    };
    if endpoint["SkipTLSVerify"].as_bool() == Some(true) {
        bail!(
            "Docker context {name:?} skips TLS verification (SkipTLSVerify), which nixctr does not do: give it the \
             engine's CA (`docker context update {name} --docker host={host},ca=CA.pem,cert=…,key=…`)"
        );
    }
    let mut address = EngineAddress::new(host, why);
    let tls_dir = store.join("contexts/tls").join(&hash).join("docker");
    if address.url.starts_with("tcp://") && tls_dir.join("key.pem").exists() {
        address.tls = Some(TlsFiles::in_dir(&tls_dir, format!("Docker context {name:?}")));
    }
    checked(address)
}

// ---------------------------------------------------------------------------------------------
// Podman connections

fn podman_connection(inputs: &Inputs, name: &str) -> Result<EngineAddress> {
    let config_home = match inputs.var("XDG_CONFIG_HOME") {
        Some(dir) => PathBuf::from(dir),
        None => inputs.home.clone().unwrap_or_default().join(".config"),
    };
    let why = format!("Podman connection {name:?} (CONTAINER_CONNECTION)");
    let mut seen = Vec::new();
    // Podman 5: podman-connections.json.
    let json_path = config_home.join("containers/podman-connections.json");
    if let Ok(text) = std::fs::read_to_string(&json_path) {
        let value: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", json_path.display()))?;
        if let Some(connections) = value["Connection"]["Connections"].as_object() {
            if let Some(c) = connections.get(name) {
                let mut address = EngineAddress::new(c["URI"].as_str().unwrap_or_default(), why);
                address.identity = c["Identity"].as_str().filter(|s| !s.is_empty()).map(PathBuf::from);
                return checked(address);
            }
            seen.extend(connections.keys().cloned());
        }
    }
    // containers.conf: [engine.service_destinations.NAME] uri, identity.
    for conf in [config_home.join("containers/containers.conf"), PathBuf::from("/etc/containers/containers.conf")] {
        let Ok(text) = std::fs::read_to_string(&conf) else { continue };
        let value: toml::Table = toml::from_str(&text).with_context(|| format!("cannot parse {}", conf.display()))?;
        let Some(destinations) =
            value.get("engine").and_then(|e| e.get("service_destinations")).and_then(|d| d.as_table())
        else {
            continue;
        };
        if let Some(d) = destinations.get(name) {
            let uri = d.get("uri").and_then(|u| u.as_str()).unwrap_or_default();
            let mut address = EngineAddress::new(uri, why);
            address.identity = d.get("identity").and_then(|i| i.as_str()).filter(|s| !s.is_empty()).map(PathBuf::from);
            return checked(address);
        }
        seen.extend(destinations.keys().cloned());
    }
    seen.sort();
    seen.dedup();
    bail!(
        "Podman connection {name:?} (from CONTAINER_CONNECTION) does not exist; the connections are: {} \
         (`podman system connection ls`; add one with `podman system connection add`)",
        if seen.is_empty() { "none".to_string() } else { seen.join(", ") }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(env: &[(&str, &str)]) -> Inputs {
        Inputs {
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            home: Some(PathBuf::from("/nonexistent-home")),
            ..Inputs::default()
        }
    }

    #[test]
    fn ssh_addresses_take_docker_and_podman_forms() {
        let t = SshTarget::parse("ssh://root@127.0.0.1:2222").unwrap();
        assert_eq!(
            (t.destination.as_str(), t.port, t.socket.as_str()),
            ("root@127.0.0.1", Some(2222), REMOTE_DOCKER_SOCKET)
        );
        let t = SshTarget::parse("ssh://core@host/run/podman/podman.sock").unwrap();
        assert_eq!((t.destination.as_str(), t.port, t.socket.as_str()), ("core@host", None, "/run/podman/podman.sock"));
        assert!(SshTarget::parse("ssh://u:secret@host").unwrap_err().to_string().contains("password"));
        assert!(SshTarget::parse("ssh://-oProxyCommand=x").is_err());
    }

    #[test]
    fn docker_host_beats_docker_context_and_tls_env_applies() {
        let i = inputs(&[
            ("DOCKER_HOST", "tcp://10.0.0.1:2376"),
            ("DOCKER_CONTEXT", "nope"),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", "/certs"),
        ]);
        let r = resolve(&i).unwrap();
        assert_eq!(r[0].why, "DOCKER_HOST");
        assert_eq!(r[0].tls.as_ref().unwrap().key, PathBuf::from("/certs/key.pem"));
    }

    #[test]
    fn an_unknown_context_lists_the_ones_there_are() {
        let err = resolve(&inputs(&[("DOCKER_CONTEXT", "nope")])).unwrap_err().to_string();
        assert!(err.contains("\"nope\"") && err.contains("default"), "{err}");
    }

    #[test]
    fn the_default_context_means_no_context() {
        let i = inputs(&[("DOCKER_CONTEXT", "default"), ("CONTAINER_HOST", "unix:///p.sock")]);
        assert_eq!(resolve(&i).unwrap()[0].why, "CONTAINER_HOST");
        let mut i = inputs(&[]);
        i.file_engines = vec!["unix:///a.sock".into(), "unix:///b.sock".into()];
        let r = resolve(&i).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].why, "engines in nixctr.toml");
        assert!(resolve(&inputs(&[])).unwrap().is_empty());
    }

    #[test]
    fn engine_tls_applies_to_tcp_engines_of_the_file() {
        let mut i = inputs(&[]);
        i.file_engines = vec!["tcp://h:2376".into(), "unix:///x.sock".into()];
        i.file_tls = Some(TlsFiles::in_dir(Path::new("/t"), "[engine-tls] in nixctr.toml".into()));
        let r = resolve(&i).unwrap();
        assert_eq!(r[0].tls.as_ref().unwrap().ca, PathBuf::from("/t/ca.pem"));
        assert!(r[1].tls.is_none());
        // DOCKER_TLS_VERIFY wins over the file's files.
        i.env.insert("DOCKER_TLS_VERIFY".into(), "1".into());
        i.env.insert("DOCKER_CERT_PATH".into(), "/env".into());
        assert_eq!(resolve(&i).unwrap()[0].tls.as_ref().unwrap().ca, PathBuf::from("/env/ca.pem"));
    }

    #[test]
    fn podman_connections_come_from_json_and_containers_conf() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("containers");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(
            conf.join("podman-connections.json"),
            r#"{"Connection":{"Default":"a","Connections":{"a":{"URI":"ssh://core@a:22/run/podman/podman.sock","Identity":"/k/a"}}}}"#,
        )
        .unwrap();
        std::fs::write(
            conf.join("containers.conf"),
            "[engine.service_destinations.b]\nuri = \"ssh://root@b/run/podman/podman.sock\"\nidentity = \"/k/b\"\n",
        )
        .unwrap();
        let config_home = dir.path().to_str().unwrap();
        for (name, uri, key) in [
            ("a", "ssh://core@a:22/run/podman/podman.sock", "/k/a"),
            ("b", "ssh://root@b/run/podman/podman.sock", "/k/b"),
        ] {
            let r = resolve(&inputs(&[("XDG_CONFIG_HOME", config_home), ("CONTAINER_CONNECTION", name)])).unwrap();
            assert_eq!((r[0].url.as_str(), r[0].identity.as_deref()), (uri, Some(Path::new(key))));
            assert!(r[0].why.contains(&format!("Podman connection \"{name}\"")), "{}", r[0].why);
        }
        let err = resolve(&inputs(&[("XDG_CONFIG_HOME", config_home), ("CONTAINER_CONNECTION", "c")])).unwrap_err();
        assert!(err.to_string().contains("a, b"), "{err}");
    }

    #[test]
    fn context_directories_are_the_sha256_of_the_name() {
        assert_eq!(context_dir_name("default"), "37a8eec1ce19687d132fe29051dca629d164e2c4958ba141d5f4133a33f0688f");
    }
}
