//! `nixctr build NAME…`: the archives' paths on stdout (or, with `--load`, the images' names).

use anyhow::Result;

use crate::build;
use crate::cli::BuildArgs;
use crate::engine::Engine;
use crate::output;
use crate::progress::Progress;
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: BuildArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let targets = build::plan(settings.project_root()?, &args.names, args.output.as_deref(), args.load)?;
    let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
    for built in build::build(&engine, settings, &targets, &progress).await? {
        if args.load {
            for image in engine.load_archive(&built.path).await? {
                progress.info(format!("loaded {image} from {}", built.path.display()));
                output::line(&image)?;
            }
        } else {
            output::line(built.path.display())?;
        }
    }
    Ok(())
}
