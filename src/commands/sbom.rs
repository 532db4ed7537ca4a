//! `nixctr sbom`: builds the selected containers as `build` does (each archive where `build`
//! puts it by default), then writes each image's SBOM and prints its path; a summary on stderr
//! when several were selected.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::build::{self, Outcome, Target};
use crate::cli::SbomArgs;
use crate::engines::Engines;
use crate::exit::Usage;
use crate::output::{self, check_writable, AtomicFile};
use crate::platform::Platform;
use crate::progress::Progress;
use crate::project;
use crate::report::{self, Record, Status};
use crate::sbom::{self, Format, Metadata};
use crate::settings::Settings;
use crate::version;

pub(crate) async fn run(settings: &Settings, args: SbomArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let names = super::selected(settings, &args.select, &progress)?;
    if names.is_empty() {
        return Ok(());
    }
    if args.max_jobs == Some(0) {
        return Err(Usage("-j 0: give at least 1".to_string()).into());
    }
    let format: Format = args.format.into();
    let root = settings.project_root()?;
    // Every destination is checked before anything is built.
    let mut targets = build::plan(root, &names, &settings.platforms, None, false)?;
    for target in &mut targets {
        // Read in the build's own container: no second one, and --no-cache works too.
        target.sbom = true;
    }
    let outputs = sbom_paths(&targets, settings.platforms.len() > 1, args.output.as_deref(), format)?;
    for path in &outputs {
        check_writable(path)?;
    }

    let engines = Engines::connect(&settings.engines, &settings.platforms, &progress).await?;
    let options = build::Options { jobs: args.max_jobs, fail_fast: args.fail_fast };
    // The version lookup may start a nix container of its own: meanwhile, not after.
    let (outcomes, metadata) = tokio::join!(
        build::build(&engines, &settings.nix, root, &targets, options, &progress, None),
        metadata(settings, root, &names, &progress)
    );
    let outcomes = outcomes?;
    if let [Outcome::Failed { error, .. }] = outcomes.as_slice() {
        return Err(anyhow!("{error}"));
    }
    let built: Vec<(usize, &build::Built)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| match o {
            Outcome::Built(b) => Some((i, b)),
            _ => None,
        })
        .collect();
    let images: Vec<(&build::Built, Metadata)> = built
        .iter()
        .map(|(i, b)| (*b, metadata.iter().find(|m| m.name == targets[*i].name).cloned().unwrap_or_default()))
        .collect();
    let mut sboms =
        sbom::generate::generate(&engines, &settings.nix, root, &images, format, &progress).await?.into_iter();

    let mut records = Vec::new();
    for (i, (target, outcome)) in targets.iter().zip(&outcomes).enumerate() {
        let mut record = match outcome {
            Outcome::Built(built) => {
                // `generate` answers once per built image, in order.
                let result = match sboms.next() {
                    Some(Ok(sbom)) => {
                        progress.debug(format!("{}: {}", outputs[i].display(), sbom.media_type));
                        write(&outputs[i], &sbom.bytes).await.map(|()| sbom.bytes.len())
                    }
                    Some(Err(e)) => Err(e),
                    None => Err(anyhow!("no SBOM was made")),
                };
                match result {
                    Ok(size) => {
                        progress.info(format!("wrote {} ({size} bytes)", outputs[i].display()));
                        output::line(outputs[i].display())?;
                        let mut record = Record::new(&target.name, Status::Built);
                        record.archive = built.path.as_ref().map(|p| p.display().to_string());
                        record.seconds = built.seconds;
                        record
                    }
                    Err(e) => Record::failed(&target.name, format!("{e:#}"), built.seconds),
                }
            }
            Outcome::Failed { error, seconds } => Record::failed(&target.name, error.clone(), *seconds),
            Outcome::Stopped => Record {
                error: Some("not built: --fail-fast".to_string()),
                ..Record::new(&target.name, Status::Skipped)
            },
        };
        record.version = metadata.iter().find(|m| m.name == target.name).and_then(|m| m.app_version.clone());
        if settings.platforms.len() > 1 {
            record.platform = target.platform.as_ref().map(ToString::to_string);
        }
        records.push(record);
    }
    if let [record] = records.as_slice() {
        if record.status == Status::Failed {
            return Err(anyhow!("{}", record.error.as_deref().unwrap_or("failed")));
        }
    }
    if records.len() > 1 {
        report::summary(&records, &progress);
    }
    report::outcome(&records)
}

/// Where each target's SBOM goes: `-o FILE` for one target, `-o DIR/NAME.EXT` (an existing
/// directory) for any number; by default `NAME.EXT` (`NAME-ARCH.EXT` for several platforms) in
/// the working directory, as `build` names the archives.
fn sbom_paths(
    targets: &[Target],
    several_platforms: bool,
    output: Option<&Path>,
    format: Format,
) -> Result<Vec<PathBuf>> {
    let file_name = |t: &Target| match (&t.platform, several_platforms) {
        (Some(p), true) => format!("{}-{}.{}", t.name, Platform::suffix(p), format.extension()),
        _ => format!("{}.{}", t.name, format.extension()),
    };
    match output {
        Some(dir) if dir.is_dir() => Ok(targets.iter().map(|t| dir.join(file_name(t))).collect()),
        Some(file) if targets.len() == 1 => {
            if file == Path::new("-") {
                bail!("-o -: the SBOM goes to a file (name one, or a directory)");
            }
            Ok(vec![file.to_path_buf()])
        }
        Some(other) => bail!(
            "-o {:?} names one file, but {} SBOMs are to be written (name an existing directory, or drop -o: \
             each goes to NAME.{})",
            other.display().to_string(),
            targets.len(),
            format.extension()
        ),
        None => Ok(targets.iter().map(|t| PathBuf::from(file_name(t))).collect()),
    }
}

/// Each container's metadata: the app version `nixctr version` finds (none, with a note, when
/// it finds none) and the project's git commit.
async fn metadata(settings: &Settings, root: &Path, names: &[String], progress: &Progress) -> Vec<Metadata> {
    let commit = project::head_commit(root).ok();
    let answers = match version::versions(settings.version_sources(), names, version::From::Auto, progress).await {
        Ok(answers) => answers,
        Err(e) => {
            progress.warn(format!("the SBOMs name no app version: {e:#}"));
            names.iter().map(|_| Err(anyhow!("not looked up"))).collect()
        }
    };
    names
        .iter()
        .zip(answers)
        .map(|(name, answer)| {
            let app_version = match answer {
                Ok(answer) => Some(answer.version),
                Err(e) => {
                    progress.info(format!("the SBOM of {name} names no app version: {e:#}"));
                    None
                }
            };
            Metadata { name: name.clone(), app_version, commit: commit.clone() }
        })
        .collect()
}

async fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut file = AtomicFile::create(path)?;
    file.file.write_all(bytes).await?;
    file.commit().await
}
