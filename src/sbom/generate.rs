//! The SBOM of images `build` made: rendered from the closure the build read, or read now in
//! a nix container on the store the image was built in. Apart from the rest of `sbom` so the
//! store queries stay below `build`, which calls them.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use super::{closure, Document, Format, Metadata, Sbom};
use crate::build::Built;
use crate::engines::Engines;
use crate::nix::{Inputs, NixContainer, NixOptions};
use crate::progress::Progress;

/// The SBOM of each built image, in order, each one's own result. `images` pairs what
/// `build::build` returned (an archive written to a file) with the container's metadata.
/// An image built from a target with `sbom` set carries its [`Closure`], read in the container
/// that built it: it only needs rendering. For the others, one nix container per engine and
/// platform reads the store they were built in and evaluates their licences (the project at
/// `root` is uploaded for that, with no secret). An error is returned only for what concerns
/// them all.
///
/// For `publish --sbom`: set `target.sbom = true` on the targets of `build::plan`, then
/// `generate(&engines, &settings.nix, root, &[(&built, meta)], format, &progress)` and push
/// `sbom.bytes` with `sbom.media_type` as the artifact type.
pub(crate) async fn generate(
    engines: &Engines,
    nix: &NixOptions,
    root: &Path,
    images: &[(&Built, Metadata)],
    format: Format,
    progress: &Progress,
) -> Result<Vec<Result<Sbom>>> {
    let mut results: Vec<Option<Result<Sbom>>> = images.iter().map(|_| None).collect();
    // Grouped by (engine, platform): one container each, for those without a closure.
    let mut groups: Vec<(&str, &crate::platform::Platform, Vec<usize>)> = Vec::new();
    for (i, (built, meta)) in images.iter().enumerate() {
        if let Some(slot) = &built.closure {
            let rendered = match slot.get().await {
                Ok(closure) => Document::new(meta.clone(), *closure).render(format),
                Err(e) => Err(anyhow!("{e}")),
            };
            results[i] = Some(rendered.with_context(|| format!("no SBOM for {}", built.name)));
            continue;
        }
        match groups.iter_mut().find(|(e, p, _)| *e == built.engine && **p == built.platform) {
            Some((_, _, members)) => members.push(i),
            None => groups.push((&built.engine, &built.platform, vec![i])),
        }
    }
    for (address, platform, members) in groups {
        if nix.no_cache {
            bail!("the SBOM reads the store the image was built in, which --no-cache throws away: drop --no-cache");
        }
        let engine = engines
            .by_address(address)
            .ok_or_else(|| anyhow!("no connection to the engine {address} that built the image"))?;
        let inputs = Inputs { project: Some(root), role: "sbom", platform: Some(platform) };
        let container = NixContainer::start(engine, nix, inputs, progress).await?;
        for i in members {
            let (built, meta) = &images[i];
            let result = async {
                let archive = built
                    .path
                    .as_deref()
                    .ok_or_else(|| anyhow!("the SBOM of {} needs its archive in a file", built.name))?;
                let closure = closure(&container, archive, &meta.name, progress).await?;
                Document::new(meta.clone(), closure).render(format)
            }
            .await;
            results[i] = Some(result.with_context(|| format!("no SBOM for {}", built.name)));
        }
        container.finish().await?;
    }
    Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Err(anyhow!("not generated")))).collect())
}
