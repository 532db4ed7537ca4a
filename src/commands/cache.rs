//! `nixctr cache ls|rm|push`: the nix store volumes, one per nix image (nixctr never prunes them
//! on its own), and the binary cache (nix_cache).

use anyhow::{anyhow, bail, Result};

use crate::cli::CacheCommand;
use crate::engine::Engine;
use crate::progress::Progress;
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, command: CacheCommand) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
    let volumes = engine.store_volumes().await?;
    match command {
        CacheCommand::Ls { names } => {
            for (name, image) in &volumes {
                crate::output::line(format_args!("{name}\t{image}"))?;
            }
            if settings.cache.primary().is_some() {
                let names = if names.is_empty() {
                    crate::selection::select(settings.project_root()?, &crate::selection::Select::All)?.names
                } else {
                    names
                };
                crate::nix_cache::list(&engine, settings, &names, &progress).await?;
            }
        }
        CacheCommand::Push { names } => crate::nix_cache::push_built(&engine, settings, &names, &progress).await?,
        CacheCommand::Rm { all } => {
            let doomed: Vec<&String> = if all {
                volumes.iter().map(|(name, _)| name).collect()
            } else {
                let id = image_id(&engine, &settings.nix_image).await?;
                volumes.iter().filter(|(_, image)| *image == id).map(|(name, _)| name).collect()
            };
            if doomed.is_empty() && !all {
                bail!("no store volume for {} (see `nixctr cache ls`; --all removes every one)", settings.nix_image);
            }
            for name in doomed {
                engine.remove_volume(name).await?;
                crate::output::line(format_args!("{name}"))?;
            }
        }
    }
    Ok(())
}

async fn image_id(engine: &Engine, image: &str) -> Result<String> {
    engine
        .image_id(image)
        .await?
        .ok_or_else(|| anyhow!("image {image} is not in the engine, so its store volume is unknown (use --all, or name it in `nixctr cache ls`)"))
}
