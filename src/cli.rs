//! The command line: global flags and one `Command` enum. Each flag's doc comment is its help.
//! Settings that can also come from `nixctr.toml` are `Option`s here; `commands` turns them
//! into plain `settings::Inputs`, which `settings` resolves without knowing clap.

use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// The command line of this process; exits with clap's usage error (code 2) when it does not parse.
pub fn parse() -> Parsed {
    Parsed::from_matches(&Cli::command().get_matches()).unwrap_or_else(|e| e.exit())
}

/// The parsed command line, and what only clap's matches know about where a value came from.
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    /// `--engine` was not given and its value came from `NIXCTR_ENGINE`.
    pub engine_from_env: bool,
}

impl Parsed {
    fn from_matches(matches: &ArgMatches) -> Result<Parsed, clap::Error> {
        let engine_from_env = matches.value_source("engine") == Some(ValueSource::EnvVariable);
        Ok(Parsed { cli: Cli::from_arg_matches(matches)?, engine_from_env })
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "nixctr",
    version,
    about = "Build nix container images with only a Docker or Podman engine, and push them to OCI registries"
)]
pub struct Cli {
    /// Project root (default: nearest ancestor holding nixctr.toml or .git)
    #[arg(short = 'C', long = "directory", global = true, value_name = "DIR")]
    pub directory: Option<PathBuf>,

    /// Engine API address: unix:///path.sock, tcp://host:port (TLS with DOCKER_TLS_VERIFY and
    /// DOCKER_CERT_PATH), http://host:port, ssh://user@host[:port][/path/to/engine.sock]
    /// (default: --context, DOCKER_HOST, DOCKER_CONTEXT, the current Docker context,
    /// CONTAINER_CONNECTION, CONTAINER_HOST, nixctr.toml, then the usual sockets)
    #[arg(short = 'H', long, global = true, value_name = "URL", env = "NIXCTR_ENGINE")]
    pub engine: Vec<String>,

    /// Docker context to reach the engine through (`docker context ls`; `default`: none)
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,

    /// Image that provides nix (default: nixos/nix:2.33.3)
    #[arg(long, global = true, value_name = "IMAGE", env = "NIXCTR_NIX_IMAGE")]
    pub nix_image: Option<String>,

    /// When to pull the nix image
    #[arg(long, global = true, value_enum, value_name = "WHEN")]
    pub pull: Option<PullPolicy>,

    /// nixpkgs to build against: a flake reference, or a directory on this machine
    /// (default: nixpkgs from the flake registry)
    #[arg(long, global = true, value_name = "REF", env = "NIXCTR_NIXPKGS")]
    pub nixpkgs: Option<String>,

    /// Platforms to build for, OS/ARCH[/VARIANT], comma-separated (default: the engine's own)
    #[arg(long, global = true, value_name = "PLATFORMS", env = "DOCKER_DEFAULT_PLATFORM")]
    pub platform: Option<String>,

    /// Use a throwaway nix store instead of the cache volume
    #[arg(long, global = true)]
    pub no_cache: bool,

    #[command(flatten)]
    pub cache: CacheArgs,

    #[command(flatten)]
    pub builders: BuilderArgs,

    /// Print nothing but results and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Say more about what happens (why a version source was passed over, engine calls)
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The shared nix binary cache: where nix substitutes from, and where built containers go.
#[derive(Debug, Args, Clone, Default)]
pub struct CacheArgs {
    /// A binary cache nix may download from, besides the image's own (repeatable; replaces
    /// `substituters` in nixctr.toml)
    #[arg(long = "substituter", global = true, value_name = "URL")]
    pub substituters: Vec<String>,

    /// A key the caches' paths must be signed with, NAME:BASE64 (repeatable; replaces
    /// `trusted-public-keys` in nixctr.toml)
    #[arg(long = "trusted-public-key", global = true, value_name = "KEY")]
    pub trusted_public_keys: Vec<String>,

    /// After each build, sign and copy the image's closure and its build-time closure to this
    /// store (http(s)://…, s3://bucket?…, file:///…, ssh-ng://…)
    #[arg(long, global = true, value_name = "STORE-URL", env = "NIXCTR_CACHE_TO")]
    pub cache_to: Option<String>,

    /// nix secret key to sign uploads with (mode 600)
    #[arg(long, global = true, value_name = "FILE", env = "NIXCTR_SIGNING_KEY_FILE")]
    pub signing_key: Option<PathBuf>,

    /// netrc file with the login of an authenticated HTTP cache (mode 600)
    #[arg(long, global = true, value_name = "FILE")]
    pub netrc: Option<PathBuf>,

    /// Fail (exit 1) when the upload to --cache-to fails (default: a warning)
    #[arg(long, global = true)]
    pub cache_required: bool,

    /// Network of the nix container (default: the engine's default)
    #[arg(long, global = true, value_enum, value_name = "MODE")]
    pub network: Option<Network>,
}

/// nix's remote builders: machines nix sends derivations to over ssh.
#[derive(Debug, Args, Clone, Default)]
pub struct BuilderArgs {
    /// A remote builder, in nix's machine-spec syntax: ssh-ng://[USER@]HOST[:PORT] [SYSTEMS [KEY
    /// [JOBS [SPEED [FEATURES]]]]] (repeatable; replaces `builders` in nixctr.toml)
    #[arg(long = "builder", global = true, value_name = "URI")]
    pub builders: Vec<String>,

    /// ssh identity for the builders (mode 600; a machine spec's own KEY field wins)
    #[arg(long, global = true, value_name = "FILE", env = "NIXCTR_BUILDER_KEY")]
    pub builder_key: Option<PathBuf>,

    /// The builders' host keys (default: ~/.ssh/known_hosts); an unknown or changed key is refused
    #[arg(long, global = true, value_name = "FILE")]
    pub builder_known_hosts: Option<PathBuf>,

    /// Build nothing in the build container: every derivation goes to a builder (--max-jobs 0)
    #[arg(long, global = true)]
    pub builders_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Network {
    /// The engine's bridge network
    Bridge,
    /// The machine's own network (reaches services on its 127.0.0.1)
    Host,
    /// No network at all
    None,
}

impl From<Network> for crate::nix::Network {
    fn from(n: Network) -> Self {
        match n {
            Network::Bridge => Self::Bridge,
            Network::Host => Self::Host,
            Network::None => Self::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PullPolicy {
    /// Pull only when the engine does not have the image
    Missing,
    /// Pull every time
    Always,
    /// Never pull; fail when the image is missing
    Never,
}

impl From<PullPolicy> for crate::engine::PullPolicy {
    fn from(p: PullPolicy) -> Self {
        match p {
            PullPolicy::Missing => Self::Missing,
            PullPolicy::Always => Self::Always,
            PullPolicy::Never => Self::Never,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build containers/NAME/default.nix into a docker-archive
    Build(BuildArgs),
    /// Print the version of the app a container ships
    Version(VersionArgs),
    /// Push a docker-archive (.tar or .tar.gz) to a registry; several as one image index
    Push(PushArgs),
    /// Build a container and push it as REGISTRY/NAMESPACE/NAME:TAG
    Publish(PublishArgs),
    /// Write the SBOM of each container's image (built if needed) from its nix closure
    Sbom(SbomArgs),
    /// List or remove the nix store volumes
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Remove containers left behind by nixctr runs that were killed
    Gc(GcArgs),
    /// Print the selected container names (for a CI matrix: --json)
    List(ListArgs),
    /// Check the engine, the platforms it runs, the nix image, the project, the registry and
    /// the binary cache; each problem with its fix (exit 1 when there is one)
    Doctor(DoctorArgs),
    /// Check an image's cosign signature with a public key, and say what is attached to it
    /// (signed or not): exit 1 when no signature verifies
    Verify(VerifyArgs),
    /// Write an image already pushed (REF@DIGEST) into GitOps files, as publish --pin does
    Pin(PinCommandArgs),
    /// Print a shell completion script
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff)
    Man,
}

/// Which containers: names, `--all`, or `--changed REV`.
#[derive(Debug, Args, Clone, Default)]
pub struct Selection {
    /// Container names (directories under containers/)
    #[arg(value_name = "NAME", conflicts_with_all = ["all", "changed"])]
    pub names: Vec<String>,

    /// Every containers/*/default.nix
    #[arg(long, conflicts_with = "changed")]
    pub all: bool,

    /// The containers changed between REV and the working tree (all of them when nixctr.toml,
    /// flake.nix or flake.lock changed)
    #[arg(long, value_name = "REV")]
    pub changed: Option<String>,
}

/// How many containers build, and what stops them.
#[derive(Debug, Args, Clone)]
pub struct ManyArgs {
    /// Derivations nix builds at once (default: the engine's CPU count)
    #[arg(short = 'j', long = "max-jobs", value_name = "N")]
    pub max_jobs: Option<usize>,

    /// Stop at the first container that fails (default: build all that can be built)
    #[arg(long)]
    pub fail_fast: bool,

    /// Print one JSON object per container: {name, version, status, tag, tags, ref, digest, archive, error, seconds}
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub select: Selection,

    /// Print one JSON array (for a CI matrix)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub select: Selection,

    #[command(flatten)]
    pub many: ManyArgs,

    /// Where to write the archive of one container (default: NAME.tar.gz in the working directory; - for stdout)
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Also load the image into the engine and print its name
    #[arg(long)]
    pub load: bool,
}

/// An SBOM format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum SbomFormat {
    /// CycloneDX 1.6 JSON (NAME.cdx.json)
    #[default]
    Cyclonedx,
    /// SPDX 2.3 JSON (NAME.spdx.json)
    Spdx,
}

impl From<SbomFormat> for crate::sbom::Format {
    fn from(f: SbomFormat) -> Self {
        match f {
            SbomFormat::Cyclonedx => Self::CycloneDx,
            SbomFormat::Spdx => Self::Spdx,
        }
    }
}

#[derive(Debug, Args)]
pub struct SbomArgs {
    #[command(flatten)]
    pub select: Selection,

    /// Where to write the SBOM: a file for one container, a directory for several
    /// (default: NAME.cdx.json or NAME.spdx.json in the working directory, beside the archive
    /// the build writes there)
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// SBOM format
    #[arg(long, value_enum, default_value = "cyclonedx")]
    pub format: SbomFormat,

    /// Derivations nix builds at once (default: the engine's CPU count)
    #[arg(short = 'j', long = "max-jobs", value_name = "N")]
    pub max_jobs: Option<usize>,

    /// Stop at the first container that fails (default: build all that can be built)
    #[arg(long)]
    pub fail_fast: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionFrom {
    /// default.nix, then the Dockerfile, then nixpkgs
    Auto,
    /// Only nixpkgs' own version of the package
    Nixpkgs,
}

impl From<VersionFrom> for crate::version::From {
    fn from(f: VersionFrom) -> Self {
        match f {
            VersionFrom::Auto => Self::Auto,
            VersionFrom::Nixpkgs => Self::Nixpkgs,
        }
    }
}

#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Container names, or nixpkgs attributes
    #[arg(value_name = "NAME", conflicts_with_all = ["all", "changed"])]
    pub names: Vec<String>,

    /// Every containers/*/default.nix
    #[arg(long, conflicts_with = "changed")]
    pub all: bool,

    /// The containers changed between REV and the working tree
    #[arg(long, value_name = "REV")]
    pub changed: Option<String>,

    /// Where to look for the version
    #[arg(long, value_enum, default_value = "auto")]
    pub from: VersionFrom,

    /// Print one JSON object per name
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ManifestFormat {
    /// OCI image manifest
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2
    Docker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Compression {
    #[default]
    Gzip,
    /// OCI format only
    Zstd,
}

impl From<ManifestFormat> for crate::registry::ManifestFormat {
    fn from(f: ManifestFormat) -> Self {
        match f {
            ManifestFormat::Oci => Self::Oci,
            ManifestFormat::Docker => Self::Docker,
        }
    }
}

impl From<Compression> for crate::registry::Compression {
    fn from(c: Compression) -> Self {
        match c {
            Compression::Gzip => Self::Gzip,
            Compression::Zstd => Self::Zstd,
        }
    }
}

/// How to reach a registry and log in; push, publish and doctor share it.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryLogin {
    /// Allow plain http (and no certificate check) for this registry
    #[arg(long)]
    pub insecure: bool,

    /// PEM file of a private certificate authority to trust
    #[arg(long, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,

    /// Registry user name (the password comes from --password-stdin)
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,

    /// Read the registry password from standard input
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
}

/// How to reach and log in to a registry; shared by push and publish.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// Manifest format to push
    #[arg(long, value_enum, default_value = "oci")]
    pub format: ManifestFormat,

    /// Layer compression
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: Compression,

    #[command(flatten)]
    pub login: RegistryLogin,

    /// Layers uploaded at once
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,

    /// Upload blobs in chunks of this size (8MiB, 4M, 5MB; 64KiB to 1GiB) instead of whole,
    /// or as the registry turns out to need (default: `chunk-size` under
    /// `[registries."HOST"]` in nixctr.toml)
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// docker-archives to push (.tar or .tar.gz; `-`: one uncompressed docker-archive on
    /// standard input, entries in any order); several become one image index, each entry's
    /// platform read from its config
    #[arg(value_name = "ARCHIVE", required = true, num_args = 1..)]
    pub archives: Vec<PathBuf>,

    /// Destination: host[:port]/path:tag
    #[arg(value_name = "REF")]
    pub reference: String,

    /// Also tag the image TAG in REF's repository (repeatable): one manifest, several tags
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    #[command(flatten)]
    pub select: Selection,

    #[command(flatten)]
    pub many: ManyArgs,

    /// App version for the tag of one container (default: what `nixctr version NAME` finds)
    #[arg(long, value_name = "V")]
    pub version: Option<String>,

    /// Registry host[:port] (or `registry` in nixctr.toml)
    #[arg(long = "registry", value_name = "HOST", env = "NIXCTR_REGISTRY")]
    pub registry_host: Option<String>,

    /// Repository namespace (or `namespace` in nixctr.toml)
    #[arg(long, value_name = "PATH")]
    pub namespace: Option<String>,

    /// The whole tag, instead of the templates (`tag` or `tags` in nixctr.toml); repeat it
    /// for several tags on one image
    #[arg(long, value_name = "TAG")]
    pub tag: Vec<String>,

    /// Publish even when containers/NAME has uncommitted changes
    #[arg(long)]
    pub allow_dirty: bool,

    /// Overwrite a tag that names another image in the registry (a tag that names the same
    /// image is never pushed again)
    #[arg(long, conflicts_with = "skip_existing")]
    pub force: bool,

    /// Count a tag that already exists as done, whatever it names (the others are pushed)
    #[arg(long)]
    pub skip_existing: bool,

    /// Publish this archive (of one container) instead of building
    #[arg(long, value_name = "PATH")]
    pub archive: Option<PathBuf>,

    /// Sign each image pushed, and its attestations, with this key as cosign does (an
    /// unencrypted PKCS#8 PEM ECDSA P-256 key only its owner may read; or `sign-key` in
    /// nixctr.toml)
    #[arg(long, value_name = "FILE", env = "NIXCTR_SIGN_KEY_FILE")]
    pub sign_key: Option<PathBuf>,

    /// Attach SLSA v1 provenance to each image pushed (or `provenance = true` in nixctr.toml)
    #[arg(long)]
    pub provenance: bool,

    /// Attach the SBOM of each image pushed (or `sbom = true` in nixctr.toml)
    #[arg(long)]
    pub sbom: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,

    #[command(flatten)]
    pub pin: PinArgs,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The image: host[:port]/path:tag or host[:port]/path@sha256:…
    #[arg(value_name = "REF")]
    pub reference: String,

    /// The public key (cosign.pub: a PEM ECDSA P-256 public key)
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,

    #[command(flatten)]
    pub login: RegistryLogin,
}

/// Where a pushed image's tag and digest are written.
#[derive(Debug, Args, Clone, Default)]
pub struct PinArgs {
    /// After a push, write its tag (and digest) into this file or glob: kustomization
    /// `images:` entries and manifests' `image:` strings naming the repository (repeatable;
    /// or `pin` in nixctr.toml)
    #[arg(long, value_name = "PATH|GLOB")]
    pub pin: Vec<String>,

    /// Write the digest too where the file had none (`digest:`, `@sha256:…`)
    #[arg(long)]
    pub pin_digest: bool,

    /// Commit the files --pin changed (never pushed)
    #[arg(long)]
    pub pin_commit: bool,
}

#[derive(Debug, Args)]
pub struct PinCommandArgs {
    /// The image pushed: REGISTRY/NAMESPACE/NAME:TAG@sha256:…
    #[arg(value_name = "REF@DIGEST")]
    pub reference: String,

    #[command(flatten)]
    pub pin: PinArgs,

    /// Print one JSON object: {ref, digest, pinned, commits}
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Registry host[:port] to check (or `registry` in nixctr.toml)
    #[arg(long = "registry", value_name = "HOST", env = "NIXCTR_REGISTRY")]
    pub registry_host: Option<String>,

    #[command(flatten)]
    pub login: RegistryLogin,

    /// Print one JSON object: {ok, sections: [{name, checks: [{name, ok, detail, fix}], skipped}]}
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Also remove containers of runs still going, or made on another machine
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the nix store volumes; with a binary cache configured, also whether it holds each
    /// container's current output
    Ls {
        /// Containers to look up in the binary cache (default: all)
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Copy containers already built (in the store volume) to the --cache-to cache, without
    /// building
    Push {
        #[arg(value_name = "NAME", required = true, num_args = 1..)]
        names: Vec<String>,
    },
    /// Remove the store volume of the current nix image (or all with --all)
    Rm {
        /// Remove every nixctr store volume
        #[arg(long)]
        all: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_from(args: &[&str]) -> Parsed {
        Parsed::from_matches(&Cli::command().try_get_matches_from(args).unwrap()).unwrap()
    }

    /// The only test that sets `NIXCTR_ENGINE`: every case runs in this one function.
    #[test]
    fn engine_source_is_the_flag_or_the_environment() {
        std::env::remove_var("NIXCTR_ENGINE");
        let parsed = parse_from(&["nixctr", "-H", "unix:///a.sock", "gc"]);
        assert_eq!((parsed.cli.engine, parsed.engine_from_env), (vec!["unix:///a.sock".to_string()], false));
        std::env::set_var("NIXCTR_ENGINE", "unix:///env.sock");
        let parsed = parse_from(&["nixctr", "gc"]);
        assert_eq!((parsed.cli.engine, parsed.engine_from_env), (vec!["unix:///env.sock".to_string()], true));
        for args in [&["nixctr", "--engine", "unix:///a.sock", "gc"][..], &["nixctr", "gc", "-H", "unix:///a.sock"]] {
            let parsed = parse_from(args);
            assert_eq!(
                (parsed.cli.engine, parsed.engine_from_env),
                (vec!["unix:///a.sock".to_string()], false),
                "{args:?}"
            );
        }
        // Empty names no engine: `settings` drops empty values.
        std::env::set_var("NIXCTR_ENGINE", "");
        let parsed = parse_from(&["nixctr", "gc"]);
        assert!(parsed.cli.engine.iter().all(String::is_empty), "{:?}", parsed.cli.engine);
        std::env::remove_var("NIXCTR_ENGINE");
    }
}
