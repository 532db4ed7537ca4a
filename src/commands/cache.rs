//! `nixctr cache`.
use crate::{cli::CacheCommand, settings::Settings};
pub async fn run(_settings: &Settings, _args: CacheCommand) -> anyhow::Result<()> { anyhow::bail!("not yet") }
