//! A docker-archive read once, from a stream (nixpkgs' `streamLayeredImage` writes the layers
//! first, then the config, then manifest.json): entries come in any order and cannot be read
//! again, so each layer is handed to the caller as it passes (to hash and compress it), JSON
//! is kept in memory, and the layers are matched with the config's `rootfs.diff_ids` at the end.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::io_readers::{Counted, Pipelined};
use super::{
    describe_read_error, kind_of, normalize, past_the_end, read_up_to, sha256_digest, Archive, Cancellable,
    ConfigRootfs, Identity, Kind, Layer, ManifestEntry, SpoolBound, GZIP_MAGIC,
};

/// JSON entries are held in memory up to this size.
const JSON_LIMIT: u64 = 64 << 20;

enum Seen {
    Json(Vec<u8>),
    /// A layer's sha256 (uncompressed) and size.
    Layer(String, u64),
    Link(String),
}

/// Reads every entry; I/O errors come back as `io::Error`s (for the callers to word).
fn read_entries(
    reader: impl Read,
    bound: Option<&SpoolBound>,
    on_layer: &mut dyn FnMut(&str, &mut dyn Read) -> Result<String>,
) -> Result<HashMap<String, Seen>> {
    let mut tar = tar::Archive::new(reader);
    let mut seen: HashMap<String, Seen> = HashMap::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let name = normalize(&entry.path()?);
        match kind_of(&entry, &name)? {
            Kind::Link(target) => {
                seen.insert(name, Seen::Link(target));
                continue;
            }
            Kind::Other => continue,
            Kind::File => {}
        }
        let size = entry.size();
        if let Some(bound) = bound {
            bound.check(entry.raw_file_position().saturating_add(size))?;
        }
        if name.ends_with(".json") || name == "repositories" {
            if size > JSON_LIMIT {
                bail!("{name:?} is {size} bytes, too big for JSON");
            }
            let mut bytes = Vec::with_capacity(size as usize);
            entry.read_to_end(&mut bytes)?;
            if bytes.len() as u64 != size {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("entry {name:?} is cut short")).into());
            }
            seen.insert(name, Seen::Json(bytes));
            continue;
        }
        let mut head = [0u8; 2];
        let got = read_up_to(&mut entry, &mut head)?;
        let raw = io::Cursor::new(head).take(got as u64).chain(&mut entry);
        let mut counted = Counted { inner: raw, count: 0 };
        let layer = if got == 2 && head == GZIP_MAGIC {
            let mut plain = Counted { inner: flate2::read::MultiGzDecoder::new(&mut counted), count: 0 };
            let digest = on_layer(&name, &mut plain)?;
            let size = plain.count;
            io::copy(&mut counted, &mut io::sink())?;
            Seen::Layer(digest, size)
        } else {
            let digest = on_layer(&name, &mut counted)?;
            Seen::Layer(digest, counted.count)
        };
        if counted.count != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("entry {name:?} is cut short")).into());
        }
        seen.insert(name, layer);
    }
    Ok(seen)
}

impl Archive {
    /// Reads a docker-archive from `reader` in one pass. `on_layer` gets each entry that is not
    /// JSON, uncompressed (a gzip-compressed entry is inflated on the way), and returns the
    /// sha256 of what it read, all of it. `shown` names the stream in errors. The layers of
    /// the archive returned have no bytes to read again ([`Layer::data`] is `None`). The
    /// stream is read to its end, past the tar's end blocks (only padding may follow): a
    /// program's stream ends with its exit status, which must be known before the archive
    /// is taken as whole.
    pub(crate) fn from_stream(
        mut reader: impl Read,
        shown: &str,
        on_layer: &mut dyn FnMut(&str, &mut dyn Read) -> Result<String>,
    ) -> Result<Archive> {
        let mut counted = Counted { inner: &mut reader, count: 0 };
        let seen = read_entries(&mut counted, None, on_layer).map_err(|e| super::stream_error(e, shown))?;
        let end = counted.count;
        past_the_end(&mut counted, end, false).map_err(|e| super::stream_error(e.into(), shown))?;
        Archive::from_seen(&seen, shown)
    }

    /// A gzip-compressed archive file read as a stream ([`Archive::from_stream`]): inflated
    /// on a thread of its own while `on_layer` hashes and compresses, with no uncompressed
    /// copy on disk. Bounded as [`Archive::open_with`] bounds its spool: a declared size the
    /// file cannot hold, or more than padding after the tar's end, is refused as a bomb.
    pub(crate) fn stream_gzip_file(
        path: &Path,
        cancel: Arc<AtomicBool>,
        on_layer: &mut dyn FnMut(&str, &mut dyn Read) -> Result<String>,
    ) -> Result<Archive> {
        let opened_as = Identity::of(path);
        let file = File::open(path).with_context(|| format!("cannot open archive {}", path.display()))?;
        let compressed = file.metadata().with_context(|| format!("cannot read archive {}", path.display()))?.len();
        let bound = SpoolBound::for_file(compressed, &std::env::temp_dir().join("nixctr"));
        let decoder = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, file));
        let decoded = Pipelined::spawn(Cancellable { inner: decoder, cancel });
        let mut counted = Counted { inner: decoded, count: 0 };
        let seen = read_entries(&mut counted, Some(&bound), on_layer).map_err(|e| describe_read_error(path, e))?;
        let end = counted.count;
        past_the_end(&mut counted, end, true).map_err(|e| describe_read_error(path, e.into()))?;
        let mut archive = Archive::from_seen(&seen, &path.display().to_string())?;
        archive.path = path.to_path_buf();
        archive.gzipped = true;
        archive.opened_as = opened_as;
        Ok(archive)
    }

    fn from_seen(seen: &HashMap<String, Seen>, shown: &str) -> Result<Archive> {
        let resolve = |name: &str| -> Option<&Seen> {
            let mut name = normalize(Path::new(name));
            for _ in 0..8 {
                match seen.get(&name)? {
                    Seen::Link(target) => name = target.clone(),
                    other => return Some(other),
                }
            }
            None
        };
        let Some(Seen::Json(manifest)) = resolve("manifest.json") else {
            bail!("{shown} is not a docker-archive: it has no manifest.json (or was cut short)");
        };
        let manifest: Vec<ManifestEntry> = serde_json::from_slice(manifest)
            .with_context(|| format!("{shown}: manifest.json is not a docker-archive manifest"))?;
        let image = match manifest.as_slice() {
            [one] => one,
            [] => bail!("{shown}: manifest.json lists no image"),
            more => bail!("{shown}: manifest.json lists {} images; push supports one per archive", more.len()),
        };
        let Some(Seen::Json(config)) = resolve(&image.config) else {
            bail!("{shown}: config {:?} is missing", image.config);
        };
        let diff_ids = serde_json::from_slice::<ConfigRootfs>(config)
            .with_context(|| format!("{shown}: config {:?} has no rootfs.diff_ids", image.config))?
            .rootfs
            .diff_ids;
        if diff_ids.len() != image.layers.len() {
            bail!(
                "{shown}: manifest.json lists {} layers but the config's rootfs.diff_ids has {} (the image is corrupt)",
                image.layers.len(),
                diff_ids.len()
            );
        }
        let mut layers = Vec::with_capacity(diff_ids.len());
        for (index, (name, want)) in image.layers.iter().zip(&diff_ids).enumerate() {
            let Some(Seen::Layer(sha256, size)) = resolve(name) else {
                bail!("{shown}: layer {} ({name:?}) is missing", index + 1);
            };
            if sha256 != want {
                bail!(
                    "{shown}: layer {} ({name:?}) has diff_id {sha256} but the config says {want} (the image is corrupt)",
                    index + 1
                );
            }
            layers.push(Layer { name: name.clone(), diff_id: sha256.clone(), size: *size, data: None });
        }
        Ok(Archive {
            path: PathBuf::from(shown),
            _spool: None,
            config_digest: sha256_digest(config),
            config: config.clone(),
            repo_tags: image.repo_tags.clone().unwrap_or_default(),
            layers,
            gzipped: false,
            config_data: None,
            opened_as: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tar_with;
    use super::*;

    /// Layers first, manifest last, as streamLayeredImage writes them.
    fn stream(layers: &[&[u8]], ids: Vec<String>) -> Vec<u8> {
        let config = serde_json::to_vec(&serde_json::json!({"rootfs": {"diff_ids": ids}})).unwrap();
        let names: Vec<String> = (0..layers.len()).map(|i| format!("l{i}/layer.tar")).collect();
        let manifest = serde_json::to_vec(&serde_json::json!([{"Config": "c.json", "Layers": names}])).unwrap();
        let mut entries: Vec<(&str, &[u8])> = names.iter().map(|n| n.as_str()).zip(layers.iter().copied()).collect();
        entries.push(("c.json", &config));
        entries.push(("manifest.json", &manifest));
        tar_with(&entries)
    }

    fn hash_all(_: &str, r: &mut dyn Read) -> Result<String> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes)?;
        Ok(sha256_digest(&bytes))
    }

    #[test]
    fn reads_layers_before_the_manifest() {
        let (a, b) = (tar_with(&[("a", b"hello")]), tar_with(&[("b", &[5u8; 50_000])]));
        let bytes = stream(&[&a, &b], vec![sha256_digest(&a), sha256_digest(&b)]);
        let mut names = Vec::new();
        let archive = Archive::from_stream(&bytes[..], "the stream", &mut |name, r| {
            names.push(name.to_string());
            hash_all(name, r)
        })
        .unwrap();
        assert_eq!(names, ["l0/layer.tar", "l1/layer.tar"]);
        assert_eq!(archive.layers[1].diff_id, sha256_digest(&b));
        assert_eq!(archive.layers[1].size, b.len() as u64);
        assert!(archive.layers.iter().all(|l| l.data.is_none()));
    }

    #[test]
    fn a_wrong_layer_or_a_cut_stream_is_an_error() {
        let a = tar_with(&[("a", &[1u8; 30_000])]);
        let bytes = stream(&[&a], vec![sha256_digest(b"other")]);
        let err = Archive::from_stream(&bytes[..], "the stream", &mut hash_all).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains("diff_id"), "{err}");
        let bytes = stream(&[&a], vec![sha256_digest(&a)]);
        for cut in [bytes.len() / 2, 10_000] {
            let err = Archive::from_stream(&bytes[..cut], "the stream", &mut hash_all).unwrap_err().to_string();
            assert!(err.contains("cut short") || err.contains("no manifest.json"), "{err}");
        }
    }

    /// The stream's end, after its tar's: its source's last word (an error) still counts,
    /// and more than padding is refused.
    #[test]
    fn a_stream_is_read_past_its_tar_to_its_end() {
        struct ThenFail(io::Cursor<Vec<u8>>);
        impl Read for ThenFail {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                match self.0.read(buf)? {
                    0 => Err(super::super::SourceError::io("stream-app exited with code 3")),
                    n => Ok(n),
                }
            }
        }
        let a = tar_with(&[("a", &[1u8; 30_000])]);
        let bytes = stream(&[&a], vec![sha256_digest(&a)]);
        Archive::from_stream(&bytes[..], "the stream", &mut hash_all).unwrap();
        let err = Archive::from_stream(ThenFail(io::Cursor::new(bytes.clone())), "the stream", &mut hash_all)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "stream-app exited with code 3");
        let mut long = bytes.clone();
        long.resize(bytes.len() + (super::super::TAR_TAIL as usize) + 4096, 0);
        let err = Archive::from_stream(&long[..], "the stream", &mut hash_all).unwrap_err().to_string();
        assert!(err.contains("goes on after its tar ends"), "{err}");
    }
}
