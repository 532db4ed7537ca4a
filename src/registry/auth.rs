//! Registry credentials and `WWW-Authenticate` challenges.
//!
//! Credentials come from the first source that has some: `--username` + `--password-stdin`,
//! `NIXCTR_REGISTRY_USERNAME`/`NIXCTR_REGISTRY_PASSWORD`, Podman's auth file, Docker's
//! config (`credHelpers`, `credsStore`, `auths`); else the push is anonymous. A password is
//! only ever held in [`Secret`], whose `Debug` and `Display` print `<redacted>`.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde::Deserialize;

pub(crate) const USERNAME_ENV: &str = "NIXCTR_REGISTRY_USERNAME";
pub(crate) const PASSWORD_ENV: &str = "NIXCTR_REGISTRY_PASSWORD";

/// A password or token. Never printed.
// pub: used by tests/it/push.rs
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

// pub: used by tests/it/push.rs
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: Secret,
    /// Where they came from, for error messages (`--password-stdin`, a file path, a helper).
    pub source: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &self.password)
            .field("source", &self.source)
            .finish()
    }
}

impl Credentials {
    pub(crate) fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password.expose());
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(raw))
    }

    /// Removes the password (and its base64 forms) from text that came from elsewhere.
    pub(crate) fn redact(&self, text: &str) -> String {
        let password = self.password.expose();
        if password.is_empty() {
            return text.to_string();
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", self.username, password));
        text.replace(&b64, "<redacted>").replace(password, "<redacted>")
    }
}

/// Reads a password from the first line of stdin, for `--password-stdin` (its name is in
/// the messages). The command layer calls this; the registry only takes [`Credentials`].
pub(crate) fn read_password_stdin() -> Result<Secret> {
    let mut password = String::new();
    std::io::stdin().read_line(&mut password).context("cannot read the password from stdin")?;
    let password = password.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        bail!("--password-stdin: stdin was empty (pipe the password in, e.g. `printf %s \"$PW\" | nixctr push …`)");
    }
    Ok(Secret::new(password))
}

/// Where to look; tests and `publish` can point these elsewhere.
#[derive(Debug, Clone, Default)]
pub(crate) struct Lookup {
    pub(crate) env: BTreeMap<String, String>,
}

impl Lookup {
    /// The process environment, for the variables credential lookup reads.
    pub(crate) fn from_env() -> Lookup {
        let names = [
            USERNAME_ENV,
            PASSWORD_ENV,
            "REGISTRY_AUTH_FILE",
            "XDG_RUNTIME_DIR",
            "XDG_CONFIG_HOME",
            "DOCKER_CONFIG",
            "HOME",
            HELPER_TIMEOUT_ENV,
        ];
        let env = names
            .iter()
            .filter_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()).map(|v| (n.to_string(), v)))
            .collect();
        Lookup { env }
    }

    fn var(&self, name: &str) -> Option<&str> {
        self.env.get(name).map(String::as_str)
    }

    fn home(&self) -> Option<PathBuf> {
        self.var("HOME").map(PathBuf::from).or_else(dirs::home_dir)
    }

    /// Podman's auth files, in the order Podman reads them.
    pub(crate) fn podman_auth_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(f) = self.var("REGISTRY_AUTH_FILE") {
            files.push(PathBuf::from(f));
        }
        if let Some(dir) = self.var("XDG_RUNTIME_DIR") {
            files.push(Path::new(dir).join("containers/auth.json"));
        }
        match self.var("XDG_CONFIG_HOME") {
            Some(dir) => files.push(Path::new(dir).join("containers/auth.json")),
            None => files.extend(self.home().map(|h| h.join(".config/containers/auth.json"))),
        }
        files
    }

    pub(crate) fn docker_config(&self) -> Option<PathBuf> {
        match self.var("DOCKER_CONFIG") {
            Some(dir) => Some(Path::new(dir).join("config.json")),
            None => self.home().map(|h| h.join(".docker/config.json")),
        }
    }

    /// Environment variables, then Podman's and Docker's files (not the command line).
    /// A source that cannot be read (bad JSON, a missing helper) is passed over with a note,
    /// so a broken file about other registries does not stop an anonymous push.
    pub(crate) fn find(&self, registry: &str) -> Result<Found> {
        match (self.var(USERNAME_ENV), self.var(PASSWORD_ENV)) {
            (Some(user), Some(pass)) => {
                return Ok(Found {
                    credentials: Some(Credentials {
                        username: user.to_string(),
                        password: Secret::new(pass),
                        source: format!("{USERNAME_ENV}/{PASSWORD_ENV}"),
                    }),
                    notes: Vec::new(),
                })
            }
            (Some(_), None) => bail!("{USERNAME_ENV} is set but {PASSWORD_ENV} is not (set both, or neither)"),
            (None, Some(_)) => bail!("{PASSWORD_ENV} is set but {USERNAME_ENV} is not (set both, or neither)"),
            (None, None) => {}
        }
        let limit = helper_timeout(self.var(HELPER_TIMEOUT_ENV))?;
        let mut notes = Vec::new();
        let mut note = |r: Result<Option<Credentials>>| {
            r.unwrap_or_else(|e| {
                notes.push(format!("{e:#}"));
                None
            })
        };
        let mut found = None;
        for file in self.podman_auth_files() {
            if found.is_none() {
                found = note(read_auth_file(&file).and_then(|c| match c {
                    Some(c) => c.auths_entry(registry, &file),
                    None => Ok(None),
                }));
            }
        }
        if let (None, Some(file)) = (&found, self.docker_config()) {
            let config = match read_auth_file(&file) {
                Ok(c) => c,
                Err(e) => {
                    notes.push(format!("{e:#}"));
                    None
                }
            };
            // A helper that hangs is an error; other failures are passed over with a note.
            let mut note = |r: Result<Option<Credentials>>| match r {
                Err(e) if e.is::<HelperTimedOut>() => Err(e),
                r => Ok(r.unwrap_or_else(|e| {
                    notes.push(format!("{e:#}"));
                    None
                })),
            };
            if let Some(config) = config {
                let shown = file.display();
                if let Some(helper) = config.cred_helpers.get(registry) {
                    let origin = format!("the credHelpers entry for {registry} from {shown}");
                    found = note(run_helper(helper, registry, limit, &origin))?;
                }
                if found.is_none() {
                    found = note(config.auths_entry(registry, &file))?;
                }
                if let (None, Some(store)) = (&found, &config.creds_store) {
                    found = note(run_helper(store, registry, limit, &format!("credsStore from {shown}")))?;
                }
            }
        }
        Ok(Found { credentials: found, notes })
    }
}

/// What credential lookup found, and the sources it had to pass over.
#[derive(Debug, Default)]
pub(crate) struct Found {
    pub(crate) credentials: Option<Credentials>,
    /// Why a source was passed over (shown if the registry then asks for credentials).
    pub(crate) notes: Vec<String>,
}

/// The shape shared by Podman's auth.json and Docker's config.json.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

fn read_auth_file(path: &Path) -> Result<Option<AuthFile>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read credentials file {}", path.display())),
    };
    // serde's message would quote the file's text, which may hold a password.
    let parsed = parse_auth_file(&text)
        .map_err(|_| anyhow!("credentials file {} is not valid JSON (fix or remove it)", path.display()))?;
    Ok(Some(parsed))
}

pub(crate) fn parse_auth_file(text: &str) -> std::result::Result<AuthFile, serde_json::Error> {
    serde_json::from_str(text)
}

impl AuthFile {
    /// The `auths` entry for `registry`: keys may carry a scheme or a `/v1/` suffix.
    fn auths_entry(&self, registry: &str, file: &Path) -> Result<Option<Credentials>> {
        let entry = self.auths.iter().find(|(key, _)| normalize_key(key) == registry).or_else(|| {
            // Docker Hub is stored under its legacy v1 address.
            (registry == "docker.io")
                .then(|| self.auths.iter().find(|(k, _)| normalize_key(k) == "index.docker.io"))
                .flatten()
        });
        let Some((_, entry)) = entry else { return Ok(None) };
        let source = file.display().to_string();
        if let (Some(user), Some(pass)) = (&entry.username, &entry.password) {
            return Ok(Some(Credentials { username: user.clone(), password: Secret::new(pass.clone()), source }));
        }
        let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) else {
            return Ok(None);
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .ok_or_else(|| {
                anyhow!("{source}: the auth entry for {registry:?} is not base64 of user:password (log in again)")
            })?;
        let Some((user, pass)) = decoded.split_once(':') else {
            bail!("{source}: the auth entry for {registry:?} is not base64 of user:password (log in again)");
        };
        Ok(Some(Credentials { username: user.to_string(), password: Secret::new(pass), source }))
    }
}

fn normalize_key(key: &str) -> &str {
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    key.split('/').next().unwrap_or(key)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

/// How long a credential helper may take, unless [`HELPER_TIMEOUT_ENV`] says otherwise. A
/// helper may unlock a keyring or ask a daemon, so this is generous; one that hangs must not
/// hang the push with it.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const HELPER_TIMEOUT_ENV: &str = "NIXCTR_CREDENTIAL_HELPER_TIMEOUT";
/// A helper's answer is a small JSON object; more than this is not one.
const HELPER_OUTPUT_LIMIT: u64 = 64 << 10;

/// A credential helper that did not answer in time: an error of its own, because passing
/// over it silently would turn a stuck keyring into a confusing "requires credentials".
#[derive(Debug, thiserror::Error)]
#[error("credential helper {program} did not answer within {}s for registry {registry} (check the helper, or remove {origin})", .limit.as_secs())]
pub(crate) struct HelperTimedOut {
    program: String,
    registry: String,
    limit: Duration,
    /// Where it is configured, as the fix names it (`credsStore from ~/.docker/config.json`).
    origin: String,
}

/// `NIXCTR_CREDENTIAL_HELPER_TIMEOUT=SECONDS`, else [`HELPER_TIMEOUT`].
fn helper_timeout(value: Option<&str>) -> Result<Duration> {
    let Some(value) = value else { return Ok(HELPER_TIMEOUT) };
    match value.trim().parse::<u64>() {
        Ok(secs) if (1..=3600).contains(&secs) => Ok(Duration::from_secs(secs)),
        _ => bail!("{HELPER_TIMEOUT_ENV}={value:?}: give a whole number of seconds from 1 to 3600"),
    }
}

/// Runs `docker-credential-<name> get` with the registry on stdin. A helper that does not
/// know the registry answers non-zero: that is "no credentials", not an error. The helper
/// runs in a process group of its own, so that one that does not answer within `limit`
/// is killed together with whatever it started; at most [`HELPER_OUTPUT_LIMIT`] of its
/// answer is read.
fn run_helper(name: &str, registry: &str, limit: Duration, origin: &str) -> Result<Option<Credentials>> {
    use std::os::unix::process::CommandExt;
    let program = format!("docker-credential-{name}");
    let mut child = match Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("docker config names credential helper {name:?} but {program} is not on PATH (install it, or remove it from the docker config)")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot run {program}")),
    };
    // The group's id is the helper's pid, which stays ours until the helper is reaped below.
    let group = child.id() as libc::pid_t;
    let kill_group = move || {
        // SAFETY: kill(2) with a negative pid signals that process group; no memory involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits without reading closes the pipe; its exit status says why.
        let _ = stdin.write_all(registry.as_bytes());
    }
    let mut stdout = child.stdout.take().context("the helper's stdout")?;
    let (tx, answered) = std::sync::mpsc::channel();
    // Reads the answer and reaps the helper; the caller's timeout kills the group, which
    // ends both the read and the wait.
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let read = (&mut stdout).take(HELPER_OUTPUT_LIMIT + 1).read_to_end(&mut out);
        if out.len() as u64 > HELPER_OUTPUT_LIMIT {
            kill_group();
        }
        drop(stdout);
        let status = child.wait();
        let _ = tx.send((read.and(status), out));
    });
    let (status, out) = match answered.recv_timeout(limit) {
        Ok(answer) => answer,
        Err(_) => {
            if let Ok(answer) = answered.try_recv() {
                answer
            } else {
                kill_group();
                // The reader thread reaps it; waiting for that keeps the group's id from reuse
                // while it matters, and the kill makes the wait short.
                let _ = answered.recv();
                return Err(HelperTimedOut {
                    program,
                    registry: registry.to_string(),
                    limit,
                    origin: origin.to_string(),
                }
                .into());
            }
        }
    };
    let status = status.with_context(|| format!("cannot run {program}"))?;
    if out.len() as u64 > HELPER_OUTPUT_LIMIT {
        bail!("{program} get answered more than {} KiB, which is not credentials", HELPER_OUTPUT_LIMIT >> 10);
    }
    if !status.success() {
        return Ok(None);
    }
    let answer: HelperAnswer = serde_json::from_slice(&out)
        .map_err(|_| anyhow!("{program} get answered something that is not {{\"Username\",\"Secret\"}} JSON"))?;
    if answer.username == "<token>" {
        // An identity token for an OAuth flow nixctr does not speak; try other sources.
        return Ok(None);
    }
    Ok(Some(Credentials { username: answer.username, password: Secret::new(answer.secret), source: program }))
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: String, service: Option<String>, scope: Option<String> },
}

pub(crate) fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = parse_params(rest);
    let realm = params.get("realm")?.clone();
    Some(Challenge::Bearer { realm, service: params.get("service").cloned(), scope: params.get("scope").cloned() })
}

/// `realm="x",service="y",scope="a:b:pull,push"`: commas may sit inside quotes.
fn parse_params(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        assert_eq!(parse_challenge("Basic realm=\"Registry Realm\""), Some(Challenge::Basic));
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge("bearer realm=https://t/x, service=s"),
            Some(Challenge::Bearer { realm: "https://t/x".into(), service: Some("s".into()), scope: None })
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(parse_challenge("Bearer service=\"x\""), None);
    }

    fn lookup(dir: &Path, extra: &[(&str, &str)]) -> Lookup {
        let mut env = BTreeMap::new();
        env.insert("HOME".to_string(), dir.display().to_string());
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        Lookup { env }
    }

    #[test]
    fn auth_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let l = lookup(dir.path(), &[]);
        assert_eq!(l.find("r.example:5000").unwrap().credentials, None);

        std::fs::create_dir_all(dir.path().join(".docker")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode("dock:pw1");
        std::fs::write(
            dir.path().join(".docker/config.json"),
            format!(r#"{{"auths": {{"https://r.example:5000/v1/": {{"auth": "{b64}"}}}}}}"#),
        )
        .unwrap();
        let found = l.find("r.example:5000").unwrap().credentials.unwrap();
        assert_eq!((found.username.as_str(), found.password.expose()), ("dock", "pw1"));

        std::fs::create_dir_all(dir.path().join(".config/containers")).unwrap();
        std::fs::write(
            dir.path().join(".config/containers/auth.json"),
            r#"{"auths": {"r.example:5000": {"username": "pod", "password": "pw2"}}}"#,
        )
        .unwrap();
        assert_eq!(l.find("r.example:5000").unwrap().credentials.unwrap().username, "pod");
        assert_eq!(l.find("other.example").unwrap().credentials, None);

        let l = lookup(dir.path(), &[(USERNAME_ENV, "envuser"), (PASSWORD_ENV, "pw3")]);
        assert_eq!(l.find("r.example:5000").unwrap().credentials.unwrap().username, "envuser");
        let l = lookup(dir.path(), &[(USERNAME_ENV, "envuser")]);
        assert!(l.find("r.example:5000").unwrap_err().to_string().contains(PASSWORD_ENV));
    }

    #[test]
    fn bad_auth_file_does_not_echo_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("auth.json");
        std::fs::write(&file, r#"{"auths": {"x": {"password": "hunter2""#).unwrap();
        let l = lookup(dir.path(), &[("REGISTRY_AUTH_FILE", file.to_str().unwrap())]);
        let found = l.find("x").unwrap();
        assert!(found.credentials.is_none());
        let note = found.notes.join("\n");
        assert!(note.contains("not valid JSON") && !note.contains("hunter2"), "{note}");
    }

    #[test]
    fn helper_timeout_is_whole_seconds() {
        assert_eq!(helper_timeout(None).unwrap(), HELPER_TIMEOUT);
        assert_eq!(helper_timeout(Some("5")).unwrap(), Duration::from_secs(5));
        for bad in ["", "0", "-1", "1.5", "30s", "99999"] {
            let err = helper_timeout(Some(bad)).unwrap_err().to_string();
            assert!(err.contains(HELPER_TIMEOUT_ENV) && err.contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn secrets_are_redacted() {
        let c = Credentials { username: "u".into(), password: Secret::new("hunter2"), source: "test".into() };
        assert!(!format!("{c:?}").contains("hunter2"));
        assert_eq!(format!("{}", c.password), "<redacted>");
        let header = c.basic_header();
        assert_eq!(c.redact(&format!("got hunter2 and {header}")), "got <redacted> and Basic <redacted>");
    }
}
