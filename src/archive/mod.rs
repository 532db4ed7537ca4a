//! Docker-archive files (`docker save`, nix's `dockerTools`): a tar, plain or gzip-compressed,
//! holding `manifest.json`, the image config and one tar per layer.
//!
//! Three ways in. [`Archive::index`] reads a plain tar's headers, manifest and config only:
//! its layers' diff_ids are the config's word until their bytes are read (and hashed then).
//! [`Archive::open_with`] reads the whole file once and hashes every entry, so a truncated
//! archive, or a layer that does not match the config's `rootfs.diff_ids`, is an error before
//! any of it is used; a compressed archive is copied uncompressed to a temporary file during
//! that pass, so layers can later be read at their offsets. `stream.rs` reads an archive once
//! from a stream, handing each layer to the caller as it passes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

mod io_readers;
mod platform;
mod stream;

pub(crate) use platform::platform_of;

use io_readers::{hash_reader, Counted, Pipelined, Tee};
pub(crate) use io_readers::{read_up_to, sha256_digest, Cancellable, Cancelled, SourceError};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One image from a docker-archive, checked against its config.
#[derive(Debug)]
pub(crate) struct Archive {
    path: PathBuf,
    /// The uncompressed copy of a gzip-compressed archive, read by the layers' [`EntryData`];
    /// deleted on drop.
    _spool: Option<tempfile::NamedTempFile>,
    /// The config JSON, byte for byte as in the archive (its sha256 is the image id).
    pub(crate) config: Vec<u8>,
    pub(crate) config_digest: String,
    /// `RepoTags` of the image, as written by `docker save` or nix.
    pub(crate) repo_tags: Vec<String>,
    pub(crate) layers: Vec<Layer>,
    /// Whether the archive file itself was gzip-compressed.
    pub(crate) gzipped: bool,
    /// Where the config's bytes are in a plain archive, for [`Archive::recall`] to re-read.
    config_data: Option<EntryData>,
    /// The file as it was before the read, so a file changed meanwhile is not remembered.
    opened_as: Option<Identity>,
}

/// One layer: a tar entry whose (uncompressed) sha256 is the `diff_id`.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    /// The entry's path in the archive (`<hash>/layer.tar`).
    pub(crate) name: String,
    pub(crate) diff_id: String,
    /// Size of the uncompressed layer tar.
    pub(crate) size: u64,
    /// `None` for an archive recalled from [`Archive::recall`] whose bytes need a full read
    /// (a compressed archive).
    pub(crate) data: Option<EntryData>,
}

/// Where one entry's bytes are: a plain tar file, at an offset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct EntryData {
    path: PathBuf,
    offset: u64,
    size: u64,
    /// Some archives hold gzip-compressed layer tars.
    gzipped: bool,
    /// The bytes are in a spool of this process's own, hashed as they were written: read
    /// again, they need no second hash. Never from a file (`archives.json`): only this process
    /// can say so.
    #[serde(skip)]
    spooled: bool,
}

impl EntryData {
    /// Whether the bytes were checked where they lie now (see `spooled`).
    pub(crate) fn spooled(&self) -> bool {
        self.spooled
    }

    /// The entry's uncompressed bytes.
    pub(crate) fn reader(&self) -> Result<Box<dyn Read + Send>> {
        let mut file = File::open(&self.path).with_context(|| format!("cannot reopen {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let raw = BufReader::with_capacity(256 << 10, file).take(self.size);
        Ok(if self.gzipped { Box::new(flate2::read::MultiGzDecoder::new(raw)) } else { Box::new(raw) })
    }
}

/// A file entry, handed out as soon as it is read and hashed, before the archive as a whole
/// is checked: callers may start work on likely layers early (but must not send them yet).
#[derive(Debug, Clone)]
pub(crate) struct SeenEntry {
    /// sha256 of the uncompressed content: the diff_id, if this is a layer.
    pub(crate) sha256: String,
    pub(crate) data: EntryData,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct ConfigRootfs {
    rootfs: Rootfs,
}

#[derive(Debug, Deserialize)]
struct Rootfs {
    diff_ids: Vec<String>,
}

/// A read's findings (an index's, for a plain archive), stored by [`Archive::remember`].
///
/// The memory is a hint, like the blob cache: being wrong about an archive would push
/// another image than the one named, so a recalled entry must show it is this file's. Its
/// key is the file's identity (inode, size, mtime, ctime: any write changes the ctime); but
/// a file replaced by another of the same size can reuse the inode, and timestamps are
/// coarse, so its content is sampled too ([`fingerprint`]). Then what the entry says must
/// hang together (the config's `rootfs.diff_ids` are the layers'), and a plain archive's
/// config is read again from the file. Layer bytes read later are checked against their
/// diff_ids as they are compressed.
#[derive(Debug, Serialize, Deserialize)]
struct Checked {
    key: FileKey,
    fingerprint: String,
    config: String,
    config_data: Option<EntryData>,
    repo_tags: Vec<String>,
    gzipped: bool,
    layers: Vec<CheckedLayer>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckedLayer {
    name: String,
    diff_id: String,
    size: u64,
    data: Option<EntryData>,
}

/// Identifies one version of a file: any write changes the ctime, which cannot be set back.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileKey {
    path: PathBuf,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileKey {
    fn of(path: &Path) -> Option<FileKey> {
        use std::os::unix::fs::MetadataExt;
        let path = path.canonicalize().ok()?;
        let m = std::fs::metadata(&path).ok()?;
        Some(FileKey {
            path,
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        })
    }
}

/// What the file is: its identity and a sample of its content.
#[derive(Debug, PartialEq, Eq)]
struct Identity {
    key: FileKey,
    fingerprint: String,
}

impl Identity {
    fn of(path: &Path) -> Option<Identity> {
        let key = FileKey::of(path)?;
        let fingerprint = fingerprint(path).ok()?;
        (FileKey::of(path)? == key).then_some(Identity { key, fingerprint })
    }
}

/// Bytes sampled at each end of a file by [`fingerprint`].
const SAMPLE: u64 = 1 << 20;

/// sha256 of a file's size, first and last MiB: in a docker-archive those hold the first
/// layer's start and the manifest and config (or, gzipped, the trailer's CRC of the whole),
/// which differ between builds. Cheap next to hashing the whole file, which recall avoids.
fn fingerprint(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut hasher = Sha256::new();
    hasher.update(size.to_le_bytes());
    let mut buf = vec![0u8; SAMPLE.min(size) as usize];
    file.read_exact(&mut buf)?;
    hasher.update(&buf);
    if size > SAMPLE {
        let start = size.saturating_sub(SAMPLE).max(SAMPLE);
        file.seek(SeekFrom::Start(start))?;
        buf.clear();
        file.take(SAMPLE).read_to_end(&mut buf)?;
        hasher.update(&buf);
    }
    Ok(format!("sha256:{}", hex::encode(hasher.finalize())))
}

/// What the first pass learned about one tar entry.
#[derive(Debug, Clone)]
enum Entry {
    /// `sha256`: `None` when only the headers were read ([`Archive::index`]).
    File {
        sha256: Option<String>,
        content_size: u64,
        data: EntryData,
    },
    Link(String),
}

impl Archive {
    /// An archive with nothing read yet, for [`Archive::check`] to fill in.
    fn unchecked(
        path: PathBuf,
        spool: Option<tempfile::NamedTempFile>,
        gzipped: bool,
        opened_as: Option<Identity>,
    ) -> Archive {
        Archive {
            path,
            _spool: spool,
            config: Vec::new(),
            config_digest: String::new(),
            repo_tags: Vec::new(),
            layers: Vec::new(),
            gzipped,
            config_data: None,
            opened_as,
        }
    }

    /// Opens and checks `path`. `cancel` stops the read early (Ctrl-C) with an error.
    #[cfg(test)]
    pub(crate) fn open(path: &Path, cancel: Option<Arc<AtomicBool>>) -> Result<Archive> {
        Archive::open_with(path, cancel, &mut |_| {})
    }

    /// [`Archive::open`], calling `on_entry` for each file entry that may be a layer (not
    /// JSON) as soon as it has been read.
    pub(crate) fn open_with(
        path: &Path,
        cancel: Option<Arc<AtomicBool>>,
        on_entry: &mut dyn FnMut(&SeenEntry),
    ) -> Result<Archive> {
        let shown = path.display();
        let opened_as = Identity::of(path);
        let mut file = File::open(path).with_context(|| format!("cannot open archive {shown}"))?;
        let mut magic = [0u8; 2];
        let n = read_up_to(&mut file, &mut magic).with_context(|| format!("cannot read archive {shown}"))?;
        file.seek(SeekFrom::Start(0))?;
        let gzipped = n == 2 && magic == GZIP_MAGIC;
        let cancel = cancel.unwrap_or_default();

        let (entries, spool) = if gzipped {
            let compressed = file.metadata().with_context(|| format!("cannot read archive {shown}"))?.len();
            let decoder = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file));
            let decoded = Pipelined::spawn(Cancellable { inner: decoder, cancel: cancel.clone() });
            let (entries, spool) =
                spool_entries(decoded, Some(compressed), on_entry).map_err(|e| describe_read_error(path, e))?;
            (entries, Some(spool))
        } else {
            let reader = Cancellable { inner: BufReader::with_capacity(1 << 20, file), cancel };
            let entries = scan(reader, path, None, on_entry).map_err(|e| describe_read_error(path, e))?;
            (entries, None)
        };

        let mut archive = Archive::unchecked(path.to_path_buf(), spool, gzipped, opened_as);
        archive.check(&entries)?;
        Ok(archive)
    }

    /// An uncompressed docker-archive stream (an image program's stdout), copied to a spool
    /// of this process's own as it is read and hashed: `on_entry` hears of each file entry
    /// that may be a layer once its bytes are in the spool, so the caller compresses only
    /// the layers it needs, from there. Bounded by TMPDIR's free space.
    pub(crate) fn spool_stream(
        reader: impl Read,
        shown: &str,
        on_entry: &mut dyn FnMut(&SeenEntry),
    ) -> Result<Archive> {
        let (entries, spool) = spool_entries(reader, None, on_entry).map_err(|e| stream_error(e, shown))?;
        let mut archive = Archive::unchecked(PathBuf::from(shown), Some(spool), false, None);
        archive.check(&entries)?;
        Ok(archive)
    }

    /// A plain (not gzip-compressed) archive's manifest, config and layer places, from its tar
    /// headers alone: no layer is read. Its layers' `diff_id`s are the config's, not yet
    /// checked: a layer's bytes must be hashed as they are read ([`EntryData::spooled`] is
    /// false), and a layer never read is used only through a blob already proven to hold
    /// its diff_id. `None` for a gzip-compressed archive, which must be read whole
    /// ([`Archive::open_with`]).
    pub(crate) fn index(path: &Path) -> Result<Option<Archive>> {
        let shown = path.display();
        let opened_as = Identity::of(path);
        let mut file = File::open(path).with_context(|| format!("cannot open archive {shown}"))?;
        let mut magic = [0u8; 2];
        let n = read_up_to(&mut file, &mut magic).with_context(|| format!("cannot read archive {shown}"))?;
        if n == 2 && magic == GZIP_MAGIC {
            return Ok(None);
        }
        file.seek(SeekFrom::Start(0))?;
        let length = file.metadata().with_context(|| format!("cannot read archive {shown}"))?.len();
        let entries = walk_headers(file, path, length).map_err(|e| describe_read_error(path, e))?;
        let mut archive = Archive::unchecked(path.to_path_buf(), None, false, opened_as);
        archive.check(&entries)?;
        Ok(Some(archive))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// The uncompressed bytes of layer `index`.
    #[cfg(test)]
    pub(crate) fn layer_reader(&self, index: usize) -> Result<Box<dyn Read + Send>> {
        let layer = self.layers.get(index).ok_or_else(|| anyhow!("no layer {index}"))?;
        match &layer.data {
            Some(data) => data.reader(),
            None => bail!("layer {} of {} needs a full read of the archive", index + 1, self.path.display()),
        }
    }

    /// The archive as a full read found it before, when the file has not changed since
    /// (see [`Checked`] for how that is told), so an unchanged archive is not hashed again.
    pub(crate) fn recall(path: &Path, memory: &Path) -> Option<Archive> {
        let key = FileKey::of(path)?;
        let text = std::fs::read(memory).ok()?;
        let mut all: Vec<Checked> = serde_json::from_slice(&text).ok()?;
        let index = all.iter().position(|c| c.key == key)?;
        let checked = all.swap_remove(index);
        if fingerprint(path).ok()? != checked.fingerprint {
            return None;
        }
        // The file is the user's to edit: anything not shaped as nixctr wrote it is ignored,
        // and the archive is read again.
        let length = std::fs::metadata(path).ok()?.len();
        let within = |d: &EntryData| d.offset.checked_add(d.size).is_some_and(|end| end <= length);
        let sane = checked.layers.iter().all(|l| is_digest(&l.diff_id) && l.data.as_ref().is_none_or(within))
            && checked.config_data.as_ref().is_none_or(within);
        if !sane {
            return None;
        }
        let plain = !checked.gzipped;
        let here = |d: EntryData| EntryData { path: path.to_path_buf(), spooled: false, ..d };
        // A plain archive's config is a few KiB at a known place: read it again.
        let config_data = checked.config_data.filter(|_| plain).map(here);
        if plain {
            let mut bytes = Vec::new();
            config_data.as_ref()?.reader().ok()?.take(64 << 20).read_to_end(&mut bytes).ok()?;
            if bytes != checked.config.as_bytes() {
                return None;
            }
        }
        let diff_ids = serde_json::from_str::<ConfigRootfs>(&checked.config).ok()?.rootfs.diff_ids;
        if !diff_ids.iter().eq(checked.layers.iter().map(|l| &l.diff_id)) {
            return None;
        }
        Some(Archive {
            path: path.to_path_buf(),
            _spool: None,
            config_digest: sha256_digest(checked.config.as_bytes()),
            config: checked.config.into_bytes(),
            repo_tags: checked.repo_tags,
            layers: checked
                .layers
                .into_iter()
                .map(|l| Layer {
                    name: l.name,
                    diff_id: l.diff_id,
                    size: l.size,
                    // The path as given now: the one stored may be relative to another directory.
                    data: l.data.filter(|_| plain).map(here),
                })
                .collect(),
            gzipped: checked.gzipped,
            config_data,
            opened_as: None,
        })
    }

    /// Remembers this archive's check for [`Archive::recall`] (the last 32 archives), unless
    /// the file changed while it was read.
    pub(crate) fn remember(&self, memory: &Path) -> Result<()> {
        let Some(Identity { key, fingerprint }) =
            Identity::of(&self.path).filter(|now| self.opened_as.as_ref() == Some(now))
        else {
            return Ok(());
        };
        let Ok(config) = String::from_utf8(self.config.clone()) else {
            return Ok(());
        };
        let mut all: Vec<Checked> =
            std::fs::read(memory).ok().and_then(|t| serde_json::from_slice(&t).ok()).unwrap_or_default();
        all.retain(|c| c.key.path != key.path);
        all.push(Checked {
            key,
            fingerprint,
            config,
            config_data: if self.gzipped { None } else { self.config_data.clone() },
            repo_tags: self.repo_tags.clone(),
            gzipped: self.gzipped,
            layers: self
                .layers
                .iter()
                .map(|l| CheckedLayer {
                    name: l.name.clone(),
                    diff_id: l.diff_id.clone(),
                    size: l.size,
                    data: if self.gzipped { None } else { l.data.clone() },
                })
                .collect(),
        });
        let excess = all.len().saturating_sub(32);
        all.drain(..excess);
        let dir = memory.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut file = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer(&mut file, &all)?;
        file.persist(memory)?;
        Ok(())
    }

    fn read_entry(&self, entries: &HashMap<String, Entry>, name: &str, what: &str) -> Result<(Vec<u8>, EntryData)> {
        let Some(Entry::File { data, content_size, .. }) = resolve(entries, name) else {
            bail!("{}: {what} {name:?} is missing (the archive may be truncated)", self.path.display());
        };
        if content_size > 64 << 20 {
            bail!("{}: {what} {name:?} is {content_size} bytes, too big for JSON", self.path.display());
        }
        let mut bytes = Vec::with_capacity(content_size as usize);
        data.reader()?.read_to_end(&mut bytes)?;
        Ok((bytes, data))
    }

    /// Reads manifest.json and the config, and matches the layers with `rootfs.diff_ids`.
    fn check(&mut self, entries: &HashMap<String, Entry>) -> Result<()> {
        let shown = self.path.display().to_string();
        if !entries.contains_key("manifest.json") {
            bail!(
                "{shown:?} is not a docker-archive: it has no manifest.json (an OCI layout or a plain \
                 tar? build it with nix's dockerTools or `docker save`; it may also be truncated)"
            );
        }
        let (manifest, _) = self.read_entry(entries, "manifest.json", "manifest")?;
        let manifest: Vec<ManifestEntry> = serde_json::from_slice(&manifest)
            .with_context(|| format!("{shown}: manifest.json is not a docker-archive manifest"))?;
        let image = match manifest.as_slice() {
            [one] => one,
            [] => bail!("{shown}: manifest.json lists no image"),
            more => bail!("{shown}: manifest.json lists {} images; push supports one per archive", more.len()),
        };
        let (config, config_data) = self.read_entry(entries, &image.config, "config")?;
        self.config = config;
        self.config_data = Some(config_data);
        self.config_digest = sha256_digest(&self.config);
        let config: ConfigRootfs = serde_json::from_slice(&self.config)
            .with_context(|| format!("{shown}: config {:?} has no rootfs.diff_ids", image.config))?;
        self.repo_tags = image.repo_tags.clone().unwrap_or_default();
        let diff_ids = config.rootfs.diff_ids;
        if diff_ids.len() != image.layers.len() {
            bail!(
                "{shown}: manifest.json lists {} layers but the config's rootfs.diff_ids has {} (the archive is corrupt; rebuild it)",
                image.layers.len(),
                diff_ids.len()
            );
        }
        for (index, (name, want)) in image.layers.iter().zip(&diff_ids).enumerate() {
            let Some(Entry::File { sha256, content_size, data }) = resolve(entries, name) else {
                bail!("{shown}: layer {} ({name:?}) is missing (the archive may be truncated)", index + 1);
            };
            match sha256 {
                Some(sha256) if &sha256 != want => bail!(
                    "{shown}: layer {} ({name:?}) has diff_id {sha256} but the config says {want} (the archive is corrupt; rebuild it)",
                    index + 1
                ),
                // Not read yet: checked when (and if) its bytes are.
                _ if !is_digest(want) => {
                    bail!("{shown}: the config's diff_id {want:?} of layer {} is not a sha256 digest", index + 1)
                }
                _ => {}
            }
            self.layers.push(Layer { name: name.clone(), diff_id: want.clone(), size: content_size, data: Some(data) });
        }
        Ok(())
    }
}

/// Padding accepted after a tar's end-of-archive blocks: writers pad to their record size
/// (GNU tar's is 10 KiB); anything much longer is not part of the archive.
const TAR_TAIL: u64 = 1 << 20;
/// DEFLATE's largest expansion: one 258-byte match per 2 bits, about 1032 to 1.
const DEFLATE_MAX_RATIO: u64 = 1032;
/// Room left free in TMPDIR for everything else (compressed layers go there too), at most.
const TMP_RESERVE: u64 = 1 << 30;

/// How far the uncompressed copy of a `.tar.gz` may grow.
///
/// A gzip file cannot say how much it holds: its ISIZE trailer is the size modulo 2^32
/// (useless past 4 GiB) of the last member only (useless for multi-member files, such as
/// pigz --independent or bgzip write), and a real bomb's trailer is honest anyway. What
/// the archive does say is in its tar headers: each entry declares its size before its
/// bytes, and the tar reader consumes exactly those. So every spooled byte is one a header
/// declared, or at most [`TAR_TAIL`] of padding after the end (the classic bomb, gzipped
/// zeros, reads as an empty tar followed by gigabytes). A declared size is checked before
/// its entry is read: against what the compressed file could hold at DEFLATE's maximum
/// ratio (more is a lie), and against the free space in TMPDIR less a reserve. A large
/// legitimate archive (any size, any number of members) passes: its headers are true.
#[derive(Debug, Clone)]
struct SpoolBound {
    /// Bytes the compressed file could decompress to at most.
    ceiling: u64,
    compressed: u64,
    /// TMPDIR's free space, less the reserve; `None` when it cannot be asked.
    room: Option<(u64, PathBuf)>,
}

/// Why a compressed archive was not spooled further.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("decompresses to more than it says (its tar ends at {end} bytes, and more than {} MiB of something else follows): refusing a possible gzip bomb", TAR_TAIL >> 20)]
    BeyondEnd { end: u64 },
    #[error("goes on after its tar ends (at {end} bytes): more than {} MiB follow", TAR_TAIL >> 20)]
    GoesOn { end: u64 },
    #[error("decompresses to more than it says (its tar headers declare {declared}+ bytes, more than {compressed} bytes of gzip can hold): refusing a possible gzip bomb")]
    Impossible { declared: u64, compressed: u64 },
    #[error("decompresses to {needed}+ bytes, more than {} has free ({room} bytes after a reserve; point TMPDIR at a roomier place)", .dir.display())]
    NoRoom { needed: u64, room: u64, dir: PathBuf },
}

impl SpoolBound {
    fn for_file(compressed: u64, spool: &Path) -> SpoolBound {
        let dir = spool.parent().unwrap_or(Path::new("/"));
        let room = free_space(dir).map(|free| (free - TMP_RESERVE.min(free / 10), dir.to_path_buf()));
        SpoolBound { ceiling: compressed.saturating_mul(DEFLATE_MAX_RATIO).saturating_add(TAR_TAIL), compressed, room }
    }

    /// An uncompressed stream: only TMPDIR's room bounds it.
    fn for_stream(spool: &Path) -> SpoolBound {
        SpoolBound { ceiling: u64::MAX, compressed: u64::MAX, ..SpoolBound::for_file(0, spool) }
    }

    /// Whether the stream may grow to `end` bytes.
    fn check(&self, end: u64) -> io::Result<()> {
        if end > self.ceiling {
            return Err(io::Error::other(Refusal::Impossible { declared: end, compressed: self.compressed }));
        }
        match &self.room {
            Some((room, dir)) if end > *room => {
                Err(io::Error::other(Refusal::NoRoom { needed: end, room: *room, dir: dir.clone() }))
            }
            _ => Ok(()),
        }
    }
}

/// Bytes available to this user in the file system holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is written by statvfs before it is read.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// The uncompressed copy's file, refusing to grow past its bound (a backstop behind the
/// declared-size checks, for what the tar reader reads on its own: long names, pax headers).
struct Spool {
    file: File,
    written: u64,
    bound: SpoolBound,
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bound.check(self.written.saturating_add(buf.len() as u64))?;
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// What went wrong reading a stream: the source's own error as it is, anything else as a
/// stream that is no docker-archive.
pub(crate) fn stream_error(error: anyhow::Error, shown: &str) -> anyhow::Error {
    match error.downcast::<io::Error>() {
        Ok(io) => match SourceError::within(&io) {
            Some(own) => anyhow!("{own}"),
            None => anyhow!("{shown} is not a docker-archive stream (or was cut short): {io}"),
        },
        Err(other) => other,
    }
}

/// Reads what follows a tar's end blocks (at `end`), to the end of the input, so a cut or
/// failing source still shows; but only the little padding tar writers add: more (an
/// `inflated` bomb's endless zeros, a stream that goes on) is refused.
fn past_the_end(reader: &mut impl Read, end: u64, inflated: bool) -> io::Result<()> {
    let tail = io::copy(&mut reader.take(TAR_TAIL + 1), &mut io::sink())?;
    if tail <= TAR_TAIL {
        return Ok(());
    }
    Err(io::Error::other(if inflated { Refusal::BeyondEnd { end } } else { Refusal::GoesOn { end } }))
}

/// Reads a tar stream whole into a new spool file, scanning its entries on the way (see
/// [`scan`]); `compressed`: the size of the gzip file it is inflated from, which bounds it.
fn spool_entries(
    reader: impl Read,
    compressed: Option<u64>,
    on_entry: &mut dyn FnMut(&SeenEntry),
) -> Result<(HashMap<String, Entry>, tempfile::NamedTempFile)> {
    let spool = tempfile::Builder::new()
        .prefix("nixctr-archive-")
        .tempfile()
        .context("cannot create a temporary file for the uncompressed archive (is TMPDIR writable?)")?;
    let bound = match compressed {
        Some(compressed) => SpoolBound::for_file(compressed, spool.path()),
        None => SpoolBound::for_stream(spool.path()),
    };
    // Unbuffered, so an entry's bytes are in the file by the time `on_entry` hears of it.
    let writer = Spool { file: spool.as_file().try_clone()?, written: 0, bound: bound.clone() };
    let mut tee = Tee { inner: reader, copy: writer };
    let entries = scan(&mut tee, spool.path(), Some(&bound), on_entry)?;
    let end = tee.copy.written;
    past_the_end(&mut tee, end, compressed.is_some())?;
    tee.copy.file.flush().context("cannot write the uncompressed archive to TMPDIR")?;
    Ok((entries, spool))
}

/// Reads every entry of a tar stream, hashing file contents (after gunzip when an entry is
/// itself gzip-compressed).
/// `bound`, for a stream being spooled: an entry whose declared size would take the stream
/// past it is refused before any of its bytes are read.
fn scan(
    reader: impl Read,
    source: &Path,
    bound: Option<&SpoolBound>,
    on_entry: &mut dyn FnMut(&SeenEntry),
) -> Result<HashMap<String, Entry>> {
    let mut tar = tar::Archive::new(reader);
    let mut entries = HashMap::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = normalize(&entry.path()?);
        match kind_of(&entry, &name)? {
            Kind::Link(target) => {
                entries.insert(name, Entry::Link(target));
                continue;
            }
            Kind::Other => continue,
            Kind::File => {}
        }
        let offset = entry.raw_file_position();
        let size = entry.size();
        if let Some(bound) = bound {
            bound.check(offset.saturating_add(size))?;
        }
        let mut head = [0u8; 2];
        let got = read_up_to(&mut entry, &mut head)?;
        let gzipped = got == 2 && head == GZIP_MAGIC;
        let (sha256, content_size, read) = if gzipped {
            let mut counter = Counted { inner: io::Cursor::new(head).chain(&mut entry), count: 0 };
            let mut decoder = flate2::read::MultiGzDecoder::new(&mut counter);
            let (digest, n) = hash_reader(&mut decoder)?;
            // Drain anything after the gzip stream so the raw size check below holds.
            io::copy(&mut counter, &mut io::sink())?;
            (digest, n, counter.count)
        } else {
            let (digest, n) = hash_reader(&mut io::Cursor::new(&head[..got]).chain(&mut entry))?;
            (digest, n, n)
        };
        if read != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("entry {name:?} is cut short")).into());
        }
        let data = EntryData { path: source.to_path_buf(), offset, size, gzipped, spooled: bound.is_some() };
        if !name.ends_with(".json") && name != "repositories" {
            on_entry(&SeenEntry { sha256: sha256.clone(), data: data.clone() });
        }
        entries.insert(name, Entry::File { sha256: Some(sha256), content_size, data });
    }
    Ok(entries)
}

/// Reads a plain tar's headers only, seeking over entry data; each entry's first bytes tell
/// whether it is itself gzip-compressed.
fn walk_headers(file: File, source: &Path, length: u64) -> Result<HashMap<String, Entry>> {
    let mut tar = tar::Archive::new(BufReader::with_capacity(64 << 10, file));
    let mut entries = HashMap::new();
    for entry in tar.entries_with_seek()? {
        let mut entry = entry?;
        let name = normalize(&entry.path()?);
        match kind_of(&entry, &name)? {
            Kind::Link(target) => {
                entries.insert(name, Entry::Link(target));
                continue;
            }
            Kind::Other => continue,
            Kind::File => {}
        }
        let offset = entry.raw_file_position();
        let size = entry.size();
        if offset.saturating_add(size) > length {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("entry {name:?} is cut short")).into());
        }
        let mut head = [0u8; 2];
        let gzipped = read_up_to(&mut entry, &mut head)? == 2 && head == GZIP_MAGIC;
        let data = EntryData { path: source.to_path_buf(), offset, size, gzipped, spooled: false };
        entries.insert(name, Entry::File { sha256: None, content_size: size, data });
    }
    Ok(entries)
}

/// Follows links (at most a few hops) to the file an entry name stands for.
/// `sha256:` and 64 lowercase hex digits.
fn is_digest(s: &str) -> bool {
    s.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

fn resolve(entries: &HashMap<String, Entry>, name: &str) -> Option<Entry> {
    let mut name = normalize(Path::new(name));
    for _ in 0..8 {
        match entries.get(&name)? {
            Entry::Link(target) => name = target.clone(),
            file => return Some(file.clone()),
        }
    }
    None
}

/// `./a/../b/layer.tar` -> `b/layer.tar`.
/// What a tar entry is to the archive readers: a link (to its target, a symlink's resolved
/// against the entry's directory), a file, or something else to pass over.
pub(super) enum Kind {
    Link(String),
    File,
    Other,
}

pub(super) fn kind_of<R: Read>(entry: &tar::Entry<'_, R>, name: &str) -> io::Result<Kind> {
    let kind = entry.header().entry_type();
    if kind.is_symlink() || kind.is_hard_link() {
        return Ok(match entry.link_name()? {
            Some(target) if kind.is_symlink() => {
                Kind::Link(normalize(&Path::new(name).parent().unwrap_or(Path::new("")).join(&target)))
            }
            Some(target) => Kind::Link(normalize(&target)),
            None => Kind::Other,
        });
    }
    Ok(if kind.is_file() { Kind::File } else { Kind::Other })
}

fn normalize(path: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for part in path.components() {
        match part {
            Component::Normal(p) => parts.push(p.to_string_lossy().into_owned()),
            Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    parts.join("/")
}

/// The [`Refusal`] under an I/O error, through the tar reader's wrapping.
fn refusal(io: &io::Error) -> Option<&Refusal> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = io.get_ref().map(|e| e as _);
    while let Some(err) = next {
        if let Some(refusal) = err.downcast_ref::<Refusal>() {
            return Some(refusal);
        }
        next = match err.downcast_ref::<io::Error>() {
            Some(inner) => inner.get_ref().map(|e| e as _),
            None => err.source(),
        };
    }
    None
}

fn describe_read_error(path: &Path, err: anyhow::Error) -> anyhow::Error {
    let shown = path.display();
    if let Some(io) = err.downcast_ref::<io::Error>() {
        if let Some(refusal) = refusal(io) {
            return anyhow!("{shown}: {refusal}");
        }
        if io.get_ref().is_some_and(|inner| inner.is::<Cancelled>()) {
            return anyhow!("reading {shown} was cancelled");
        }
        if io.kind() == io::ErrorKind::UnexpectedEof {
            return anyhow!("{shown:?} is truncated: {io} (copy or rebuild the archive)");
        }
        if io.raw_os_error().is_some() {
            return anyhow!("cannot read {shown:?}: {io}");
        }
        // The tar reader's own complaints (bad header checksum, short block) end up here. They
        // quote header bytes, which for a wrong file may be anything (a password file): not shown.
        return anyhow!("{shown:?} is not a docker-archive (not a tar or gzip-compressed tar, or corrupt: its tar headers do not parse)");
    }
    anyhow!("{shown:?} is not a docker-archive (not a tar or gzip-compressed tar): {err}")
}

/// A tar of `entries` (name, bytes), for tests of the readers of tars.
#[cfg(test)]
pub(crate) fn tar_with(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(layers: &[&[u8]], diff_ids: Option<Vec<String>>) -> Vec<u8> {
        let ids = diff_ids.unwrap_or_else(|| layers.iter().map(|l| sha256_digest(l)).collect());
        let config =
            serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": ids}});
        let config = serde_json::to_vec(&config).unwrap();
        let names: Vec<String> = (0..layers.len()).map(|i| format!("l{i}/layer.tar")).collect();
        let manifest = serde_json::json!([{"Config": "config.json", "RepoTags": ["x:1"], "Layers": names}]);
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let mut entries: Vec<(&str, &[u8])> = names.iter().map(|n| n.as_str()).zip(layers.iter().copied()).collect();
        entries.push(("config.json", &config));
        entries.push(("manifest.json", &manifest));
        tar_with(&entries)
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(bytes).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn reads_plain_and_gzip_archives() {
        let dir = tempfile::tempdir().unwrap();
        let layer_a = tar_with(&[("a", b"hello")]);
        let layer_b = tar_with(&[("b", b"world")]);
        let bytes = image(&[&layer_a, &layer_b], None);
        for (name, data) in [("x.tar", bytes.clone()), ("x.tar.gz", gzip(&bytes)), ("no-extension", gzip(&bytes))] {
            let archive = Archive::open(&write(&dir, name, &data), None).unwrap();
            assert_eq!(archive.layers.len(), 2);
            assert_eq!(archive.repo_tags, vec!["x:1".to_string()]);
            assert_eq!(archive.layers[1].diff_id, sha256_digest(&layer_b));
            let mut back = Vec::new();
            archive.layer_reader(1).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, layer_b);
        }
    }

    #[test]
    fn gzipped_layer_entries_are_hashed_uncompressed() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("a", b"hello")]);
        let mut bytes = image(&[&gzip(&layer)], Some(vec![sha256_digest(&layer)]));
        bytes = gzip(&bytes);
        let archive = Archive::open(&write(&dir, "x", &bytes), None).unwrap();
        let mut back = Vec::new();
        archive.layer_reader(0).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, layer);
    }

    #[test]
    fn index_reads_only_headers_manifest_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let layer_a = tar_with(&[("a", &[3u8; 70_000])]);
        let layer_b = tar_with(&[("b", b"world")]);
        // The config names another diff_id for layer 2: the index cannot tell, a read can.
        let wrong = sha256_digest(b"other");
        let bytes = image(&[&layer_a, &layer_b], Some(vec![sha256_digest(&layer_a), wrong.clone()]));
        let path = write(&dir, "i.tar", &bytes);
        let archive = Archive::index(&path).unwrap().unwrap();
        assert_eq!(archive.layers[1].diff_id, wrong);
        assert!(archive.layers.iter().all(|l| l.data.as_ref().is_some_and(|d| !d.spooled())));
        let mut back = Vec::new();
        archive.layer_reader(0).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, layer_a);
        assert!(Archive::open(&path, None).unwrap_err().to_string().contains("diff_id"));
        assert!(Archive::index(&write(&dir, "i.tar.gz", &gzip(&bytes))).unwrap().is_none());
        // Cut inside the first layer: its header says more than the file holds.
        let err = Archive::index(&write(&dir, "cut.tar", &bytes[..20_000])).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
        let err = Archive::index(&write(&dir, "n.tar", &tar_with(&[("x", b"y")]))).unwrap_err().to_string();
        assert!(err.contains("no manifest.json"), "{err}");
    }

    /// A reader that gives `bytes`, then fails with `error`.
    struct FailingAfter {
        bytes: io::Cursor<Vec<u8>>,
        error: Option<io::Error>,
    }

    impl Read for FailingAfter {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.bytes.read(buf)? {
                0 => Err(self.error.take().unwrap_or_else(|| io::Error::other("read again"))),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn a_spooled_stream_is_checked_and_its_layers_kept() {
        let layer = tar_with(&[("a", &[5u8; 50_000])]);
        let bytes = image(&[&layer], None);
        let mut seen = Vec::new();
        let archive = Archive::spool_stream(&bytes[..], "the stream", &mut |e| seen.push(e.sha256.clone())).unwrap();
        assert_eq!(seen, vec![sha256_digest(&layer)]);
        let data = archive.layers[0].data.as_ref().expect("the layer is in the spool");
        assert!(data.spooled());
        let mut back = Vec::new();
        data.reader().unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, layer);
        // A wrong diff_id is caught as in a file.
        let wrong = image(&[&layer], Some(vec![sha256_digest(b"other")]));
        let err = Archive::spool_stream(&wrong[..], "the stream", &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("diff_id"), "{err}");
    }

    #[test]
    fn a_stream_source_error_is_told_as_it_is() {
        let bytes = image(&[&tar_with(&[("a", &[5u8; 50_000])])], None);
        let failing =
            |error: io::Error| FailingAfter { bytes: io::Cursor::new(bytes[..30_000].to_vec()), error: Some(error) };
        let own = SourceError::io("stream-app failed (exit code 3): disk full");
        let err = Archive::spool_stream(failing(own), "the stream", &mut |_| {}).unwrap_err().to_string();
        assert_eq!(err, "stream-app failed (exit code 3): disk full");
        let other = io::Error::other("connection reset");
        let err = Archive::spool_stream(failing(other), "the stream", &mut |_| {}).unwrap_err().to_string();
        assert!(err.starts_with("the stream is not a docker-archive stream (or was cut short)"), "{err}");
        assert!(err.contains("connection reset"), "{err}");
    }

    #[test]
    fn diff_id_mismatch_names_the_layer() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("a", b"hello")]);
        let bytes = image(&[&layer], Some(vec![sha256_digest(b"other")]));
        let err = Archive::open(&write(&dir, "x.tar", &bytes), None).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains("diff_id"), "{err}");
    }

    #[test]
    fn truncated_archives_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("a", &[7u8; 100_000])]);
        let bytes = image(&[&layer], None);
        for cut in [bytes.len() / 3, bytes.len() - 2048] {
            let err = Archive::open(&write(&dir, "t.tar", &bytes[..cut]), None).unwrap_err().to_string();
            assert!(err.contains("truncated"), "{err}");
        }
        let gz = gzip(&bytes);
        let err = Archive::open(&write(&dir, "t.tar.gz", &gz[..gz.len() - 30]), None).unwrap_err().to_string();
        assert!(err.contains("truncated") || err.contains("corrupt"), "{err}");
    }

    /// `count` gzip members of 1 MiB of zeros each: a bomb made in microseconds.
    fn zero_members(count: usize) -> Vec<u8> {
        let member = gzip(&vec![0u8; 1 << 20]);
        member.repeat(count)
    }

    #[test]
    fn gzip_bombs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Gzipped zeros: an empty tar, then far more than padding.
        let err = Archive::open(&write(&dir, "zeros.tar.gz", &zero_members(64)), None).unwrap_err().to_string();
        assert!(err.contains("decompresses to more than it says") && err.contains("tar ends at"), "{err}");
        assert!(err.contains("refusing a possible gzip bomb") && err.contains("zeros.tar.gz"), "{err}");
        // A real image followed by the same.
        let image = image(&[&tar_with(&[("a", b"hello")])], None);
        let mut bomb = gzip(&image);
        bomb.extend(zero_members(64));
        let err = Archive::open(&write(&dir, "tail.tar.gz", &bomb), None).unwrap_err().to_string();
        assert!(err.contains("refusing a possible gzip bomb"), "{err}");
        // A header declaring a terabyte, in a file that cannot hold one.
        let mut header = tar::Header::new_gnu();
        header.set_path("l0/layer.tar").unwrap();
        header.set_size(1 << 40);
        header.set_cksum();
        let mut bomb = gzip(header.as_bytes());
        bomb.extend(zero_members(4));
        let err = Archive::open(&write(&dir, "declared.tar.gz", &bomb), None).unwrap_err().to_string();
        assert!(err.contains("tar headers declare") && err.contains("refusing a possible gzip bomb"), "{err}");
    }

    #[test]
    fn spool_bound_names_the_full_disk() {
        let bound = SpoolBound { ceiling: 1 << 40, compressed: 1 << 30, room: Some((1000, PathBuf::from("/tmp/x"))) };
        assert!(bound.check(1000).is_ok());
        let err = bound.check(1001).unwrap_err();
        let text = refusal(&err).unwrap().to_string();
        assert!(text.contains("/tmp/x has free") && text.contains("TMPDIR"), "{text}");
        assert!(matches!(refusal(&err), Some(Refusal::NoRoom { needed: 1001, .. })));
    }

    #[test]
    fn multi_member_archives_read() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("a", &[9u8; 300_000])]);
        let bytes = image(&[&layer], None);
        let members: Vec<u8> = bytes.chunks(4096).flat_map(gzip).collect();
        let archive = Archive::open(&write(&dir, "m.tar.gz", &members), None).unwrap();
        assert_eq!(archive.layers[0].diff_id, sha256_digest(&layer));
    }

    #[test]
    fn other_files_are_not_archives() {
        let dir = tempfile::tempdir().unwrap();
        let err =
            Archive::open(&write(&dir, "n.tar", b"just some text, long enough to not be a tar header at all"), None)
                .unwrap_err()
                .to_string();
        assert!(err.contains("not a docker-archive"), "{err}");
        let plain = tar_with(&[("hello.txt", b"hi")]);
        let err = Archive::open(&write(&dir, "p.tar", &plain), None).unwrap_err().to_string();
        assert!(err.contains("no manifest.json"), "{err}");
    }

    #[test]
    fn cancelled_reads_stop() {
        let dir = tempfile::tempdir().unwrap();
        let layer = tar_with(&[("a", &[1u8; 300_000])]);
        let bytes = image(&[&layer], None);
        for (name, data) in [("c.tar", bytes.clone()), ("c.tar.gz", gzip(&bytes))] {
            let cancel = Arc::new(AtomicBool::new(true));
            let err = Archive::open(&write(&dir, name, &data), Some(cancel)).unwrap_err().to_string();
            assert!(err.contains("cancelled"), "{err}");
        }
    }

    #[test]
    fn a_hostile_memory_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("archives.json");
        let path = write(&dir, "x.tar", &image(&[&tar_with(&[("a", b"hello")])], None));
        let archive = Archive::open(&path, None).unwrap();
        archive.remember(&memory).unwrap();
        assert!(Archive::recall(&path, &memory).is_some());
        let text = std::fs::read_to_string(&memory).unwrap();
        let digest = &archive.layers[0].diff_id;
        for hostile in
            [text.replace(digest.as_str(), "sha256:\u{fc}\u{fc}"), text.replace("\"offset\":", "\"offset\":9999999")]
        {
            assert_ne!(hostile, text);
            std::fs::write(&memory, hostile).unwrap();
            assert!(Archive::recall(&path, &memory).is_none());
        }
        for garbage in ["", "[", "{}", "\u{0}\u{ff}", "[{\"key\": 1}]"] {
            std::fs::write(&memory, garbage).unwrap();
            assert!(Archive::recall(&path, &memory).is_none());
        }
    }

    #[test]
    fn recall_finds_only_unchanged_archives() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("mem/archives.json");
        let layer = tar_with(&[("a", b"hello")]);
        let path = write(&dir, "x.tar", &image(&[&layer], None));
        assert!(Archive::recall(&path, &memory).is_none());
        let archive = Archive::open(&path, None).unwrap();
        archive.remember(&memory).unwrap();
        let recalled = Archive::recall(&path, &memory).unwrap();
        assert_eq!(recalled.config, archive.config);
        assert_eq!(recalled.layers[0].diff_id, archive.layers[0].diff_id);
        let mut back = Vec::new();
        recalled.layer_reader(0).unwrap().read_to_end(&mut back).unwrap();
        assert_eq!(back, layer);
        // Rewriting the file, even with the same bytes, changes its ctime (once the clock
        // has ticked past the old one: rewrite until it has).
        let before = FileKey::of(&path).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while FileKey::of(&path).unwrap() == before {
            assert!(std::time::Instant::now() < deadline, "ctime never changed");
            write(&dir, "x.tar", &image(&[&layer], None));
        }
        assert!(Archive::recall(&path, &memory).is_none());

        let gz = write(&dir, "x.tar.gz", &gzip(&image(&[&layer], None)));
        Archive::open(&gz, None).unwrap().remember(&memory).unwrap();
        let recalled = Archive::recall(&gz, &memory).unwrap();
        assert!(recalled.layers[0].data.is_none() && recalled.layer_reader(0).is_err());
        assert!(Archive::recall(&path, &memory).is_none());
    }

    /// An entry whose key matches another file (as when a new build reuses the old one's
    /// inode, size and timestamps) or whose parts disagree is not recalled.
    #[test]
    fn stale_or_inconsistent_memories_are_not_recalled() {
        let dir = tempfile::tempdir().unwrap();
        let memory = dir.path().join("archives.json");
        let old = write(&dir, "old.tar", &image(&[&tar_with(&[("a", b"hello")])], None));
        let new = write(&dir, "new.tar", &image(&[&tar_with(&[("a", b"world")])], None));
        assert_eq!(std::fs::metadata(&old).unwrap().len(), std::fs::metadata(&new).unwrap().len());
        Archive::open(&old, None).unwrap().remember(&memory).unwrap();
        let pristine: serde_json::Value = serde_json::from_slice(&std::fs::read(&memory).unwrap()).unwrap();
        let recall_with = |edit: &dyn Fn(&mut serde_json::Value), path: &Path| {
            let mut entry = pristine.clone();
            edit(&mut entry[0]);
            std::fs::write(&memory, entry.to_string()).unwrap();
            Archive::recall(path, &memory)
        };
        assert!(recall_with(&|_| {}, &old).is_some());
        let new_key = serde_json::to_value(FileKey::of(&new).unwrap()).unwrap();
        assert!(recall_with(&|e| e["key"] = new_key.clone(), &new).is_none(), "same key, other content");
        let new_print = serde_json::json!(fingerprint(&new).unwrap());
        let both = |e: &mut serde_json::Value| {
            e["key"] = new_key.clone();
            e["fingerprint"] = new_print.clone();
        };
        assert!(recall_with(&both, &new).is_none(), "the config read again differs");
        let other = serde_json::json!(sha256_digest(b"other"));
        assert!(recall_with(&|e| e["layers"][0]["diff_id"] = other.clone(), &old).is_none(), "diff_ids disagree");
    }

    #[test]
    fn symlinked_layers_resolve() {
        let mut builder = tar::Builder::new(Vec::new());
        let layer = tar_with(&[("a", b"x")]);
        let mut header = tar::Header::new_gnu();
        header.set_size(layer.len() as u64);
        header.set_cksum();
        builder.append_data(&mut header, "one/layer.tar", layer.as_slice()).unwrap();
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        builder.append_link(&mut link, "two/layer.tar", "../one/layer.tar").unwrap();
        let id = sha256_digest(&layer);
        let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": [id, id]}})).unwrap();
        let manifest = serde_json::to_vec(
            &serde_json::json!([{"Config": "c.json", "Layers": ["one/layer.tar", "two/layer.tar"]}]),
        )
        .unwrap();
        for (name, data) in [("c.json", &config), ("manifest.json", &manifest)] {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_cksum();
            builder.append_data(&mut header, name, data.as_slice()).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::open(&write(&dir, "s.tar", &builder.into_inner().unwrap()), None).unwrap();
        assert_eq!(archive.layers.len(), 2);
    }
}
