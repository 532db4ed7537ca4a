//! Inflates a gzip file with one backend and prints its speed: `inflaters FILE [libdeflate]`;
//! `inflaters FILE.tar deflate` compresses instead, at level 1 in 2 MiB members as nixctr
//! does, with libdeflate (nixctr's) and with flate2's backend, on one core.
//! flate2's backend is chosen at build time (features zlib-rs, miniz, zlib) and reads the file
//! as a stream, as nixctr does; `libdeflate` decompresses the whole file in memory at once
//! (libdeflate has no streaming interface), so its peak memory is the uncompressed size.
use std::io::Read;
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = &args[1];
    if args.get(2).is_some_and(|a| a == "deflate") {
        return deflate(path);
    }
    let whole = args.get(2).is_some_and(|a| a == "libdeflate");
    let started = Instant::now();
    let out = if whole {
        let input = std::fs::read(path).unwrap();
        let isize = u32::from_le_bytes(input[input.len() - 4..].try_into().unwrap()) as usize;
        // ISIZE is the size modulo 4 GiB: enough for this bench's files.
        let mut output = vec![0u8; isize];
        let mut d = libdeflater::Decompressor::new();
        d.gzip_decompress(&input, &mut output).unwrap()
    } else {
        let file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).unwrap());
        let mut decoder = flate2::read::MultiGzDecoder::new(file);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = decoder.read(&mut buf).unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    };
    let secs = started.elapsed().as_secs_f64();
    let backend = if whole { "libdeflate (whole file)" } else { BACKEND };
    println!("{backend:24} {:8.0} MB out in {secs:6.2} s = {:6.0} MB/s", out as f64 / 1e6, out as f64 / 1e6 / secs);
}

/// One core's gzip speed and ratio at level 1 on the first 400 MB of `path`.
fn deflate(path: &str) {
    use std::io::Write;
    let data = std::fs::read(path).unwrap();
    let data = &data[..data.len().min(400 << 20)];
    let block = 2 << 20;
    let report = |name: &str, secs: f64, out: usize| {
        let mb = data.len() as f64 / 1e6;
        println!("{name:24} {:6.0} MB/s  compressed to {:.3} of the input", mb / secs, out as f64 / data.len() as f64);
    };
    let started = Instant::now();
    let mut c = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(1).unwrap());
    let mut out = vec![0u8; c.gzip_compress_bound(block)];
    let total: usize = data.chunks(block).map(|chunk| c.gzip_compress(chunk, &mut out).unwrap()).sum();
    report("libdeflate level 1", started.elapsed().as_secs_f64(), total);
    let started = Instant::now();
    let total: usize = data
        .chunks(block)
        .map(|chunk| {
            let mut e = flate2::write::GzEncoder::new(Vec::with_capacity(block), flate2::Compression::new(1));
            e.write_all(chunk).unwrap();
            e.finish().unwrap().len()
        })
        .sum();
    report(&format!("{BACKEND} level 1"), started.elapsed().as_secs_f64(), total);
}

#[cfg(feature = "zlib-rs")]
const BACKEND: &str = "flate2 zlib-rs";
#[cfg(feature = "miniz")]
const BACKEND: &str = "flate2 miniz_oxide";
#[cfg(feature = "zlib")]
const BACKEND: &str = "flate2 zlib (C)";
