//! `nixctr gc`: removes the containers that killed runs left behind, on the engine named (on
//! each, when several are). Store volumes are the cache, not leftovers: `nixctr cache rm`
//! removes those.

use anyhow::Result;

use crate::cli::GcArgs;
use crate::engine::{self, Engine};
use crate::engines::Engines;
use crate::progress::Progress;
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: GcArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let engines = Engines::named(&settings.engines, &progress).await?;
    for engine in &engines {
        let progress = if engines.len() > 1 { progress.for_item(engine.address()) } else { progress.clone() };
        collect(engine, args.all, &progress).await?;
    }
    Ok(())
}

async fn collect(engine: &Engine, all: bool, progress: &Progress) -> Result<()> {
    let here = engine::hostname();
    let mut removed = 0;
    for (id, labels) in engine.labelled_containers().await? {
        let short: String = id.chars().take(12).collect();
        if !all {
            if let Some(owner) = engine::live_owner(&labels, &here) {
                progress.info(format!("kept container {short} ({owner}; --all removes it anyway)"));
                continue;
            }
        }
        engine.remove_container(&id).await?;
        progress.debug(format!("removed container {short}"));
        removed += 1;
    }
    progress.info(format!("removed {removed} container{}", if removed == 1 { "" } else { "s" }));
    Ok(())
}
