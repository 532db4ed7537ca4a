//! `nixctr push ARCHIVE… REF`: the digest on stdout, progress on stderr.

use std::collections::BTreeMap;

use anyhow::Result;

use crate::cli::PushArgs;
use crate::output;
use crate::progress::Progress;
use crate::registry::{PushSession, Reference};
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: PushArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let config = settings.registry_config(&super::registry_inputs(&args.registry))?;
    let progress = Progress::new(settings.quiet, settings.verbose);
    let session = PushSession::open(&config, reference.registry(), &progress)?;
    let outcome = match args.archives.as_slice() {
        [one] => session.push(one, &reference, &progress).await?,
        several => session.push_index(several, &reference, &BTreeMap::new(), &progress).await?,
    };
    output::line(format_args!("{}@{}", outcome.reference, outcome.digest))
}
