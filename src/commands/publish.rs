//! `nixctr publish`.
use crate::{cli::PublishArgs, settings::Settings};
pub async fn run(_settings: &Settings, _args: PublishArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
