//! Settings resolved once: command-line flags win over the environment, which wins over
//! `nixctr.toml` at the project root, which wins over the defaults. The command line arrives
//! as plain [`Inputs`] (no parser types here); the rest of the program reads only [`Settings`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::engine::address::{self, TlsFiles};
use crate::engine::{EngineAddress, PullPolicy};
use crate::engines::EngineChoice;
use crate::nix::{BuilderSettings, CacheSettings, Network, NixOptions, Nixpkgs};
use crate::platform::Platform;
use crate::registry::auth::read_password_stdin;
use crate::registry::cache::BlobCache;
use crate::registry::{parse_chunk_size, Compression, Credentials, ManifestFormat, RegistryConfig};
use crate::version;

pub(crate) const DEFAULT_NIX_IMAGE: &str = "nixos/nix:2.33.3";
pub(crate) const DEFAULT_TAG_TEMPLATE: &str = "v{version}-{sha}-nix";
pub(crate) const CONFIG_FILE: &str = "nixctr.toml";

/// `nixctr.toml`. Unknown keys are errors, so a typo never silently does nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct FileConfig {
    pub(crate) nix_image: Option<String>,
    pub(crate) nixpkgs: Option<String>,
    pub(crate) engine: Option<String>,
    /// Several engines (the builds spread over them); not with `engine`.
    pub(crate) engines: Option<Vec<String>>,
    /// TLS files for a `tcp://` engine named here or by `--engine`/`DOCKER_HOST`.
    pub(crate) engine_tls: Option<EngineTlsConfig>,
    /// Platform (`linux/arm64`) -> the engine that builds it.
    #[serde(default)]
    pub(crate) platform_engines: BTreeMap<String, String>,
    pub(crate) pull: Option<PullPolicy>,
    /// One platform to build for (`linux/arm64`).
    pub(crate) platform: Option<String>,
    /// Several: one archive each, one image index when published.
    pub(crate) platforms: Option<Vec<String>>,
    pub(crate) registry: Option<String>,
    pub(crate) namespace: Option<String>,
    /// The tag template; not with `tags`.
    pub(crate) tag: Option<String>,
    /// Several tag templates: one image, several tags.
    pub(crate) tags: Option<Vec<String>>,
    /// Registries reached over plain http (host or host:port).
    #[serde(default)]
    pub(crate) insecure_registries: Vec<String>,
    /// `[registries."host[:port]"]`: how to push to one registry.
    #[serde(default)]
    pub(crate) registries: BTreeMap<String, RegistryFileConfig>,
    /// Container name -> nixpkgs attribute, for `nixctr version`.
    #[serde(default)]
    pub(crate) packages: BTreeMap<String, String>,
    /// Binary caches nix may download from.
    #[serde(default)]
    pub(crate) substituters: Vec<String>,
    #[serde(default)]
    pub(crate) trusted_public_keys: Vec<String>,
    /// The store URL built containers are copied to.
    pub(crate) cache_to: Option<String>,
    /// Relative to the project root.
    pub(crate) signing_key: Option<PathBuf>,
    /// Relative to the project root.
    pub(crate) netrc: Option<PathBuf>,
    pub(crate) cache_required: Option<bool>,
    pub(crate) network: Option<Network>,
    /// Remote builders, in nix's machine-spec syntax.
    pub(crate) builders: Option<Vec<String>>,
    /// Relative to the project root.
    pub(crate) builder_key: Option<PathBuf>,
    /// Relative to the project root.
    pub(crate) builder_known_hosts: Option<PathBuf>,
    pub(crate) builders_only: Option<bool>,
    /// Files and globs (relative to the project root) publish writes pushed images into.
    #[serde(default)]
    pub(crate) pin: Vec<String>,
    /// The key publish signs with; relative to the project root.
    pub(crate) sign_key: Option<PathBuf>,
    /// Attach provenance, an SBOM, to each image published.
    pub(crate) provenance: Option<bool>,
    pub(crate) sbom: Option<bool>,
}

/// `[registries."host[:port]"]` in nixctr.toml.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(crate) struct RegistryFileConfig {
    /// Upload blobs in chunks of this size (`"8MiB"`), as `--chunk-size`.
    pub(crate) chunk_size: Option<String>,
}

/// `[engine-tls]`: paths relative to the project root.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EngineTlsConfig {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The project root, when one was found (push needs none).
    pub(crate) root: Option<PathBuf>,
    /// The engines, resolved (URL, TLS files, ssh identity, and why).
    pub(crate) engines: EngineChoice,
    /// The nix container: image, store, nixpkgs, binary caches.
    pub(crate) nix: NixOptions,
    /// The platforms to build for; empty: the engine's own.
    pub(crate) platforms: Vec<Platform>,
    pub(crate) quiet: bool,
    pub(crate) verbose: bool,
    pub(crate) registry: Option<String>,
    pub(crate) namespace: Option<String>,
    /// The tag templates (one unless `tags` names several), each `{version}` and `{sha}` filled in.
    pub(crate) tag_templates: Vec<String>,
    pub(crate) insecure_registries: Vec<String>,
    /// `[registries.…]` of nixctr.toml, checked when a registry is used.
    pub(crate) registries: BTreeMap<String, RegistryFileConfig>,
    pub(crate) packages: BTreeMap<String, String>,
    /// `pin` of nixctr.toml: files and globs relative to the project root.
    pub(crate) pin: Vec<String>,
    /// `sign-key` of nixctr.toml, resolved against the project root.
    pub(crate) sign_key: Option<PathBuf>,
    pub(crate) provenance: bool,
    pub(crate) sbom: bool,
}

/// What the command line says (its flags, and the environment variables read in their place),
/// as plain values: `None` or empty where it says nothing. The command-line layer fills this in.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inputs {
    /// `-C DIR`.
    pub(crate) directory: Option<PathBuf>,
    /// `--engine`, repeated (or `NIXCTR_ENGINE`).
    pub(crate) engines: Vec<String>,
    /// Whether [`Inputs::engines`] came from `NIXCTR_ENGINE` rather than the flag.
    pub(crate) engines_from_env: bool,
    pub(crate) context: Option<String>,
    pub(crate) nix_image: Option<String>,
    pub(crate) pull: Option<PullPolicy>,
    pub(crate) nixpkgs: Option<String>,
    /// Comma-separated platforms (`--platform`, `DOCKER_DEFAULT_PLATFORM`).
    pub(crate) platform: Option<String>,
    pub(crate) no_cache: bool,
    /// The binary-cache flags; each replaces its key in `nixctr.toml` (`required` can only
    /// turn the requirement on).
    pub(crate) cache: CacheSettings,
    /// The builder flags; each replaces its key in `nixctr.toml` (`only` can only turn it on).
    pub(crate) builders: BuilderSettings,
    pub(crate) quiet: bool,
    pub(crate) verbose: bool,
}

/// How to reach and log in to a registry, as the command line says it.
#[derive(Debug, Clone)]
pub(crate) struct RegistryInputs {
    pub(crate) format: ManifestFormat,
    pub(crate) compression: Compression,
    pub(crate) insecure: bool,
    pub(crate) ca_cert: Option<PathBuf>,
    pub(crate) username: Option<String>,
    pub(crate) password_stdin: bool,
    /// Layers uploaded at once.
    pub(crate) jobs: usize,
    /// `--chunk-size`, as written.
    pub(crate) chunk_size: Option<String>,
}

impl Settings {
    pub(crate) fn resolve(inputs: &Inputs) -> Result<Settings> {
        let root = match &inputs.directory {
            Some(dir) => {
                if !dir.is_dir() {
                    bail!(
                        "-C {}: not a directory (pass the project root, the folder holding containers/)",
                        dir.display()
                    );
                }
                Some(dir.canonicalize().with_context(|| format!("cannot resolve {}", dir.display()))?)
            }
            None => find_root(&std::env::current_dir().context("cannot read the working directory")?),
        };
        let file = match &root {
            Some(root) => load_config(&root.join(CONFIG_FILE))?,
            None => FileConfig::default(),
        };
        let nixpkgs = match inputs.nixpkgs.clone().or(file.nixpkgs.clone()) {
            None => Nixpkgs::Flake("nixpkgs".to_string()),
            // A directory given in nixctr.toml is relative to the project root, on the
            // command line relative to the working directory.
            Some(value) => {
                let base = if inputs.nixpkgs.is_some() { None } else { root.as_deref() };
                parse_nixpkgs(&value, base)?
            }
        };
        let (engines, platform_engines) = resolve_engines(inputs, &file, root.as_deref())?;
        let platforms = match (&inputs.platform, &file.platform, &file.platforms) {
            (Some(list), _, _) => Platform::parse_list(list).context("--platform (or DOCKER_DEFAULT_PLATFORM)")?,
            (None, Some(_), Some(_)) => bail!("{CONFIG_FILE}: set `platform` or `platforms`, not both"),
            (None, Some(one), None) => vec![Platform::parse(one).with_context(|| format!("{CONFIG_FILE}: platform"))?],
            (None, None, Some(list)) => {
                Platform::parse_list(&list.join(",")).with_context(|| format!("{CONFIG_FILE}: platforms"))?
            }
            (None, None, None) => Vec::new(),
        };
        let in_root = |p: PathBuf| match &root {
            Some(root) => root.join(p),
            None => p,
        };
        let args = &inputs.cache;
        let cache = CacheSettings {
            substituters: if args.substituters.is_empty() { file.substituters } else { args.substituters.clone() },
            trusted_public_keys: if args.trusted_public_keys.is_empty() {
                file.trusted_public_keys
            } else {
                args.trusted_public_keys.clone()
            },
            cache_to: args.cache_to.clone().filter(|u| !u.is_empty()).or(file.cache_to),
            signing_key: args
                .signing_key
                .clone()
                .filter(|p| !p.as_os_str().is_empty())
                .or(file.signing_key.map(in_root)),
            netrc: args.netrc.clone().or(file.netrc.map(in_root)),
            required: args.required || file.cache_required.unwrap_or(false),
            network: args.network.or(file.network),
        };
        let args = &inputs.builders;
        let builders = BuilderSettings {
            specs: if args.specs.is_empty() { file.builders.unwrap_or_default() } else { args.specs.clone() },
            key: args.key.clone().or(file.builder_key.map(in_root)),
            known_hosts: args.known_hosts.clone().or(file.builder_known_hosts.map(in_root)),
            only: args.only || file.builders_only.unwrap_or(false),
        };
        let sign_key = file.sign_key.map(in_root);
        let nix = NixOptions {
            image: inputs.nix_image.clone().or(file.nix_image).unwrap_or_else(|| DEFAULT_NIX_IMAGE.to_string()),
            pull: inputs.pull.or(file.pull).unwrap_or(PullPolicy::Missing),
            nixpkgs,
            no_cache: inputs.no_cache,
            cache,
            builders,
        };
        Ok(Settings {
            root,
            platforms,
            engines: EngineChoice { first: engines.first().cloned(), all: engines, by_platform: platform_engines },
            nix,
            quiet: inputs.quiet,
            verbose: inputs.verbose,
            registry: file.registry,
            namespace: file.namespace,
            tag_templates: match (file.tag, file.tags) {
                (Some(_), Some(_)) => bail!("{CONFIG_FILE}: set `tag` or `tags`, not both"),
                (Some(one), None) => vec![one],
                (None, Some(list)) if list.is_empty() => {
                    bail!("{CONFIG_FILE}: `tags` is empty: name at least one tag template, e.g. [\"v{{version}}-{{sha}}-nix\"]")
                }
                (None, Some(list)) => list,
                (None, None) => vec![DEFAULT_TAG_TEMPLATE.to_string()],
            },
            insecure_registries: file.insecure_registries,
            registries: file.registries,
            packages: file.packages,
            pin: file.pin,
            sign_key,
            provenance: file.provenance.unwrap_or(false),
            sbom: file.sbom.unwrap_or(false),
        })
    }

    /// How to reach registries: the flags, nixctr.toml's insecure registries, and the password
    /// from stdin (read here, once).
    pub(crate) fn registry_config(&self, args: &RegistryInputs) -> Result<RegistryConfig> {
        let mut config = RegistryConfig {
            format: args.format,
            compression: args.compression,
            insecure: args.insecure,
            insecure_registries: self.insecure_registries.clone(),
            ca_cert: args.ca_cert.clone(),
            credentials: None,
            jobs: args.jobs,
            blob_cache: BlobCache::default_path(),
            chunk_size: match &args.chunk_size {
                Some(text) => Some(parse_chunk_size(text).map_err(|e| anyhow::anyhow!("--chunk-size {text:?}: {e}"))?),
                None => None,
            },
            chunk_sizes: chunk_sizes(&self.registries)?,
        };
        // Checked before stdin is read: a refused command consumes no password.
        config.check()?;
        config.credentials = match &args.username {
            Some(username) if args.password_stdin => Some(Credentials {
                username: username.clone(),
                password: read_password_stdin()?,
                source: "--password-stdin".to_string(),
            }),
            Some(_) => bail!("--username needs --password-stdin"),
            None => None,
        };
        Ok(config)
    }

    /// Where `nixctr version` looks: the project's files, then nixpkgs on the first engine.
    pub(crate) fn version_sources(&self) -> version::Sources<'_> {
        version::Sources {
            root: self.root.as_deref(),
            packages: &self.packages,
            engine: self.engines.first.as_ref(),
            platform: self.platforms.first(),
            nix: &self.nix,
        }
    }

    /// The project root, or an error that says how to name one.
    pub(crate) fn project_root(&self) -> Result<&Path> {
        match &self.root {
            Some(root) => Ok(root),
            None => bail!(
                "no project found: no {CONFIG_FILE} or .git in the working directory or its parents (pass -C DIR)"
            ),
        }
    }
}

/// `chunk-size` of each `[registries."host[:port]"]` that sets one.
fn chunk_sizes(registries: &BTreeMap<String, RegistryFileConfig>) -> Result<BTreeMap<String, u64>> {
    let mut sizes = BTreeMap::new();
    for (registry, config) in registries {
        if let Some(text) = &config.chunk_size {
            let size = parse_chunk_size(text)
                .map_err(|e| anyhow::anyhow!("{CONFIG_FILE}: [registries.{registry:?}] chunk-size {text:?}: {e}"))?;
            sizes.insert(registry.clone(), size);
        }
    }
    Ok(sizes)
}

/// The engines, by the address precedence (see `engine::address`), and `[platform-engines]`
/// keyed by the platform's normal name (`linux/arm64`, whether written `linux/aarch64` or not).
fn resolve_engines(
    given: &Inputs,
    file: &FileConfig,
    root: Option<&Path>,
) -> Result<(Vec<EngineAddress>, BTreeMap<String, EngineAddress>)> {
    let mut inputs = address::Inputs::from_env();
    inputs.flag = given.engines.iter().filter(|e| !e.is_empty()).cloned().collect();
    inputs.flag_from_env = given.engines_from_env;
    inputs.context = given.context.clone().filter(|c| !c.is_empty());
    inputs.file_engines = match (&file.engine, &file.engines) {
        (Some(_), Some(_)) => bail!("{CONFIG_FILE}: set `engine` or `engines`, not both"),
        (Some(one), None) => vec![one.clone()],
        (None, Some(list)) => list.clone(),
        (None, None) => Vec::new(),
    };
    inputs.file_tls = file.engine_tls.as_ref().map(|tls| {
        let at = |p: &Path| root.map_or_else(|| p.to_path_buf(), |r| r.join(p));
        TlsFiles {
            ca: at(&tls.ca),
            cert: at(&tls.cert),
            key: at(&tls.key),
            source: format!("[engine-tls] in {CONFIG_FILE}"),
        }
    });
    let engines = address::resolve(&inputs)?;
    let mut platform_engines = BTreeMap::new();
    for (platform, (key, url)) in platform_engine_keys(&file.platform_engines)? {
        let why = format!("[platform-engines] {key:?} in {CONFIG_FILE}");
        platform_engines.insert(platform, address::configured(&inputs, url, why)?);
    }
    Ok((engines, platform_engines))
}

/// `[platform-engines]` by the platform's normal name (engines look a platform up by it), with
/// the key as written and its engine URL. A key that names no platform, or the same platform
/// as another key, is refused.
fn platform_engine_keys(table: &BTreeMap<String, String>) -> Result<BTreeMap<String, (&str, &str)>> {
    let mut keys: BTreeMap<String, (&str, &str)> = BTreeMap::new();
    for (key, url) in table {
        let Some(platform) = Platform::parse(key).ok().filter(Platform::is_known) else {
            bail!(
                "{CONFIG_FILE}: [platform-engines] {key:?}: not a platform (OS/ARCH[/VARIANT] with a known \
                 architecture, e.g. linux/amd64, linux/arm64, linux/arm/v7)"
            );
        };
        let name = platform.to_string();
        if let Some((other, _)) = keys.get(&name) {
            bail!("{CONFIG_FILE}: [platform-engines] {other:?} and {key:?} both name {name}: keep one");
        }
        keys.insert(name, (key, url));
    }
    Ok(keys)
}

/// The nearest ancestor of `start` holding `nixctr.toml` or `.git`.
pub(crate) fn find_root(start: &Path) -> Option<PathBuf> {
    start.ancestors().find(|dir| dir.join(CONFIG_FILE).is_file() || dir.join(".git").exists()).map(Path::to_path_buf)
}

pub(crate) fn load_config(path: &Path) -> Result<FileConfig> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(FileConfig::default()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    parse_config(&text).map_err(|e| anyhow::anyhow!("{}:{e}", path.display()))
}

/// Parses `nixctr.toml` text; the error names the line and column.
pub(crate) fn parse_config(text: &str) -> std::result::Result<FileConfig, String> {
    toml::from_str(text).map_err(|e| {
        let (line, col) = e
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                (line, col)
            })
            .unwrap_or((1, 1));
        format!("{line}:{col}: {}", e.message())
    })
}

/// A value that names an existing directory (or starts with `/`, `./`, `../`) is a local
/// nixpkgs; anything else is a flake reference.
pub(crate) fn parse_nixpkgs(value: &str, base: Option<&Path>) -> Result<Nixpkgs> {
    let looks_local = value.starts_with('/') || value.starts_with("./") || value.starts_with("../") || value == ".";
    let path = match base {
        Some(base) => base.join(value),
        None => PathBuf::from(value),
    };
    if path.is_dir() {
        let path =
            path.canonicalize().with_context(|| format!("cannot resolve nixpkgs directory {}", path.display()))?;
        return Ok(Nixpkgs::Local(path));
    }
    if looks_local {
        bail!("nixpkgs {value:?}: no such directory (give a flake reference or an existing directory)");
    }
    Ok(Nixpkgs::Flake(value.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_line_and_key() {
        let err = parse_config("nix-image = \"x\"\nregistyr = \"r\"\n").unwrap_err();
        assert!(err.starts_with("2:1:"), "{err}");
        assert!(err.contains("registyr"), "{err}");
    }

    #[test]
    fn packages_table_parses() {
        let cfg = parse_config("[packages]\nntfy = \"ntfy-sh\"\n").unwrap();
        assert_eq!(cfg.packages["ntfy"], "ntfy-sh");
    }

    #[test]
    fn engine_keys_parse() {
        let cfg = parse_config(
            "engines = [\"ssh://a@b\", \"tcp://c:2376\"]\n[engine-tls]\nca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n\
             [platform-engines]\n\"linux/arm64\" = \"ssh://pi@arm\"\n",
        )
        .unwrap();
        assert_eq!(cfg.engines.unwrap().len(), 2);
        assert_eq!(cfg.engine_tls.unwrap().key, PathBuf::from("k.pem"));
        assert_eq!(cfg.platform_engines["linux/arm64"], "ssh://pi@arm");
    }

    #[test]
    fn builder_keys_parse() {
        let cfg = parse_config(
            "builders = [\"ssh-ng://nix@builder-1 x86_64-linux - 8 2 big-parallel\", \"ssh-ng://b:2222\"]\n\
             builder-key = \"keys/builder\"\nbuilder-known-hosts = \"known_hosts\"\nbuilders-only = true\n",
        )
        .unwrap();
        assert_eq!(cfg.builders.unwrap().len(), 2);
        assert_eq!(cfg.builder_key, Some(PathBuf::from("keys/builder")));
        assert_eq!(cfg.builder_known_hosts, Some(PathBuf::from("known_hosts")));
        assert_eq!(cfg.builders_only, Some(true));
    }

    fn table(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn platform_engine_keys_are_normalised() {
        let written =
            table(&[("linux/aarch64", "ssh://pi@arm"), ("Linux/x86_64", "tcp://x:2376"), ("linux/arm/v7", "ssh://b")]);
        let keys = platform_engine_keys(&written).unwrap();
        assert_eq!(keys.keys().collect::<Vec<_>>(), ["linux/amd64", "linux/arm/v7", "linux/arm64"]);
        assert_eq!(keys["linux/arm64"], ("linux/aarch64", "ssh://pi@arm"));
    }

    #[test]
    fn platform_engine_keys_that_name_no_platform_are_refused() {
        for bad in ["linux/potato", "linux", "arm64", "linux/arm64/v8/x"] {
            let err = platform_engine_keys(&table(&[("linux/amd64", "tcp://x:2376"), (bad, "ssh://b")]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(&format!("nixctr.toml: [platform-engines] {bad:?}: not a platform (")), "{err}");
        }
    }

    #[test]
    fn platform_engine_keys_naming_one_platform_twice_are_refused() {
        let err = platform_engine_keys(&table(&[("linux/aarch64", "ssh://a"), ("linux/arm64/v8", "ssh://b")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"linux/aarch64\" and \"linux/arm64/v8\" both name linux/arm64"), "{err}");
    }

    #[test]
    fn registries_table_sets_chunk_sizes() {
        let cfg = parse_config(
            "insecure-registries = [\"r:5000\"]\n[registries.\"r:5000\"]\nchunk-size = \"8MiB\"\n[registries.\"ghcr.io\"]\n",
        )
        .unwrap();
        let sizes = chunk_sizes(&cfg.registries).unwrap();
        assert_eq!(sizes, BTreeMap::from([("r:5000".to_string(), 8 << 20)]));
        let cfg = parse_config("[registries.\"r:5000\"]\nchunk-size = \"1TB\"\n").unwrap();
        let err = chunk_sizes(&cfg.registries).unwrap_err().to_string();
        assert_eq!(
            err,
            "nixctr.toml: [registries.\"r:5000\"] chunk-size \"1TB\": give a size from 64.0 KiB to 1.0 GiB, such as 8MiB"
        );
        let err = parse_config("[registries.\"r:5000\"]\nchunk-sise = \"8MiB\"\n").unwrap_err();
        assert!(err.contains("chunk-sise"), "{err}");
    }

    #[test]
    fn attachment_keys_parse() {
        let cfg = parse_config("sign-key = \"keys/cosign.key\"\nprovenance = true\nsbom = true\n").unwrap();
        assert_eq!(cfg.sign_key.as_deref(), Some(Path::new("keys/cosign.key")));
        assert_eq!((cfg.provenance, cfg.sbom), (Some(true), Some(true)));
    }

    #[test]
    fn malformed_value_is_an_error() {
        let err = parse_config("pull = \"sometimes\"\n").unwrap_err();
        assert!(err.starts_with("1:"), "{err}");
    }

    #[test]
    fn flake_refs_stay_refs() {
        assert_eq!(
            parse_nixpkgs("github:NixOS/nixpkgs/nixos-24.11", None).unwrap(),
            Nixpkgs::Flake("github:NixOS/nixpkgs/nixos-24.11".into())
        );
        assert!(parse_nixpkgs("./no/such/dir", None).is_err());
    }
}
