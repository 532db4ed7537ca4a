//! nixctr builds `containers/<name>/default.nix` images inside a Docker or Podman engine,
//! reads the version of the app each one ships, and pushes the result to an OCI registry.
//!
//! Each outside system has one module: `engine` (bollard), `registry` (oci-client),
//! `nix` (what runs inside the nix container), `archive` (docker-archive files).
#![warn(clippy::unwrap_used)]

pub mod archive;
pub mod cli;
pub mod commands;
pub mod context;
pub mod engine;
pub mod exit;
pub mod nix;
pub mod pipe;
pub mod progress;
pub mod project;
pub mod registry;
pub(crate) mod selection;
pub mod settings;
pub mod version_sources;

use cli::{Cli, Command};
use exit::Interrupted;

/// Runs one command to completion. Ctrl-C and SIGTERM abort the command's future, whose
/// guards (containers, temporary files) clean up as they drop, and end in [`Interrupted`].
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let settings = settings::Settings::resolve(&cli)?;
        let work = async {
            match cli.command {
                Command::Build(args) => commands::build::run(&settings, args).await,
                Command::Version(args) => commands::version::run(&settings, args).await,
                Command::Push(args) => commands::push::run(&settings, args).await,
                Command::Publish(args) => commands::publish::run(&settings, args).await,
                Command::Cache(args) => commands::cache::run(&settings, args).await,
                Command::Gc(args) => commands::gc::run(&settings, args).await,
            }
        };
        tokio::select! {
            result = work => result,
            signal = exit::interrupted() => Err(anyhow::Error::new(Interrupted(signal))),
        }
    })
}
