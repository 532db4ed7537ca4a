//! Several archives as one image index: each image pushed by digest, then the index under
//! the tag, each entry naming its image's platform.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use super::{PushOutcome, PushSession};
use crate::archive;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::registry::manifest::{image_index, IndexEntry};
use crate::registry::Reference;

impl PushSession {
    /// Pushes each archive's image by digest, then one image index (a Docker manifest list
    /// with `--format docker`) naming them by platform, under `reference`'s tag. Each
    /// archive's platform is read from its config first: two of one platform are refused
    /// before anything is sent. Images go one after the other, so a layer they share is sent once.
    pub async fn push_index(
        &self,
        archives: &[PathBuf],
        reference: &Reference,
        annotations: &BTreeMap<String, String>,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        self.check_host(reference)?;
        let mut platforms: Vec<Platform> = Vec::new();
        for path in archives {
            let owned = path.clone();
            let platform = tokio::task::spawn_blocking(move || archive::platform_of(&owned))
                .await
                .map_err(|e| anyhow!("reading {} stopped: {e}", path.display()))??;
            if let Some(i) = platforms.iter().position(|p| *p == platform) {
                bail!(
                    "{} and {} are both {platform}: an index holds one image per platform",
                    archives[i].display(),
                    path.display()
                );
            }
            platforms.push(platform);
        }
        let mut entries = Vec::new();
        let mut total = PushOutcome::new(reference, self.format);
        for (path, platform) in archives.iter().zip(&platforms) {
            let one = self.push_one(path, reference, false, &progress.for_item(&platform.to_string())).await?;
            total.pushed_bytes += one.pushed_bytes;
            total.pushed_layers += one.pushed_layers;
            total.skipped_layers += one.skipped_layers;
            total.mounted_layers += one.mounted_layers;
            total.uploads.add(&one.uploads);
            total.platforms.push((platform.to_string(), one.digest.clone()));
            entries.push((
                one.format,
                IndexEntry {
                    media_type: one.media_type,
                    digest: one.digest,
                    size: one.manifest_size,
                    platform: platform.clone(),
                },
            ));
        }
        // A registry that refused one manifest type took the other for every image.
        let format = entries.first().map_or(self.format, |(f, _)| *f);
        let entries: Vec<IndexEntry> = entries.into_iter().map(|(_, e)| e).collect();
        let (media_type, body) = image_index(format, &entries, annotations)?;
        total.manifest_size = body.len() as u64;
        total.media_type = media_type.to_string();
        total.format = format;
        let repo = reference.repository();
        total.digest = match self.client().await?.put_manifest(repo, reference.tag(), media_type, body).await? {
            Ok(digest) => digest,
            Err(rejected) => return Err(rejected.into()),
        };
        progress.info(format!("pushed the index of {} images as {reference}", entries.len()));
        Ok(total)
    }
}
