//! `nixctr push ARCHIVE… REF [--tag TAG]…`: `REF@DIGEST` on stdout, progress on stderr; `-v`
//! adds where the time went (read/hash, compress, upload, manifest).

use std::collections::BTreeMap;

use std::path::Path;

use anyhow::{bail, Result};

use crate::cli::PushArgs;
use crate::output;
use crate::progress::Progress;
use crate::registry::{Destination, ExistingTags, PushSession, Reference};
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: PushArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let destination = Destination::with_tags(reference, &args.tags, ExistingTags::Overwrite)?;
    let config = settings.registry_config(&super::registry_inputs(&args.registry))?;
    let progress = Progress::new(settings.quiet, settings.verbose);
    let session = PushSession::open(&config, destination.reference().registry(), &progress)?;
    let stdin = Path::new("-");
    let outcome = match args.archives.as_slice() {
        [one] if one == stdin => session.push_reader(Box::new(std::io::stdin()), &destination, &progress).await?,
        several if several.len() > 1 && several.iter().any(|a| a == stdin) => {
            bail!("`-` (an archive on standard input) must be the only archive of a push")
        }
        [one] => session.push_to(one, &destination, &progress).await?,
        several => session.push_index(several, &destination, &BTreeMap::new(), &progress).await?,
    };
    output::line(format_args!("{}@{}", outcome.reference, outcome.digest))
}
