//! `nixctr version`: one version a line (`NAME VERSION` for several names), or one JSON
//! object per name.

use anyhow::Result;

use crate::cli::{self, VersionArgs};
use crate::output;
use crate::progress::Progress;
use crate::settings::Settings;
use crate::version;

pub(crate) async fn run(settings: &Settings, args: VersionArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    // Plain names may be nixpkgs attributes, not containers: they are not checked.
    let names = if args.all || args.changed.is_some() {
        let select = cli::Selection { names: Vec::new(), all: args.all, changed: args.changed.clone() };
        super::selected(settings, &select, &progress)?
    } else if args.names.is_empty() {
        return Err(crate::exit::Usage("name the containers: NAME…, --all, or --changed REV".to_string()).into());
    } else {
        args.names.clone()
    };
    let answers = version::versions(settings.version_sources(), &names, args.from.into(), &progress)
        .await?
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let several = answers.len() > 1;
    for answer in &answers {
        if args.json {
            output::line(serde_json::to_string(answer)?)?;
        } else if several {
            output::line(format_args!("{} {}", answer.name, answer.version))?;
        } else {
            output::line(&answer.version)?;
        }
    }
    Ok(())
}
