//! What the binary cache holds of the project's containers, for `nixctr cache push` and
//! `nixctr cache ls`: each container is evaluated in a nix container on the store volume,
//! then, with every evaluation done (project code never runs beside a secret), the cache is
//! written to or asked.

use std::path::Path;

use anyhow::{bail, Result};

use crate::engine::Engine;
use crate::nix::{Inputs, NixContainer, NixOptions};
use crate::platform::Platform;
use crate::progress::Progress;

/// Where the containers are, and for which platform (`None`: the engine's own).
#[derive(Clone, Copy)]
pub(crate) struct Project<'a> {
    pub(crate) root: &'a Path,
    pub(crate) platform: Option<&'a Platform>,
}

/// What `cache push` did: nix copy's summary, and each container's output.
pub(crate) struct Pushed {
    pub(crate) summary: String,
    pub(crate) outputs: Vec<(String, String)>,
}

/// Copies containers already built in the store volume to the `--cache-to` cache, without
/// building.
pub(crate) async fn push_built(
    engine: &Engine,
    options: &NixOptions,
    project: Project<'_>,
    names: &[String],
    progress: &Progress,
) -> Result<Pushed> {
    if options.cache.cache_to.is_none() {
        bail!("cache push needs a cache to write to: --cache-to URL (or cache-to in nixctr.toml)");
    }
    if options.no_cache {
        bail!("cache push copies what is in the store volume: drop --no-cache (a throwaway store holds nothing built)");
    }
    for name in names {
        crate::project::container_file(project.root, name)?;
    }
    let nix = start(engine, options, project, progress).await?;
    let result = async {
        let mut drvs = Vec::new();
        for name in names {
            drvs.push(nix.instantiate(name).await?);
        }
        let outs = nix.outputs(&drvs).await?;
        let valid = nix.valid(&outs).await?;
        let missing: Vec<&String> =
            names.iter().zip(&outs).filter(|(_, o)| !valid.contains(o)).map(|(n, _)| n).collect();
        if !missing.is_empty() {
            let list = missing.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" ");
            bail!(
                "not built in the store volume of {}: {list} (its current output is not there; run `nixctr build \
                 {list}` first)",
                options.image
            );
        }
        let summary = nix.cache_push(&drvs, progress).await?;
        Ok(Pushed { summary, outputs: names.iter().cloned().zip(outs).collect() })
    }
    .await;
    let removed = nix.finish().await;
    let pushed = result?;
    removed?;
    Ok(pushed)
}

/// Whether the cache holds a container's current output.
pub(crate) enum Held {
    Cached(String),
    Missing(String),
    /// Evaluating it, or asking the cache, failed: why.
    Unknown(String),
}

/// For `cache ls`: the cache asked (the one written to, else the first read from), and each
/// container's answer, in order. `None` when no cache is configured.
pub(crate) async fn list(
    engine: &Engine,
    options: &NixOptions,
    project: Project<'_>,
    names: &[String],
    progress: &Progress,
) -> Result<Option<(String, Vec<(String, Held)>)>> {
    let Some(url) = options.cache.primary().map(str::to_string) else {
        return Ok(None);
    };
    let nix = start(engine, options, project, progress).await?;
    let result = async {
        let mut outputs = Vec::new();
        for name in names {
            let found = async {
                let drv = nix.instantiate(name).await?;
                Ok::<_, anyhow::Error>(nix.outputs(std::slice::from_ref(&drv)).await?.remove(0))
            }
            .await;
            outputs.push(found);
        }
        let known: Vec<String> = outputs.iter().filter_map(|o| o.as_ref().ok().cloned()).collect();
        let mut answers = nix.cache_has(&url, &known).await?.into_iter();
        let mut held = Vec::new();
        for (name, output) in names.iter().zip(outputs) {
            let answer = match output.map(|out| (answers.next(), out)) {
                Ok((Some(Ok(true)), out)) => Held::Cached(out),
                Ok((Some(Ok(false)), out)) => Held::Missing(out),
                Ok((Some(Err(e)), _)) | Err(e) => Held::Unknown(format!("{e:#}")),
                Ok((None, _)) => Held::Unknown("no answer".to_string()),
            };
            held.push((name.clone(), answer));
        }
        Ok::<_, anyhow::Error>(held)
    }
    .await;
    let removed = nix.finish().await;
    let held = result?;
    removed?;
    Ok(Some((url, held)))
}

async fn start(
    engine: &Engine,
    options: &NixOptions,
    project: Project<'_>,
    progress: &Progress,
) -> Result<NixContainer> {
    let inputs = Inputs { project: Some(project.root), role: "cache", platform: project.platform };
    NixContainer::start(engine, options, inputs, progress).await
}
