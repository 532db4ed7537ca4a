//! nix's remote builders (`--builder ssh-ng://…`): the machines nix may send derivations to,
//! written in nix's own machine-spec syntax, and the ssh client setup they need inside the
//! build container.
//!
//! nix 2.26 cannot parse a port in an `ssh-ng://` URI, so every builder is handed to nix under
//! a host alias (`nixctr-builder-HASH`) that an ssh client config written here resolves: host,
//! port, identity, known hosts (`HostKeyAlias`, so `[host]:port` entries match), strict host
//! key checking, no prompt, a connect timeout. The identity is a secret: like the cache
//! secrets (`cache::Phase`), it is in the container only for the `nix-store --realise` exec, in
//! a root-only directory that build users cannot read, removed right after; never in a process
//! argument, an environment variable or the container's config.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;

use super::cache::{random_hex, secrets_tar, SECRETS_PARENT};
use super::cache_settings::read_secret;
use super::text::{
    builder_trouble, built_on, error_excerpt, nix_cmd, no_machine_for, ssh_trouble, store_info, strings, BuilderTrouble,
};
use crate::engine::{ContainerGuard, OutputMode};
use crate::progress::Progress;

/// How long ssh may take to reach a builder: a dead one is named well within 30 s.
const CONNECT_TIMEOUT_SECONDS: u32 = 10;

/// The builder settings, resolved from flags and `nixctr.toml`.
#[derive(Debug, Clone, Default)]
pub(crate) struct BuilderSettings {
    /// Machine specs as written: `URI [SYSTEMS [KEY [JOBS [SPEED [FEATURES [MANDATORY [HOSTKEY]]]]]]]`.
    pub(crate) specs: Vec<String>,
    /// The ssh identity of builders whose spec names none.
    pub(crate) key: Option<PathBuf>,
    /// `None`: `~/.ssh/known_hosts`.
    pub(crate) known_hosts: Option<PathBuf>,
    /// Build nothing in the container (`--max-jobs 0`).
    pub(crate) only: bool,
}

/// One builder, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    /// The URI as written: how the user is told about it.
    pub(crate) uri: String,
    scheme: String,
    user: Option<String>,
    host: String,
    port: Option<u16>,
    /// `?…` of the URI, kept for nix.
    query: String,
    /// nix systems (`aarch64-linux`); empty: the container's own.
    pub(crate) systems: Vec<String>,
    key: Option<PathBuf>,
    /// Fields 4 to 7 as written (`-` where unset).
    rest: [String; 4],
    /// Field 8: a base64 host public key.
    host_key: Option<String>,
}

impl BuilderSettings {
    pub(crate) fn is_active(&self) -> bool {
        !self.specs.is_empty()
    }

    /// The builders, parsed; a spec nix would refuse is refused here, with what to write.
    pub(crate) fn machines(&self) -> Result<Vec<Machine>> {
        let mut machines = Vec::new();
        for spec in &self.specs {
            // nix separates machines with newlines or `;`.
            for one in spec.split(['\n', ';']).map(str::trim).filter(|s| !s.is_empty() && !s.starts_with('#')) {
                machines.push(Machine::parse(one, self.key.as_deref())?);
            }
        }
        Ok(machines)
    }

    /// Checks what can be checked on this machine before any engine work: the specs, the
    /// identities (present, not readable by others), the known hosts file.
    pub(crate) fn check(&self) -> Result<()> {
        if !self.is_active() {
            if self.only {
                bail!("--builders-only needs a builder: --builder URI or `builders` in nixctr.toml");
            }
            return Ok(());
        }
        for machine in self.machines()? {
            let key = machine.key.as_ref().with_context(|| {
                format!(
                    "builder {}: no ssh identity: pass --builder-key FILE (or `builder-key` in nixctr.toml), \
                     or name the key in the machine spec's third field",
                    machine.uri
                )
            })?;
            read_secret(key, "builder key").with_context(|| format!("builder {}", machine.uri))?;
        }
        let known_hosts = self.known_hosts_path()?;
        std::fs::metadata(&known_hosts).with_context(|| {
            format!(
                "cannot read the builders' known hosts {} (--builder-known-hosts FILE; add a builder's host key \
                 with `ssh-keyscan -p PORT HOST >> FILE`, after checking its fingerprint)",
                known_hosts.display()
            )
        })?;
        Ok(())
    }

    fn known_hosts_path(&self) -> Result<PathBuf> {
        match &self.known_hosts {
            Some(path) => Ok(path.clone()),
            None => dirs::home_dir()
                .map(|h| h.join(".ssh/known_hosts"))
                .context("no home directory for ~/.ssh/known_hosts: pass --builder-known-hosts FILE"),
        }
    }
}

impl Machine {
    /// One machine spec (`ssh-ng://nix@host:2222 x86_64-linux,aarch64-linux - 8 2 big-parallel`).
    pub(crate) fn parse(spec: &str, default_key: Option<&Path>) -> Result<Machine> {
        let fields: Vec<&str> = spec.split_whitespace().collect();
        let field = |i: usize| fields.get(i).copied().filter(|f| *f != "-" && !f.is_empty());
        if fields.len() > 8 {
            bail!("builder {spec:?}: more than 8 fields (URI SYSTEMS KEY JOBS SPEED FEATURES MANDATORY HOSTKEY)");
        }
        let written = fields.first().copied().unwrap_or_default();
        let (scheme, rest) = match written.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("ssh", written),
        };
        if scheme != "ssh-ng" && scheme != "ssh" {
            bail!("builder {written:?}: nixctr reaches builders over ssh: write ssh-ng://[USER@]HOST[:PORT]");
        }
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, format!("?{q}")),
            None => (rest, String::new()),
        };
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((user, hostport)) => (Some(user.to_string()), hostport),
            None => (None, authority),
        };
        let (host, port) = split_port(hostport).with_context(|| format!("builder {written:?}"))?;
        let valid_host = !host.is_empty()
            && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
            && !host.starts_with('-');
        if !valid_host || user.as_deref().is_some_and(|u| u.is_empty() || u.starts_with('-') || u.contains(' ')) {
            bail!("builder {written:?}: not ssh-ng://[USER@]HOST[:PORT]");
        }
        let systems: Vec<String> =
            field(1).map(|s| s.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect()).unwrap_or_default();
        for system in &systems {
            if !system.contains('-') {
                bail!("builder {written}: {system:?} is not a nix system (x86_64-linux, aarch64-linux)");
            }
        }
        let key = field(2).map(PathBuf::from).or(default_key.map(Path::to_path_buf));
        if let Some(jobs) = field(3) {
            jobs.parse::<u32>().map_err(|_| anyhow::anyhow!("builder {written}: max jobs {jobs:?} is not a number"))?;
        }
        if let Some(speed) = field(4) {
            speed
                .parse::<f64>()
                .map_err(|_| anyhow::anyhow!("builder {written}: speed factor {speed:?} is not a number"))?;
        }
        let host_key = match field(7) {
            Some(b64) => {
                let text = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .filter(|t| t.split_whitespace().count() >= 2)
                    .with_context(|| {
                        format!(
                            "builder {written}: the host key field is not base64 of a public key line \
                             (`base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`)"
                        )
                    })?;
                Some(text.trim().to_string())
            }
            None => None,
        };
        let rest = [3, 4, 5, 6].map(|i| field(i).unwrap_or("-").to_string());
        Ok(Machine {
            uri: written.to_string(),
            scheme: scheme.to_string(),
            user,
            host: host.to_string(),
            port,
            query,
            systems,
            key,
            rest,
            host_key,
        })
    }

    /// Whether it builds for `system` (a builder that names none builds the container's own).
    pub(crate) fn builds(&self, system: &str) -> bool {
        self.systems.iter().any(|s| s == system)
    }

    /// The host name nix is given: the same for the same builder and key in every run, so
    /// nix's per-machine load locks (in the store volume) count concurrent builds together,
    /// and different ones never share a lock or an ssh config entry.
    fn alias(&self) -> String {
        use sha2::Digest;
        let key = self.key.as_ref().map(|k| k.display().to_string()).unwrap_or_default();
        let digest = sha2::Sha256::digest(format!("{}\0{key}", self.uri).as_bytes());
        format!("nixctr-builder-{}", &hex::encode(digest)[..12])
    }

    /// What ssh looks the host key up as: `[host]:port` as `ssh-keyscan -p` and ssh write it.
    fn host_key_alias(&self) -> String {
        match self.port {
            Some(port) if port != 22 => format!("[{}]:{port}", self.host),
            _ => self.host.clone(),
        }
    }

    /// The URI nix is given: the alias in place of host and port.
    fn nix_uri(&self) -> String {
        let user = self.user.as_ref().map(|u| format!("{u}@")).unwrap_or_default();
        format!("{}://{user}{}{}", self.scheme, self.alias(), self.query)
    }

    /// The machine spec nix is given: the identity and host key are in the ssh config.
    fn nix_spec(&self) -> String {
        let systems = if self.systems.is_empty() { "-".to_string() } else { self.systems.join(",") };
        format!("{} {systems} - {} -", self.nix_uri(), self.rest.join(" "))
    }

    fn ssh_config(&self, dir: &str, key_file: Option<&str>) -> String {
        let mut lines = vec![
            format!("Host {}", self.alias()),
            format!("  HostName {}", self.host),
            format!("  Port {}", self.port.unwrap_or(22)),
            format!("  HostKeyAlias {}", self.host_key_alias()),
            format!("  UserKnownHostsFile {dir}/known_hosts"),
            "  GlobalKnownHostsFile /dev/null".to_string(),
            "  StrictHostKeyChecking yes".to_string(),
            "  UpdateHostKeys no".to_string(),
            "  CheckHostIP no".to_string(),
            "  BatchMode yes".to_string(),
            format!("  ConnectTimeout {CONNECT_TIMEOUT_SECONDS}"),
            "  ServerAliveInterval 15".to_string(),
            "  IdentitiesOnly yes".to_string(),
        ];
        if let Some(user) = &self.user {
            lines.push(format!("  User {user}"));
        }
        if let Some(file) = key_file {
            lines.push(format!("  IdentityFile {dir}/{file}"));
        }
        lines.join("\n") + "\n"
    }
}

/// `host[:port]` or `[v6]:port`.
fn split_port(hostport: &str) -> Result<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (host, after) = rest.split_once(']').context("an unclosed [ in the host")?;
        (host, after.strip_prefix(':'))
    } else if hostport.matches(':').count() == 1 {
        let (host, port) = hostport.split_once(':').unwrap_or((hostport, ""));
        (host, Some(port))
    } else {
        (hostport, None)
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p > 0).with_context(|| format!("port {p:?} is not a port"))?),
        None => None,
    };
    Ok((host, port))
}

/// The builders of one nix container.
pub(crate) struct Builders {
    settings: BuilderSettings,
    machines: Vec<Machine>,
}

/// The ssh setup put in the container for one `nix-store --realise`, and the settings that use
/// it. It must be removed with [`StagedBuilders::remove`] once that exec is done.
pub(crate) struct StagedBuilders {
    dir: String,
    /// `NIX_CONFIG` lines: `builders`, `builders-use-substitutes`.
    pub(crate) nix_config: Vec<String>,
    /// `NIX_SSHOPTS`: the config file's path (not a secret).
    pub(crate) env: Vec<String>,
}

impl StagedBuilders {
    /// Removes the identities. An error means they may still be there: the caller stops.
    pub(crate) async fn remove(self, guard: &ContainerGuard) -> Result<()> {
        let cmd = strings(&["rm", "-rf", &self.dir]);
        let out = guard
            .exec(&cmd, &[], None, OutputMode::Captured)
            .await
            .context("cannot remove the builder keys from the container")?;
        if out.exit_code != 0 {
            bail!("cannot remove the builder keys from the container (rm exit code {})", out.exit_code);
        }
        Ok(())
    }
}

/// One check of `nixctr doctor`: what was found, or what is wrong and what fixes it.
pub(crate) struct Probe {
    pub(crate) name: String,
    pub(crate) result: std::result::Result<String, (String, String)>,
}

/// What became of a builder in one realise: derivations it built, trouble nix reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct BuilderUse {
    /// URI as written -> derivations built there.
    pub(crate) built: BTreeMap<String, usize>,
    /// Derivations built in the container itself.
    pub(crate) local: usize,
    /// Each builder's trouble, with the fix: `builder URI: …`.
    pub(crate) trouble: Vec<String>,
    /// Each derivation built, and the builder's URI as written (`None`: here).
    pub(crate) derivations: Vec<(String, Option<String>)>,
}

impl Builders {
    /// `None` when no builder is configured.
    pub(crate) fn new(settings: &BuilderSettings) -> Result<Option<Builders>> {
        settings.check()?;
        if !settings.is_active() {
            return Ok(None);
        }
        Ok(Some(Builders { settings: settings.clone(), machines: settings.machines()? }))
    }

    pub(crate) fn machines(&self) -> &[Machine] {
        &self.machines
    }

    /// Whether nothing is built in the container (`--builders-only`).
    pub(crate) fn only(&self) -> bool {
        self.settings.only
    }

    /// The builders that build `system`.
    pub(crate) fn for_system(&self, system: &str) -> Vec<&Machine> {
        self.machines.iter().filter(|m| m.builds(system)).collect()
    }

    /// Puts the identities, known hosts and ssh config in the container (a fresh root-only
    /// directory); `substitutes`: whether builders fetch from binary caches themselves.
    pub(crate) async fn stage(&self, guard: &ContainerGuard, substitutes: bool) -> Result<StagedBuilders> {
        let dir = format!("{SECRETS_PARENT}/builders-{}", random_hex());
        let files = self.files(&dir)?;
        let borrowed: Vec<(&str, String)> = files.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
        let tar = secrets_tar(dir.trim_start_matches('/'), &borrowed)?;
        let body = futures::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(tar)) });
        guard.upload(body).await.context("cannot put the builder keys into the container")?;
        Ok(StagedBuilders {
            nix_config: self.nix_config(substitutes),
            env: vec![format!("NIX_SSHOPTS=-F {dir}/ssh_config")],
            dir,
        })
    }

    /// `builders` and `builders-use-substitutes` for nix.
    fn nix_config(&self, substitutes: bool) -> Vec<String> {
        let specs: Vec<String> = self.machines.iter().map(Machine::nix_spec).collect();
        vec![format!("builders = {}", specs.join(" ; ")), format!("builders-use-substitutes = {substitutes}")]
    }

    /// The files of the staged directory: one identity per key file, known hosts, ssh config.
    fn files(&self, dir: &str) -> Result<Vec<(String, String)>> {
        let mut files: Vec<(String, String)> = Vec::new();
        let mut keys: Vec<(PathBuf, String)> = Vec::new();
        let mut config = String::new();
        for machine in &self.machines {
            let name = match &machine.key {
                Some(path) => match keys.iter().find(|(p, _)| p == path) {
                    Some((_, name)) => Some(name.clone()),
                    None => {
                        let name = format!("key-{}", keys.len());
                        let mut text =
                            read_secret(path, "builder key").with_context(|| format!("builder {}", machine.uri))?;
                        if !text.ends_with('\n') {
                            text.push('\n');
                        }
                        files.push((name.clone(), text));
                        keys.push((path.clone(), name.clone()));
                        Some(name)
                    }
                },
                None => None,
            };
            config.push_str(&machine.ssh_config(dir, name.as_deref()));
        }
        let path = self.settings.known_hosts_path()?;
        let mut known = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the builders' known hosts {}", path.display()))?;
        if !known.is_empty() && !known.ends_with('\n') {
            known.push('\n');
        }
        for machine in &self.machines {
            if let Some(key) = &machine.host_key {
                known.push_str(&format!("{} {key}\n", machine.host_key_alias()));
            }
        }
        files.push(("known_hosts".to_string(), known));
        files.push(("ssh_config".to_string(), config));
        Ok(files)
    }

    /// What nix's realise log says about the builders.
    pub(crate) fn usage(&self, log: &[String]) -> BuilderUse {
        let mut usage = BuilderUse::default();
        for machine in &self.machines {
            usage.built.insert(machine.uri.clone(), 0);
        }
        let mut seen: Vec<(String, BuilderTrouble)> = Vec::new();
        // A remote build's log repeats its `building '…'` line, as if it were built here.
        let mut remote: Vec<&str> = Vec::new();
        for (n, line) in log.iter().enumerate() {
            match built_on(line) {
                Some((drv, Some(uri))) => {
                    remote.push(drv);
                    let m = self.by_nix_uri(uri);
                    let shown = m.map_or(uri.to_string(), |m| m.uri.clone());
                    *usage.built.entry(shown.clone()).or_default() += 1;
                    usage.derivations.push((drv.to_string(), Some(shown)));
                }
                Some((drv, None)) if !remote.contains(&drv) => {
                    usage.local += 1;
                    usage.derivations.push((drv.to_string(), None));
                }
                _ => {}
            }
            // Only news when no builder may build the system (one listing none builds the
            // container's own): else the builders' own trouble says why.
            let unlisted =
                |s: &&str| self.for_system(s).is_empty() && !self.machines.iter().any(|m| m.systems.is_empty());
            if let Some(system) = no_machine_for(line).filter(unlisted) {
                let trouble = format!(
                    "no builder builds {system}{}: name one whose machine spec lists it (`ssh-ng://HOST {system}`)",
                    if self.settings.only { " and --builders-only builds nothing here" } else { "" }
                );
                if !usage.trouble.contains(&trouble) {
                    usage.trouble.push(trouble);
                }
            }
            if let Some((uri, trouble)) = builder_trouble(line, &log[..n]) {
                if let Some(m) = self.by_nix_uri(uri) {
                    if !seen.iter().any(|(u, t)| *u == m.uri && *t == trouble) {
                        seen.push((m.uri.clone(), trouble));
                        usage.trouble.push(self.explain(m, trouble, line));
                    }
                }
            }
        }
        usage
    }

    fn by_nix_uri(&self, uri: &str) -> Option<&Machine> {
        self.machines.iter().find(|m| m.nix_uri() == uri || m.uri == uri)
    }

    /// nix's complaint about builder `m`, with what fixes it.
    fn explain(&self, m: &Machine, trouble: BuilderTrouble, line: &str) -> String {
        let fix = self.fix(m, trouble);
        // nix names the alias: the user knows the builder by its URI and host.
        let said = self.unalias(m, line.trim().trim_start_matches("error: "));
        format!("builder {}: {fix} (nix: {said})", m.uri)
    }

    /// `text` with nix's alias of `m` replaced by the URI or host the user wrote.
    fn unalias(&self, m: &Machine, text: &str) -> String {
        let host = match m.port {
            Some(port) => format!("{}:{port}", m.host),
            None => m.host.clone(),
        };
        text.replace(&m.nix_uri(), &m.uri).replace(&m.alias(), &host)
    }

    /// What to do about `trouble` with builder `m`.
    fn fix(&self, m: &Machine, trouble: BuilderTrouble) -> String {
        let known_hosts =
            self.settings.known_hosts_path().map(|p| p.display().to_string()).unwrap_or_else(|_| "FILE".to_string());
        let port = m.port.map(|p| format!("-p {p} ")).unwrap_or_default();
        match trouble {
            BuilderTrouble::Unreachable => format!(
                "it does not answer within {CONNECT_TIMEOUT_SECONDS} s: is it up, is {}:{} right, and can the build \
                 container reach it (--network host for a builder on this machine's loopback)?",
                m.host,
                m.port.unwrap_or(22)
            ),
            BuilderTrouble::KeyRefused => {
                "it refused the ssh key: add the public half of --builder-key to the builder's authorized_keys, \
                 or pass the right key"
                    .to_string()
            }
            BuilderTrouble::UnknownHostKey => format!(
                "its host key is not in {known_hosts}: check the fingerprint, then `ssh-keyscan {port}{} >> \
                 {known_hosts}` (or --builder-known-hosts FILE)",
                m.host
            ),
            BuilderTrouble::ChangedHostKey => format!(
                "its host key is NOT the one in {known_hosts}: someone may be impersonating it, or it was \
                 reinstalled; nixctr never accepts a changed key: check, then replace its line in {known_hosts}"
            ),
            BuilderTrouble::Other => "nix could not use it".to_string(),
        }
    }

    /// Each builder's health, for `nixctr doctor`: the nix daemon answers through ssh (so it is
    /// reachable, its host key is known and the key accepted) and trusts this user; and each
    /// system its spec lists builds a throwaway derivation there.
    pub(crate) async fn probe(&self, guard: &ContainerGuard) -> Result<Vec<Probe>> {
        let staged = self.stage(guard, false).await?;
        let mut probes = Vec::new();
        for m in &self.machines {
            let ping = nix_cmd(&["store", "info", "--json", "--store", &m.nix_uri()]);
            let out = guard.exec(&ping, &staged.env, None, OutputMode::Captured).await;
            let answer = match out {
                Ok(out) if out.exit_code == 0 => match store_info(&out.stdout) {
                    (version, Some(false)) => Err((
                        format!("nix {} answers, but does not trust this user", version.as_deref().unwrap_or("?")),
                        "add the ssh user to trusted-users in the builder's nix.conf".to_string(),
                    )),
                    (version, _) => Ok(format!(
                        "reachable, host key known, key accepted: nix {} answers",
                        version.as_deref().unwrap_or("(version not said)")
                    )),
                },
                Ok(out) => {
                    let text = out.stderr_tail.join("\n");
                    let fix = self.fix(m, ssh_trouble(&text));
                    Err((self.unalias(m, &error_excerpt(&out.stderr_tail)), fix))
                }
                Err(e) => Err((format!("{e:#}"), "run `nixctr -v doctor` to see the engine calls".to_string())),
            };
            let answered = answer.is_ok();
            probes.push(Probe { name: m.uri.clone(), result: answer });
            if !answered {
                continue;
            }
            for system in &m.systems {
                probes.push(Probe {
                    name: format!("{} {system}", m.uri),
                    result: self.try_build(guard, &staged, m, system).await,
                });
            }
        }
        staged.remove(guard).await?;
        Ok(probes)
    }

    /// Builds a throwaway derivation of `system` on machine `i` alone.
    async fn try_build(
        &self,
        guard: &ContainerGuard,
        staged: &StagedBuilders,
        m: &Machine,
        system: &str,
    ) -> std::result::Result<String, (String, String)> {
        let expr = format!(
            "derivation {{ name = \"nixctr-doctor-{}\"; system = \"{system}\"; builder = \"/bin/sh\"; \
             args = [ \"-c\" \"echo ok > $out\" ]; }}",
            random_hex()
        );
        let cmd = strings(&["nix-build", "--no-out-link", "--max-jobs", "0", "-E", &expr]);
        let mut env = staged.env.clone();
        env.push(format!("NIX_CONFIG=builders = {}\nbuilders-use-substitutes = false", m.nix_spec()));
        match guard.exec(&cmd, &env, Some("/tmp"), OutputMode::Captured).await {
            Ok(out) if out.exit_code == 0 => Ok("builds a derivation of this system".to_string()),
            Ok(out) => Err((
                self.unalias(m, &error_excerpt(&out.stderr_tail)),
                format!("drop {system} from its machine spec, or make the builder build it (binfmt, extra-platforms)"),
            )),
            Err(e) => Err((format!("{e:#}"), "run `nixctr -v doctor` to see the engine calls".to_string())),
        }
    }

    /// Says, after a realise, where derivations were built and which builders failed.
    pub(crate) fn report(&self, log: &[String], failed: bool, progress: &Progress) -> BuilderUse {
        let usage = self.usage(log);
        for (drv, on) in &usage.derivations {
            let on = on.as_ref().map_or("here".to_string(), |uri| format!("on {uri}"));
            progress.debug(format!("built {drv} {on}"));
        }
        let mut parts: Vec<String> = usage.built.iter().map(|(uri, n)| format!("{n} on {uri}")).collect();
        parts.push(format!("{} here", usage.local));
        progress.info(format!("builders: derivations built {}", parts.join(", ")));
        if !failed {
            for trouble in &usage.trouble {
                progress.warn(format!("{trouble}; built elsewhere instead"));
            }
        }
        usage
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_parsed_in_nix_syntax() {
        let m = Machine::parse("ssh-ng://nix@builder-1 x86_64-linux,aarch64-linux - 8 2 big-parallel", None).unwrap();
        assert_eq!((m.user.as_deref(), m.host.as_str(), m.port), (Some("nix"), "builder-1", None));
        assert_eq!(m.systems, vec!["x86_64-linux", "aarch64-linux"]);
        let alias = m.alias();
        assert!(alias.starts_with("nixctr-builder-") && alias.len() == 27, "{alias}");
        assert_eq!(m.nix_spec(), format!("ssh-ng://nix@{alias} x86_64-linux,aarch64-linux - 8 2 big-parallel - -"));
        let bare = Machine::parse("builder", Some(Path::new("/k"))).unwrap();
        assert_eq!((bare.scheme.as_str(), bare.key.as_deref()), ("ssh", Some(Path::new("/k"))));
        assert_eq!(bare.nix_spec(), format!("ssh://{} - - - - - - -", bare.alias()));
        // Another key, another alias: ssh takes the first config entry of a host name.
        let other = Machine::parse("builder", Some(Path::new("/other"))).unwrap();
        assert_ne!(bare.alias(), other.alias());
        assert_eq!(bare.alias(), Machine::parse("builder", Some(Path::new("/k"))).unwrap().alias());
        assert!(Machine::parse("http://x", None).unwrap_err().to_string().contains("ssh-ng://"));
        assert!(Machine::parse("ssh-ng://x:notaport", None).is_err());
        assert!(Machine::parse("ssh-ng://x amd64", None).is_err());
        assert!(Machine::parse("ssh-ng://-oProxyCommand=x", None).is_err());
    }

    #[test]
    fn ports_become_an_alias_with_a_host_key_alias() {
        let m = Machine::parse("ssh-ng://root@127.0.0.1:2222?remote-store=local x86_64-linux /keys/b", None).unwrap();
        assert_eq!(m.port, Some(2222));
        assert_eq!(m.nix_uri(), format!("ssh-ng://root@{}?remote-store=local", m.alias()));
        assert_eq!(m.host_key_alias(), "[127.0.0.1]:2222");
        let config = m.ssh_config("/nixctr/builders-x", Some("key-0"));
        let host = format!("Host {}", m.alias());
        for line in [
            host.as_str(),
            "  HostName 127.0.0.1",
            "  Port 2222",
            "  HostKeyAlias [127.0.0.1]:2222",
            "  UserKnownHostsFile /nixctr/builders-x/known_hosts",
            "  StrictHostKeyChecking yes",
            "  BatchMode yes",
            "  ConnectTimeout 10",
            "  IdentityFile /nixctr/builders-x/key-0",
        ] {
            assert!(config.lines().any(|l| l == line), "{line:?} missing in\n{config}");
        }
        let v6 = Machine::parse("ssh-ng://[::1]:22", None).unwrap();
        assert_eq!((v6.host.as_str(), v6.host_key_alias().as_str()), ("::1", "::1"));
    }

    #[test]
    fn several_builders_and_the_nix_settings() {
        let settings = BuilderSettings {
            specs: vec!["ssh-ng://a x86_64-linux; ssh-ng://b:2 aarch64-linux".to_string()],
            ..Default::default()
        };
        let builders = Builders { machines: settings.machines().unwrap(), settings };
        let (a, b) = (builders.machines[0].alias(), builders.machines[1].alias());
        assert_eq!(
            builders.nix_config(true),
            vec![
                format!("builders = ssh-ng://{a} x86_64-linux - - - - - - ; ssh-ng://{b} aarch64-linux - - - - - -"),
                "builders-use-substitutes = true".to_string()
            ]
        );
        assert_eq!(builders.for_system("aarch64-linux").len(), 1);
        let log: Vec<String> = [
            "building '/nix/store/a-x.drv' on 'ssh-ng://B'...",
            "building '/nix/store/a-x.drv'...",
            "building '/nix/store/b-y.drv'...",
            "building '/nix/store/c-z.drv' on 'ssh-ng://B'...",
            "ssh: connect to host 127.0.0.1 port 1: Connection refused",
            "cannot build on 'ssh-ng://A': error: failed to start SSH connection to 'A': ssh: connect to host 127.0.0.1 port 1: Connection refused",
            // nix gives up on the derivation: no other machine; a builder for it was named.
            "required (system, features): (x86_64-linux, [])",
        ]
        .iter()
        .map(|s| s.replace('A', &a).replace('B', &b))
        .collect();
        let usage = builders.usage(&log);
        assert_eq!(usage.built["ssh-ng://b:2"], 2);
        assert_eq!(usage.built["ssh-ng://a"], 0);
        assert_eq!(usage.local, 1);
        assert_eq!(usage.trouble.len(), 1);
        assert!(usage.trouble[0].starts_with("builder ssh-ng://a: it does not answer"), "{}", usage.trouble[0]);
        assert!(usage.trouble[0].contains("cannot build on 'ssh-ng://a'"), "{}", usage.trouble[0]);
        assert!(!usage.trouble[0].contains(&a), "{}", usage.trouble[0]);
        // A system no builder lists is named as such.
        let usage = builders.usage(&["required (system, features): (riscv64-linux, [])".to_string()]);
        assert_eq!(usage.trouble.len(), 1);
        assert!(usage.trouble[0].starts_with("no builder builds riscv64-linux: "), "{}", usage.trouble[0]);
    }

    #[test]
    fn builders_only_needs_a_builder() {
        let settings = BuilderSettings { only: true, ..Default::default() };
        assert!(settings.check().unwrap_err().to_string().contains("--builders-only needs a builder"));
        let settings = BuilderSettings { specs: vec!["ssh-ng://x".to_string()], ..Default::default() };
        assert!(settings.check().unwrap_err().to_string().contains("--builder-key FILE"));
    }
}
