//! Layer compression: the uncompressed layer tar in, a compressed temporary file out, with
//! the digest and size of what was written. Output is deterministic (no gzip timestamp), so
//! the same layer always becomes the same blob and a registry that has it is found by digest.
//!
//! gzip is libdeflate, one gzip member per 2 MiB of input: about twice zlib's speed at the
//! same ratio. A gzip file may hold several members (RFC 1952 2.2); Go's readers, and so
//! Docker, containerd, Podman and skopeo, read them all.

use std::io::{self, BufWriter, Read, Write};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use super::manifest::Compression;

/// libdeflate level: 1 is within 5% of zlib -6's size at almost three times its speed.
pub(crate) const GZIP_LEVEL: i32 = 1;
/// Input bytes per gzip member.
const MEMBER: usize = 2 << 20;
/// zstd level: the library default, fast with a better ratio than gzip -9.
pub(crate) const ZSTD_LEVEL: i32 = 3;

/// Input and output buffers of finished compressions, for the next ones.
static SPARE: std::sync::Mutex<Vec<(Vec<u8>, Vec<u8>)>> = std::sync::Mutex::new(Vec::new());

/// A compressed layer waiting to be uploaded; the file goes when this is dropped.
pub(crate) struct Compressed {
    pub file: tempfile::NamedTempFile,
    pub digest: String,
    pub size: u64,
}

pub(crate) fn compress(mut reader: impl Read, compression: Compression, dir: &Path) -> Result<Compressed> {
    let file = tempfile::Builder::new()
        .prefix("layer-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let sink = Hashing {
        inner: BufWriter::with_capacity(256 << 10, file.as_file().try_clone()?),
        hasher: Sha256::new(),
        size: 0,
    };
    let sink = match compression {
        Compression::Gzip => {
            let mut sink = sink;
            let level =
                libdeflater::CompressionLvl::new(GZIP_LEVEL).map_err(|e| anyhow::anyhow!("gzip level: {e:?}"))?;
            let mut compressor = libdeflater::Compressor::new(level);
            // Buffers are reused across layers: zeroing fresh megabytes for every layer cost
            // more system time than the copying did.
            let mut buffers = SPARE.lock().ok().and_then(|mut spare| spare.pop()).unwrap_or_default();
            let result = (|| -> Result<()> {
                let (input, output) = &mut buffers;
                input.resize(MEMBER, 0);
                output.resize(compressor.gzip_compress_bound(MEMBER), 0);
                loop {
                    let n = crate::archive::read_up_to(&mut reader, input)?;
                    if n == 0 && sink.size > 0 {
                        break;
                    }
                    let written = compressor
                        .gzip_compress(&input[..n], output)
                        .map_err(|e| anyhow::anyhow!("gzip compression failed: {e:?}"))?;
                    sink.write_all(&output[..written])?;
                    if n < MEMBER {
                        break;
                    }
                }
                Ok(())
            })();
            if let Ok(mut spare) = SPARE.lock() {
                spare.push(buffers);
            }
            result?;
            sink
        }
        Compression::Zstd => {
            let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL)?;
            copy(&mut reader, &mut encoder)?;
            encoder.finish()?
        }
    };
    let Hashing { mut inner, hasher, size } = sink;
    inner.flush()?;
    Ok(Compressed { file, digest: format!("sha256:{}", hex::encode(hasher.finalize())), size })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"layer bytes ".repeat(10_000);
        for compression in [Compression::Gzip, Compression::Zstd] {
            let a = compress(&data[..], compression, dir.path()).unwrap();
            let b = compress(&data[..], compression, dir.path()).unwrap();
            assert_eq!(a.digest, b.digest);
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
        let c = compress(&big[..], Compression::Gzip, dir.path()).unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(c.file.path()).unwrap()).read_to_end(&mut back).unwrap();
        assert_eq!(back, big);
        let c = compress(&b""[..], Compression::Gzip, dir.path()).unwrap();
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(std::fs::File::open(c.file.path()).unwrap()).read_to_end(&mut back).unwrap();
        assert!(back.is_empty());
    }
}
