//! `nixctr list`: the selected container names, one a line, or one JSON array. No engine.

use anyhow::Result;

use crate::cli::ListArgs;
use crate::output;
use crate::progress::Progress;
use crate::selection::{self, Select};
use crate::settings::Settings;

pub(crate) async fn run(settings: &Settings, args: ListArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let names = match super::how(&args.select) {
        Some(_) => super::selected(settings, &args.select, &progress)?,
        None => selection::select(settings.project_root()?, &Select::All)?.names,
    };
    if args.json {
        output::line(serde_json::to_string(&names)?)?;
    } else {
        for name in &names {
            output::line(name)?;
        }
    }
    Ok(())
}
