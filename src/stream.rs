//! Streamed images: a container whose output is not an archive but a program that writes one
//! (nixpkgs' `dockerTools.streamLayeredImage`: an uncompressed docker-archive on stdout, in any
//! entry order, the config and manifest.json usually last). The program runs in the nix
//! container and its stdout comes here as an [`ImageStream`], which a file, the engine's image
//! load or a push reads. On its way the stream's tar headers are followed, so the image config
//! is read as it passes and its platform checked: a stream of the wrong platform, or one
//! without a config, ends in an error instead of its last bytes, and nothing takes it as whole.

use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::{anyhow, Result};
use bytes::Bytes;
use futures::Stream;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::archive::SourceError;
use crate::compress::{cores, ParallelGzip, GZIP_LEVEL};
use crate::platform::Platform;

/// Chunks of the program's stdout in flight between the exec and the reader.
const DEPTH: usize = 16;
/// A tar entry bigger than this is not an image config.
const SMALL: u64 = 4 << 20;

/// What a container's store output is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutputKind {
    /// A docker-archive file (`.tar`, `.tar.gz`): copied out as it is.
    Archive,
    /// An executable that writes the archive to stdout.
    Stream,
}

/// What a store path's name says it is, when it says: dockerTools names archives
/// `NAME.tar[.gz|.zst]` and streams `stream-NAME`; anything else is asked of the file.
pub(crate) fn kind_by_name(store_path: &str) -> Option<OutputKind> {
    let name = store_path.rsplit('/').next().unwrap_or(store_path);
    if [".tar", ".tar.gz", ".tgz", ".tar.zst"].iter().any(|ext| name.ends_with(ext)) {
        Some(OutputKind::Archive)
    } else {
        None
    }
}

/// The kind of a regular file of mode `mode` (`None`: not a regular file, which no
/// container's output may be).
pub(crate) fn kind_by_mode(store_path: &str, mode: Option<u32>) -> Result<OutputKind> {
    match mode {
        Some(mode) if mode & 0o111 != 0 => Ok(OutputKind::Stream),
        Some(_) => Ok(OutputKind::Archive),
        None => Err(anyhow!(
            "{store_path} is neither an archive file nor an executable that streams one (does the default.nix \
             end in dockerTools.buildLayeredImage or dockerTools.streamLayeredImage?)"
        )),
    }
}

/// The sending half: the exec's stdout goes in, then, if the program failed, its error.
pub(crate) type StreamSender = mpsc::Sender<io::Result<Bytes>>;

/// A channel for one image stream, the image to be of `platform`.
pub(crate) fn channel(platform: &Platform) -> (StreamSender, ImageStream) {
    let (tx, rx) = mpsc::channel(DEPTH);
    (tx, ImageStream { rx, check: ConfigCheck::new(platform.clone()), chunk: Bytes::new(), ended: false })
}

/// The image as the program writes it, checked on the way (see the module's opening).
pub(crate) struct ImageStream {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    check: ConfigCheck,
    /// What a [`Read`] has not taken yet of the last chunk.
    chunk: Bytes,
    ended: bool,
}

impl ImageStream {
    fn next_item(&mut self, item: Option<io::Result<Bytes>>) -> Option<io::Result<Bytes>> {
        if self.ended {
            return None;
        }
        let result = match item {
            Some(Ok(chunk)) => self.check.feed(&chunk).map(|()| chunk),
            Some(Err(e)) => Err(e),
            None => match self.check.finish() {
                Ok(()) => {
                    self.ended = true;
                    return None;
                }
                Err(e) => Err(e),
            },
        };
        if result.is_err() {
            self.ended = true;
        }
        Some(result)
    }

    /// A blocking reader (for a blocking thread).
    pub(crate) fn into_reader(self) -> Box<dyn Read + Send> {
        Box::new(self)
    }
}

impl Stream for ImageStream {
    type Item = io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let item = std::task::ready!(self.rx.poll_recv(cx));
        Poll::Ready(self.next_item(item))
    }
}

impl Read for ImageStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            if self.ended {
                return Ok(0);
            }
            let item = self.rx.blocking_recv();
            match self.next_item(item) {
                Some(chunk) => self.chunk = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// How an archive file's bytes are packed, by its name: only those a hand-over unpacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Packing {
    Plain,
    Gzip,
}

impl Packing {
    pub(crate) fn by_name(store_path: &str) -> Option<Packing> {
        if store_path.ends_with(".tar") {
            Some(Packing::Plain)
        } else if store_path.ends_with(".tar.gz") || store_path.ends_with(".tgz") {
            Some(Packing::Gzip)
        } else {
            None
        }
    }
}

/// Unpacks an archive file's bytes from `reader` (as copied out) into `tx`, in chunks, on a
/// blocking thread: the inflate runs beside whatever reads the stream.
pub(crate) async fn unpack(
    reader: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    packing: Packing,
    tx: StreamSender,
) -> Result<()> {
    let unpacking = tokio::task::spawn_blocking(move || -> Result<()> {
        let raw = std::io::BufReader::with_capacity(1 << 20, tokio_util::io::SyncIoBridge::new(reader));
        let mut from: Box<dyn Read> = match packing {
            Packing::Plain => Box::new(raw),
            Packing::Gzip => Box::new(flate2::read::MultiGzDecoder::new(raw)),
        };
        loop {
            let mut chunk = vec![0u8; 1 << 20];
            let n = crate::archive::read_up_to(&mut from, &mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            chunk.truncate(n);
            if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
                // The reader is gone (it failed, or was stopped): its error is the one to tell.
                return Ok(());
            }
        }
    });
    unpacking.await.map_err(|e| anyhow!("unpacking the archive stopped: {e}"))?
}

/// An [`ImageStream`] handed from the build to whoever consumes it (`publish`), once.
#[derive(Clone)]
pub(crate) struct HandOver(Arc<Mutex<Option<ImageStream>>>);

impl HandOver {
    pub(crate) fn new(stream: ImageStream) -> HandOver {
        HandOver(Arc::new(Mutex::new(Some(stream))))
    }

    /// The stream, for the first to ask.
    pub(crate) fn take(&self) -> Option<ImageStream> {
        self.0.lock().ok()?.take()
    }
}

impl std::fmt::Debug for HandOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandOver")
    }
}

/// Compresses `reader` into `writer` as gzip on every core, deterministic (the push's own
/// encoder: libdeflate, one member per 2 MiB, no timestamp), so the same image always makes
/// the same `.tar.gz`. Returns the bytes written.
pub(crate) fn gzip(reader: &mut dyn Read, writer: &mut dyn Write) -> Result<u64> {
    let mut counted = Counting { inner: writer, written: 0 };
    let mut gzip = ParallelGzip::new(&mut counted, GZIP_LEVEL, cores())?;
    std::io::copy(reader, &mut gzip)?;
    gzip.finish()?;
    Ok(counted.written)
}

/// A writer that counts what passes.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    written: u64,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[derive(Deserialize)]
struct Config {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
    rootfs: Option<serde_json::Value>,
}

/// Follows a tar stream's headers and reads its small JSON entries as they pass: the one
/// with `architecture` and `rootfs` is the image config, whose platform must be `expected`.
struct ConfigCheck {
    expected: Platform,
    /// Bytes of the header being read.
    header: Vec<u8>,
    /// Data bytes (with padding) of the current entry still to come.
    skip: u64,
    /// The current entry's bytes, when it may be the config, and how many are data.
    capture: Option<(Vec<u8>, u64)>,
    /// The entry before was an extended header: this one's name may be in it.
    named_before: bool,
    found: bool,
    /// Two zero blocks: the end of the archive.
    zero_blocks: u8,
}

impl ConfigCheck {
    fn new(expected: Platform) -> ConfigCheck {
        ConfigCheck {
            expected,
            header: Vec::with_capacity(512),
            skip: 0,
            capture: None,
            named_before: false,
            found: false,
            zero_blocks: 0,
        }
    }

    fn feed(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                if let Some((bytes, size)) = &mut self.capture {
                    let want = (*size as usize).saturating_sub(bytes.len()).min(n);
                    bytes.extend_from_slice(&data[..want]);
                }
                self.skip -= n as u64;
                data = &data[n..];
                if self.skip == 0 {
                    self.entry_done()?;
                }
                continue;
            }
            if self.zero_blocks >= 2 {
                return Ok(()); // padding after the end
            }
            let n = (512 - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() == 512 {
                self.header_done()?;
            }
        }
        Ok(())
    }

    fn header_done(&mut self) -> io::Result<()> {
        let block = std::mem::take(&mut self.header);
        if block.iter().all(|&b| b == 0) {
            self.zero_blocks += 1;
            return Ok(());
        }
        let header = tar::Header::from_byte_slice(&block);
        let bad = || SourceError::io("the image stream is not a tar archive (a header does not parse)");
        let size = header.entry_size().map_err(|_| bad())?;
        let named_before = std::mem::replace(&mut self.named_before, false);
        match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let name = String::from_utf8_lossy(&header.path_bytes()).to_string();
                if size <= SMALL && (name.ends_with(".json") || named_before) {
                    self.capture = Some((Vec::with_capacity(size as usize), size));
                }
            }
            tar::EntryType::XHeader | tar::EntryType::GNULongName => self.named_before = true,
            _ => {}
        }
        self.skip = size.div_ceil(512) * 512;
        if self.skip == 0 {
            self.entry_done()?;
        }
        Ok(())
    }

    fn entry_done(&mut self) -> io::Result<()> {
        let Some((bytes, _)) = self.capture.take() else { return Ok(()) };
        let Ok(config) = serde_json::from_slice::<Config>(&bytes) else { return Ok(()) };
        let (Some(arch), Some(_)) = (config.architecture, config.rootfs) else { return Ok(()) };
        let says = Platform::new(config.os.as_deref().unwrap_or("linux"), &arch, config.variant.as_deref());
        if !crate::engine::same_platform(&says, &self.expected) {
            return Err(SourceError::io(format!(
                "the image stream's config says {says}, not {} (was it built for another system?)",
                self.expected
            )));
        }
        self.found = true;
        Ok(())
    }

    fn finish(&self) -> io::Result<()> {
        if !self.found {
            return Err(SourceError::io("the image stream ended without an image config: it is not a docker-archive"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &[u8] = br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;

    fn checked(bytes: &[u8], chunk: usize, platform: &str) -> io::Result<()> {
        let mut check = ConfigCheck::new(Platform::parse(platform).unwrap());
        for piece in bytes.chunks(chunk) {
            check.feed(piece)?;
        }
        check.finish()
    }

    #[test]
    fn the_config_is_found_in_any_order_and_chunking() {
        let layer = vec![7u8; 5000];
        let stream = crate::archive::tar_with(&[("a/layer.tar", &layer), ("c.json", CONFIG), ("manifest.json", b"[]")]);
        for chunk in [1, 100, 511, 512, 513, 4096, stream.len()] {
            checked(&stream, chunk, "linux/amd64").unwrap();
        }
        let e = checked(&stream, 1000, "linux/arm64").unwrap_err().to_string();
        assert!(e.contains("says linux/amd64, not linux/arm64"), "{e}");
        // A long name (GNU long-name entry) hides nothing.
        let long = format!("{}.json", "x".repeat(150));
        checked(&crate::archive::tar_with(&[(&long, CONFIG)]), 300, "linux/amd64").unwrap();
    }

    #[test]
    fn a_stream_without_a_config_is_refused() {
        let e =
            checked(&crate::archive::tar_with(&[("a/layer.tar", b"x"), ("manifest.json", b"[]")]), 64, "linux/amd64")
                .unwrap_err();
        assert!(e.to_string().contains("without an image config"), "{e}");
        // Bytes that are not tar headers.
        assert!(checked(&[1u8; 2048], 512, "linux/amd64").is_err());
    }

    #[test]
    fn names_say_archive_and_modes_say_stream() {
        assert_eq!(kind_by_name("/nix/store/x-hello.tar.gz"), Some(OutputKind::Archive));
        assert_eq!(kind_by_name("/nix/store/x-hello.tar"), Some(OutputKind::Archive));
        assert_eq!(kind_by_name("/nix/store/x-stream-hello"), None);
        assert_eq!(kind_by_mode("p", Some(0o555)).unwrap(), OutputKind::Stream);
        assert_eq!(kind_by_mode("p", Some(0o444)).unwrap(), OutputKind::Archive);
        assert!(kind_by_mode("/nix/store/x-dir", None).unwrap_err().to_string().contains("streamLayeredImage"));
    }

    #[test]
    fn gzip_is_deterministic_and_reads_back() {
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        gzip(&mut &data[..], &mut a).unwrap();
        gzip(&mut &data[..], &mut b).unwrap();
        assert_eq!(a, b);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&a[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        let mut empty = Vec::new();
        gzip(&mut &b""[..], &mut empty).unwrap();
        assert!(!empty.is_empty(), "an empty input is still a gzip file");
    }

    #[tokio::test]
    async fn a_failed_program_ends_the_reader_in_its_error() {
        let platform = Platform::parse("linux/amd64").unwrap();
        let (tx, stream) = channel(&platform);
        let bytes = crate::archive::tar_with(&[("c.json", CONFIG)]);
        tx.send(Ok(Bytes::from(bytes[..600].to_vec()))).await.unwrap();
        tx.send(Err(io::Error::other("stream-hello exited with code 3"))).await.unwrap();
        drop(tx);
        let read = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            stream.into_reader().read_to_end(&mut out)
        })
        .await
        .unwrap();
        assert!(read.unwrap_err().to_string().contains("exited with code 3"));
    }

    #[tokio::test]
    async fn an_archive_is_unpacked_into_the_stream_as_it_comes() {
        assert_eq!(Packing::by_name("/nix/store/x-hello.tar.gz"), Some(Packing::Gzip));
        assert_eq!(Packing::by_name("/nix/store/x-hello.tar"), Some(Packing::Plain));
        assert_eq!(Packing::by_name("/nix/store/x-hello.tar.zst"), None);
        let platform = Platform::parse("linux/amd64").unwrap();
        let image = crate::archive::tar_with(&[("a/layer.tar", &vec![9u8; 3 << 20]), ("c.json", CONFIG)]);
        for packing in [Packing::Plain, Packing::Gzip] {
            let packed = match packing {
                Packing::Plain => image.clone(),
                Packing::Gzip => {
                    let mut out = Vec::new();
                    gzip(&mut &image[..], &mut out).unwrap();
                    out
                }
            };
            let (tx, stream) = channel(&platform);
            let (mut writer, reader) = tokio::io::duplex(64 << 10);
            let writing = async move {
                tokio::io::AsyncWriteExt::write_all(&mut writer, &packed).await.unwrap();
            };
            let reading = tokio::task::spawn_blocking(move || {
                let mut out = Vec::new();
                stream.into_reader().read_to_end(&mut out).map(|_| out)
            });
            let ((), unpacked, read) = tokio::join!(writing, unpack(reader, packing, tx), reading);
            unpacked.unwrap();
            assert!(read.unwrap().unwrap() == image, "{packing:?}");
        }
    }
}
