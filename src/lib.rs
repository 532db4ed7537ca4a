//! nixctr builds `containers/<name>/default.nix` images inside a Docker or Podman engine,
//! reads the version of the app each one ships, and pushes the result to an OCI registry.
//!
//! Each outside system has one module: `engine` (bollard), `registry` (oci-client),
//! `nix` (what runs inside the nix container), `archive` (docker-archive files).
#![warn(clippy::unwrap_used)]

mod archive;
mod attachments;
mod attest;
mod binary_cache;
mod build;
// pub: the binary parses the command line.
pub mod cli;
mod commands;
mod compress;
mod context;
mod doctor;
mod engine;
mod engines;
// pub: the binary reports errors and exit codes.
pub mod exit;
mod nix;
mod output;
mod pin;
mod pipe;
mod platform;
// pub: used by tests/it/push.rs.
pub mod progress;
mod project;
mod publish;
mod report;
mod sbom;
mod selection;
// pub: used by tests/it/push.rs.
pub mod registry;
mod settings;
mod sign;
mod stream;
mod tls;
mod version;

use exit::Interrupted;

/// Runs one command to completion. Ctrl-C and SIGTERM abort the command's future, whose
/// guards (containers, temporary files) clean up as they drop, and end in [`Interrupted`].
pub fn run(cli: cli::Parsed) -> anyhow::Result<()> {
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        tokio::select! {
            result = commands::run(cli) => result,
            signal = exit::interrupted() => Err(anyhow::Error::new(Interrupted(signal))),
        }
    })
}
