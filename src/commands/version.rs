//! `nixctr version NAME…`: one version a line (`NAME VERSION` for several names), or one
//! JSON object per name.

use anyhow::Result;

use crate::cli::VersionArgs;
use crate::output;
use crate::progress::Progress;
use crate::settings::Settings;
use crate::version;

pub(crate) async fn run(settings: &Settings, args: VersionArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let answers = version::versions(settings, &args.names, args.from.into(), &progress)
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
