//! Push sessions: one per registry host, owning the connection, the blob cache, the
//! compressor and the compressions under way, shared by every push to that host (pushes to
//! different repositories may run at once; blob transfers stay within `jobs` in all).
//!
//! Order of work for one push: read and check the archive, compressing each layer the blob
//! cache does not know into a temporary file as soon as it has been read (on all cores).
//! Once the whole archive checks out, per layer: skip it when the registry has it, mount it
//! from another repository when the cache knows one, else upload it; then the config; the
//! manifest last, so a failed push leaves no tag. An archive unchanged since its last check
//! (same inode, size, mtime, ctime and content sample, its config agreeing) is not read
//! again, unless a layer turns out to need compressing and the recalled archive cannot supply
//! its bytes. Both cache files are hints: a layer goes into a manifest only as a blob whose
//! link to its diff_id nixctr proved (compressed it from bytes hashing to that diff_id, then
//! or in a signed cache entry), at the size the registry's HEAD confirms.

mod index;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::api::manifest_type_refused;
use super::blobs::{Compressor, Pending};
use super::cache::{BlobCache, CachedBlob};
use super::client::Client;
use super::manifest::{image_manifest, Compression, ManifestFormat};
use super::upload::{UploadBody, UploadPolicy, UploadStats};
use super::Target;
use super::{is_digest, plural, short, Reference, RegistryConfig};
use crate::archive::{sha256_digest, Archive, EntryData, SeenEntry};
use crate::progress::{human_bytes, Progress};

/// What one push did.
// pub: used by tests/it/push.rs
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// `host[:port]/path:tag`.
    pub reference: String,
    /// The manifest digest the registry confirmed (`sha256:…`).
    pub digest: String,
    /// Bytes uploaded (layers and config).
    pub pushed_bytes: u64,
    pub pushed_layers: usize,
    /// Layers the repository already had.
    pub skipped_layers: usize,
    /// Layers mounted from another repository of the registry.
    pub mounted_layers: usize,
    /// The manifest format the registry took (it may differ from the one asked for).
    pub format: ManifestFormat,
    /// The manifest's size and media type, as an index lists it.
    pub manifest_size: u64,
    pub media_type: String,
    /// For an image index: each platform (`linux/arm64`) and its image manifest's digest.
    pub platforms: Vec<(String, String)>,
    /// What the uploads took: bytes sent, requests, chunks, resumes.
    pub uploads: UploadStats,
}

impl PushOutcome {
    /// Nothing pushed yet.
    fn new(reference: &Reference, format: ManifestFormat) -> PushOutcome {
        PushOutcome {
            reference: reference.to_string(),
            digest: String::new(),
            pushed_bytes: 0,
            pushed_layers: 0,
            skipped_layers: 0,
            mounted_layers: 0,
            format,
            manifest_size: 0,
            media_type: String::new(),
            platforms: Vec::new(),
            uploads: UploadStats::default(),
        }
    }
}

/// A connection to one registry host and everything pushes to it share.
// pub: used by tests/it/push.rs
pub struct PushSession {
    /// Logged in on first use, so that a push reads its archive while it logs in.
    client: tokio::sync::OnceCell<Client>,
    target: Target,
    progress: Progress,
    /// `host[:port]`, as references name it and the blob cache keys it.
    registry: String,
    format: ManifestFormat,
    compression: Compression,
    jobs: usize,
    cache: Mutex<BlobCache>,
    /// `archives.json` next to the blob cache: archive checks to recall.
    memory: Option<PathBuf>,
    compressor: Compressor,
    /// Blob transfers (checks, mounts, uploads) under way across all pushes of the session.
    transfers: Semaphore,
    /// Whole blobs or chunks, as the registry turned out to take them.
    uploads: UploadPolicy,
}

/// How one layer went.
enum LayerResult {
    Skipped,
    Mounted(String),
    Pushed(u64, UploadStats),
}

/// A layer's step of a push: done as (digest, size) of its blob, or not possible without
/// reading the archive again.
enum LayerStep {
    Done((String, u64), LayerResult),
    NeedsFullRead,
}

/// A push of an archive as far as it went: a recalled archive may lack the bytes of a layer
/// that needs compressing.
enum Attempt {
    Done(PushOutcome),
    NeedsFullRead,
}

impl PushSession {
    /// Connects to `registry` (`host[:port]`, as [`Reference::registry`] gives it) and logs
    /// in, so bad credentials show before any work is done. Credentials are the config's, or
    /// looked up for this host.
    pub async fn connect(config: &RegistryConfig, registry: &str, progress: &Progress) -> Result<PushSession> {
        let session = PushSession::open(config, registry, progress)?;
        session.client().await?;
        Ok(session)
    }

    /// A session that logs in on its first request.
    pub fn open(config: &RegistryConfig, registry: &str, progress: &Progress) -> Result<PushSession> {
        config.check()?;
        let target = config.target(registry)?;
        for note in &target.credential_notes {
            progress.debug(format!("credentials: passed over {note}"));
        }
        if let Some(c) = &target.credentials {
            progress.debug(format!("credentials: user {:?} from {}", c.username, c.source));
        }
        let (cache, note) = BlobCache::load(config.blob_cache.clone());
        if let Some(note) = note {
            progress.debug(note);
        }
        Ok(PushSession {
            client: tokio::sync::OnceCell::new(),
            target: target.clone(),
            progress: progress.clone(),
            registry: registry.to_string(),
            format: config.format,
            compression: config.compression,
            jobs: config.jobs,
            cache: Mutex::new(cache),
            memory: config.blob_cache.as_ref().map(|p| p.with_file_name("archives.json")),
            compressor: Compressor::new(config.compression)?,
            transfers: Semaphore::new(config.jobs),
            uploads: UploadPolicy::new(
                registry,
                target.chunk_size,
                config.blob_cache.as_ref().map(|p| p.with_file_name("uploads.json")),
                progress,
            ),
        })
    }

    async fn client(&self) -> Result<&Client> {
        self.client.get_or_try_init(|| Client::connect(&self.target, &self.progress)).await
    }

    /// Whether `reference`'s tag exists in the registry (as any kind of manifest).
    pub async fn tag_exists(&self, reference: &Reference) -> Result<bool> {
        self.check_host(reference)?;
        let client = self.client().await?;
        client.add_scope(format!("repository:{}:pull,push", reference.repository()));
        client.manifest_exists(reference.repository(), reference.tag()).await
    }

    /// Pushes `archive` as `reference`. Nothing is sent until the archive checks out; layers
    /// are compressed while it is still being read. The blob cache is saved afterwards,
    /// whether the push worked or not: what went up stays known.
    pub async fn push(&self, archive: &Path, reference: &Reference, progress: &Progress) -> Result<PushOutcome> {
        self.push_one(archive, reference, true, progress).await
    }

    /// [`PushSession::push`], tagged or (for an index) by digest only.
    async fn push_one(
        &self,
        archive: &Path,
        reference: &Reference,
        tagged: bool,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        self.check_host(reference)?;
        let started = Started { compressor: &self.compressor, diff_ids: Mutex::default() };
        let result = self.push_archive(archive, reference, tagged, progress, &started).await;
        if let Ok(mut cache) = self.cache.lock() {
            if let Err(e) = cache.save() {
                progress.debug(format!("could not save the blob cache: {e:#}"));
            }
        }
        if let Some(note) = self.uploads.save() {
            progress.debug(note);
        }
        result
    }

    async fn login_for(&self, reference: &Reference) -> Result<()> {
        let client = self.client().await?;
        client.add_scope(format!("repository:{}:pull,push", reference.repository()));
        Ok(())
    }

    fn check_host(&self, reference: &Reference) -> Result<()> {
        if reference.registry() != self.registry {
            bail!("{reference} is not in registry {} (this session pushes only there)", self.registry);
        }
        Ok(())
    }

    async fn push_archive(
        &self,
        path: &Path,
        reference: &Reference,
        tagged: bool,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<PushOutcome> {
        progress.info(format!("reading {}", path.display()));
        if let Some(recalled) = self.recall(path, progress).await {
            progress.debug(format!("{} is unchanged since nixctr last checked it", path.display()));
            self.login_for(reference).await?;
            match self.push_layers(&recalled, reference, tagged, progress, started).await? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::NeedsFullRead => progress.debug("a layer needs compressing: reading the whole archive"),
            }
        }
        // Logs in while the archive is read; what is wrong with the archive is said first.
        let (archive, login) = tokio::join!(self.read(path, progress, started), self.login_for(reference));
        let archive = archive?;
        login?;
        match self.push_layers(&archive, reference, tagged, progress, started).await? {
            Attempt::Done(outcome) => Ok(outcome),
            Attempt::NeedsFullRead => bail!("{}: a layer has no bytes even after a full read", path.display()),
        }
    }

    /// The archive as its last full read found it, if unchanged since. A recalled archive
    /// whose digests are malformed (the memory file is user-writable) is not used.
    async fn recall(&self, path: &Path, progress: &Progress) -> Option<Archive> {
        let memory = self.memory.clone()?;
        let owned = path.to_path_buf();
        let (recalled, memory) = tokio::task::spawn_blocking(move || {
            let recalled = Archive::recall(&owned, &memory);
            (recalled, memory)
        })
        .await
        .ok()?;
        let Some(recalled) = recalled else {
            // No entry for this archive is normal; a file that is not JSON is worth a note.
            if let Ok(bytes) = std::fs::read(&memory) {
                if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() {
                    progress.debug(format!("{} is not valid: ignoring it", memory.display()));
                }
            }
            return None;
        };
        let sound = is_digest(&recalled.config_digest) && recalled.layers.iter().all(|l| is_digest(&l.diff_id));
        if !sound {
            progress.debug(format!("{}: malformed entry for {}: ignoring it", memory.display(), path.display()));
            return None;
        }
        Some(recalled)
    }

    /// Reads and checks the archive, compressing what looks like a layer as soon as it has
    /// been read, unless the blob cache says the registry has it already.
    async fn read(&self, path: &Path, progress: &Progress, started: &Started<'_>) -> Result<Archive> {
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SeenEntry>();
        let owned = path.to_path_buf();
        let open = tokio::task::spawn_blocking(move || {
            Archive::open_with(&owned, Some(cancel), &mut |entry| {
                let _ = tx.send(entry.clone());
            })
        });
        while let Some(entry) = rx.recv().await {
            if self.cached(&entry.sha256).is_none() {
                // The task runs on its own; the layer's step finds it in the compressor.
                drop(started.start(&entry.sha256, entry.data));
            }
        }
        let archive = open.await.map_err(|e| anyhow!("reading the archive stopped: {e}"))??;
        if let Some(memory) = &self.memory {
            if let Err(e) = archive.remember(memory) {
                progress.debug(format!("could not remember the archive's check: {e:#}"));
            }
        }
        Ok(archive)
    }

    fn cached(&self, diff_id: &str) -> Option<CachedBlob> {
        self.cache.lock().ok()?.get(&self.registry, self.compression.name(), diff_id).cloned()
    }

    fn record(&self, diff_id: &str, (digest, size): (&str, u64), repo: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.record(&self.registry, self.compression.name(), diff_id, digest, size, repo);
        }
    }

    /// Layers (`jobs` at once), config, manifest.
    async fn push_layers(
        &self,
        archive: &Archive,
        reference: &Reference,
        tagged: bool,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Attempt> {
        let total = archive.layers.len();
        let repo = reference.repository();
        progress.info(format!("pushing {total} layers to {reference}"));

        let mut steps = futures::stream::iter(0..total)
            .map(|index| self.push_layer(archive, index, repo, progress, started))
            .buffered(self.jobs);
        let mut blobs = Vec::with_capacity(total);
        let mut outcome = PushOutcome::new(reference, self.format);
        while let Some(step) = steps.next().await {
            let (blob, result) = match step? {
                LayerStep::Done(blob, result) => (blob, result),
                // Dropping `steps` stops the other layers; what they finished is in the cache.
                LayerStep::NeedsFullRead => return Ok(Attempt::NeedsFullRead),
            };
            match result {
                LayerResult::Skipped => outcome.skipped_layers += 1,
                LayerResult::Mounted(_) => outcome.mounted_layers += 1,
                LayerResult::Pushed(size, stats) => {
                    outcome.pushed_layers += 1;
                    outcome.pushed_bytes += size;
                    outcome.uploads.add(&stats);
                }
            }
            blobs.push(blob);
        }
        drop(steps);

        let layer_bytes = outcome.pushed_bytes;
        let config = (archive.config_digest.as_str(), archive.config.len() as u64);
        {
            let _transfer = self.transfers.acquire().await.context("the push session closed")?;
            if !self.client().await?.blob_exists(repo, config).await? {
                let body = UploadBody::Bytes(archive.config.clone());
                let stats = self.client().await?.upload_blob(&self.uploads, repo, config, body, None).await?;
                outcome.pushed_bytes += config.1;
                outcome.uploads.add(&stats);
            }
        }

        let mut format = self.format;
        outcome.digest = loop {
            let (media_type, body) = image_manifest(format, self.compression, config, &blobs)?;
            outcome.manifest_size = body.len() as u64;
            outcome.media_type = media_type.to_string();
            // Untagged, a manifest is put under its own digest.
            let name = if tagged { reference.tag().to_string() } else { sha256_digest(&body) };
            match self.client().await?.put_manifest(repo, &name, media_type, body).await? {
                Ok(digest) => break digest,
                Err(rejected)
                    if manifest_type_refused(&rejected)
                        && self.compression == Compression::Gzip
                        && format == self.format =>
                {
                    progress.info(format!(
                        "registry {} refused the {} manifest ({}); pushing a {} manifest instead",
                        self.registry,
                        format.name(),
                        rejected.detail.as_deref().unwrap_or(rejected.status.as_str()),
                        format.other().name()
                    ));
                    format = format.other();
                }
                Err(rejected) => return Err(rejected.into()),
            }
        };
        outcome.format = format;
        if outcome.uploads.requests > 0 {
            progress.info(format!("sent {}", outcome.uploads.describe()));
        }
        progress.info(format!(
            "pushed {} ({}), {} already there, {} mounted",
            plural(outcome.pushed_layers, "layer"),
            human_bytes(layer_bytes),
            outcome.skipped_layers,
            outcome.mounted_layers
        ));
        Ok(Attempt::Done(outcome))
    }

    async fn push_layer(
        &self,
        archive: &Archive,
        index: usize,
        repo: &str,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<LayerStep> {
        let total = archive.layers.len();
        let layer = &archive.layers[index];
        let label = format!("layer {}/{total} {}", index + 1, short(&layer.diff_id));
        if let Some(known) = self.cached(&layer.diff_id) {
            let reused = {
                let _transfer = self.transfers.acquire().await.context("the push session closed")?;
                self.reuse(repo, &known).await?
            };
            match reused {
                Some(result) => {
                    report(progress, &label, &result);
                    self.record(&layer.diff_id, (&known.digest, known.size), repo);
                    return Ok(LayerStep::Done((known.digest, known.size), result));
                }
                None => {
                    if let Ok(mut cache) = self.cache.lock() {
                        cache.forget(&self.registry, self.compression.name(), &layer.diff_id);
                    }
                }
            }
        }
        let job = match self.compressor.get(&layer.diff_id) {
            Some(job) => job,
            None => {
                progress.debug(format!("{label}: compressing {}", human_bytes(layer.size)));
                let Some(data) = layer.data.clone() else {
                    return Ok(LayerStep::NeedsFullRead);
                };
                started.start(&layer.diff_id, data)
            }
        };
        let compressed = job
            .await
            .map_err(|e| anyhow!("cannot compress layer {} of {}: {e:#}", index + 1, archive.path().display()))?;
        let blob = (compressed.digest.as_str(), compressed.size);
        let result = {
            let _transfer = self.transfers.acquire().await.context("the push session closed")?;
            if self.client().await?.blob_exists(repo, blob).await? {
                LayerResult::Skipped
            } else {
                let bar = progress.bar(&label, Some(blob.1));
                let body = UploadBody::File(compressed.file.path());
                let stats = self.client().await?.upload_blob(&self.uploads, repo, blob, body, Some(&bar)).await?;
                bar.finish_and_clear();
                LayerResult::Pushed(blob.1, stats)
            }
        };
        report(progress, &label, &result);
        self.record(&layer.diff_id, blob, repo);
        Ok(LayerStep::Done((blob.0.to_string(), blob.1), result))
    }

    /// A cached blob: still in this repository, or mountable from another one? `None`: neither.
    async fn reuse(&self, repo: &str, known: &CachedBlob) -> Result<Option<LayerResult>> {
        if self.client().await?.blob_exists(repo, (&known.digest, known.size)).await? {
            return Ok(Some(LayerResult::Skipped));
        }
        for from in known.repositories.iter().rev().filter(|r| r.as_str() != repo) {
            if self.client().await?.mount_blob(repo, &known.digest, from).await? {
                return Ok(Some(LayerResult::Mounted(from.clone())));
            }
        }
        Ok(None)
    }
}

fn report(progress: &Progress, label: &str, result: &LayerResult) {
    match result {
        LayerResult::Skipped => progress.info(format!("{label} already there")),
        LayerResult::Mounted(from) => progress.info(format!("{label} mounted from {from}")),
        LayerResult::Pushed(size, _) => progress.info(format!("{label} pushed ({})", human_bytes(*size))),
    }
}

/// Sets the flag when dropped, so blocking work stops when the push future is dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The compressions one push started. When the push ends (or is dropped) they leave the
/// session's map, so their files go once no other push holds them, and a long session does
/// not keep every layer it ever compressed on disk.
struct Started<'a> {
    compressor: &'a Compressor,
    diff_ids: Mutex<Vec<String>>,
}

impl Started<'_> {
    fn start(&self, diff_id: &str, data: EntryData) -> Pending {
        match self.compressor.start(diff_id, data) {
            Ok(job) => {
                if let Ok(mut mine) = self.diff_ids.lock() {
                    mine.push(diff_id.to_string());
                }
                job
            }
            Err(job) => job,
        }
    }
}

impl Drop for Started<'_> {
    fn drop(&mut self) {
        if let Ok(mine) = self.diff_ids.lock() {
            self.compressor.forget(&mine);
        }
    }
}
