//! `nixctr version`.
use crate::{cli::VersionArgs, settings::Settings};
pub async fn run(_settings: &Settings, _args: VersionArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
