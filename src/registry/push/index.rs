//! Several archives as one image index: each image pushed by digest, then the index under
//! the tags, each entry naming its image's platform.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};

use super::tags::Candidate;
use super::{Destination, ExistingTags, Mode, PushOutcome, PushSession, Started};
use crate::archive;
use crate::platform::Platform;
use crate::progress::Progress;
use crate::registry::manifest::{image_index, IndexEntry};
use crate::registry::Reference;

impl PushSession {
    /// Pushes each archive's image by digest, then one image index (a Docker manifest list
    /// with `--format docker`) naming them by platform, under `destination`'s tags. Each
    /// archive's platform is read from its config first: two of one platform are refused
    /// before anything is sent. Images go one after the other, so a layer they share is sent
    /// once. Tags that exist and must match are compared with the index worked out first,
    /// as [`PushSession::push_to`] does for one image.
    pub async fn push_index(
        &self,
        archives: &[PathBuf],
        destination: &Destination,
        annotations: &BTreeMap<String, String>,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        let reference = destination.reference();
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
        let states = self.tag_states(destination).await?;
        if states.iter().any(|s| s.digest.is_some()) && destination.existing() == ExistingTags::MustMatch {
            let (candidates, outcome) =
                self.index_candidates(archives, &platforms, reference, annotations, progress).await?;
            return self.publish_unless_there(destination, &states, candidates, outcome, progress).await;
        }
        let mut entries = Vec::new();
        let mut total = PushOutcome::new(reference, self.format);
        for (path, platform) in archives.iter().zip(&platforms) {
            let one = self.push_untagged(path, reference, &progress.for_item(&platform.to_string())).await?;
            total.pushed_bytes += one.pushed_bytes;
            total.pushed_layers += one.pushed_layers;
            total.skipped_layers += one.skipped_layers;
            total.mounted_layers += one.mounted_layers;
            total.read_layers += one.read_layers;
            total.compressed_layers += one.compressed_layers;
            total.total_layers += one.total_layers;
            total.phases.add(&one.phases);
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
        let existing: Vec<String> = states.into_iter().filter(|s| s.digest.is_some()).map(|s| s.tag).collect();
        let repo = reference.repository();
        let tags = destination.tags();
        total.digest = self.put_tagged(repo, tags, &existing, media_type, body, progress).await??;
        total.tags = tags.to_vec();
        progress.info(format!("pushed the index of {} images as {reference}", entries.len()));
        Ok(total)
    }

    /// The indexes this push may make (one per manifest format), each image's blobs found
    /// out without sending anything.
    async fn index_candidates(
        &self,
        archives: &[PathBuf],
        platforms: &[Platform],
        reference: &Reference,
        annotations: &BTreeMap<String, String>,
        progress: &Progress,
    ) -> Result<(Vec<Candidate>, PushOutcome)> {
        let started = Started::new(&self.compressor);
        let mut images = Vec::new();
        let mut total = PushOutcome::new(reference, self.format);
        for (path, platform) in archives.iter().zip(platforms) {
            let progress = progress.for_item(&platform.to_string());
            let image = self.prepare(path, reference, Mode::Check, &progress, &started).await;
            self.save_cache(&progress);
            let image = image?;
            total.skipped_layers += image.outcome.skipped_layers;
            images.push((platform, self.manifest_candidates(&image)?));
        }
        let mut candidates = Vec::new();
        for (i, format) in images
            .first()
            .map(|(_, c)| c.iter().map(|c| c.format).collect())
            .unwrap_or_else(Vec::new)
            .into_iter()
            .enumerate()
        {
            let entries: Vec<IndexEntry> = images
                .iter()
                .map(|(platform, manifests)| IndexEntry {
                    media_type: manifests[i].media_type.to_string(),
                    digest: manifests[i].digest.clone(),
                    size: manifests[i].body.len() as u64,
                    platform: (*platform).clone(),
                })
                .collect();
            let (media_type, body) = image_index(format, &entries, annotations)?;
            let mut candidate = Candidate::new(format, media_type, body);
            candidate.platforms = entries.iter().map(|e| (e.platform.to_string(), e.digest.clone())).collect();
            candidates.push(candidate);
        }
        Ok((candidates, total))
    }
}
