//! Publishing one container: checks first (the directory is committed, the tag is new), then
//! the build (or a given archive), then the push as `REGISTRY/NAMESPACE/NAME:TAG`, the tag
//! rendered from the template `v{version}-{sha}-nix`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::build::{self, Output, Target};
use crate::engine::Engine;
use crate::progress::Progress;
use crate::project;
use crate::registry::{PushSession, Reference, RegistryConfig};
use crate::settings::Settings;
use crate::version;

/// What to publish and how; resolved from flags and nixctr.toml.
pub(crate) struct Request {
    pub name: String,
    /// The app version for the tag; found with the version lookup when `None`.
    pub version: Option<String>,
    /// `host[:port]`.
    pub registry: String,
    pub namespace: Option<String>,
    /// The whole tag, instead of the template.
    pub tag: Option<String>,
    pub allow_dirty: bool,
    pub force: bool,
    /// Publish this archive instead of building.
    pub archive: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Published {
    pub name: String,
    pub version: String,
    pub tag: String,
    #[serde(rename = "ref")]
    pub reference: String,
    pub digest: String,
    pub pushed_bytes: u64,
    pub skipped_layers: usize,
}

pub(crate) async fn publish(
    settings: &Settings,
    request: &Request,
    registry: &RegistryConfig,
    progress: &Progress,
) -> Result<Published> {
    let root = settings.project_root()?.to_path_buf();
    let name = &request.name;
    if request.archive.is_none() {
        project::container_file(&root, name)?;
        // The cheap check before the version lookup, which may start a container.
        if !request.allow_dirty {
            check_clean(&root, name)?;
        }
    }
    let (tag, version) = match &request.tag {
        Some(tag) => (tag.clone(), request.version.clone().unwrap_or_default()),
        None => {
            let version = match &request.version {
                Some(v) => v.clone(),
                None => {
                    let names = [name.clone()];
                    let mut found = version::versions(settings, &names, version::From::Auto, progress).await?;
                    found.pop().context("the version lookup answered nothing")??.version
                }
            };
            let sha = if settings.tag_template.contains("{sha}") {
                project::head_commit(&root)?.chars().take(7).collect()
            } else {
                String::new()
            };
            (render_tag(&settings.tag_template, &version, &sha)?, version)
        }
    };
    let reference = Reference::parse(&format!("{}:{tag}", repository(&request.registry, request.namespace.as_deref(), name)))?;

    let session = PushSession::connect(registry, reference.registry(), progress).await?;
    if !request.force && session.tag_exists(&reference).await? {
        bail!("{reference} already exists in the registry (a tag names one build: bump the version, or overwrite it with --force)");
    }

    let built_dir;
    let archive = match &request.archive {
        Some(path) => path.clone(),
        None => {
            built_dir = tempfile::Builder::new()
                .prefix("nixctr-publish-")
                .tempdir()
                .context("cannot make a temporary directory")?;
            let path = built_dir.path().join(format!("{name}.tar.gz"));
            let engine = Engine::connect(settings.engine.as_deref(), progress).await?;
            let target = Target { name: name.clone(), output: Output::File(path.clone()) };
            build::build(&engine, settings, &[target], progress).await?;
            path
        }
    };
    let outcome = session.push(&archive, &reference, progress).await?;
    Ok(Published {
        name: name.clone(),
        version,
        tag,
        reference: outcome.reference,
        digest: outcome.digest,
        pushed_bytes: outcome.pushed_bytes,
        skipped_layers: outcome.skipped_layers,
    })
}

/// `host/namespace/name`, or `host/name` without a namespace.
fn repository(host: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{}/{}/{name}", host.trim_end_matches('/'), ns.trim_matches('/')),
        None => format!("{}/{name}", host.trim_end_matches('/')),
    }
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
