//! Push sessions: one per registry host, owning the connection, the blob cache, the
//! compressor and the compressions under way, shared by every push to that host (pushes to
//! different repositories may run at once; blob transfers stay within `jobs` in all).
//!
//! How an archive is read depends on what it is, so that only what changed is read:
//! - A plain `.tar` is indexed from its tar headers (manifest.json and the config read, layer
//!   data seeked over). A layer whose diff_id the blob cache maps to a blob the registry
//!   confirms (HEAD, digest and size) is skipped without reading its bytes; the others are
//!   read, hashed, checked against their diff_id and compressed, one at a time on every
//!   core, and uploaded as each is done.
//! - A `.tar.gz` is read whole (its bytes cannot be reached otherwise). For a registry the
//!   cache knows nothing of, every layer is compressed as it is inflated (a pipeline: inflate
//!   on one thread, hash and compress on the others); else it is inflated to a temporary
//!   file and only the layers the cache does not know are compressed.
//! - A stream ([`PushSession::push_reader`]) is read once: every layer is hashed and
//!   compressed as it passes and its blob sent at once; the layers are matched with the
//!   config's diff_ids when the stream ends.
//!
//! An archive unchanged since its last check (same inode, size, mtime, ctime and content
//! sample, its config agreeing) is not indexed or read again, unless a layer turns out to need
//! compressing and the recalled archive cannot supply its bytes. Then the config; the manifest
//! last, so a failed push leaves no tag (a `.tar.gz` that does not check out sends nothing at
//! all; a plain archive or a stream may have sent blobs by then, which nothing names). Both
//! cache files are hints: a layer goes into a manifest only as a blob whose link to its
//! diff_id nixctr proved (compressed it from bytes hashing to that diff_id, then or in a
//! signed cache entry), at the size the registry's HEAD confirms. A layer whose bytes do not
//! hash to the config's diff_id is refused whenever it must be sent; where it need not be,
//! its bytes are never read, and the manifest names the diff_id's proven blob, consistent
//! with the config.

mod index;
pub(crate) mod referrers;
mod tags;

pub use tags::{Destination, ExistingTags};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use tokio::sync::Semaphore;

use super::api::manifest_type_refused;
use super::blobs::{compress, Compressed, Compressor, Pending};
use super::cache::{BlobCache, CachedBlob};
use super::client::Client;
use super::manifest::{image_manifest, Compression, ManifestFormat};
use super::phases::{Phase, PhaseClock, PushPhases};
use super::upload::{UploadBody, UploadPolicy, UploadStats};
use super::Target;
use super::{is_digest, plural, short, Reference, RegistryConfig};
use crate::archive::{Archive, Cancellable, EntryData, SeenEntry};
use crate::progress::{human_bytes, Progress};

/// Called with each layer of an archive read once: hashes and compresses it, giving back its
/// sha256.
type OnLayer<'a> = dyn FnMut(&str, &mut dyn std::io::Read) -> Result<String> + 'a;

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
    /// The tags that name the manifest now, the reference's first; none when pushed by
    /// digest only.
    pub tags: Vec<String>,
    /// Those of `tags` that named it already: nothing was sent for them. All of them: the
    /// image was published already, and nothing was sent at all.
    pub already: Vec<String>,
    /// What the uploads took: bytes sent, requests, chunks, resumes.
    pub uploads: UploadStats,
    /// Layers whose bytes this push read (hashed, and compressed unless the registry had
    /// them): with a blob cache, only those the registry lacked, or all of a compressed
    /// archive, which can only be read whole.
    pub read_layers: usize,
    /// Layers this push compressed (of those read, the ones the registry lacked, or all
    /// when they were compressed as they were read).
    pub compressed_layers: usize,
    /// Layers in the image (in all images, for an index).
    pub total_layers: usize,
    /// Where the time went.
    pub phases: PushPhases,
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
            tags: Vec::new(),
            already: Vec::new(),
            uploads: UploadStats::default(),
            read_layers: 0,
            compressed_layers: 0,
            total_layers: 0,
            phases: PushPhases::default(),
        }
    }

    /// Whether every tag named the image already, so that nothing was pushed.
    pub fn already_published(&self) -> bool {
        !self.tags.is_empty() && self.already.len() == self.tags.len()
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
    /// Not in the repository, and left so ([`Mode::Check`]).
    Missing,
}

/// A layer's step of a push: done as (digest, size) of its blob (and whether its bytes were
/// read for it), or not possible without reading the archive again.
enum LayerStep {
    Done((String, u64), LayerResult, bool),
    NeedsFullRead,
}

/// An image's blobs settled as far as it went: a recalled archive may lack the bytes of a
/// layer that needs compressing.
enum Attempt {
    Done(Box<Prepared>),
    NeedsFullRead,
}

/// An image whose blobs are known (and in the repository, unless only checked): what its
/// manifest is made of.
struct Prepared {
    /// The config blob's digest and size.
    config: (String, u64),
    /// Each layer's blob, in order.
    layers: Vec<(String, u64)>,
    /// Of the bytes sent, those of layers.
    layer_bytes: u64,
    /// What was sent and found so far (no digest yet).
    outcome: PushOutcome,
}

/// What settling an image's blobs does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Each blob ends up in the repository: found, mounted or uploaded.
    Push,
    /// Each blob's digest is found out (from the registry, or by compressing the layer), and
    /// nothing is sent: the manifest can be worked out before deciding to push.
    Check,
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
        Ok(self.tag_digest(reference).await?.is_some())
    }

    /// The digest of the manifest (an image's or an index's) under `reference`'s tag, if any.
    pub async fn tag_digest(&self, reference: &Reference) -> Result<Option<String>> {
        self.check_host(reference)?;
        self.login_for(reference).await?;
        self.client().await?.manifest_digest(reference.repository(), reference.tag()).await
    }

    /// Pushes `archive` as `reference`, overwriting the tag if it exists.
    pub async fn push(&self, archive: &Path, reference: &Reference, progress: &Progress) -> Result<PushOutcome> {
        self.push_to(archive, &Destination::new(reference.clone()), progress).await
    }

    /// Pushes `archive` under each tag of `destination`. Nothing is sent until the archive
    /// checks out; layers are compressed while it is still being read. When tags that must
    /// match exist already, the image's manifest is worked out first (asking the registry
    /// which blobs it has, compressing the others) and compared with what they name: the
    /// same image is not sent again, another one is refused before anything is sent. The
    /// blob cache is saved afterwards, whether the push worked or not: what went up stays known.
    pub async fn push_to(&self, archive: &Path, destination: &Destination, progress: &Progress) -> Result<PushOutcome> {
        let reference = destination.reference();
        self.check_host(reference)?;
        let started = Started::new(&self.compressor);
        let result = async {
            let states = self.tag_states(destination).await?;
            if states.iter().any(|s| s.digest.is_some()) && destination.existing() == ExistingTags::MustMatch {
                let image = self.prepare(archive, reference, Mode::Check, progress, &started).await?;
                let candidates = self.manifest_candidates(&image)?;
                return self.publish_unless_there(destination, &states, candidates, image.outcome, progress).await;
            }
            let image = self.prepare(archive, reference, Mode::Push, progress, &started).await?;
            let existing: Vec<String> = states.into_iter().filter(|s| s.digest.is_some()).map(|s| s.tag).collect();
            self.put_image(image, reference, destination.tags(), &existing, progress).await
        }
        .await;
        self.save_cache(progress);
        result.map(|outcome| started.finish(outcome, progress))
    }

    /// Pushes the uncompressed docker-archive that `reader` yields (entries in any order, as
    /// nixpkgs' `streamLayeredImage` writes them: layers first, manifest last) under each tag
    /// of `destination`. The stream is read once: each layer is hashed and compressed into a
    /// temporary file as it passes (nothing uncompressed is written), the layers are checked
    /// against the config's diff_ids at the end, and then the image goes up as a file
    /// archive's would, tags that must match compared first.
    pub async fn push_reader(
        &self,
        reader: Box<dyn std::io::Read + Send>,
        destination: &Destination,
        progress: &Progress,
    ) -> Result<PushOutcome> {
        let reference = destination.reference();
        self.check_host(reference)?;
        let started = Started::new(&self.compressor);
        let result = async {
            progress.info("reading the image stream");
            // The tags first (a few requests): whether blobs go up while the stream is read.
            self.login_for(reference).await?;
            let states = self.tag_states(destination).await?;
            let check = states.iter().any(|s| s.digest.is_some()) && destination.existing() == ExistingTags::MustMatch;
            let mode = if check { Mode::Check } else { Mode::Push };
            // A registry this cache has sent to likely has most layers already: the stream is
            // spooled and hashed, and only the layers it lacks are compressed. Else every layer
            // is compressed as it passes and sent at once.
            let warm = self.cache.lock().is_ok_and(|c| c.knows_any(&self.registry, self.compression.name()));
            let archive = if warm {
                self.read_spooled(reader, progress, &started).await?
            } else {
                let read = move |cancel: Arc<AtomicBool>, on_layer: &mut OnLayer<'_>| {
                    Archive::from_stream(Cancellable { inner: reader, cancel }, "the image stream", on_layer)
                };
                let early = (mode == Mode::Push).then(|| reference.repository());
                self.read_stream(read, early, progress, &started).await?
            };
            let mut image = match self.settle_blobs(&archive, reference, mode, progress, &started).await? {
                Attempt::Done(image) => *image,
                Attempt::NeedsFullRead => bail!("a layer of the image stream was not kept"),
            };
            image.outcome.read_layers = archive.layers.len();
            if !warm {
                image.outcome.compressed_layers = archive.layers.len();
            }
            if check {
                let candidates = self.manifest_candidates(&image)?;
                return self.publish_unless_there(destination, &states, candidates, image.outcome, progress).await;
            }
            let existing: Vec<String> = states.into_iter().filter(|s| s.digest.is_some()).map(|s| s.tag).collect();
            self.put_image(image, reference, destination.tags(), &existing, progress).await
        }
        .await;
        self.save_cache(progress);
        result.map(|outcome| started.finish(outcome, progress))
    }

    /// Reads a docker-archive once with `read`, compressing every layer as it passes; the
    /// compressions go to the compressor, where each layer's step finds them. With `early`
    /// (a repository), each compressed blob goes up to it at once, while the rest is read:
    /// a blob is content-addressed, and nothing names it until the manifest, put only once
    /// the whole archive checked out.
    async fn read_stream<F>(
        &self,
        read: F,
        early: Option<&str>,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Archive>
    where
        F: FnOnce(Arc<AtomicBool>, &mut OnLayer<'_>) -> Result<Archive> + Send + 'static,
    {
        let _in = started.clock.enter(Phase::Read);
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        let (compression, dir, clock) =
            (self.compression, self.compressor.work_dir().to_path_buf(), started.clock.clone());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Arc<Compressed>>();
        let reading = tokio::task::spawn_blocking(move || -> Result<(Archive, Vec<Arc<Compressed>>)> {
            let mut kept = Vec::new();
            let archive = read(cancel, &mut |name, layer| {
                let compressed = Arc::new(
                    compress(layer, compression, &dir, true, &clock)
                        .with_context(|| format!("cannot compress {name:?}"))?,
                );
                let digest = compressed.input_digest.clone();
                let _ = tx.send(compressed.clone());
                kept.push(compressed);
                Ok(digest)
            })?;
            Ok((archive, kept))
        });
        let uploads = async {
            let Some(repo) = early else { return };
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .for_each_concurrent(self.jobs, |blob| async move {
                    if let Err(e) = self.upload_early(repo, &blob, started).await {
                        progress.debug(format!("an early upload failed (the layer's step sends it again): {e:#}"));
                    }
                })
                .await;
        };
        let (read, ()) = tokio::join!(reading, uploads);
        let (archive, kept) = read.map_err(|e| anyhow!("reading the image stream stopped: {e}"))??;
        for compressed in kept {
            // Entries that are not layers of the image go now, with their files.
            let diff_id = compressed.input_digest.clone();
            if archive.layers.iter().any(|l| l.diff_id == diff_id) {
                started.adopt(&diff_id, compressed);
            }
        }
        Ok(archive)
    }

    /// Sends a blob compressed from a stream unless the repository has it, noting what was
    /// sent for the layer's step to count. The blob cache learns the link (proven: the blob
    /// was made from bytes hashing to its diff_id) only in that step, for layers of the image.
    async fn upload_early(&self, repo: &str, blob: &Compressed, started: &Started<'_>) -> Result<()> {
        let _transfer = self.transfers.acquire().await.context("the push session closed")?;
        let _in = started.clock.enter(Phase::Upload);
        let key = (blob.digest.as_str(), blob.size);
        if self.client().await?.blob_exists(repo, key).await? {
            return Ok(());
        }
        let body = UploadBody::File(blob.file.path());
        let stats = self.client().await?.upload_blob(&self.uploads, repo, key, body, None).await?;
        if let Ok(mut sent) = started.sent_early.lock() {
            sent.insert(blob.digest.clone(), stats);
        }
        Ok(())
    }

    /// Pushes `archive` by digest only, untagged (an image of an index).
    async fn push_untagged(&self, archive: &Path, reference: &Reference, progress: &Progress) -> Result<PushOutcome> {
        let started = Started::new(&self.compressor);
        let result = async {
            let image = self.prepare(archive, reference, Mode::Push, progress, &started).await?;
            self.put_image(image, reference, &[], &[], progress).await
        }
        .await;
        self.save_cache(progress);
        result.map(|outcome| started.finish(outcome, progress))
    }

    fn save_cache(&self, progress: &Progress) {
        if let Ok(mut cache) = self.cache.lock() {
            if let Err(e) = cache.save() {
                progress.debug(format!("could not save the blob cache: {e:#}"));
            }
        }
        if let Some(note) = self.uploads.save() {
            progress.debug(note);
        }
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

    /// Reads the archive (or recalls it) and settles each blob: sent to the repository in
    /// [`Mode::Push`], only known in [`Mode::Check`].
    async fn prepare(
        &self,
        path: &Path,
        reference: &Reference,
        mode: Mode,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Prepared> {
        progress.info(format!("reading {}", path.display()));
        let recalled = {
            let _in = started.clock.enter(Phase::Read);
            self.recall(path, progress).await
        };
        if let Some(recalled) = recalled {
            progress.debug(format!("{} is unchanged since nixctr last checked it", path.display()));
            self.login_for(reference).await?;
            match self.settle_blobs(&recalled, reference, mode, progress, started).await? {
                Attempt::Done(image) => return Ok(*image),
                Attempt::NeedsFullRead => progress.debug("a layer needs compressing: reading the whole archive"),
            }
        }
        // A plain archive: its headers say where everything is, and only the layers the
        // registry lacks are read. Logs in meanwhile; what is wrong with the archive is said first.
        let (indexed, login) = tokio::join!(self.index(path, progress, started), self.login_for(reference));
        if let Some(archive) = indexed? {
            login?;
            return match self.settle_blobs(&archive, reference, mode, progress, started).await? {
                Attempt::Done(image) => Ok(*image),
                Attempt::NeedsFullRead => bail!("{}: a layer has no bytes in a plain archive", path.display()),
            };
        }
        // A compressed archive for a registry nothing was sent to yet (as far as the blob cache
        // knows): its layers will all be sent, so each is compressed as it is inflated, with
        // no uncompressed copy on disk.
        if !self.cache.lock().is_ok_and(|c| c.knows_any(&self.registry, self.compression.name())) {
            let owned = path.to_path_buf();
            let read = move |cancel: Arc<AtomicBool>, on_layer: &mut OnLayer<'_>| {
                Archive::stream_gzip_file(&owned, cancel, on_layer)
            };
            // Nothing is sent before the whole file checked out: a bad archive on disk leaves
            // the registry as it was.
            let (archive, login) =
                tokio::join!(self.read_stream(read, None, progress, started), self.login_for(reference));
            let archive = archive?;
            login?;
            if let Some(memory) = &self.memory {
                if let Err(e) = archive.remember(memory) {
                    progress.debug(format!("could not remember the archive's check: {e:#}"));
                }
            }
            return match self.settle_blobs(&archive, reference, mode, progress, started).await? {
                Attempt::Done(mut image) => {
                    image.outcome.read_layers = archive.layers.len();
                    image.outcome.compressed_layers = archive.layers.len();
                    Ok(*image)
                }
                Attempt::NeedsFullRead => bail!("{}: a layer was not kept", path.display()),
            };
        }
        // Else it is read whole, compressing the layers the cache does not know as they come by.
        let (archive, login) = tokio::join!(self.read(path, progress, started), self.login_for(reference));
        let archive = archive?;
        login?;
        match self.settle_blobs(&archive, reference, mode, progress, started).await? {
            Attempt::Done(mut image) => {
                image.outcome.read_layers = archive.layers.len();
                Ok(*image)
            }
            Attempt::NeedsFullRead => bail!("{}: a layer has no bytes even after a full read", path.display()),
        }
    }

    /// A plain archive's index ([`Archive::index`]), remembered for the next push; `None` for
    /// a compressed one.
    async fn index(&self, path: &Path, progress: &Progress, started: &Started<'_>) -> Result<Option<Archive>> {
        let _in = started.clock.enter(Phase::Read);
        let owned = path.to_path_buf();
        let indexed = tokio::task::spawn_blocking(move || Archive::index(&owned))
            .await
            .map_err(|e| anyhow!("reading the archive stopped: {e}"))??;
        if let (Some(archive), Some(memory)) = (&indexed, &self.memory) {
            if let Err(e) = archive.remember(memory) {
                progress.debug(format!("could not remember the archive's check: {e:#}"));
            }
        }
        Ok(indexed)
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
        let owned = path.to_path_buf();
        let open = move |cancel: Arc<AtomicBool>, on_entry: &mut dyn FnMut(&SeenEntry)| {
            Archive::open_with(&owned, Some(cancel), on_entry)
        };
        let archive = self.compress_unknown("the archive", open, progress, started).await?;
        if let Some(memory) = &self.memory {
            if let Err(e) = archive.remember(memory) {
                progress.debug(format!("could not remember the archive's check: {e:#}"));
            }
        }
        Ok(archive)
    }

    /// An image stream read into a spool ([`Archive::spool_stream`]), each layer the blob
    /// cache does not know compressed from there as soon as it is in.
    async fn read_spooled(
        &self,
        reader: Box<dyn std::io::Read + Send>,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Archive> {
        let open = move |cancel: Arc<AtomicBool>, on_entry: &mut dyn FnMut(&SeenEntry)| {
            Archive::spool_stream(Cancellable { inner: reader, cancel }, "the image stream", on_entry)
        };
        self.compress_unknown("the image stream", open, progress, started).await
    }

    /// Reads an archive with `open` on a blocking thread; each layer entry the blob cache
    /// does not know starts compressing (from where `open` left its bytes) as soon as it is
    /// read: the layer's step finds it in the compressor.
    async fn compress_unknown<F>(
        &self,
        shown: &str,
        open: F,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Archive>
    where
        F: FnOnce(Arc<AtomicBool>, &mut dyn FnMut(&SeenEntry)) -> Result<Archive> + Send + 'static,
    {
        let _in = started.clock.enter(Phase::Read);
        let cancel = Arc::new(AtomicBool::new(false));
        let _guard = CancelOnDrop(cancel.clone());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SeenEntry>();
        let reading = tokio::task::spawn_blocking(move || {
            open(cancel, &mut |entry| {
                let _ = tx.send(entry.clone());
            })
        });
        while let Some(entry) = rx.recv().await {
            if self.cached(&entry.sha256).is_none() {
                progress.debug(format!("layer {}: not in the blob cache, compressing", short(&entry.sha256)));
                drop(started.start(&entry.sha256, entry.data));
            }
        }
        reading.await.map_err(|e| anyhow!("reading {shown} stopped: {e}"))?
    }

    fn cached(&self, diff_id: &str) -> Option<CachedBlob> {
        self.cache.lock().ok()?.get(&self.registry, self.compression.name(), diff_id).cloned()
    }

    fn record(&self, diff_id: &str, (digest, size): (&str, u64), repo: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.record(&self.registry, self.compression.name(), diff_id, digest, size, repo);
        }
    }

    /// Layers (`jobs` at once), then the config: each blob's digest and size, and (in
    /// [`Mode::Push`]) each in the repository.
    async fn settle_blobs(
        &self,
        archive: &Archive,
        reference: &Reference,
        mode: Mode,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<Attempt> {
        let total = archive.layers.len();
        let repo = reference.repository();
        match mode {
            Mode::Push => progress.info(format!("pushing {total} layers to {reference}")),
            Mode::Check => progress.info(format!("checking the image against the tags of {reference}")),
        }

        let mut steps = futures::stream::iter(0..total)
            .map(|index| self.push_layer(archive, index, repo, mode, progress, started))
            .buffered(self.jobs);
        let mut layers = Vec::with_capacity(total);
        let mut outcome = PushOutcome::new(reference, self.format);
        while let Some(step) = steps.next().await {
            let (blob, result) = match step? {
                LayerStep::Done(blob, result, read) => {
                    outcome.read_layers += usize::from(read);
                    outcome.compressed_layers += usize::from(read);
                    (blob, result)
                }
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
                LayerResult::Missing => {}
            }
            layers.push(blob);
        }
        drop(steps);
        outcome.total_layers = total;

        let layer_bytes = outcome.pushed_bytes;
        let config = (archive.config_digest.clone(), archive.config.len() as u64);
        if mode == Mode::Push {
            let _transfer = self.transfers.acquire().await.context("the push session closed")?;
            let _in = started.clock.enter(Phase::Upload);
            if !self.client().await?.blob_exists(repo, (&config.0, config.1)).await? {
                let body = UploadBody::Bytes(archive.config.clone());
                let stats =
                    self.client().await?.upload_blob(&self.uploads, repo, (&config.0, config.1), body, None).await?;
                outcome.pushed_bytes += config.1;
                outcome.uploads.add(&stats);
            }
        }
        Ok(Attempt::Done(Box::new(Prepared { config, layers, layer_bytes, outcome })))
    }

    /// Puts the manifest of a pushed image under `tags` of `reference`'s repository
    /// (`existing`: those the registry has, moved first), or by digest only when there are
    /// none. A registry that refuses the manifest type gets the other format.
    async fn put_image(
        &self,
        image: Prepared,
        reference: &Reference,
        tags: &[String],
        existing: &[String],
        progress: &Progress,
    ) -> Result<PushOutcome> {
        let Prepared { config, layers, layer_bytes, mut outcome } = image;
        let repo = reference.repository();
        let mut format = self.format;
        let putting = std::time::Instant::now();
        outcome.digest = loop {
            let (media_type, body) = image_manifest(format, self.compression, (&config.0, config.1), &layers)?;
            outcome.manifest_size = body.len() as u64;
            outcome.media_type = media_type.to_string();
            match self.put_tagged(repo, tags, existing, media_type, body, progress).await? {
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
        outcome.phases.manifest += putting.elapsed();
        outcome.format = format;
        outcome.tags = tags.to_vec();
        if outcome.uploads.requests > 0 {
            progress.info(format!("sent {}", outcome.uploads.describe()));
        }
        let compressed = if outcome.compressed_layers == outcome.read_layers {
            String::new()
        } else {
            format!(", compressed {}", outcome.compressed_layers)
        };
        progress.info(format!(
            "pushed {} ({}), {} already there, {} mounted; read {} of {}{compressed}",
            plural(outcome.pushed_layers, "layer"),
            human_bytes(layer_bytes),
            outcome.skipped_layers,
            outcome.mounted_layers,
            outcome.read_layers,
            plural(outcome.total_layers, "layer"),
        ));
        Ok(outcome)
    }

    async fn push_layer(
        &self,
        archive: &Archive,
        index: usize,
        repo: &str,
        mode: Mode,
        progress: &Progress,
        started: &Started<'_>,
    ) -> Result<LayerStep> {
        let total = archive.layers.len();
        let layer = &archive.layers[index];
        let label = format!("layer {}/{total} {}", index + 1, short(&layer.diff_id));
        if let Some(known) = self.cached(&layer.diff_id) {
            let reused = {
                let _transfer = self.transfers.acquire().await.context("the push session closed")?;
                let _in = started.clock.enter(Phase::Upload);
                match mode {
                    Mode::Push => self.reuse(repo, &known).await?,
                    Mode::Check => {
                        let here = self.client().await?.blob_exists(repo, (&known.digest, known.size)).await?;
                        here.then_some(LayerResult::Skipped)
                    }
                }
            };
            match reused {
                Some(result) => {
                    report(progress, mode, &label, &result);
                    self.record(&layer.diff_id, (&known.digest, known.size), repo);
                    return Ok(LayerStep::Done((known.digest, known.size), result, false));
                }
                // A check sends nothing, so the blob may still be mounted later: keep it.
                None if mode == Mode::Check => {}
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
            .map_err(|e| anyhow!("{}: layer {} ({:?}): {e:#}", archive.path().display(), index + 1, layer.name))?;
        let blob = (compressed.digest.as_str(), compressed.size);
        let result = {
            let _transfer = self.transfers.acquire().await.context("the push session closed")?;
            let _in = started.clock.enter(Phase::Upload);
            let early = started.sent_early.lock().ok().and_then(|mut sent| sent.remove(blob.0));
            if let Some(stats) = early.filter(|_| mode == Mode::Push) {
                // Sent while the archive was read; confirmed here like any other.
                if !self.client().await?.blob_exists(repo, blob).await? {
                    bail!("registry {} lost blob {} just sent", self.registry, blob.0);
                }
                LayerResult::Pushed(blob.1, stats)
            } else if self.client().await?.blob_exists(repo, blob).await? {
                LayerResult::Skipped
            } else if mode == Mode::Check {
                LayerResult::Missing
            } else {
                let bar = progress.bar(&label, Some(blob.1));
                let body = UploadBody::File(compressed.file.path());
                let stats = self.client().await?.upload_blob(&self.uploads, repo, blob, body, Some(&bar)).await?;
                bar.finish_and_clear();
                LayerResult::Pushed(blob.1, stats)
            }
        };
        report(progress, mode, &label, &result);
        if !matches!(result, LayerResult::Missing) {
            self.record(&layer.diff_id, blob, repo);
        }
        Ok(LayerStep::Done((blob.0.to_string(), blob.1), result, true))
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

fn report(progress: &Progress, mode: Mode, label: &str, result: &LayerResult) {
    match result {
        // A check only looks: its findings are details.
        _ if mode == Mode::Check => progress.debug(format!(
            "{label} {}",
            if matches!(result, LayerResult::Missing) { "not in the repository" } else { "in the repository" }
        )),
        LayerResult::Skipped => progress.info(format!("{label} already there")),
        LayerResult::Mounted(from) => progress.info(format!("{label} mounted from {from}")),
        LayerResult::Pushed(size, _) => progress.info(format!("{label} pushed ({})", human_bytes(*size))),
        LayerResult::Missing => {}
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
    /// The push's time per phase.
    clock: Arc<PhaseClock>,
    /// Blobs sent while a stream was read, by digest, with what sending them took.
    sent_early: Mutex<HashMap<String, UploadStats>>,
}

impl<'a> Started<'a> {
    fn new(compressor: &'a Compressor) -> Started<'a> {
        Started { compressor, diff_ids: Mutex::default(), clock: Arc::default(), sent_early: Mutex::default() }
    }

    /// The push's outcome with its phases' times, printed with `-v`.
    fn finish(&self, mut outcome: PushOutcome, progress: &Progress) -> PushOutcome {
        let manifest = outcome.phases.manifest;
        outcome.phases = self.clock.phases();
        outcome.phases.manifest += manifest;
        progress.debug(format!("push phases: {} (they overlap)", outcome.phases.describe()));
        outcome
    }

    /// A compression made from a stream, removed with the push's others.
    fn adopt(&self, diff_id: &str, compressed: Arc<Compressed>) {
        if self.compressor.adopt(diff_id, compressed) {
            if let Ok(mut mine) = self.diff_ids.lock() {
                mine.push(diff_id.to_string());
            }
        }
    }

    fn start(&self, diff_id: &str, data: EntryData) -> Pending {
        match self.compressor.start(diff_id, data, &self.clock) {
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
