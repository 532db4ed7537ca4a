//! `nixctr cache ls|rm|push`: the nix store volumes, one per nix image (nixctr never prunes them
//! on its own), and the binary cache (`binary_cache`).

use anyhow::{anyhow, bail, Result};

use crate::binary_cache::{self, Held, Project};
use crate::cli::CacheCommand;
use crate::engine::Engine;
use crate::output;
use crate::progress::Progress;
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, command: CacheCommand) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let engine = Engine::connect(settings.engines.first.as_ref(), &progress).await?;
    let volumes = engine.store_volumes().await?;
    match command {
        CacheCommand::Ls { names } => {
            for (name, image) in &volumes {
                output::line(format_args!("{name}\t{image}"))?;
            }
            if settings.nix.cache.primary().is_some() {
                let root = settings.project_root()?;
                let names = if names.is_empty() {
                    crate::selection::select(root, &crate::selection::Select::All)?.names
                } else {
                    names
                };
                let project = Project { root, platform: settings.platforms.first() };
                if let Some((url, held)) =
                    binary_cache::list(&engine, &settings.nix, project, &names, &progress).await?
                {
                    for (name, held) in held {
                        match held {
                            Held::Cached(out) => output::line(format_args!("{name}\tcached\t{out}\t{url}"))?,
                            Held::Missing(out) => output::line(format_args!("{name}\tmissing\t{out}\t{url}"))?,
                            Held::Unknown(why) => {
                                progress.warn(format!("{name}: {}", why.lines().next().unwrap_or_default()));
                                output::line(format_args!("{name}\tunknown\t-\t{url}"))?;
                            }
                        }
                    }
                }
            }
        }
        CacheCommand::Push { names } => {
            let project = Project { root: settings.project_root()?, platform: settings.platforms.first() };
            let pushed = binary_cache::push_built(&engine, &settings.nix, project, &names, &progress).await?;
            progress.info(pushed.summary);
            for (name, out) in pushed.outputs {
                output::line(format_args!("{name}\t{out}"))?;
            }
        }
        CacheCommand::Rm { all } => {
            let image = &settings.nix.image;
            let doomed: Vec<&String> = if all {
                volumes.iter().map(|(name, _)| name).collect()
            } else {
                let id = image_id(&engine, image).await?;
                volumes.iter().filter(|(_, of)| *of == id).map(|(name, _)| name).collect()
            };
            if doomed.is_empty() && !all {
                bail!("no store volume for {image} (see `nixctr cache ls`; --all removes every one)");
            }
            for name in doomed {
                engine.remove_volume(name).await?;
                output::line(format_args!("{name}"))?;
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
