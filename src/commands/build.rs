//! `nixctr build`.
use crate::{cli::BuildArgs, settings::Settings};
pub async fn run(_settings: &Settings, _args: BuildArgs) -> anyhow::Result<()> { anyhow::bail!("not yet") }
