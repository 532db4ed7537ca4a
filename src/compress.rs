//! Compression on every core, with output that depends only on the input and the settings,
//! never on the thread count: the same layer always becomes the same blob, so a registry that
//! has it is found by digest, whichever machine compressed it.
//!
//! gzip is pigz-style: the input is cut into blocks of [`GZIP_BLOCK`] bytes, each compressed
//! by libdeflate into a gzip member of its own on a pool of threads, and the members written
//! in order (RFC 1952 2.2: a gzip file may hold several members; Go's readers, and so Docker,
//! containerd, Podman and skopeo, read them all). At most two blocks per thread are in flight,
//! so memory stays bounded whatever the input's size. zstd uses the library's own workers,
//! whose streaming output is the same for any number of workers of one or more (zstd issue
//! #2238); it differs from the single-threaded output, so a worker is always used.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

/// libdeflate level: 1 is within 5% of zlib -6's size at almost three times its speed.
pub(crate) const GZIP_LEVEL: i32 = 1;
/// Input bytes per gzip member. Part of the output's identity: changing it changes every blob.
pub(crate) const GZIP_BLOCK: usize = 2 << 20;
/// zstd level: the library default, fast with a better ratio than gzip -9.
pub(crate) const ZSTD_LEVEL: i32 = 3;
/// Input bytes per zstd job (one worker's share at a time).
const ZSTD_JOB: u32 = 4 << 20;

/// The threads to compress one stream on: every core.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// A block's buffer and its member's, back from a worker.
type Done = io::Result<(Vec<u8>, Vec<u8>)>;

/// One block to compress at a level, and where its member goes.
struct Job {
    level: i32,
    input: Vec<u8>,
    reply: mpsc::SyncSender<Done>,
}

/// The process's gzip workers, one per core, shared by every stream being compressed: so
/// several layers at once do not start more threads than there are cores, and their
/// buffers stay few and reused (fresh megabytes for every block cost more system time, and
/// left more memory resident, than the copying did).
fn workers() -> &'static Mutex<mpsc::Sender<Job>> {
    static WORKERS: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    WORKERS.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..cores() {
            let rx = rx.clone();
            std::thread::spawn(move || {
                let mut compressor: Option<(i32, libdeflater::Compressor)> = None;
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(Job { level: wanted, input, reply }) = job else { return };
                    let result = (|| {
                        if compressor.as_ref().is_none_or(|(l, _)| *l != wanted) {
                            compressor = Some((wanted, libdeflater::Compressor::new(level(wanted)?)));
                        }
                        let mut output = buffer();
                        if let Some((_, c)) = &mut compressor {
                            gzip_block(c, &input, &mut output)?;
                        }
                        Ok((input, output))
                    })();
                    let _ = reply.send(result);
                }
            });
        }
        Mutex::new(tx)
    })
}

/// Buffers of finished blocks and members, for the next ones.
static BUFFERS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

fn buffer() -> Vec<u8> {
    BUFFERS.lock().ok().and_then(|mut b| b.pop()).unwrap_or_else(|| Vec::with_capacity(GZIP_BLOCK))
}

fn recycle(mut buffer: Vec<u8>) {
    buffer.clear();
    if let Ok(mut buffers) = BUFFERS.lock() {
        // Enough for every block in flight on every core, and little more.
        if buffers.len() < 6 * cores() {
            buffers.push(buffer);
        }
    }
}

/// A gzip writer whose blocks are compressed on up to `threads` cores at once (on the
/// caller's thread for one); [`ParallelGzip::finish`] writes the last member and hands
/// back the inner writer.
pub(crate) struct ParallelGzip<W: Write> {
    /// `None` once finished.
    inner: Option<W>,
    level: i32,
    /// The block being filled.
    block: Vec<u8>,
    /// Members under way, oldest first.
    in_flight: VecDeque<mpsc::Receiver<Done>>,
    limit: usize,
    members: u64,
    /// With one thread, blocks are compressed on the caller's.
    local: Option<libdeflater::Compressor>,
}

fn level(level: i32) -> io::Result<libdeflater::CompressionLvl> {
    libdeflater::CompressionLvl::new(level).map_err(|e| io::Error::other(format!("gzip level {level}: {e:?}")))
}

fn gzip_block(compressor: &mut libdeflater::Compressor, input: &[u8], output: &mut Vec<u8>) -> io::Result<()> {
    output.resize(compressor.gzip_compress_bound(input.len()), 0);
    let n = compressor
        .gzip_compress(input, output)
        .map_err(|e| io::Error::other(format!("gzip compression failed: {e:?}")))?;
    output.truncate(n);
    Ok(())
}

impl<W: Write> ParallelGzip<W> {
    pub(crate) fn new(inner: W, gzip_level: i32, threads: usize) -> io::Result<ParallelGzip<W>> {
        let threads = threads.max(1);
        let local = if threads == 1 { Some(libdeflater::Compressor::new(level(gzip_level)?)) } else { None };
        level(gzip_level)?;
        Ok(ParallelGzip {
            inner: Some(inner),
            level: gzip_level,
            block: buffer(),
            in_flight: VecDeque::new(),
            // Two per thread: one compressing, one waiting, so no worker idles while the
            // oldest member is written.
            limit: 2 * threads,
            members: 0,
            local,
        })
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.inner.as_mut().ok_or_else(|| io::Error::other("gzip stream finished"))
    }

    /// Sends the full block off (or compresses it here, with one thread).
    fn submit(&mut self) -> io::Result<()> {
        let block = std::mem::replace(&mut self.block, buffer());
        self.members += 1;
        if let Some(compressor) = &mut self.local {
            let mut member = buffer();
            gzip_block(compressor, &block, &mut member)?;
            self.out()?.write_all(&member)?;
            recycle(member);
            recycle(block);
            return Ok(());
        }
        while self.in_flight.len() >= self.limit {
            self.write_oldest()?;
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let sent = workers().lock().map(|jobs| jobs.send(Job { level: self.level, input: block, reply }));
        if !matches!(sent, Ok(Ok(()))) {
            return Err(io::Error::other("the gzip workers stopped"));
        }
        self.in_flight.push_back(answer);
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(answer) = self.in_flight.pop_front() else { return Ok(()) };
        let (input, output) = answer.recv().map_err(|_| io::Error::other("a gzip worker stopped"))??;
        self.out()?.write_all(&output)?;
        recycle(input);
        recycle(output);
        Ok(())
    }

    /// Writes the last member (an empty one for empty input, so the file is valid gzip) and
    /// everything under way; returns the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() || self.members == 0 {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        self.out()?.flush()?;
        self.inner.take().ok_or_else(|| io::Error::other("gzip stream finished"))
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = GZIP_BLOCK - self.block.len();
        let n = room.min(buf.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == GZIP_BLOCK {
            self.submit()?;
        }
        Ok(n)
    }

    /// Blocks are only ever whole: flushing writes what is done, not the partial block.
    fn flush(&mut self) -> io::Result<()> {
        self.out()?.flush()
    }
}

impl<W: Write> Drop for ParallelGzip<W> {
    fn drop(&mut self) {
        // Members under way are dropped by their workers' replies going nowhere.
        recycle(std::mem::take(&mut self.block));
    }
}

/// zstd contexts of finished streams, with the (level, workers) they were set up for: a
/// context keeps its workers, so the next stream neither starts threads nor allocates their
/// buffers again (with fresh ones per layer, glibc's per-thread arenas grew resident memory
/// past 200 MB over an image's layers).
static ZSTD_CONTEXTS: Mutex<Vec<((i32, usize), zstd::zstd_safe::CCtx<'static>)>> = Mutex::new(Vec::new());

fn zstd_error(code: usize) -> io::Error {
    io::Error::other(format!("zstd compression failed: {}", zstd::zstd_safe::get_error_name(code)))
}

/// A zstd writer on the library's workers (at least one, for output independent of
/// `threads`); [`ZstdWriter::finish`] ends the frame and hands back the inner writer.
pub(crate) struct ZstdWriter<W: Write> {
    inner: Option<W>,
    key: (i32, usize),
    context: Option<zstd::zstd_safe::CCtx<'static>>,
    out: Vec<u8>,
}

impl<W: Write> ZstdWriter<W> {
    pub(crate) fn new(inner: W, level: i32, threads: usize) -> io::Result<ZstdWriter<W>> {
        use zstd::zstd_safe::{CCtx, CParameter, ResetDirective};
        let key = (level, threads.max(1));
        let reused = ZSTD_CONTEXTS.lock().ok().and_then(|mut all| {
            let at = all.iter().position(|(k, _)| *k == key)?;
            Some(all.swap_remove(at).1)
        });
        let context = match reused {
            Some(mut context) => {
                context.reset(ResetDirective::SessionOnly).map_err(zstd_error)?;
                context
            }
            None => {
                let mut context = CCtx::create();
                context.set_parameter(CParameter::CompressionLevel(level)).map_err(zstd_error)?;
                context.set_parameter(CParameter::NbWorkers(key.1 as u32)).map_err(zstd_error)?;
                // Smaller jobs than the library's (8 MiB at level 3): less memory, at a ratio
                // within a fraction of a percent. Part of the output's identity, like the level.
                context.set_parameter(CParameter::JobSize(ZSTD_JOB)).map_err(zstd_error)?;
                context
            }
        };
        Ok(ZstdWriter { inner: Some(inner), key, context: Some(context), out: Vec::with_capacity(256 << 10) })
    }

    /// Runs the context over `input` with `end`, writing what comes out; the bytes still
    /// inside when ending (0: the frame is done).
    fn run(&mut self, input: &[u8], end: zstd::zstd_safe::zstd_sys::ZSTD_EndDirective) -> io::Result<usize> {
        use zstd::zstd_safe::{InBuffer, OutBuffer};
        let (Some(context), Some(inner)) = (self.context.as_mut(), self.inner.as_mut()) else {
            return Err(io::Error::other("zstd stream finished"));
        };
        let mut input = InBuffer::around(input);
        loop {
            self.out.clear();
            let mut output = OutBuffer::around(&mut self.out);
            let left = context.compress_stream2(&mut output, &mut input, end).map_err(zstd_error)?;
            let made = output.pos();
            inner.write_all(&self.out[..made])?;
            let ending = end == zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end;
            if (ending && left == 0) || (!ending && input.pos() == input.src.len()) {
                return Ok(left);
            }
        }
    }

    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.run(&[], zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_end)?;
        if let (Some(context), Ok(mut all)) = (self.context.take(), ZSTD_CONTEXTS.lock()) {
            if all.len() < 2 {
                all.push((self.key, context));
            }
        }
        let mut inner = self.inner.take().ok_or_else(|| io::Error::other("zstd stream finished"))?;
        inner.flush()?;
        Ok(inner)
    }
}

impl<W: Write> Write for ZstdWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.run(buf, zstd::zstd_safe::zstd_sys::ZSTD_EndDirective::ZSTD_e_continue)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.as_mut().map_or(Ok(()), |w| w.flush())
    }
}

/// gzip-compresses `input` on `threads` threads into a `Vec`.
#[cfg(test)]
fn gzip_vec(input: &[u8], threads: usize) -> Vec<u8> {
    let mut gz = ParallelGzip::new(Vec::new(), GZIP_LEVEL, threads).unwrap();
    // Odd write sizes, so blocks straddle writes.
    for piece in input.chunks(777_777) {
        gz.write_all(piece).unwrap();
    }
    gz.finish().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample(len: usize) -> Vec<u8> {
        (0..len as u32).map(|i| ((i / 7) % 251) as u8 ^ (i % 13) as u8).collect()
    }

    #[test]
    fn gzip_output_is_the_same_on_any_number_of_threads() {
        for len in [0, 1, GZIP_BLOCK, GZIP_BLOCK + 1, 5 * GZIP_BLOCK + 12_345] {
            let input = sample(len);
            let one = gzip_vec(&input, 1);
            for threads in [2, 3, 8] {
                assert_eq!(gzip_vec(&input, threads), one, "{len} bytes on {threads} threads");
            }
            let mut back = Vec::new();
            flate2::read::MultiGzDecoder::new(&one[..]).read_to_end(&mut back).unwrap();
            assert_eq!(back, input);
            // One member per started block, and one for empty input.
            let members = len.div_ceil(GZIP_BLOCK).max(1);
            let mut count = 0;
            let mut rest = &one[..];
            while !rest.is_empty() {
                let mut decoder = flate2::bufread::GzDecoder::new(rest);
                io::copy(&mut decoder, &mut io::sink()).unwrap();
                rest = decoder.into_inner();
                count += 1;
            }
            assert_eq!(count, members, "{len} bytes");
        }
    }

    #[test]
    fn zstd_output_is_the_same_on_any_number_of_threads() {
        let input = sample(40 << 20);
        let run = |threads| {
            let mut z = ZstdWriter::new(Vec::new(), ZSTD_LEVEL, threads).unwrap();
            for piece in input.chunks(1 << 20) {
                z.write_all(piece).unwrap();
            }
            z.finish().unwrap()
        };
        let one = run(1);
        assert_eq!(run(2), one);
        assert_eq!(run(4), one);
        // A context reused from the last stream makes the same bytes.
        assert_eq!(run(4), one);
        let back = zstd::stream::decode_all(&one[..]).unwrap();
        assert!(back == input);
    }
}
