//! Pushing docker-archives to OCI registries over the distribution API.
//!
//! The HTTP side is our own small client on reqwest (the one oci-client uses) rather than
//! oci-client's push helpers: those treat a 202 answer to a mount as an error, do not retry,
//! and do not report the `Docker-Content-Digest` of a pushed manifest. The manifest types
//! and media types are oci-client's.
//!
//! Order of work: read and check the archive while logging in, compressing each layer the
//! blob cache does not know into a temporary file as soon as it has been read (on all
//! cores). Once the whole archive checks out, per layer (`--jobs` at once): skip it when
//! the registry has it, mount it from another repository when the cache knows one, else
//! upload it; then the config; the manifest last, so a failed push leaves no tag. An
//! archive unchanged since its last check (same inode, size, mtime, ctime) is not read
//! again.

pub mod auth;
pub mod blobs;
pub mod cache;
mod client;
pub mod reference;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::{BoxFuture, Shared};
use futures::{FutureExt, StreamExt, TryStreamExt};
use oci_client::manifest::{
    OciDescriptor, OciImageManifest, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::StatusCode;
use tokio::sync::Semaphore;

use crate::archive::{sha256_digest, Archive, Cancellable, EntryData, SeenEntry};
use crate::cli::{Compression, ManifestFormat, RegistryArgs};
use crate::progress::Progress;
use crate::settings::Settings;

pub use auth::{Credentials, Secret};
pub use reference::Reference;

use cache::BlobCache;
use client::{Client, Rejected};

const IMAGE_LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// How to reach and log in to one registry; built once from settings and flags.
#[derive(Debug, Clone)]
pub struct PushOptions {
    /// `host[:port]` the options were resolved for.
    pub registry: String,
    pub format: ManifestFormat,
    pub compression: Compression,
    /// No certificate check, and plain http allowed.
    pub insecure: bool,
    /// Plain http allowed: loopback addresses and insecure registries.
    pub plain_http_allowed: bool,
    pub ca_cert: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    /// Credential sources passed over, and why (shown when the registry wants credentials).
    pub credential_notes: Vec<String>,
    pub jobs: usize,
    /// The blob cache file; `None` disables it.
    pub cache_path: Option<PathBuf>,
    pub verbose: bool,
}

impl PushOptions {
    /// Resolves flags, `nixctr.toml` and credentials (reading stdin for `--password-stdin`).
    pub fn resolve(settings: &Settings, args: &RegistryArgs, reference: &Reference) -> Result<PushOptions> {
        if args.compression == Compression::Zstd && args.format == ManifestFormat::Docker {
            bail!("--compression zstd needs --format oci (Docker schema 2 manifests have no zstd layers)");
        }
        if args.jobs == 0 {
            bail!("--jobs 0: give at least 1");
        }
        let credentials = match &args.username {
            Some(username) if args.password_stdin => {
                let mut password = String::new();
                std::io::stdin().read_line(&mut password).context("cannot read the password from stdin")?;
                let password = password.trim_end_matches(['\n', '\r']);
                if password.is_empty() {
                    bail!("--password-stdin: stdin was empty (pipe the password in, e.g. `printf %s \"$PW\" | nixctr push …`)");
                }
                Some(Credentials {
                    username: username.clone(),
                    password: Secret::new(password),
                    source: "--password-stdin".to_string(),
                })
            }
            Some(_) => bail!("--username needs --password-stdin"),
            None => None,
        };
        let (credentials, credential_notes) = match credentials {
            Some(c) => (Some(c), Vec::new()),
            None => {
                let found = auth::Lookup::from_env().find(reference.registry())?;
                (found.credentials, found.notes)
            }
        };
        let registry = reference.registry().to_string();
        let hostname = reference.hostname();
        let listed = settings.insecure_registries.iter().any(|r| r == &registry || r == hostname);
        let insecure = args.insecure || listed;
        Ok(PushOptions {
            registry,
            format: args.format,
            compression: args.compression,
            insecure,
            plain_http_allowed: insecure || is_loopback(hostname),
            ca_cert: args.ca_cert.clone(),
            credentials,
            credential_notes,
            jobs: args.jobs,
            cache_path: BlobCache::default_path(),
            verbose: settings.verbose,
        })
    }
}

/// `localhost`, 127.0.0.0/8 and ::1: plain http there stays on the machine.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

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
}

/// Sets the flag when dropped, so blocking work stops when the push future is dropped.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

enum LayerResult {
    Skipped,
    Mounted(String),
    Pushed(u64),
}

/// A compression started early; shared so the layer that needs it can wait for it.
type Pending = Shared<BoxFuture<'static, std::result::Result<Arc<blobs::Compressed>, Arc<anyhow::Error>>>>;

/// Runs compressions on all cores, into temporary files; stops them when dropped.
struct Compressor {
    slots: Arc<Semaphore>,
    work: PathBuf,
    compression: Compression,
    cancel: Arc<AtomicBool>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Compressor {
    fn start(&self, data: EntryData) -> Pending {
        let (slots, work, compression, cancel) =
            (self.slots.clone(), self.work.clone(), self.compression, self.cancel.clone());
        let task = tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.map_err(|e| anyhow!("compression stopped: {e}"))?;
            tokio::task::spawn_blocking(move || {
                let reader = Cancellable { inner: data.reader()?, cancel };
                blobs::compress(reader, compression, &work)
            })
            .await
            .map_err(|e| anyhow!("compression stopped: {e}"))?
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push(task.abort_handle());
        }
        async move {
            match task.await {
                Ok(Ok(compressed)) => Ok(Arc::new(compressed)),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(e) => Err(Arc::new(anyhow!("compression stopped: {e}"))),
            }
        }
        .boxed()
        .shared()
    }
}

impl Drop for Compressor {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Ok(tasks) = self.tasks.lock() {
            tasks.iter().for_each(|t| t.abort());
        }
    }
}

/// A recalled compressed archive has a layer to compress: its bytes need a full read.
#[derive(Debug, thiserror::Error)]
#[error("the archive needs a full read")]
struct NeedsFullRead;

fn codec_name(compression: Compression) -> &'static str {
    match compression {
        Compression::Gzip => "gzip",
        Compression::Zstd => "zstd",
    }
}

/// Pushes `archive` as `reference`. Nothing is sent until the archive checks out; layers
/// are compressed while it is still being read.
pub async fn push(
    archive: &Path,
    reference: &Reference,
    opts: &PushOptions,
    progress: &Progress,
) -> Result<PushOutcome> {
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let work = tempfile::Builder::new()
        .prefix("nixctr-push-")
        .tempdir()
        .context("cannot create a temporary directory (is TMPDIR writable?)")?;
    let cache = Arc::new(Mutex::new(BlobCache::load(opts.cache_path.clone())));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let compressor = Arc::new(Compressor {
        slots: Arc::new(Semaphore::new(cores)),
        work: work.path().to_path_buf(),
        compression: opts.compression,
        cancel: cancel.clone(),
        tasks: Mutex::new(Vec::new()),
    });
    let pending: Arc<Mutex<HashMap<String, Pending>>> = Arc::default();

    for note in &opts.credential_notes {
        progress.debug(format!("credentials: passed over {note}"));
    }
    if let Some(c) = &opts.credentials {
        progress.debug(format!("credentials: user {:?} from {}", c.username, c.source));
    }
    progress.info(format!("reading {}", archive.display()));
    let memory = opts.cache_path.as_ref().map(|p| p.with_file_name("archives.json"));
    let mut client = None;
    if let Some(memory) = &memory {
        let (path, memory) = (archive.to_path_buf(), memory.clone());
        if let Ok(Some(recalled)) = tokio::task::spawn_blocking(move || Archive::recall(&path, &memory)).await {
            progress.debug(format!("{} is unchanged since nixctr last checked it", archive.display()));
            let connected = Arc::new(Client::connect(opts, reference.api_host(), reference.repository()).await?);
            let result =
                push_with(&Arc::new(recalled), reference, opts, progress, &connected, &cache, &compressor, &pending)
                    .await;
            match result {
                Err(e) if e.is::<NeedsFullRead>() => {
                    progress.debug("a layer needs compressing: reading the whole archive");
                    client = Some(connected);
                }
                other => return finish(other, &cache, progress),
            }
        }
    }

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SeenEntry>();
    let path = archive.to_path_buf();
    let flag = cancel.clone();
    let open = tokio::task::spawn_blocking(move || {
        Archive::open_with(&path, Some(flag), &mut |entry| {
            let _ = tx.send(entry.clone());
        })
    });
    let codec = codec_name(opts.compression);
    let scanned = async {
        // Compress what looks like a layer as soon as it is read, unless the cache says the
        // registry has it already.
        while let Some(entry) = rx.recv().await {
            let known = cache.lock().ok().is_some_and(|c| c.get(&opts.registry, codec, &entry.sha256).is_some());
            if let (false, Ok(mut map)) = (known, pending.lock()) {
                if !map.contains_key(&entry.sha256) {
                    map.insert(entry.sha256.clone(), compressor.start(entry.data));
                }
            }
        }
        open.await.map_err(|e| anyhow!("reading the archive stopped: {e}"))?
    };
    let connect = async {
        match client {
            Some(client) => Ok(client),
            None => Client::connect(opts, reference.api_host(), reference.repository()).await.map(Arc::new),
        }
    };
    let (archive, client) = tokio::try_join!(scanned, connect)?;
    if let Some(memory) = &memory {
        if let Err(e) = archive.remember(memory) {
            progress.debug(format!("could not remember the archive's check: {e:#}"));
        }
    }
    let archive = Arc::new(archive);

    let result = push_with(&archive, reference, opts, progress, &client, &cache, &compressor, &pending).await;
    finish(result, &cache, progress)
}

/// Saves the blob cache, whether the push worked or not: what went up stays known.
fn finish(result: Result<PushOutcome>, cache: &Mutex<BlobCache>, progress: &Progress) -> Result<PushOutcome> {
    if let Ok(mut cache) = cache.lock() {
        if let Err(e) = cache.save() {
            progress.debug(format!("could not save the blob cache: {e:#}"));
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn push_with(
    archive: &Arc<Archive>,
    reference: &Reference,
    opts: &PushOptions,
    progress: &Progress,
    client: &Arc<Client>,
    cache: &Arc<Mutex<BlobCache>>,
    compressor: &Arc<Compressor>,
    pending: &Arc<Mutex<HashMap<String, Pending>>>,
) -> Result<PushOutcome> {
    let total = archive.layers.len();
    let codec = codec_name(opts.compression);
    let repo = reference.repository().to_string();
    progress.info(format!("pushing {total} layers to {reference}"));

    let blobs: Vec<((String, u64), LayerResult)> = futures::stream::iter(0..total)
        .map(|index| {
            let (archive, client, cache, repo, compressor, pending) =
                (archive.clone(), client.clone(), cache.clone(), repo.clone(), compressor.clone(), pending.clone());
            let registry = opts.registry.clone();
            let progress = progress.clone();
            async move {
                let layer = &archive.layers[index];
                let label = format!("layer {}/{total} {}", index + 1, short(&layer.diff_id));
                let known = cache.lock().ok().and_then(|c| c.get(&registry, codec, &layer.diff_id).cloned());
                if let Some(known) = known {
                    match reuse(&client, &repo, &known.digest, &known.repositories).await? {
                        Some(result) => {
                            report(&progress, &label, &result);
                            if let Ok(mut c) = cache.lock() {
                                c.record(&registry, codec, &layer.diff_id, &known.digest, known.size, &repo);
                            }
                            return Ok::<_, anyhow::Error>(((known.digest, known.size), result));
                        }
                        None => {
                            if let Ok(mut c) = cache.lock() {
                                c.forget(&registry, codec, &layer.diff_id);
                            }
                        }
                    }
                }
                let started = pending.lock().ok().and_then(|m| m.get(&layer.diff_id).cloned());
                let job = match started {
                    Some(job) => job,
                    None => {
                        progress.debug(format!("{label}: compressing {}", human(layer.size)));
                        let Some(data) = layer.data.clone() else {
                            return Err(NeedsFullRead.into());
                        };
                        let job = compressor.start(data);
                        if let Ok(mut m) = pending.lock() {
                            m.insert(layer.diff_id.clone(), job.clone());
                        }
                        job
                    }
                };
                let compressed = job.await.map_err(|e| {
                    anyhow!("cannot compress layer {} of {}: {e:#}", index + 1, archive.path().display())
                })?;
                let result = if blob_exists(&client, &repo, &compressed.digest).await? {
                    LayerResult::Skipped
                } else {
                    let bar = progress.bar(&label, Some(compressed.size));
                    let file = compressed.file.path().to_path_buf();
                    upload_blob(
                        &client,
                        &repo,
                        &compressed.digest,
                        compressed.size,
                        UploadBody::File(&file),
                        Some(&bar),
                    )
                    .await?;
                    bar.finish_and_clear();
                    LayerResult::Pushed(compressed.size)
                };
                report(&progress, &label, &result);
                if let Ok(mut c) = cache.lock() {
                    c.record(&registry, codec, &layer.diff_id, &compressed.digest, compressed.size, &repo);
                }
                Ok(((compressed.digest.clone(), compressed.size), result))
            }
        })
        .buffered(opts.jobs)
        .try_collect::<Vec<_>>()
        .await?;

    let mut outcome = PushOutcome {
        reference: reference.to_string(),
        digest: String::new(),
        pushed_bytes: 0,
        pushed_layers: 0,
        skipped_layers: 0,
        mounted_layers: 0,
        format: opts.format,
    };
    for (_, result) in &blobs {
        match result {
            LayerResult::Skipped => outcome.skipped_layers += 1,
            LayerResult::Mounted(_) => outcome.mounted_layers += 1,
            LayerResult::Pushed(size) => {
                outcome.pushed_layers += 1;
                outcome.pushed_bytes += size;
            }
        }
    }

    let layer_bytes = outcome.pushed_bytes;
    let config_digest = archive.config_digest.clone();
    let config_size = archive.config.len() as u64;
    if !blob_exists(client, &repo, &config_digest).await? {
        upload_blob(client, &repo, &config_digest, config_size, UploadBody::Bytes(archive.config.clone()), None)
            .await?;
        outcome.pushed_bytes += config_size;
    }

    let layers: Vec<(String, u64)> = blobs.into_iter().map(|(blob, _)| blob).collect();
    let mut format = opts.format;
    let digest = loop {
        let (media_type, body) = manifest(format, opts.compression, (&config_digest, config_size), &layers)?;
        match put_manifest(client, reference, media_type, body).await {
            Ok(digest) => break digest,
            Err(ManifestError::Rejected(rejected))
                if manifest_type_refused(&rejected)
                    && opts.compression == Compression::Gzip
                    && format == opts.format =>
            {
                let other = match format {
                    ManifestFormat::Oci => ManifestFormat::Docker,
                    ManifestFormat::Docker => ManifestFormat::Oci,
                };
                progress.info(format!(
                    "registry {} refused the {} manifest ({}); pushing a {} manifest instead",
                    opts.registry,
                    format_name(format),
                    rejected.detail.as_deref().unwrap_or(rejected.status.as_str()),
                    format_name(other)
                ));
                format = other;
            }
            Err(ManifestError::Rejected(rejected)) => return Err(rejected.into()),
            Err(ManifestError::Other(e)) => return Err(e),
        }
    };
    outcome.digest = digest;
    outcome.format = format;
    progress.info(format!(
        "pushed {} ({}), {} already there, {} mounted",
        plural(outcome.pushed_layers, "layer"),
        human(layer_bytes),
        outcome.skipped_layers,
        outcome.mounted_layers
    ));
    Ok(outcome)
}

/// Whether the registry said no to the manifest's media type (rather than to its content).
fn manifest_type_refused(rejected: &Rejected) -> bool {
    matches!(rejected.status, StatusCode::BAD_REQUEST | StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::NOT_ACCEPTABLE)
        && rejected.code.as_deref().is_none_or(|c| c == "MANIFEST_INVALID" || c == "UNSUPPORTED" || c == "UNKNOWN")
}

fn format_name(format: ManifestFormat) -> &'static str {
    match format {
        ManifestFormat::Oci => "OCI",
        ManifestFormat::Docker => "Docker schema 2",
    }
}

/// The manifest bytes and their media type.
fn manifest(
    format: ManifestFormat,
    compression: Compression,
    config: (&str, u64),
    layers: &[(String, u64)],
) -> Result<(&'static str, Vec<u8>)> {
    let (manifest_type, config_type, layer_type) = match (format, compression) {
        (ManifestFormat::Oci, Compression::Gzip) => {
            (OCI_IMAGE_MEDIA_TYPE, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE)
        }
        (ManifestFormat::Oci, Compression::Zstd) => {
            (OCI_IMAGE_MEDIA_TYPE, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_ZSTD_MEDIA_TYPE)
        }
        (ManifestFormat::Docker, Compression::Gzip) => {
            (IMAGE_MANIFEST_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE)
        }
        (ManifestFormat::Docker, Compression::Zstd) => {
            bail!("--compression zstd needs --format oci (Docker schema 2 manifests have no zstd layers)")
        }
    };
    let descriptor = |media_type: &str, digest: &str, size: u64| OciDescriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(manifest_type.to_string()),
        config: descriptor(config_type, config.0, config.1),
        layers: layers.iter().map(|(digest, size)| descriptor(layer_type, digest, *size)).collect(),
        subject: None,
        artifact_type: None,
        annotations: None,
    };
    Ok((manifest_type, serde_json::to_vec_pretty(&manifest)?))
}

fn report(progress: &Progress, label: &str, result: &LayerResult) {
    match result {
        LayerResult::Skipped => progress.info(format!("{label} already there")),
        LayerResult::Mounted(from) => progress.info(format!("{label} mounted from {from}")),
        LayerResult::Pushed(size) => progress.info(format!("{label} pushed ({})", human(*size))),
    }
}

/// A cached blob: still in this repository, or mountable from another one? `None`: neither.
async fn reuse(client: &Client, repo: &str, digest: &str, repositories: &[String]) -> Result<Option<LayerResult>> {
    if blob_exists(client, repo, digest).await? {
        return Ok(Some(LayerResult::Skipped));
    }
    for from in repositories.iter().rev().filter(|r| r.as_str() != repo) {
        if mount_blob(client, repo, digest, from).await? {
            return Ok(Some(LayerResult::Mounted(from.clone())));
        }
    }
    Ok(None)
}

async fn blob_exists(client: &Client, repo: &str, digest: &str) -> Result<bool> {
    let what = format!("HEAD blob {}", short(digest));
    let answer = client.send(&what, |http, base| http.head(format!("{base}/v2/{repo}/blobs/{digest}"))).await?;
    match answer.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        StatusCode::FORBIDDEN => Err(forbidden(client, repo, &what).await),
        _ => Err(client.rejected(answer, &what).await.into()),
    }
}

/// Cross-repository mount; `false` when the registry answers 202 ("upload it instead").
async fn mount_blob(client: &Client, repo: &str, digest: &str, from: &str) -> Result<bool> {
    client.add_scope(format!("repository:{from}:pull"));
    let what = format!("mount of {} from {from}", short(digest));
    let answer = client
        .send(&what, |http, base| {
            http.post(format!("{base}/v2/{repo}/blobs/uploads/"))
                .query(&[("mount", digest), ("from", from)])
                .header(CONTENT_LENGTH, 0)
        })
        .await?;
    match answer.status() {
        StatusCode::CREATED => Ok(true),
        StatusCode::ACCEPTED => {
            // An upload session was opened instead; close it so it does not linger.
            if let Some(location) = answer.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                let url = client.absolute(location);
                let _ = client.send("cancel upload", |http, _| http.delete(&url)).await;
            }
            Ok(false)
        }
        StatusCode::FORBIDDEN => Err(forbidden(client, repo, &what).await),
        _ => Err(client.rejected(answer, &what).await.into()),
    }
}

enum UploadBody<'a> {
    File(&'a Path),
    Bytes(Vec<u8>),
}

/// Uploads a blob as the Docker client does, which every registry takes: POST opens a
/// session, one PATCH streams the whole blob, PUT with the digest closes it. A session
/// that fails partway (the registry restarted, a PATCH half-sent) is opened anew, twice at most.
async fn upload_blob(
    client: &Client,
    repo: &str,
    digest: &str,
    size: u64,
    body: UploadBody<'_>,
    bar: Option<&indicatif::ProgressBar>,
) -> Result<()> {
    let what = format!("upload of {}", short(digest));
    let mut last = None;
    for _session in 0..3 {
        let answer = client
            .send(&what, |http, base| http.post(format!("{base}/v2/{repo}/blobs/uploads/")).header(CONTENT_LENGTH, 0))
            .await?;
        let location = match answer.status() {
            StatusCode::ACCEPTED => upload_location(client, &answer)?,
            StatusCode::FORBIDDEN => return Err(forbidden(client, repo, &what).await),
            _ => return Err(client.rejected(answer, &what).await.into()),
        };
        let answer = client
            .send(&what, |http, _| {
                let request =
                    http.patch(&location).header(CONTENT_TYPE, "application/octet-stream").header(CONTENT_LENGTH, size);
                match &body {
                    UploadBody::Bytes(bytes) => request.body(bytes.clone()),
                    UploadBody::File(path) => match std::fs::File::open(path) {
                        Ok(file) => {
                            if let Some(bar) = bar {
                                bar.set_position(0);
                            }
                            let bar = bar.cloned();
                            let file = tokio::fs::File::from_std(file);
                            let stream =
                                tokio_util::io::ReaderStream::with_capacity(file, 256 << 10).inspect(move |chunk| {
                                    if let (Some(bar), Ok(chunk)) = (&bar, chunk) {
                                        bar.inc(chunk.len() as u64);
                                    }
                                });
                            request.body(reqwest::Body::wrap_stream(stream))
                        }
                        // The body then falls short of Content-Length and the request fails.
                        Err(_) => request.body(Vec::new()),
                    },
                }
            })
            .await?;
        let location = match answer.status() {
            StatusCode::ACCEPTED | StatusCode::NO_CONTENT => upload_location(client, &answer)?,
            StatusCode::FORBIDDEN => return Err(forbidden(client, repo, &what).await),
            // A lost or half-written session: start over.
            StatusCode::NOT_FOUND | StatusCode::RANGE_NOT_SATISFIABLE => {
                last = Some(client.rejected(answer, &what).await);
                continue;
            }
            _ => return Err(client.rejected(answer, &what).await.into()),
        };
        let mut url = location;
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str("digest=");
        url.push_str(digest);
        let answer = client.send(&what, |http, _| http.put(&url).header(CONTENT_LENGTH, 0)).await?;
        match answer.status() {
            StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => return Ok(()),
            StatusCode::FORBIDDEN => return Err(forbidden(client, repo, &what).await),
            _ => {
                // A PATCH retried after a cut connection may have appended twice: the digest
                // then does not match, and a fresh session fixes it.
                let rejected = client.rejected(answer, &what).await;
                let code = rejected.code.as_deref().unwrap_or("");
                let start_over = matches!(rejected.status, StatusCode::NOT_FOUND | StatusCode::RANGE_NOT_SATISFIABLE)
                    || matches!(code, "DIGEST_INVALID" | "BLOB_UPLOAD_INVALID" | "BLOB_UPLOAD_UNKNOWN");
                if !start_over {
                    return Err(rejected.into());
                }
                last = Some(rejected);
            }
        }
    }
    match last {
        Some(rejected) => Err(anyhow::Error::new(rejected)
            .context(format!("the registry lost the upload of {} three times", short(digest)))),
        None => bail!("registry {} lost the upload of {} three times; try again", client.registry(), short(digest)),
    }
}

/// The absolute URL of an upload session's `Location` header.
fn upload_location(client: &Client, answer: &reqwest::Response) -> Result<String> {
    let location = answer
        .headers()
        .get(LOCATION)
        .and_then(|l| l.to_str().ok())
        .ok_or_else(|| anyhow!("registry {} answered an upload without a Location header", client.registry()))?;
    Ok(client.absolute(location))
}

async fn forbidden(client: &Client, repo: &str, what: &str) -> anyhow::Error {
    anyhow!(
        "registry {} denied {what} in {repo:?} (403 Forbidden: the user may not push there; check the repository name and the account's rights)",
        client.registry()
    )
}

/// PUTs the manifest; the registry's `Docker-Content-Digest`, else the bytes' own sha256.
async fn put_manifest(
    client: &Client,
    reference: &Reference,
    media_type: &str,
    body: Vec<u8>,
) -> std::result::Result<String, ManifestError> {
    let what = format!("PUT manifest {}", reference.tag());
    let repo = reference.repository();
    let tag = reference.tag();
    let answer = client
        .send(&what, |http, base| {
            http.put(format!("{base}/v2/{repo}/manifests/{tag}")).header(CONTENT_TYPE, media_type).body(body.clone())
        })
        .await
        .map_err(ManifestError::Other)?;
    if answer.status().is_success() {
        let digest = answer
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|d| d.to_str().ok())
            .filter(|d| d.starts_with("sha256:"))
            .map(str::to_string)
            .unwrap_or_else(|| sha256_digest(&body));
        return Ok(digest);
    }
    Err(ManifestError::Rejected(client.rejected(answer, &what).await))
}

enum ManifestError {
    Rejected(Rejected),
    Other(anyhow::Error),
}

/// Whether `reference`'s tag exists in the registry.
pub async fn tag_exists(reference: &Reference, opts: &PushOptions) -> Result<bool> {
    let client = Client::connect(opts, reference.api_host(), reference.repository()).await?;
    let what = format!("HEAD manifest {}", reference.tag());
    let (repo, tag) = (reference.repository(), reference.tag());
    let accept = [
        OCI_IMAGE_MEDIA_TYPE,
        IMAGE_MANIFEST_MEDIA_TYPE,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
    .join(", ");
    let answer = client
        .send(&what, |http, base| http.head(format!("{base}/v2/{repo}/manifests/{tag}")).header("Accept", &accept))
        .await?;
    match answer.status() {
        s if s.is_success() => Ok(true),
        StatusCode::NOT_FOUND => Ok(false),
        _ => Err(client.rejected(answer, &what).await.into()),
    }
}

/// `sha256:0123456789ab`.
fn short(digest: &str) -> &str {
    &digest[..digest.len().min(19)]
}

pub fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GB", b as f64 / 1e9),
        b if b >= 1 << 20 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1 << 10 => format!("{:.1} kB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in ["localhost", "127.0.0.1", "127.8.9.1", "::1"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["example.com", "10.0.0.1", "localhost.example", "::2"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn manifests_say_what_the_bytes_are() {
        let layers = vec![("sha256:aa".to_string(), 10)];
        let (ty, body) = manifest(ManifestFormat::Oci, Compression::Zstd, ("sha256:cc", 5), &layers).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ty, OCI_IMAGE_MEDIA_TYPE);
        assert_eq!(json["layers"][0]["mediaType"], IMAGE_LAYER_ZSTD_MEDIA_TYPE);
        assert_eq!(json["config"]["mediaType"], IMAGE_CONFIG_MEDIA_TYPE);
        let (ty, body) = manifest(ManifestFormat::Docker, Compression::Gzip, ("sha256:cc", 5), &layers).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ty, IMAGE_MANIFEST_MEDIA_TYPE);
        assert_eq!(json["mediaType"], IMAGE_MANIFEST_MEDIA_TYPE);
        assert_eq!(json["layers"][0]["mediaType"], IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE);
        assert!(manifest(ManifestFormat::Docker, Compression::Zstd, ("sha256:cc", 5), &layers).is_err());
    }
}
