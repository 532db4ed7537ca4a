//! `nixctr doctor`: one screen of checks, each problem on one line with its fix, or (`--json`)
//! one JSON object for CI. Exit 1 when a check failed.

use anyhow::{bail, Result};

use crate::cli::DoctorArgs;
use crate::doctor::{self, Report};
use crate::output;
use crate::progress::Progress;
use crate::registry::{Compression, ManifestFormat};
use crate::settings::{RegistryInputs, Settings};

pub(crate) async fn run(settings: &Settings, args: DoctorArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let registry = args.registry_host.clone().filter(|r| !r.is_empty()).or(settings.registry.clone());
    let config = match &registry {
        Some(_) => Some(settings.registry_config(&RegistryInputs {
            format: ManifestFormat::default(),
            compression: Compression::default(),
            insecure: args.login.insecure,
            ca_cert: args.login.ca_cert.clone(),
            username: args.login.username.clone(),
            password_stdin: args.login.password_stdin,
            jobs: 1,
            chunk_size: None,
        })?),
        None => None,
    };
    let options = doctor::Options {
        engines: &settings.engines,
        nix: &settings.nix,
        platforms: &settings.platforms,
        root: settings.root.as_deref(),
        registry: registry.as_deref().zip(config.as_ref()),
    };
    let report = doctor::examine(&options, &progress).await;
    if args.json {
        output::line(serde_json::to_string(&report)?)?;
    } else {
        print(&report)?;
    }
    match report.problems().count() {
        0 => Ok(()),
        1 => bail!("doctor found 1 problem"),
        n => bail!("doctor found {n} problems"),
    }
}

/// The sections, a line per check: `ok` or `problem`, its name, what was found, and the fix.
fn print(report: &Report) -> Result<()> {
    let width = report.sections.iter().flat_map(|s| &s.checks).map(|c| c.name.len()).max().unwrap_or(0);
    for section in &report.sections {
        output::line(section.name)?;
        if let Some(why) = &section.skipped {
            output::line(format_args!("  -        {why}"))?;
        }
        for check in &section.checks {
            let mark = if check.ok { "ok     " } else { "problem" };
            let fix = check.fix.as_deref().map(|f| format!(" — fix: {f}")).unwrap_or_default();
            output::line(format_args!("  {mark}  {:width$}  {}{fix}", check.name, check.detail))?;
        }
    }
    if report.ok {
        output::line("all well")?;
    }
    Ok(())
}
