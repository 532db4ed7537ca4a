//! `nixctr push ARCHIVE REF`: the digest on stdout, progress on stderr.

use anyhow::Result;

use crate::cli::PushArgs;
use crate::progress::Progress;
use crate::registry::{self, PushOptions, Reference};
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: PushArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let opts = PushOptions::resolve(settings, &args.registry, &reference)?;
    let progress = Progress::new(settings.quiet, settings.verbose);
    let outcome = registry::push(&args.archive, &reference, &opts, &progress).await?;
    crate::output::line(format_args!("{}@{}", outcome.reference, outcome.digest))?;
    Ok(())
}
