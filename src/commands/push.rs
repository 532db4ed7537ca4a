//! `nixctr push ARCHIVE REF`: the digest on stdout, progress on stderr.

use anyhow::{bail, Result};

use crate::cli::{self, PushArgs, RegistryArgs};
use crate::progress::Progress;
use crate::registry::auth::read_password_stdin;
use crate::registry::cache::BlobCache;
use crate::registry::{Compression, Credentials, ManifestFormat, PushSession, Reference, RegistryConfig};
use crate::settings::Settings;

pub async fn run(settings: &Settings, args: PushArgs) -> Result<()> {
    let reference = Reference::parse(&args.reference)?;
    let config = registry_config(settings, &args.registry)?;
    let progress = Progress::new(settings.quiet, settings.verbose);
    let session = PushSession::connect(&config, reference.registry(), &progress).await?;
    let outcome = session.push(&args.archive, &reference, &progress).await?;
    println!("{}@{}", outcome.reference, outcome.digest);
    Ok(())
}

/// Flags and `nixctr.toml` as the registry takes them; reads stdin for `--password-stdin`.
pub(crate) fn registry_config(settings: &Settings, args: &RegistryArgs) -> Result<RegistryConfig> {
    let mut config = RegistryConfig {
        format: match args.format {
            cli::ManifestFormat::Oci => ManifestFormat::Oci,
            cli::ManifestFormat::Docker => ManifestFormat::Docker,
        },
        compression: match args.compression {
            cli::Compression::Gzip => Compression::Gzip,
            cli::Compression::Zstd => Compression::Zstd,
        },
        insecure: args.insecure,
        insecure_registries: settings.insecure_registries.clone(),
        ca_cert: args.ca_cert.clone(),
        credentials: None,
        jobs: args.jobs,
        blob_cache: BlobCache::default_path(),
    };
    config.check()?;
    config.credentials = match &args.username {
        Some(username) if args.password_stdin => Some(Credentials {
            username: username.clone(),
            password: read_password_stdin()?,
            source: "--password-stdin".to_string(),
        }),
        Some(_) => bail!("--username needs --password-stdin"),
        None => None,
    };
    Ok(config)
}
