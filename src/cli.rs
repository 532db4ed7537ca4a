//! The command line: global flags and one `Command` enum. Each flag's doc comment is its help.
//! Settings that can also come from `nixctr.toml` are `Option`s here; `settings` resolves them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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

    /// Engine API address: unix:///path.sock, tcp://host:port or http://host:port
    /// (default: DOCKER_HOST, CONTAINER_HOST, then the usual sockets)
    #[arg(long, global = true, value_name = "URL", env = "NIXCTR_ENGINE")]
    pub engine: Option<String>,

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

    /// Use a throwaway nix store instead of the cache volume
    #[arg(long, global = true)]
    pub no_cache: bool,

    /// Print nothing but results and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Say more about what happens (why a version source was passed over, engine calls)
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
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
    /// Push a docker-archive (.tar or .tar.gz) to a registry
    Push(PushArgs),
    /// Build a container and push it as REGISTRY/NAMESPACE/NAME:TAG
    Publish(PublishArgs),
    /// List or remove the nix store volumes
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Remove containers left behind by nixctr runs that were killed
    Gc(GcArgs),
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Container names (directories under containers/)
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,

    /// Where to write the archive (default: NAME.tar.gz in the working directory; - for stdout)
    #[arg(short, long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Also load the image into the engine and print its name
    #[arg(long)]
    pub load: bool,
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
    #[arg(required = true, value_name = "NAME")]
    pub names: Vec<String>,

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

/// How to reach and log in to a registry; shared by push and publish.
#[derive(Debug, Args, Clone, Default)]
pub struct RegistryArgs {
    /// Manifest format to push
    #[arg(long, value_enum, default_value = "oci")]
    pub format: ManifestFormat,

    /// Layer compression
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: Compression,

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

    /// Layers uploaded at once
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub jobs: usize,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// docker-archive to push (.tar or .tar.gz)
    #[arg(value_name = "ARCHIVE")]
    pub archive: PathBuf,

    /// Destination: host[:port]/path:tag
    #[arg(value_name = "REF")]
    pub reference: String,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Container name (a directory under containers/)
    #[arg(value_name = "NAME")]
    pub name: String,

    /// App version for the tag (default: what `nixctr version NAME` finds)
    #[arg(long, value_name = "V")]
    pub version: Option<String>,

    /// Registry host[:port] (or `registry` in nixctr.toml)
    #[arg(long = "registry", value_name = "HOST", env = "NIXCTR_REGISTRY")]
    pub registry_host: Option<String>,

    /// Repository namespace (or `namespace` in nixctr.toml)
    #[arg(long, value_name = "PATH")]
    pub namespace: Option<String>,

    /// The whole tag, instead of the template (`tag` in nixctr.toml)
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,

    /// Publish even when containers/NAME has uncommitted changes
    #[arg(long)]
    pub allow_dirty: bool,

    /// Overwrite a tag that already exists in the registry
    #[arg(long)]
    pub force: bool,

    /// Publish this archive instead of building
    #[arg(long, value_name = "PATH")]
    pub archive: Option<PathBuf>,

    /// Print the result as JSON
    #[arg(long)]
    pub json: bool,

    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Also remove containers of runs still going, or made on another machine
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the nix store volumes
    Ls,
    /// Remove the store volume of the current nix image (or all with --all)
    Rm {
        /// Remove every nixctr store volume
        #[arg(long)]
        all: bool,
    },
}
