//! `nixctr publish NAME`: build (or take `--archive`), then push as
//! `REGISTRY/NAMESPACE/NAME:TAG`, the tag rendered from `v{version}-{sha}-nix`. It refuses a
//! dirty container directory and an existing tag before any build work.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::{PublishArgs, VersionFrom};
use crate::commands::build::{self, Output};
use crate::commands::push::registry_config;
use crate::commands::version;
use crate::engine::Engine;
use crate::progress::Progress;
use crate::project;
use crate::registry::{PushSession, Reference};
use crate::settings::Settings;

#[derive(Serialize)]
struct Published {
    name: String,
    version: String,
    tag: String,
    #[serde(rename = "ref")]
    reference: String,
    digest: String,
    pushed_bytes: u64,
    skipped_layers: usize,
}

pub async fn run(settings: &Settings, args: PublishArgs) -> Result<()> {
    let progress = Progress::new(settings.quiet, settings.verbose);
    let root = settings.project_root()?.to_path_buf();
    if args.archive.is_none() {
        project::container_file(&root, &args.name)?;
    }
    let Some(host) = args.registry_host.clone().or(settings.registry.clone()) else {
        bail!("no registry to publish to: pass --registry HOST[:PORT] or set `registry` in nixctr.toml");
    };
    let namespace = args.namespace.clone().or(settings.namespace.clone());

    let (tag, version) = match &args.tag {
        Some(tag) => (tag.clone(), args.version.clone().unwrap_or_default()),
        None => {
            let version = match &args.version {
                Some(v) => v.clone(),
                None => {
                    let names = [args.name.clone()];
                    let found = version::versions(settings, &names, VersionFrom::Auto, &progress).await?;
                    found.into_iter().next().map(|a| a.version).unwrap_or_default()
                }
            };
            let sha = if settings.tag_template.contains("{sha}") {
                project::head_commit(&root)?[..7].to_string()
            } else {
                String::new()
            };
            (render_tag(&settings.tag_template, &version, &sha)?, version)
        }
    };
    let repository = match &namespace {
        Some(ns) => format!("{}/{}/{}", host.trim_end_matches('/'), ns.trim_matches('/'), args.name),
        None => format!("{}/{}", host.trim_end_matches('/'), args.name),
    };
    let reference = Reference::parse(&format!("{repository}:{tag}"))?;

    if !args.allow_dirty && args.archive.is_none() {
        check_clean(&root, &args.name)?;
    }
    let config = registry_config(settings, &args.registry)?;
    let session = PushSession::connect(&config, reference.registry(), &progress).await?;
    if !args.force && session.tag_exists(&reference).await? {
        bail!("{reference} already exists in the registry (a tag names one build: bump the version, or overwrite it with --force)");
    }

    let built_dir;
    let archive = match &args.archive {
        Some(path) => path.clone(),
        None => {
            built_dir = tempfile::Builder::new()
                .prefix("nixctr-publish-")
                .tempdir()
                .context("cannot make a temporary directory")?;
            let path = built_dir.path().join(format!("{}.tar.gz", args.name));
            let engine = Engine::connect(settings.engine.as_deref(), &progress).await?;
            build::build(&engine, settings, &[(args.name.clone(), Output::File(path.clone()))], &progress).await?;
            path
        }
    };
    let outcome = session.push(&archive, &reference, &progress).await?;
    if args.json {
        let published = Published {
            name: args.name.clone(),
            version,
            tag,
            reference: outcome.reference.clone(),
            digest: outcome.digest.clone(),
            pushed_bytes: outcome.pushed_bytes,
            skipped_layers: outcome.skipped_layers,
        };
        println!("{}", serde_json::to_string(&published)?);
    } else {
        println!("{}@{}", outcome.reference, outcome.digest);
    }
    Ok(())
}

/// Fills `{version}` (with at most one `v` in front) and `{sha}` into the tag template.
pub fn render_tag(template: &str, version: &str, sha: &str) -> Result<String> {
    let mut version = version;
    // `v{version}` with version `v2.17.0` would give `vv2.17.0`.
    if template.contains("v{version}") {
        version = version.strip_prefix('v').unwrap_or(version);
    }
    let tag = template.replace("{version}", version).replace("{sha}", sha);
    if tag.contains('{') || tag.contains('}') {
        bail!("tag template {template:?} has an unknown placeholder (known: {{version}}, {{sha}})");
    }
    let valid = !tag.is_empty()
        && tag.len() <= 128
        && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && tag.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !valid {
        bail!("tag {tag:?} is not a valid image tag (letters, digits, _ . -; at most 128)");
    }
    Ok(tag)
}

/// Refuses when `containers/NAME/` has changes git has not committed: a tag must name the
/// source it was built from.
fn check_clean(root: &Path, name: &str) -> Result<()> {
    let dir = format!("containers/{name}");
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["status", "--porcelain", "--untracked-files=all", "--", &dir])
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => bail!(
            "cannot check {dir} for uncommitted changes: git said {} (pass --allow-dirty to publish anyway)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => bail!(
            "cannot check {dir} for uncommitted changes: cannot run git ({e}); pass --allow-dirty to publish anyway"
        ),
    };
    let changes = String::from_utf8_lossy(&out.stdout);
    if !changes.trim().is_empty() {
        let listed: Vec<&str> = changes.lines().take(5).map(str::trim).collect();
        bail!("{dir} has uncommitted changes ({}): commit them, or pass --allow-dirty", listed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_template_has_one_v() {
        assert_eq!(render_tag("v{version}-{sha}-nix", "2.17.0", "abc1234").unwrap(), "v2.17.0-abc1234-nix");
        assert_eq!(render_tag("v{version}-{sha}-nix", "v2.17.0", "abc1234").unwrap(), "v2.17.0-abc1234-nix");
        assert_eq!(render_tag("{version}", "v1", "").unwrap(), "v1");
    }

    #[test]
    fn bad_templates_and_tags_are_refused() {
        assert!(render_tag("v{verison}", "1", "").is_err());
        assert!(render_tag("v{version}", "1+build", "").is_err());
        assert!(render_tag("{version}", ".1", "").is_err());
    }
}
