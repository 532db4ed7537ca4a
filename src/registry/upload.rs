//! Blob uploads as registries and their front doors take them.
//!
//! A blob goes up in one PATCH where the registry takes it (the Docker client's way, which
//! every registry knows). A proxy that caps request bodies (nginx's 1 MiB default, GHCR's
//! 4 MiB) answers 413; then that session's registry gets chunks: PATCHes of at most the
//! chunk size with `Content-Range`, the largest size that passes found by halving from
//! 64 MiB (never below `OCI-Chunk-Min-Length`) and remembered per registry in
//! `uploads.json` beside the blob cache, a hint re-probed when a chunk of that size is
//! refused. `--chunk-size` / `chunk-size` in nixctr.toml set it outright.
//!
//! A request cut off mid-blob (a dropped connection, a 5xx) asks the registry where the
//! upload stands (`GET` on its location, answered with `Range: 0-N`) and goes on from there.
//! The answer is checked against what was sent: more than was sent, or a range not starting
//! at 0, is not believed, and the blob starts again in a new session, as it does when the
//! registry lost the session (404). Chunks are read from the compressed spool file as they
//! are sent, so memory stays flat whatever their size.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use super::client::{Activity, Client, Rejected, Sent};
use super::short;
use crate::progress::{human_bytes, Progress};

/// The smallest chunk nixctr sends: below it, a gigabyte would take tens of thousands of requests.
pub const MIN_CHUNK: u64 = 64 << 10;
/// The largest chunk size one may set; a chunk as big as the blob is one PATCH anyway.
pub const MAX_CHUNK: u64 = 1 << 30;
/// Where the search for a chunk size that passes starts.
const FIRST_PROBE: u64 = 64 << 20;
/// Upload sessions per blob: a session the registry lost is opened anew, twice at most.
const SESSIONS: u32 = 3;
/// Resumes per session.
const RESUMES: u32 = 5;

/// What an upload sends: a compressed layer's file, or a small blob in memory (the config).
pub(crate) enum UploadBody<'a> {
    File(&'a Path),
    Bytes(Vec<u8>),
}

/// What uploads cost, added up over the blobs of a push.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Blob bytes sent, those sent again or refused included.
    pub sent_bytes: u64,
    /// Requests that carried blob bytes.
    pub requests: u64,
    /// The chunk size, when some blob went up in chunks.
    pub chunk_size: Option<u64>,
    /// Uploads taken up again where the registry said they stood.
    pub resumes: u32,
    /// Uploads started again from their first byte (the registry lost the session, or
    /// said something about it that could not be true).
    pub restarts: u32,
}

impl UploadStats {
    pub fn add(&mut self, other: &UploadStats) {
        self.sent_bytes += other.sent_bytes;
        self.requests += other.requests;
        self.chunk_size = match (self.chunk_size, other.chunk_size) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.resumes += other.resumes;
        self.restarts += other.restarts;
    }

    /// `12.0 MiB in 4 requests, in chunks of 8.0 MiB, 1 resumed`, for the push's summary line.
    pub fn describe(&self) -> String {
        let mut text =
            format!("{} in {}", human_bytes(self.sent_bytes), super::plural(self.requests as usize, "request"));
        if let Some(size) = self.chunk_size {
            text.push_str(&format!(", in chunks of {}", human_bytes(size)));
        }
        if self.resumes > 0 {
            text.push_str(&format!(", {} resumed", self.resumes));
        }
        if self.restarts > 0 {
            text.push_str(&format!(", {} started again", self.restarts));
        }
        text
    }
}

/// Parses a chunk size: a whole number with an optional unit, `B`, `K`/`KiB`, `M`/`MiB`,
/// `G`/`GiB` (powers of 1024, as nginx's `8m`) or `KB`/`MB`/`GB` (powers of 1000). The
/// error says what is allowed; callers put the setting's name in front.
pub fn parse_chunk_size(text: &str) -> std::result::Result<u64, String> {
    let allowed = format!("give a size from {} to {}, such as 8MiB", human_bytes(MIN_CHUNK), human_bytes(MAX_CHUNK));
    let trimmed = text.trim();
    let split = trimmed.find(|c: char| !c.is_ascii_digit()).unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("not a size ({allowed})")),
    };
    let size = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("not a size ({allowed})"))?;
    if !(MIN_CHUNK..=MAX_CHUNK).contains(&size) {
        return Err(allowed);
    }
    Ok(size)
}

/// How a session's uploads go, shared by all its blob transfers: a refusal one of them
/// meets changes the way for all.
pub(crate) struct UploadPolicy {
    registry: String,
    mode: Mutex<Mode>,
    /// Set by `--chunk-size` or nixctr.toml: used as is, never probed nor remembered.
    outright: bool,
    /// `uploads.json`; `None`: nothing remembered.
    hints: Option<PathBuf>,
    /// A chunk size proven in this session, to remember.
    proven: Mutex<Option<u64>>,
    progress: Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One PATCH per blob.
    Whole,
    /// PATCHes of at most `size`, never made smaller than `floor`.
    Chunks { size: u64, floor: u64 },
}

/// `uploads.json`: per registry, the chunk size that last passed.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Hints {
    version: u32,
    #[serde(default, rename = "chunk-sizes")]
    chunk_sizes: BTreeMap<String, u64>,
}

const HINTS_VERSION: u32 = 1;

impl Hints {
    fn load(path: &Path) -> Hints {
        std::fs::read(path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Hints>(&bytes).ok())
            .filter(|h| h.version == HINTS_VERSION)
            .unwrap_or(Hints { version: HINTS_VERSION, chunk_sizes: BTreeMap::new() })
    }
}

impl UploadPolicy {
    /// `configured`: the chunk size set outright for this registry. Otherwise what
    /// `hints` remembers of it, else one PATCH per blob.
    pub fn new(registry: &str, configured: Option<u64>, hints: Option<PathBuf>, progress: &Progress) -> UploadPolicy {
        let (mode, outright) = match configured {
            Some(size) => {
                progress.debug(format!("uploads to {registry} go in chunks of {}", human_bytes(size)));
                (Mode::Chunks { size, floor: MIN_CHUNK }, true)
            }
            None => {
                let remembered = hints.as_deref().and_then(|p| Hints::load(p).chunk_sizes.get(registry).copied());
                match remembered {
                    Some(size) if (MIN_CHUNK..=MAX_CHUNK).contains(&size) => {
                        progress.debug(format!(
                            "{registry} took chunks of {} last time: uploading in chunks of that size",
                            human_bytes(size)
                        ));
                        (Mode::Chunks { size, floor: MIN_CHUNK }, false)
                    }
                    _ => (Mode::Whole, false),
                }
            }
        };
        UploadPolicy {
            registry: registry.to_string(),
            mode: Mutex::new(mode),
            outright,
            hints,
            proven: Mutex::new(None),
            progress: progress.clone(),
        }
    }

    fn mode(&self) -> Mode {
        self.mode.lock().map(|m| *m).unwrap_or(Mode::Whole)
    }

    /// The registry announced `OCI-Chunk-Min-Length`: it takes chunks, none smaller than `min`.
    fn min_length(&self, min: u64) {
        let Ok(mut mode) = self.mode.lock() else { return };
        let floor = min.max(MIN_CHUNK);
        let next = match *mode {
            Mode::Whole => Mode::Chunks { size: FIRST_PROBE.max(floor), floor },
            Mode::Chunks { size, floor: old } if size < floor || old < floor => {
                Mode::Chunks { size: size.max(floor), floor }
            }
            same => same,
        };
        if next != *mode {
            if let Mode::Chunks { size, .. } = next {
                self.progress.debug(format!(
                    "{} asks for chunks of at least {} (OCI-Chunk-Min-Length): uploading in chunks of {}",
                    self.registry,
                    human_bytes(min),
                    human_bytes(size)
                ));
            }
            *mode = next;
        }
    }

    /// A request carrying `len` bytes was refused as too large (`why`): smaller chunks from now on.
    fn refused(&self, len: u64, digest: &str, why: &str) -> Result<()> {
        let Ok(mut mode) = self.mode.lock() else { bail!("the upload state of {} is lost", self.registry) };
        let (mut size, floor) = match *mode {
            Mode::Whole => (FIRST_PROBE, MIN_CHUNK),
            Mode::Chunks { size, floor } => (size, floor),
        };
        if self.outright {
            bail!(
                "registry {} refused a chunk of {} of {} ({why}): set a smaller --chunk-size, or chunk-size under \
                 [registries.\"{}\"] in nixctr.toml",
                self.registry,
                human_bytes(len),
                short(digest),
                self.registry
            );
        }
        while size >= len && size > 0 {
            size /= 2;
        }
        if size < floor {
            bail!(
                "registry {} refused {} of {} in one request ({why}), and nixctr sends no chunk smaller than {}: \
                 its limit on request bodies is too small to push through (behind nginx, raise client_max_body_size)",
                self.registry,
                human_bytes(len),
                short(digest),
                human_bytes(floor)
            );
        }
        let next = Mode::Chunks { size, floor };
        if *mode != next {
            self.progress.debug(format!(
                "{} refused {} in one request ({why}): trying chunks of {}",
                self.registry,
                human_bytes(len),
                human_bytes(size)
            ));
            *mode = next;
        }
        Ok(())
    }

    /// A chunk of `len` bytes passed.
    fn passed(&self, len: u64) {
        if let Mode::Chunks { size, .. } = self.mode() {
            if len == size && !self.outright {
                if let Ok(mut proven) = self.proven.lock() {
                    *proven = Some(proven.map_or(size, |p| p.min(size)));
                }
            }
        }
    }

    /// Remembers the chunk size this session proved, for the next run; a note on failure.
    pub fn save(&self) -> Option<String> {
        let path = self.hints.as_deref()?;
        let size = self.proven.lock().ok()?.take()?;
        let mut hints = Hints::load(path);
        if hints.chunk_sizes.get(&self.registry) == Some(&size) {
            return None;
        }
        hints.chunk_sizes.insert(self.registry.clone(), size);
        let write = || -> Result<()> {
            let dir = path.parent().unwrap_or(Path::new("."));
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
            let mut file = tempfile::NamedTempFile::new_in(dir)
                .with_context(|| format!("cannot write to cache directory {}", dir.display()))?;
            serde_json::to_writer(&mut file, &hints)?;
            file.flush()?;
            file.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
            Ok(())
        };
        write().err().map(|e| format!("could not remember the chunk size: {e:#}"))
    }
}

/// Where the registry says an upload stands.
enum Status {
    /// Holds the first `received` bytes; go on at `location`.
    At { received: u64, location: String },
    /// The session is gone (404), or the answer cannot be believed: start again.
    Lost(String),
}

/// A 413, or a 416 or 400 whose message names a size limit (GHCR: "exceeds the maximum
/// permissible limit of 4.00MiB").
fn names_size_limit(rejected: &Rejected) -> bool {
    if rejected.status == StatusCode::PAYLOAD_TOO_LARGE {
        return true;
    }
    let text = rejected.detail.as_deref().unwrap_or("").to_ascii_lowercase();
    matches!(rejected.status, StatusCode::RANGE_NOT_SATISFIABLE | StatusCode::BAD_REQUEST)
        && ["limit", "too large", "exceeds", "maximum"].iter().any(|w| text.contains(w))
}

/// `0-N` (or `bytes=0-N`) as bytes held: `N + 1`, except `0-0`, which distribution also
/// answers for an empty upload and is taken as none. `None`: not a range from 0.
fn parse_range(value: &str) -> Option<u64> {
    let value = value.trim();
    let value = value.strip_prefix("bytes=").unwrap_or(value);
    let (start, end) = value.split_once('-')?;
    if start.trim() != "0" {
        return None;
    }
    let end: u64 = end.trim().parse().ok()?;
    Some(if end == 0 { 0 } else { end + 1 })
}

impl Client {
    /// Uploads a blob (see the module comment): POST opens a session, PATCHes send the bytes
    /// (one, or chunks as `policy` says), PUT with the digest closes it. `bar` counts the
    /// bytes of a file body as they go.
    pub async fn upload_blob(
        &self,
        policy: &UploadPolicy,
        repo: &str,
        (digest, size): (&str, u64),
        body: UploadBody<'_>,
        bar: Option<&indicatif::ProgressBar>,
    ) -> Result<UploadStats> {
        let what = format!("upload of {}", short(digest));
        let mut stats = UploadStats::default();
        let mut last: Option<anyhow::Error> = None;
        for session in 0..SESSIONS {
            if session > 0 {
                stats.restarts += 1;
            }
            let mut location = self.open_upload(policy, repo, &what).await?;
            let mut offset = 0;
            let mut resumes = 0;
            let sent_all = loop {
                if offset >= size {
                    break true;
                }
                let mode = policy.mode();
                let len = match mode {
                    Mode::Whole => size - offset,
                    Mode::Chunks { size: chunk, .. } => {
                        stats.chunk_size = Some(stats.chunk_size.map_or(chunk, |c| c.min(chunk)));
                        chunk.min(size - offset)
                    }
                };
                let ranged = offset > 0 || matches!(mode, Mode::Chunks { .. });
                if let Some(bar) = bar {
                    bar.set_position(offset);
                }
                let sent = Arc::new(AtomicU64::new(0));
                let activity = Activity::new();
                stats.requests += 1;
                let answer = self
                    .send_upload(&what, &activity, |http| {
                        let mut request = http
                            .patch(&location)
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, len);
                        if ranged {
                            request = request.header("Content-Range", format!("{offset}-{}", offset + len - 1));
                        }
                        sent.store(0, Ordering::Relaxed);
                        request.body(chunk_body(&body, offset, len, bar, &activity, &sent))
                    })
                    .await?;
                let sent = sent.load(Ordering::Relaxed);
                stats.sent_bytes += sent;
                let cut = match answer {
                    Sent::Answer(answer) => match answer.status() {
                        StatusCode::ACCEPTED | StatusCode::NO_CONTENT | StatusCode::CREATED => {
                            // The answer's Range is not believed (ECR's have been stale): a 202
                            // takes the chunk, and the digest check at the end catches the rest.
                            if let Some(next) = answer.headers().get(LOCATION).and_then(|l| l.to_str().ok()) {
                                location = self.absolute(next);
                            }
                            offset += len;
                            policy.passed(len);
                            continue;
                        }
                        StatusCode::FORBIDDEN => return Err(self.forbidden(repo, &what)),
                        StatusCode::NOT_FOUND => {
                            let rejected = self.rejected(answer, &what).await;
                            self.debug(format!(
                                "{what}: the registry lost the session ({}): starting again",
                                rejected.status
                            ));
                            last = Some(rejected.into());
                            break false;
                        }
                        status
                            if status.is_server_error()
                                || status == StatusCode::TOO_MANY_REQUESTS
                                || status == StatusCode::REQUEST_TIMEOUT =>
                        {
                            format!("{what}: the registry answered {status}")
                        }
                        _ => {
                            let rejected = self.rejected(answer, &what).await;
                            if names_size_limit(&rejected) {
                                // A 413 says it all; nginx's comes with a page of HTML.
                                let why = match &rejected.detail {
                                    Some(detail) if rejected.status != StatusCode::PAYLOAD_TOO_LARGE => {
                                        format!("{}: {detail}", rejected.status)
                                    }
                                    _ => rejected.status.to_string(),
                                };
                                policy.refused(len, digest, &why)?;
                                // A refused request left nothing: the same offset, smaller.
                                continue;
                            }
                            if rejected.status != StatusCode::RANGE_NOT_SATISFIABLE {
                                return Err(rejected.into());
                            }
                            // A chunk out of order: ask where the upload stands.
                            rejected.to_string()
                        }
                    },
                    Sent::Cut(error) => format!("{error:#}"),
                };
                resumes += 1;
                if resumes > RESUMES {
                    bail!("{what} to registry {} was cut off {RESUMES} times; last: {cut}", self.registry());
                }
                self.debug(format!("{cut}; asking the registry where the upload stands"));
                tokio::time::sleep(super::client::backoff(resumes - 1)).await;
                // What the registry may hold: what it confirmed, and what this request sent.
                let most = offset + sent;
                match self.upload_status(&location, &what, most).await? {
                    Status::At { received, location: at } => {
                        location = at;
                        offset = received;
                        stats.resumes += 1;
                        self.debug(format!("resumed {digest} at {}", human_bytes(received)));
                    }
                    Status::Lost(why) => {
                        self.debug(format!("{what}: {why}: starting it again"));
                        self.cancel_upload(&location).await;
                        last = Some(anyhow!("{why}"));
                        break false;
                    }
                }
            };
            if !sent_all {
                continue;
            }
            let mut url = location;
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str("digest=");
            url.push_str(digest);
            let answer = self.send(&what, |http, _| http.put(&url).header(CONTENT_LENGTH, 0)).await?;
            match answer.status() {
                StatusCode::CREATED | StatusCode::NO_CONTENT | StatusCode::OK => return Ok(stats),
                StatusCode::FORBIDDEN => return Err(self.forbidden(repo, &what)),
                _ => {
                    // A PATCH retried after a cut connection may have appended twice: the
                    // digest then does not match, and a fresh session fixes it.
                    let rejected = self.rejected(answer, &what).await;
                    let code = rejected.code.as_deref().unwrap_or("");
                    let start_over =
                        matches!(rejected.status, StatusCode::NOT_FOUND | StatusCode::RANGE_NOT_SATISFIABLE)
                            || matches!(code, "DIGEST_INVALID" | "BLOB_UPLOAD_INVALID" | "BLOB_UPLOAD_UNKNOWN");
                    if !start_over {
                        return Err(rejected.into());
                    }
                    self.debug(format!("{rejected}: starting it again"));
                    last = Some(rejected.into());
                }
            }
        }
        match last {
            Some(error) => Err(error.context(format!(
                "registry {} lost the upload of {} {SESSIONS} times; try again",
                self.registry(),
                short(digest)
            ))),
            None => {
                bail!("registry {} lost the upload of {} {SESSIONS} times; try again", self.registry(), short(digest))
            }
        }
    }

    /// POST: a new upload session's location. An `OCI-Chunk-Min-Length` answer tells `policy`.
    async fn open_upload(&self, policy: &UploadPolicy, repo: &str, what: &str) -> Result<String> {
        let answer = self
            .send(what, |http, base| http.post(format!("{base}/v2/{repo}/blobs/uploads/")).header(CONTENT_LENGTH, 0))
            .await?;
        match answer.status() {
            StatusCode::ACCEPTED => {
                let min = answer
                    .headers()
                    .get("OCI-Chunk-Min-Length")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|&n| n > 0);
                if let Some(min) = min {
                    policy.min_length(min);
                }
                self.upload_location(&answer)
            }
            StatusCode::FORBIDDEN => Err(self.forbidden(repo, what)),
            _ => Err(self.rejected(answer, what).await.into()),
        }
    }

    /// GET on an upload's location: how much of it the registry holds, checked against
    /// `most`, the bytes it can have been sent.
    async fn upload_status(&self, location: &str, what: &str, most: u64) -> Result<Status> {
        let answer = self.send(what, |http, _| http.get(location)).await?;
        match answer.status() {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::ACCEPTED => {
                let range = answer.headers().get(RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
                let location = answer
                    .headers()
                    .get(LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .map_or_else(|| location.to_string(), |l| self.absolute(l));
                let received = match range.as_deref() {
                    None => 0,
                    Some(value) => match parse_range(value) {
                        Some(n) => n,
                        None => {
                            return Ok(Status::Lost(format!(
                                "the registry answered Range {value:?}, not a range from 0"
                            )))
                        }
                    },
                };
                if received > most {
                    return Ok(Status::Lost(format!(
                        "the registry says it holds {received} bytes (Range {}), more than the {most} sent",
                        range.unwrap_or_default()
                    )));
                }
                Ok(Status::At { received, location })
            }
            StatusCode::NOT_FOUND => {
                let rejected = self.rejected(answer, what).await;
                Ok(Status::Lost(format!("the upload session expired ({})", rejected.status)))
            }
            _ => Err(self.rejected(answer, what).await.into()),
        }
    }

    /// Closes a session given up on, so it does not linger; failure does not matter.
    async fn cancel_upload(&self, location: &str) {
        let _ = self.send("cancel upload", |http, _| http.delete(location)).await;
    }
}

/// `len` bytes of `body` from `offset`, streamed from the file (counted into `sent`, the
/// bar and `activity` as they go).
fn chunk_body(
    body: &UploadBody<'_>,
    offset: u64,
    len: u64,
    bar: Option<&indicatif::ProgressBar>,
    activity: &Activity,
    sent: &Arc<AtomicU64>,
) -> reqwest::Body {
    match body {
        UploadBody::Bytes(bytes) => {
            let start = (offset as usize).min(bytes.len());
            let end = (start + len as usize).min(bytes.len());
            sent.fetch_add((end - start) as u64, Ordering::Relaxed);
            reqwest::Body::from(bytes[start..end].to_vec())
        }
        UploadBody::File(path) => {
            let file = std::fs::File::open(path).and_then(|mut f| f.seek(SeekFrom::Start(offset)).map(|_| f));
            match file {
                Ok(file) => {
                    let (bar, activity, sent) = (bar.cloned(), activity.clone(), sent.clone());
                    let reader = tokio::fs::File::from_std(file).take(len);
                    let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 << 10).inspect(move |chunk| {
                        activity.touch();
                        if let Ok(chunk) = chunk {
                            sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            if let Some(bar) = &bar {
                                bar.inc(chunk.len() as u64);
                            }
                        }
                    });
                    reqwest::Body::wrap_stream(stream)
                }
                // The body then falls short of Content-Length and the request fails.
                Err(_) => reqwest::Body::from(Vec::new()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_sizes_parse_with_units() {
        assert_eq!(parse_chunk_size("8MiB"), Ok(8 << 20));
        assert_eq!(parse_chunk_size("8m"), Ok(8 << 20));
        assert_eq!(parse_chunk_size(" 5 MB "), Ok(5_000_000));
        assert_eq!(parse_chunk_size("65536"), Ok(64 << 10));
        assert_eq!(parse_chunk_size("1GiB"), Ok(1 << 30));
        for bad in ["0", "1TB", "2GiB", "1k", "", "MiB", "8 parsecs", "-8MiB", "1.5MiB", "99999999999999999999"] {
            let err = parse_chunk_size(bad).unwrap_err();
            assert!(err.contains("give a size from 64.0 KiB to 1.0 GiB"), "{bad}: {err}");
        }
    }

    #[test]
    fn ranges_are_prefixes_or_nothing() {
        assert_eq!(parse_range("0-1023"), Some(1024));
        assert_eq!(parse_range("bytes=0-9"), Some(10));
        assert_eq!(parse_range("0-0"), Some(0));
        assert_eq!(parse_range("5-100"), None);
        assert_eq!(parse_range("0-x"), None);
        assert_eq!(parse_range("garbage"), None);
    }

    fn rejected(status: StatusCode, detail: &str) -> Rejected {
        Rejected {
            registry: "r".into(),
            status,
            what: "w".into(),
            code: None,
            detail: (!detail.is_empty()).then(|| detail.to_string()),
        }
    }

    #[test]
    fn size_limits_are_told_from_other_refusals() {
        assert!(names_size_limit(&rejected(StatusCode::PAYLOAD_TOO_LARGE, "")));
        assert!(names_size_limit(&rejected(
            StatusCode::BAD_REQUEST,
            "exceeds the maximum permissible limit of 4.00MiB"
        )));
        assert!(names_size_limit(&rejected(StatusCode::RANGE_NOT_SATISFIABLE, "chunk too large")));
        assert!(!names_size_limit(&rejected(StatusCode::RANGE_NOT_SATISFIABLE, "out of order")));
        assert!(!names_size_limit(&rejected(StatusCode::BAD_REQUEST, "DIGEST_INVALID")));
    }

    #[test]
    fn refusals_halve_the_chunk_down_to_a_floor() {
        let quiet = Progress::new(true, false);
        let digest = format!("sha256:{}", "a".repeat(64));
        let policy = UploadPolicy::new("r:1", None, None, &quiet);
        assert_eq!(policy.mode(), Mode::Whole);
        // A 3 MB blob refused whole: the probe starts below it.
        policy.refused(3_000_000, &digest, "413").unwrap();
        assert_eq!(policy.mode(), Mode::Chunks { size: 2 << 20, floor: MIN_CHUNK });
        policy.refused(2 << 20, &digest, "413").unwrap();
        assert_eq!(policy.mode(), Mode::Chunks { size: 1 << 20, floor: MIN_CHUNK });
        // Another transfer refused at the old size changes nothing more.
        policy.refused(2 << 20, &digest, "413").unwrap();
        assert_eq!(policy.mode(), Mode::Chunks { size: 1 << 20, floor: MIN_CHUNK });
        let mut size = 1 << 20;
        while size > MIN_CHUNK {
            policy.refused(size, &digest, "413").unwrap();
            size /= 2;
        }
        let err = policy.refused(MIN_CHUNK, &digest, "413 Payload Too Large").unwrap_err().to_string();
        assert!(err.contains("no chunk smaller than 64.0 KiB") && err.contains("client_max_body_size"), "{err}");

        // A size set outright is not probed.
        let set = UploadPolicy::new("r:1", Some(8 << 20), None, &quiet);
        let err = set.refused(8 << 20, &digest, "413").unwrap_err().to_string();
        assert!(err.contains("set a smaller --chunk-size"), "{err}");

        // OCI-Chunk-Min-Length switches to chunks and is a floor.
        let policy = UploadPolicy::new("r:1", None, None, &quiet);
        policy.min_length(5 << 20);
        assert_eq!(policy.mode(), Mode::Chunks { size: 64 << 20, floor: 5 << 20 });
        policy.refused(64 << 20, &digest, "413").unwrap();
        policy.refused(32 << 20, &digest, "413").unwrap();
        policy.refused(16 << 20, &digest, "413").unwrap();
        assert_eq!(policy.mode(), Mode::Chunks { size: 8 << 20, floor: 5 << 20 });
        assert!(policy.refused(8 << 20, &digest, "413").is_err());
    }

    #[test]
    fn proven_sizes_are_remembered_per_registry() {
        let quiet = Progress::new(true, false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("uploads.json");
        let digest = format!("sha256:{}", "a".repeat(64));
        let policy = UploadPolicy::new("r:1", None, Some(path.clone()), &quiet);
        policy.refused(100 << 20, &digest, "413").unwrap();
        // Nothing passed yet: nothing to remember.
        assert_eq!(policy.save(), None);
        assert!(!path.exists());
        policy.passed(64 << 20);
        assert_eq!(policy.save(), None);
        let again = UploadPolicy::new("r:1", None, Some(path.clone()), &quiet);
        assert_eq!(again.mode(), Mode::Chunks { size: 64 << 20, floor: MIN_CHUNK });
        assert_eq!(UploadPolicy::new("r:2", None, Some(path.clone()), &quiet).mode(), Mode::Whole);
        // A hint out of bounds (the file is user-writable) is not used.
        std::fs::write(&path, r#"{"version": 1, "chunk-sizes": {"r:1": 0}}"#).unwrap();
        assert_eq!(UploadPolicy::new("r:1", None, Some(path.clone()), &quiet).mode(), Mode::Whole);
        std::fs::write(&path, "not json").unwrap();
        assert_eq!(UploadPolicy::new("r:1", None, Some(path), &quiet).mode(), Mode::Whole);
    }
}
