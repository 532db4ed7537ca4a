//! `nixctr gc`: removes the containers that killed runs left behind (everything labelled
//! `dev.nixctr`). Store volumes are the cache, not leftovers: `nixctr cache rm` removes those.

use anyhow::Result;

use crate::engine::Engine;
use crate::progress::Progress;
use crate::settings::Settings;

pub async fn run(settings: &Settings) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
    let ids = engine.labelled_containers().await?;
    for id in &ids {
        engine.remove_container(id).await?;
        progress.debug(format!("removed container {id}"));
    }
    progress.info(format!("removed {} container{}", ids.len(), if ids.len() == 1 { "" } else { "s" }));
    Ok(())
}
