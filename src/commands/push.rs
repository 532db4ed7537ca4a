//! `nixctr push`.
use crate::{cli::PushArgs, settings::Settings};
pub async fn run(_settings: &Settings, _args: PushArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
