//! `nixctr gc`.
use crate::settings::Settings;
pub async fn run(_settings: &Settings) -> anyhow::Result<()> { anyhow::bail!("not yet") }
