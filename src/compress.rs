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
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// libdeflate level: 1 is within 5% of zlib -6's size at almost three times its speed.
pub(crate) const GZIP_LEVEL: i32 = 1;
/// Input bytes per gzip member. Part of the output's identity: changing it changes every blob.
pub(crate) const GZIP_BLOCK: usize = 2 << 20;
/// zstd level: the library default, fast with a better ratio than gzip -9.
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// The threads to compress one stream on: every core.
pub(crate) fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// One block to compress, and where its member goes.
type Job = (Vec<u8>, mpsc::SyncSender<io::Result<(Vec<u8>, Vec<u8>)>>);

/// A gzip writer compressing blocks on `threads` threads; [`ParallelGzip::finish`] writes
/// the last member and hands back the inner writer.
pub(crate) struct ParallelGzip<W: Write> {
    /// `None` once finished.
    inner: Option<W>,
    /// The block being filled.
    block: Vec<u8>,
    /// Members under way, oldest first: each gives back its block's buffer and its bytes.
    in_flight: VecDeque<mpsc::Receiver<io::Result<(Vec<u8>, Vec<u8>)>>>,
    limit: usize,
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
    /// Buffers of written blocks, for the next ones.
    spare: Vec<Vec<u8>>,
    members: u64,
    /// With one thread, blocks are compressed on the caller's.
    local: Option<libdeflater::Compressor>,
    local_out: Vec<u8>,
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
        let lvl = level(gzip_level)?;
        let threads = threads.max(1);
        let mut gz = ParallelGzip {
            inner: Some(inner),
            block: Vec::with_capacity(GZIP_BLOCK),
            in_flight: VecDeque::new(),
            limit: 2 * threads,
            jobs: None,
            workers: Vec::new(),
            spare: Vec::new(),
            members: 0,
            local: None,
            local_out: Vec::new(),
        };
        if threads == 1 {
            gz.local = Some(libdeflater::Compressor::new(lvl));
            return Ok(gz);
        }
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads {
            let rx = rx.clone();
            let mut compressor = libdeflater::Compressor::new(lvl);
            gz.workers.push(std::thread::spawn(move || {
                let mut spare_out: Vec<u8> = Vec::new();
                loop {
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok((input, reply)) = job else { return };
                    let mut output = std::mem::take(&mut spare_out);
                    let result = gzip_block(&mut compressor, &input, &mut output).map(|()| (input, output));
                    let _ = reply.send(result);
                }
            }));
        }
        gz.jobs = Some(tx);
        Ok(gz)
    }

    fn out(&mut self) -> io::Result<&mut W> {
        self.inner.as_mut().ok_or_else(|| io::Error::other("gzip stream finished"))
    }

    /// Sends the full block off (or compresses it here, with one thread).
    fn submit(&mut self) -> io::Result<()> {
        let next = self.spare.pop().unwrap_or_else(|| Vec::with_capacity(GZIP_BLOCK));
        let block = std::mem::replace(&mut self.block, next);
        self.members += 1;
        if let Some(compressor) = &mut self.local {
            gzip_block(compressor, &block, &mut self.local_out)?;
            let member = std::mem::take(&mut self.local_out);
            self.out()?.write_all(&member)?;
            self.local_out = member;
            self.block.clear();
            self.spare.push(block);
            return Ok(());
        }
        while self.in_flight.len() >= self.limit {
            self.write_oldest()?;
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let jobs = self.jobs.as_ref().ok_or_else(|| io::Error::other("gzip workers stopped"))?;
        jobs.send((block, reply)).map_err(|_| io::Error::other("gzip workers stopped"))?;
        self.in_flight.push_back(answer);
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        let Some(answer) = self.in_flight.pop_front() else { return Ok(()) };
        let (mut input, output) = answer.recv().map_err(|_| io::Error::other("a gzip worker stopped"))??;
        self.out()?.write_all(&output)?;
        input.clear();
        self.spare.push(input);
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
        self.stop();
        self.inner.take().ok_or_else(|| io::Error::other("gzip stream finished"))
    }

    fn stop(&mut self) {
        self.jobs = None;
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
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
        self.in_flight.clear();
        self.stop();
    }
}

/// A zstd writer on the library's workers (at least one, for output independent of `threads`).
pub(crate) fn zstd_writer<W: Write>(
    inner: W,
    level: i32,
    threads: usize,
) -> io::Result<zstd::stream::write::Encoder<'static, W>> {
    let mut encoder = zstd::stream::write::Encoder::new(inner, level)?;
    encoder.multithread(threads.max(1) as u32)?;
    Ok(encoder)
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
            let mut z = zstd_writer(Vec::new(), ZSTD_LEVEL, threads).unwrap();
            for piece in input.chunks(1 << 20) {
                z.write_all(piece).unwrap();
            }
            z.finish().unwrap()
        };
        let one = run(1);
        assert_eq!(run(2), one);
        assert_eq!(run(4), one);
        let back = zstd::stream::decode_all(&one[..]).unwrap();
        assert!(back == input);
    }
}
