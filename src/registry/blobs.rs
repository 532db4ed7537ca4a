//! Layer compression: the uncompressed layer tar in, a compressed temporary file out, with
//! the digest and size of what was written. Output is deterministic (no gzip timestamp), so
//! the same layer always becomes the same blob and a registry that has it is found by digest.
//!
//! Each layer is compressed on every core by [`crate::compress`]: gzip as libdeflate members
//! of 2 MiB (about twice zlib's speed at the same ratio), zstd on the library's workers.
//!
//! [`Compressor`] runs compressions for a push session, each once per diff_id however many
//! pushes want it.

use std::collections::HashMap;
use std::io::{self, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use futures::future::{BoxFuture, Shared};
use futures::FutureExt;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::manifest::Compression;
use super::phases::{Phase, PhaseClock};
use crate::archive::{Cancellable, EntryData};
use crate::compress;

use crate::compress::{GZIP_LEVEL, ZSTD_LEVEL};

/// A compressed layer waiting to be uploaded; the file goes when this is dropped.
pub(crate) struct Compressed {
    pub file: tempfile::NamedTempFile,
    pub digest: String,
    pub size: u64,
    /// sha256 of what went in: the diff_id the blob is proven to hold.
    pub input_digest: String,
}

/// Compresses what `reader` gives into a file in `dir`; hashes the input too when
/// `hash_input` (else `input_digest` is empty).
pub(crate) fn compress(
    reader: impl Read,
    compression: Compression,
    dir: &Path,
    hash_input: bool,
    clock: &PhaseClock,
) -> Result<Compressed> {
    let mut reader = HashingReader { inner: reader, hasher: hash_input.then(Sha256::new), clock };
    let file = tempfile::Builder::new()
        .prefix("layer-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let sink = Hashing {
        inner: BufWriter::with_capacity(256 << 10, file.as_file().try_clone()?),
        hasher: Sha256::new(),
        size: 0,
    };
    // Time in writes to the encoder (and its finish) is compressing; in reads, reading.
    let threads = compress::cores();
    let sink = match compression {
        Compression::Gzip => {
            let mut gz = Timed { clock, inner: compress::ParallelGzip::new(sink, GZIP_LEVEL, threads)? };
            copy(&mut reader, &mut gz)?;
            let _in = clock.enter(Phase::Compress);
            gz.inner.finish()?
        }
        Compression::Zstd => {
            let mut encoder = Timed { clock, inner: compress::ZstdWriter::new(sink, ZSTD_LEVEL, threads)? };
            copy(&mut reader, &mut encoder)?;
            let _in = clock.enter(Phase::Compress);
            encoder.inner.finish()?
        }
    };
    let Hashing { mut inner, hasher, size } = sink;
    inner.flush()?;
    let input_digest = reader.hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))).unwrap_or_default();
    Ok(Compressed { file, digest: format!("sha256:{}", hex::encode(hasher.finalize())), size, input_digest })
}

/// Hashes what is read through it (when it has a hasher).
struct HashingReader<'a, R> {
    inner: R,
    hasher: Option<Sha256>,
    clock: &'a PhaseClock,
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let _in = self.clock.enter(Phase::Read);
        let n = self.inner.read(buf)?;
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&buf[..n]);
        }
        Ok(n)
    }
}

fn copy(reader: &mut impl Read, writer: &mut impl Write) -> io::Result<u64> {
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// An encoder whose writes count as compressing.
struct Timed<'a, W> {
    clock: &'a PhaseClock,
    inner: W,
}

impl<W: Write> Write for Timed<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _in = self.clock.enter(Phase::Compress);
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A compression started early; shared so the layer that needs it (in any push of the
/// session) can wait for it.
pub(crate) type Pending = Shared<BoxFuture<'static, std::result::Result<Arc<Compressed>, Arc<anyhow::Error>>>>;

/// Runs compressions one at a time, each on every core, into temporary files of its own
/// directory; stops them, and removes the files, when dropped.
pub(crate) struct Compressor {
    slots: Arc<Semaphore>,
    work: tempfile::TempDir,
    compression: Compression,
    cancel: Arc<AtomicBool>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Compressions by diff_id, started or done; a push removes those it started when it ends.
    pending: Mutex<HashMap<String, Pending>>,
}

impl Compressor {
    pub(crate) fn new(compression: Compression) -> Result<Compressor> {
        let work = tempfile::Builder::new()
            .prefix("nixctr-push-")
            .tempdir()
            .context("cannot create a temporary directory (is TMPDIR writable?)")?;
        Ok(Compressor {
            // One layer at a time, each on every core: more would share the cores, not add
            // to them, and hold more memory.
            slots: Arc::new(Semaphore::new(1)),
            work,
            compression,
            cancel: Arc::default(),
            tasks: Mutex::default(),
            pending: Mutex::default(),
        })
    }

    pub(crate) fn get(&self, diff_id: &str) -> Option<Pending> {
        self.pending.lock().ok()?.get(diff_id).cloned()
    }

    /// The compression of `diff_id`, started now from `data` unless one is under way.
    /// `Ok(job)` when started now, `Err(job)` when it was under way already.
    pub(crate) fn start(
        &self,
        diff_id: &str,
        data: EntryData,
        clock: &Arc<PhaseClock>,
    ) -> std::result::Result<Pending, Pending> {
        let Ok(mut pending) = self.pending.lock() else {
            return Ok(self.spawn(diff_id, data, clock.clone()));
        };
        if let Some(job) = pending.get(diff_id) {
            return Err(job.clone());
        }
        let job = self.spawn(diff_id, data, clock.clone());
        pending.insert(diff_id.to_string(), job.clone());
        Ok(job)
    }

    /// Where compressed files go.
    pub(crate) fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// A compression done elsewhere (from a stream), made from bytes hashing to `diff_id`.
    /// `false` when one for `diff_id` is known already (this one is dropped, with its file).
    pub(crate) fn adopt(&self, diff_id: &str, compressed: Arc<Compressed>) -> bool {
        let Ok(mut pending) = self.pending.lock() else { return false };
        if pending.contains_key(diff_id) {
            return false;
        }
        let done: Pending = futures::future::ready(Ok(compressed)).boxed().shared();
        pending.insert(diff_id.to_string(), done);
        true
    }

    pub(crate) fn forget(&self, diff_ids: &[String]) {
        if let Ok(mut pending) = self.pending.lock() {
            for diff_id in diff_ids {
                pending.remove(diff_id);
            }
        }
    }

    /// Compresses `data`, which must hash to `diff_id`: the bytes are read again from the
    /// archive (or its spool), which may have changed since they were checked, and a blob
    /// is recorded as `diff_id`'s only when it was made from exactly those bytes.
    fn spawn(&self, diff_id: &str, data: EntryData, clock: Arc<PhaseClock>) -> Pending {
        let (slots, work, compression, cancel) =
            (self.slots.clone(), self.work.path().to_path_buf(), self.compression, self.cancel.clone());
        let diff_id = diff_id.to_string();
        let task = tokio::spawn(async move {
            let _slot = slots.acquire_owned().await.map_err(|e| anyhow!("compression stopped: {e}"))?;
            tokio::task::spawn_blocking(move || {
                // A spool of this run's own was hashed as it was written; a file the user
                // holds may have changed since it was checked, so its bytes are hashed again.
                let recheck = !data.spooled();
                let reader = Cancellable { inner: data.reader()?, cancel };
                let compressed = compress(reader, compression, &work, recheck, &clock)?;
                if recheck && compressed.input_digest != diff_id {
                    bail!(
                        "its bytes hash to {}, not to the diff_id {diff_id} the config names (the archive is corrupt, or was rewritten during the push; rebuild it)",
                        compressed.input_digest
                    );
                }
                Ok(compressed)
            })
            .await
            .map_err(|e| anyhow!("compression stopped: {e}"))?
        });
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|t| !t.is_finished());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let clock = PhaseClock::default();
        let data = b"layer bytes ".repeat(10_000);
        for compression in [Compression::Gzip, Compression::Zstd] {
            let a = compress(&data[..], compression, dir.path(), true, &clock).unwrap();
            let b = compress(&data[..], compression, dir.path(), true, &clock).unwrap();
            assert_eq!(a.digest, b.digest);
            assert_eq!(a.input_digest, crate::archive::sha256_digest(&data));
            let bytes = std::fs::read(a.file.path()).unwrap();
            assert_eq!(bytes.len() as u64, a.size);
            assert_eq!(crate::archive::sha256_digest(&bytes), a.digest);
            assert!(a.size < data.len() as u64 / 10);
            let mut back = Vec::new();
            match compression {
                Compression::Gzip => flate2::read::MultiGzDecoder::new(&bytes[..]).read_to_end(&mut back).unwrap(),
                Compression::Zstd => {
                    zstd::stream::read::Decoder::new(&bytes[..]).unwrap().read_to_end(&mut back).unwrap()
                }
            };
            assert_eq!(back, data);
        }
        // Several members, and an empty input still makes a valid (empty) gzip file.
        let big: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let c = compress(&big[..], Compression::Gzip, dir.path(), true, &clock).unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(c.file.path()).unwrap()).read_to_end(&mut back).unwrap();
        assert_eq!(back, big);
        let c = compress(&b""[..], Compression::Gzip, dir.path(), true, &clock).unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(c.file.path()).unwrap()).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
