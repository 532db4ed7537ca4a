//! The nix image on the engine, for one platform. The engine's local copy is checked, not
//! trusted: a `docker pull --platform linux/arm64` of the tag makes it name the arm64 image on
//! Docker 20.10, and a native build would then run nix under emulation. An image of the wrong
//! platform is pulled again for the right one, whatever the pull policy allows otherwise.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context, Result};
use bollard::query_parameters::CreateImageOptionsBuilder;

use super::{engine_err, is_not_found, split_image_tag, timed, Engine, PullPolicy};
use crate::platform::Platform;
use crate::progress::Progress;

/// An image in the engine: its ID and the platform it is for.
struct Local {
    id: String,
    platform: Platform,
}

impl Engine {
    /// The platform the engine runs natively.
    pub(crate) async fn native_platform(&self) -> Result<Platform> {
        let info = timed("an info request", self.docker.info()).await?.map_err(engine_err)?;
        let os = info.os_type.unwrap_or_else(|| "linux".to_string());
        let arch = info.architecture.ok_or_else(|| anyhow!("the engine does not say its architecture"))?;
        Ok(Platform::new(&os, &arch, None))
    }

    /// The ID and platform of `image` if the engine has it.
    pub(crate) async fn local_image(&self, image: &str) -> Result<Option<(String, Platform)>> {
        Ok(self.local(image).await?.map(|l| (l.id, l.platform)))
    }

    /// The ID of `image` if the engine has it.
    pub(crate) async fn image_id(&self, image: &str) -> Result<Option<String>> {
        Ok(self.local(image).await?.map(|l| l.id))
    }

    /// The `NAME@sha256:…` digests the engine knows `image` by (empty for an image never
    /// pulled or pushed).
    pub(crate) async fn repo_digests(&self, image: &str) -> Result<Vec<String>> {
        match timed("an image inspect", self.docker.inspect_image(image)).await? {
            Ok(info) => Ok(info.repo_digests.unwrap_or_default()),
            Err(e) => Err(engine_err(e)).context(format!("cannot inspect image {image:?}")),
        }
    }

    async fn local(&self, image: &str) -> Result<Option<Local>> {
        match timed("an image inspect", self.docker.inspect_image(image)).await? {
            Ok(info) => {
                let id = info.id.ok_or_else(|| anyhow!("the engine reports no ID for image {image:?}"))?;
                let os = info.os.unwrap_or_else(|| "linux".to_string());
                let arch = info.architecture.unwrap_or_default();
                Ok(Some(Local { id, platform: Platform::new(&os, &arch, info.variant.as_deref()) }))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(engine_err(e)).context(format!("cannot inspect image {image:?}")),
        }
    }

    /// Makes sure the engine has `image` for `platform` according to `policy`, and returns
    /// the ID of that platform's image.
    pub(crate) async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        platform: &Platform,
        progress: &Progress,
    ) -> Result<String> {
        let local = self.local(image).await?;
        let fits = local.as_ref().is_some_and(|l| same(&l.platform, platform));
        match (policy, &local) {
            (PullPolicy::Never, None) => bail!(
                "image {image:?} is not in the engine and --pull never forbids pulling it \
                 (pull it, or drop --pull never)"
            ),
            (PullPolicy::Never, Some(l)) if !fits => bail!(
                "the engine's {image:?} is for {}, not {platform}, and --pull never forbids pulling it \
                 (drop --pull never, or pull it for {platform})",
                l.platform
            ),
            (PullPolicy::Missing | PullPolicy::Never, Some(l)) if fits => return Ok(l.id.clone()),
            (_, Some(l)) if !fits => {
                progress.info(format!("the engine's {image} is for {}: pulling it for {platform}", l.platform))
            }
            _ => {}
        }
        self.pull(image, platform, progress).await?;
        let pulled = self.local(image).await?.ok_or_else(|| anyhow!("image {image:?} is missing after pulling it"))?;
        if !same(&pulled.platform, platform) {
            // A single-platform image is pulled whatever the platform asked for.
            let has = self.platforms_of(image).await.unwrap_or_else(|| vec![pulled.platform.clone()]);
            return Err(no_such_platform(image, platform, &has));
        }
        Ok(pulled.id)
    }

    async fn pull(&self, image: &str, platform: &Platform, progress: &Progress) -> Result<()> {
        let (name, tag) = split_image_tag(image);
        progress.info(format!("pulling {image} for {platform}"));
        let wanted = platform.to_string();
        let options = CreateImageOptionsBuilder::default().from_image(name).tag(tag).platform(&wanted).build();
        let mut stream = self.docker.create_image(Some(options), None, None);
        let watch = self.watch(format!("pulling {image}"));
        let bar = progress.bar("pull", None);
        let mut layers: HashMap<String, (i64, i64)> = HashMap::new();
        let result: Result<()> = async {
            while let Some(item) = watch.next(&mut stream).await? {
                let info = item.map_err(engine_err)?;
                if let (Some(id), Some(detail)) = (&info.id, &info.progress_detail) {
                    if let (Some(cur), Some(total)) = (detail.current, detail.total) {
                        layers.insert(id.clone(), (cur, total));
                        bar.set_position(layers.values().map(|(c, _)| *c as u64).sum());
                    }
                }
            }
            Ok(())
        }
        .await;
        bar.finish_and_clear();
        match &result {
            Err(e) if super::is_stall(e) => return result,
            _ => {}
        }
        if result.is_err() {
            // Say which platforms the image has, when the engine can tell.
            if let Some(has) = self.platforms_of(image).await.filter(|has| !has.iter().any(|p| same(p, platform))) {
                return Err(no_such_platform(image, platform, &has));
            }
        }
        result.with_context(|| {
            format!(
                "cannot pull image {image:?} for {platform} (offline, or no such tag?): name another with \
                 --nix-image, or use one already in the engine with --pull never"
            )
        })
    }

    /// The platforms a (multi-platform) image offers, as the engine reads them from its
    /// registry: Docker's distribution endpoint, or Podman's manifest inspection.
    pub(crate) async fn platforms_of(&self, image: &str) -> Option<Vec<Platform>> {
        let encoded = image.replace('/', "%2F");
        let (path, key) = if self.is_podman() {
            (format!("/libpod/manifests/{encoded}/json"), "manifests")
        } else {
            (format!("/distribution/{image}/json"), "Platforms")
        };
        let answer = self.get_json(&path).await.ok()?;
        let list = answer.get(key)?.as_array()?;
        let platforms: Vec<Platform> = list
            .iter()
            .filter_map(|item| {
                // Docker lists platforms; Podman lists manifest descriptors that carry one.
                let p = item.get("platform").unwrap_or(item);
                let os = p.get("os")?.as_str()?;
                let arch = p.get("architecture")?.as_str()?;
                Some(Platform::new(os, arch, p.get("variant").and_then(|v| v.as_str())))
            })
            .collect();
        (!platforms.is_empty()).then_some(platforms)
    }
}

fn no_such_platform(image: &str, platform: &Platform, has: &[Platform]) -> anyhow::Error {
    let has: Vec<String> = has.iter().map(Platform::to_string).collect();
    anyhow!(
        "the nix image {image} has no {platform} image; it has {} (pick one with --platform, or name \
         another image with --nix-image)",
        has.join(", ")
    )
}

/// The same platform; a variant only one side names does not tell them apart.
pub(crate) fn same(a: &Platform, b: &Platform) -> bool {
    a.os == b.os
        && a.architecture == b.architecture
        && (a.variant.is_none() || b.variant.is_none() || a.variant == b.variant)
}
