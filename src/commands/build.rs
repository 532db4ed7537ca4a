//! `nixctr build`: each archive's path on stdout (or, with `--load`, the images' names), a
//! summary on stderr when several containers were built, `--json` one object per container;
//! with `-v`, where each one's time went.

use anyhow::{anyhow, Result};

use crate::build::{self, Outcome};
use crate::cli::BuildArgs;
use crate::engines::Engines;
use crate::output;
use crate::progress::Progress;
use crate::report::{self, Record, Status};
use crate::settings::Settings;
use crate::version;

pub(crate) async fn run(settings: &Settings, args: BuildArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let names = super::selected(settings, &args.select, &progress)?;
    if names.is_empty() {
        return Ok(());
    }
    let targets =
        build::plan(settings.project_root()?, &names, &settings.platforms, args.output.as_deref(), args.load)?;
    let jobs = super::max_jobs(&args.many)?;
    let options = build::Options { jobs, fail_fast: args.many.fail_fast };
    let engines = Engines::connect(&settings.engines, &settings.platforms, &progress).await?;
    let root = settings.project_root()?;
    let outcomes = build::build(&engines, &settings.nix, root, &targets, options, &progress, None).await?;
    if let [Outcome::Failed { error, .. }] = outcomes.as_slice() {
        // One container: its error is the command's, as it always was.
        return Err(anyhow!("{error}"));
    }
    let mut records = Vec::new();
    for (target, outcome) in targets.iter().zip(outcomes) {
        let record = match outcome {
            Outcome::Built(built) => {
                let mut record = Record::new(&target.name, Status::Built);
                record.bytes = Some(built.size);
                record.seconds = built.seconds;
                record.builders = built.builders.clone();
                if engines.several() {
                    record.engine = Some(built.engine.clone());
                }
                progress.debug(format!("{}: {}", target.name, built.phases));
                // A streamed image loaded as it came.
                for image in &built.loaded {
                    if !args.many.json {
                        output::line(image)?;
                    }
                }
                if let Some(path) = &built.path {
                    record.archive = Some(path.display().to_string());
                    // Loaded into the engine that built it.
                    if let (true, Some(engine)) = (args.load, engines.by_address(&built.engine)) {
                        for image in engine.load_archive(path).await? {
                            progress.info(format!("loaded {image} from {}", path.display()));
                            if !args.many.json {
                                output::line(&image)?;
                            }
                        }
                    } else if !args.many.json {
                        output::line(path.display())?;
                    }
                }
                record
            }
            Outcome::Failed { error, seconds } => Record::failed(&target.name, error, seconds),
            Outcome::Stopped => Record {
                error: Some("not built: --fail-fast".to_string()),
                ..Record::new(&target.name, Status::Skipped)
            },
        };
        let mut record = record;
        record.version = version::declared(root, &settings.packages, &target.name);
        if settings.platforms.len() > 1 {
            record.platform = target.platform.as_ref().map(ToString::to_string);
        }
        if args.many.json {
            output::line(serde_json::to_string(&record)?)?;
        }
        records.push(record);
    }
    if records.len() > 1 {
        report::summary(&records, &progress);
    }
    report::outcome(&records)
}
