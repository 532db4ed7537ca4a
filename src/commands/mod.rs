//! One file per command: each turns its arguments into domain types, calls the library, and
//! prints. Commands never call each other; what two share lives in the library.

pub(crate) mod build;
pub(crate) mod cache;
pub(crate) mod doctor;
pub(crate) mod gc;
pub(crate) mod list;
pub(crate) mod pin;
pub(crate) mod publish;
pub(crate) mod push;
pub(crate) mod sbom;
pub(crate) mod verify;
pub(crate) mod version;

use anyhow::Result;
use clap::CommandFactory;

use crate::cli::{self, Cli, Command, Parsed};
use crate::exit::Usage;
use crate::progress::Progress;
use crate::selection::{self, Select};
use crate::settings::{self, Settings};

/// Resolves the settings once and runs the command.
pub(crate) async fn run(parsed: Parsed) -> Result<()> {
    let inputs = settings_inputs(&parsed);
    let cli = parsed.cli;
    // These two need no project, engine or settings.
    match &cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "nixctr", &mut script);
            return crate::output::bytes(&script);
        }
        Command::Man => {
            let mut page = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut page)?;
            return crate::output::bytes(&page);
        }
        _ => {}
    }
    let settings = Settings::resolve(&inputs)?;
    match cli.command {
        Command::Build(args) => build::run(&settings, args).await,
        Command::Version(args) => version::run(&settings, args).await,
        Command::Push(args) => push::run(&settings, args).await,
        Command::Publish(args) => publish::run(&settings, args).await,
        Command::Sbom(args) => sbom::run(&settings, args).await,
        Command::Cache(args) => cache::run(&settings, args).await,
        Command::Gc(args) => gc::run(&settings, args).await,
        Command::List(args) => list::run(&settings, args).await,
        Command::Doctor(args) => doctor::run(&settings, args).await,
        Command::Pin(args) => pin::run(&settings, args).await,
        Command::Verify(args) => verify::run(&settings, args).await,
        Command::Completions { .. } | Command::Man => Ok(()),
    }
}

/// The global flags as plain values for `settings`.
fn settings_inputs(parsed: &Parsed) -> settings::Inputs {
    let cli = &parsed.cli;
    let cache = &cli.cache;
    settings::Inputs {
        directory: cli.directory.clone(),
        engines: cli.engine.clone(),
        engines_from_env: parsed.engine_from_env,
        context: cli.context.clone(),
        nix_image: cli.nix_image.clone(),
        pull: cli.pull.map(Into::into),
        nixpkgs: cli.nixpkgs.clone(),
        platform: cli.platform.clone(),
        no_cache: cli.no_cache,
        cache: crate::nix::CacheSettings {
            substituters: cache.substituters.clone(),
            trusted_public_keys: cache.trusted_public_keys.clone(),
            cache_to: cache.cache_to.clone(),
            signing_key: cache.signing_key.clone(),
            netrc: cache.netrc.clone(),
            required: cache.cache_required,
            network: cache.network.map(Into::into),
        },
        builders: crate::nix::BuilderSettings {
            specs: cli.builders.builders.clone(),
            key: cli.builders.builder_key.clone(),
            known_hosts: cli.builders.builder_known_hosts.clone(),
            only: cli.builders.builders_only,
        },
        quiet: cli.quiet,
        verbose: cli.verbose,
    }
}

/// The registry flags of push and publish as plain values for `settings`.
fn registry_inputs(args: &cli::RegistryArgs) -> settings::RegistryInputs {
    settings::RegistryInputs {
        format: args.format.into(),
        compression: args.compression.into(),
        insecure: args.login.insecure,
        ca_cert: args.login.ca_cert.clone(),
        username: args.login.username.clone(),
        password_stdin: args.login.password_stdin,
        jobs: args.jobs,
        chunk_size: args.chunk_size.clone(),
    }
}

/// The selection flags as a domain value; `None` when nothing was named.
fn how(args: &cli::Selection) -> Option<Select> {
    match (&args.changed, args.all) {
        (Some(rev), _) => Some(Select::Changed(rev.clone())),
        (None, true) => Some(Select::All),
        (None, false) if !args.names.is_empty() => Some(Select::Names(args.names.clone())),
        _ => None,
    }
}

/// The containers a command works on. Skipped directories are named on stderr; an empty
/// `--changed` selection is said, and is no error.
fn selected(settings: &Settings, args: &cli::Selection, progress: &Progress) -> Result<Vec<String>> {
    let Some(how) = how(args) else {
        return Err(Usage("name the containers: NAME…, --all, or --changed REV".to_string()).into());
    };
    let chosen = selection::select(settings.project_root()?, &how)?;
    for skipped in &chosen.skipped {
        progress.info(format!("skipped {}: {}", skipped.name, skipped.reason));
    }
    if chosen.names.is_empty() {
        progress.info("no container changed: nothing to do");
    }
    Ok(chosen.names)
}

/// `-j N`: `None` leaves it to the engine's CPU count.
fn max_jobs(args: &cli::ManyArgs) -> Result<Option<usize>> {
    match args.max_jobs {
        Some(0) => Err(Usage("-j 0: give at least 1".to_string()).into()),
        other => Ok(other),
    }
}

/// `--pin` (relative to the working directory) or else `pin` of nixctr.toml (relative to the
/// project root), its files found and checked (each parses; each naming one of the
/// `repositories` can be replaced); `None` when nothing is to be pinned. A pattern that
/// matches nothing is a warning.
fn pin_request(
    settings: &Settings,
    args: &cli::PinArgs,
    repositories: &[String],
    progress: &Progress,
) -> anyhow::Result<Option<crate::pin::Request>> {
    let patterns: Vec<crate::pin::Pattern> = if !args.pin.is_empty() {
        let cwd = std::env::current_dir()?;
        args.pin.iter().map(|text| crate::pin::Pattern { text: text.clone(), base: cwd.clone() }).collect()
    } else if let (false, Some(root)) = (settings.pin.is_empty(), &settings.root) {
        settings.pin.iter().map(|text| crate::pin::Pattern { text: text.clone(), base: root.clone() }).collect()
    } else {
        if args.pin_digest || args.pin_commit {
            return Err(Usage(
                "--pin-digest and --pin-commit need --pin PATH|GLOB (or `pin` in nixctr.toml)".to_string(),
            )
            .into());
        }
        return Ok(None);
    };
    let (targets, unmatched) = crate::pin::find(&patterns)?;
    for pattern in unmatched {
        progress.warn(format!("--pin {pattern:?} matches no file"));
    }
    crate::pin::check(&targets, repositories)?;
    Ok(Some(crate::pin::Request { targets, always_digest: args.pin_digest, commit: args.pin_commit }))
}
