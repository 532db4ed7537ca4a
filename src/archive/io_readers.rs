//! The readers the archive is read through: hashing, a read-ahead thread (gunzip beside the
//! hashing), a copy on the side, a byte count, and cancellation on Ctrl-C.

use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub(super) fn hash_reader(reader: &mut impl Read) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), total))
}

/// An error the source of a stream reported itself (its program failed, its config names
/// another platform): told as it is, not as a malformed archive.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SourceError(pub(crate) String);

impl SourceError {
    pub(crate) fn io(message: impl Into<String>) -> io::Error {
        io::Error::other(SourceError(message.into()))
    }

    /// The message of the [`SourceError`] `error` carries, if it carries one.
    pub(crate) fn within(error: &io::Error) -> Option<&str> {
        error.get_ref()?.downcast_ref::<SourceError>().map(|e| e.0.as_str())
    }
}

/// Fills `buf` unless the input ends first; returns how much was read.
pub(crate) fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

pub(crate) fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Reads `inner` on a thread of its own, a few blocks ahead: gunzip then runs beside the
/// hashing and copying that consume its output.
pub(super) struct Pipelined {
    blocks: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    /// Emptied blocks go back to the reading thread, so memory is allocated once.
    spent: std::sync::mpsc::SyncSender<Vec<u8>>,
    current: io::Cursor<Vec<u8>>,
    done: bool,
}

impl Pipelined {
    pub(super) fn spawn(mut inner: impl Read + Send + 'static) -> Pipelined {
        const BLOCKS: usize = 4;
        let (tx, blocks) = std::sync::mpsc::sync_channel(BLOCKS);
        let (spent, recycled) = std::sync::mpsc::sync_channel::<Vec<u8>>(BLOCKS + 2);
        std::thread::spawn(move || loop {
            let mut block = recycled.try_recv().unwrap_or_default();
            block.resize(1 << 20, 0);
            match read_up_to(&mut inner, &mut block) {
                Ok(0) => break,
                Ok(n) => {
                    block.truncate(n);
                    if tx.send(Ok(block)).is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                    break;
                }
            }
        });
        Pipelined { blocks, spent, current: io::Cursor::new(Vec::new()), done: false }
    }
}

impl Read for Pipelined {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() || self.done {
                return Ok(n);
            }
            match self.blocks.recv() {
                Ok(Ok(block)) => {
                    let old = std::mem::replace(&mut self.current, io::Cursor::new(block));
                    let _ = self.spent.try_send(old.into_inner());
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => self.done = true,
            }
        }
    }
}

/// Copies everything read from `inner` into `copy`.
pub(super) struct Tee<R, W> {
    pub(super) inner: R,
    pub(super) copy: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.write_all(&buf[..n])?;
        Ok(n)
    }
}

pub(super) struct Counted<R> {
    pub(super) inner: R,
    pub(super) count: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// The error a [`Cancellable`] read fails with.
#[derive(Debug, thiserror::Error)]
#[error("cancelled")]
pub(crate) struct Cancelled;

/// A reader that fails once `cancel` is set, so blocking work stops soon after Ctrl-C.
pub(crate) struct Cancellable<R> {
    pub(crate) inner: R,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl<R: Read> Read for Cancellable<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            // Not ErrorKind::Interrupted: std's read_exact and read_to_end retry those forever.
            return Err(io::Error::other(Cancelled));
        }
        self.inner.read(buf)
    }
}
