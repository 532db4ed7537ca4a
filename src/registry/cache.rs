//! What earlier pushes made of each layer: per registry, per diff_id and compression, the
//! compressed blob's digest and size and the repositories holding it. A re-push of unchanged
//! layers then checks those digests instead of compressing again, and mounts from another
//! repository of the same registry.
//!
//! The file is a hint: a wrong entry may cost time, never put a wrong layer in a manifest.
//! The registry can say whether it has a blob, but not what the blob decompresses to; only
//! compressing the layer (the work the cache saves) proves that. So the proof is kept:
//! each entry carries an HMAC, under a random key in `blobs.key` beside the file (0600),
//! of (compression, diff_id, digest, size), made only where nixctr compressed bytes it had
//! just hashed to that diff_id. An entry whose MAC does not check (edited, swapped with
//! another layer's, copied from another machine, written by an older nixctr) is dropped on
//! load, and the layer is compressed again. Whoever can read the key can forge entries, but
//! that is the user's own account. Entries whose digest or repository could not have come
//! from a push are dropped too, so nothing from the file reaches a URL unchecked.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// 2: entries carry a MAC.
const VERSION: u32 = 2;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BlobCache {
    version: u32,
    /// registry -> "<compression>:<diff_id>" -> blob.
    registries: BTreeMap<String, BTreeMap<String, CachedBlob>>,
    #[serde(skip)]
    path: Option<PathBuf>,
    #[serde(skip)]
    dirty: bool,
    /// Signs and checks entries; `None` (no key could be read or made): nothing is trusted.
    #[serde(skip)]
    key: Option<[u8; 32]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CachedBlob {
    pub digest: String,
    pub size: u64,
    /// Repositories known to hold the blob, most recent last.
    pub repositories: Vec<String>,
    /// HMAC-SHA256 (hex) of what the entry claims; see the module comment.
    #[serde(default)]
    pub mac: String,
}

impl BlobCache {
    /// `~/.cache/nixctr/blobs.json` (XDG_CACHE_HOME respected).
    pub fn default_path() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("nixctr").join("blobs.json"))
    }

    /// Loads the cache; an unreadable, corrupt or outdated file is treated as empty, and
    /// entries that could not have come from a push, or whose MAC does not check, are
    /// dropped. The note says what was passed over, for `-v`.
    pub fn load(path: Option<PathBuf>) -> (BlobCache, Option<String>) {
        let key = path.as_deref().map(|p| load_key(&p.with_file_name("blobs.key")));
        let (mut cache, mut note) = BlobCache::load_unchecked(path);
        cache.key = match key {
            Some(Ok(key)) => Some(key),
            Some(Err(e)) => {
                note = Some(format!("{e:#}: not using the blob cache"));
                None
            }
            None => None,
        };
        let unproven = cache.drop_unproven();
        if unproven > 0 {
            let shown = cache.path.as_deref().map(|p| p.display().to_string()).unwrap_or_default();
            let line = format!("blob cache {shown}: ignored {unproven} entries not signed by this machine's key");
            note = Some(note.map_or(line.clone(), |n| format!("{n}; {line}")));
        }
        (cache, note)
    }

    fn load_unchecked(path: Option<PathBuf>) -> (BlobCache, Option<String>) {
        let (mut cache, note) = match path.as_deref().map(|p| (p, std::fs::read(p))) {
            None => (BlobCache::default(), None),
            Some((_, Err(e))) if e.kind() == std::io::ErrorKind::NotFound => (BlobCache::default(), None),
            Some((p, Err(e))) => (BlobCache::default(), Some(format!("cannot read blob cache {}: {e}", p.display()))),
            Some((p, Ok(bytes))) => match serde_json::from_slice::<BlobCache>(&bytes) {
                Ok(c) if c.version == VERSION => {
                    let mut c = c;
                    let dropped = c.drop_invalid();
                    let note = (dropped > 0)
                        .then(|| format!("blob cache {}: ignored {dropped} malformed entries", p.display()));
                    (c, note)
                }
                Ok(c) => (
                    BlobCache::default(),
                    Some(format!(
                        "blob cache {} has version {}, not {VERSION}: starting afresh",
                        p.display(),
                        c.version
                    )),
                ),
                Err(_) => (BlobCache::default(), Some(format!("blob cache {} is not valid: ignoring it", p.display()))),
            },
        };
        cache.version = VERSION;
        cache.path = path;
        (cache, note)
    }

    /// Removes entries with a malformed key, digest or repository; returns how many.
    fn drop_invalid(&mut self) -> usize {
        let mut dropped = 0;
        for entries in self.registries.values_mut() {
            let before = entries.len();
            entries.retain(|k, blob| {
                let diff_id = k.split_once(':').map_or("", |(_, d)| d);
                super::is_digest(diff_id)
                    && super::is_digest(&blob.digest)
                    && blob.repositories.iter().all(|r| super::reference::valid_repository(r))
            });
            dropped += before - entries.len();
        }
        dropped
    }

    /// Removes entries whose MAC does not check; returns how many.
    fn drop_unproven(&mut self) -> usize {
        let key = self.key;
        let mut dropped = 0;
        for entries in self.registries.values_mut() {
            let before = entries.len();
            entries.retain(|k, blob| {
                let (compression, diff_id) = k.split_once(':').unwrap_or(("", ""));
                key.is_some_and(|key| blob.mac == mac(&key, compression, diff_id, &blob.digest, blob.size))
            });
            dropped += before - entries.len();
        }
        dropped
    }

    /// Whether any blob of `compression` is known for `registry`.
    pub fn knows_any(&self, registry: &str, compression: &str) -> bool {
        let prefix = format!("{compression}:");
        self.registries.get(registry).is_some_and(|blobs| blobs.keys().any(|k| k.starts_with(&prefix)))
    }

    pub fn get(&self, registry: &str, compression: &str, diff_id: &str) -> Option<&CachedBlob> {
        self.registries.get(registry)?.get(&key(compression, diff_id))
    }

    /// Records that `digest` (`size` bytes) is `diff_id` compressed, in `repository`. Only
    /// for a triple nixctr compressed itself, or one [`BlobCache::get`] gave (whose MAC
    /// checked): the entry is signed as proven.
    pub fn record(
        &mut self,
        registry: &str,
        compression: &str,
        diff_id: &str,
        digest: &str,
        size: u64,
        repository: &str,
    ) {
        let Some(secret) = self.key else { return };
        let signed = mac(&secret, compression, diff_id, digest, size);
        let entries = self.registries.entry(registry.to_string()).or_default();
        let entry = entries.entry(key(compression, diff_id)).or_insert_with(|| CachedBlob {
            digest: digest.to_string(),
            size,
            repositories: Vec::new(),
            mac: signed.clone(),
        });
        if entry.mac != signed {
            *entry = CachedBlob { digest: digest.to_string(), size, repositories: Vec::new(), mac: signed };
        }
        entry.repositories.retain(|r| r != repository);
        entry.repositories.push(repository.to_string());
        // A handful of repositories is enough to find one to mount from.
        let excess = entry.repositories.len().saturating_sub(8);
        entry.repositories.drain(..excess);
        self.dirty = true;
    }

    /// Forgets a blob the registry no longer has.
    pub fn forget(&mut self, registry: &str, compression: &str, diff_id: &str) {
        if let Some(entries) = self.registries.get_mut(registry) {
            self.dirty |= entries.remove(&key(compression, diff_id)).is_some();
        }
    }

    /// Writes the cache atomically (temporary file + rename), merged with what other runs
    /// wrote meanwhile.
    pub fn save(&mut self) -> Result<()> {
        let Some(path) = self.path.clone() else { return Ok(()) };
        if !self.dirty {
            return Ok(());
        }
        let (on_disk, _) = BlobCache::load_unchecked(Some(path.clone()));
        for (registry, entries) in on_disk.registries {
            let mine = self.registries.entry(registry).or_default();
            for (k, blob) in entries {
                mine.entry(k).or_insert(blob);
            }
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
        let mut file = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write to cache directory {}", dir.display()))?;
        serde_json::to_writer(&mut file, self)?;
        file.flush()?;
        file.persist(&path).with_context(|| format!("cannot replace {}", path.display()))?;
        self.dirty = false;
        Ok(())
    }
}

fn key(compression: &str, diff_id: &str) -> String {
    format!("{compression}:{diff_id}")
}

/// HMAC-SHA256 (RFC 2104) of an entry's claim, in hex.
fn mac(key: &[u8; 32], compression: &str, diff_id: &str, digest: &str, size: u64) -> String {
    let message = format!("nixctr blob cache\0{compression}\0{diff_id}\0{digest}\0{size}");
    let (mut inner, mut outer) = (Sha256::new(), Sha256::new());
    let pad = |byte: u8| -> [u8; 64] {
        let mut block = [byte; 64];
        block.iter_mut().zip(key).for_each(|(b, k)| *b ^= k);
        block
    };
    inner.update(pad(0x36));
    inner.update(message.as_bytes());
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    hex::encode(outer.finalize())
}

/// The key in `path` (64 hex digits), made from /dev/urandom when missing or malformed.
/// Written aside and linked into place, so runs starting at once agree on one key.
fn load_key(path: &Path) -> Result<[u8; 32]> {
    let parse = |text: &str| -> Option<[u8; 32]> { hex::decode(text.trim()).ok()?.try_into().ok() };
    match std::fs::read_to_string(path) {
        Ok(text) => {
            if let Some(key) = parse(&text) {
                return Ok(key);
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)
        .context("cannot read /dev/urandom for the blob cache's key")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache directory {}", dir.display()))?;
    // NamedTempFile is created 0600.
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write to cache directory {}", dir.display()))?;
    file.write_all(hex::encode(key).as_bytes())?;
    file.flush()?;
    match file.persist_noclobber(path) {
        Ok(_) => Ok(key),
        // Another run made one first: use that.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            match std::fs::read_to_string(path).ok().as_deref().and_then(parse) {
                Some(theirs) => Ok(theirs),
                // A malformed key in the way: replace it (its entries were unusable anyway).
                None => {
                    e.file.persist(path).with_context(|| format!("cannot replace {}", path.display()))?;
                    Ok(key)
                }
            }
        }
        Err(e) => Err(e.error).with_context(|| format!("cannot write {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_save_and_merge() {
        let digest = |c: &str| format!("sha256:{}", c.repeat(64));
        let (d1, c1, z1) = (digest("1"), digest("c"), digest("f"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/blobs.json");
        let (mut a, _) = BlobCache::load(Some(path.clone()));
        a.record("r:5000", "gzip", &d1, &c1, 10, "one");
        a.save().unwrap();
        let (mut b, _) = BlobCache::load(Some(path.clone()));
        b.record("r:5000", "gzip", &d1, &c1, 10, "two");
        b.record("r:5000", "zstd", &d1, &z1, 8, "two");
        b.save().unwrap();
        let (c, note) = BlobCache::load(Some(path));
        assert_eq!(note, None);
        let blob = c.get("r:5000", "gzip", &d1).unwrap();
        assert_eq!(blob.repositories, vec!["one".to_string(), "two".to_string()]);
        assert_eq!(c.get("r:5000", "zstd", &d1).unwrap().digest, z1);
        assert!(c.get("other", "gzip", &d1).is_none());
    }

    #[test]
    fn garbage_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs.json");
        for garbage in [&b"{not json"[..], b"\xff\xfe\x00", b"[]", br#"{"version": 1, "registries": 7}"#] {
            std::fs::write(&path, garbage).unwrap();
            let (cache, note) = BlobCache::load(Some(path.clone()));
            assert!(cache.registries.is_empty());
            assert!(note.unwrap().contains("not valid"));
        }
        std::fs::write(&path, r#"{"version": 99, "registries": {}}"#).unwrap();
        assert!(BlobCache::load(Some(path.clone())).1.unwrap().contains("version 99"));
        let (cache, note) = BlobCache::load(Some(dir.path().join("missing.json")));
        assert!(cache.registries.is_empty() && note.is_none());
    }

    #[test]
    fn hostile_entries_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs.json");
        let key = load_key(&dir.path().join("blobs.key")).unwrap();
        let good = format!("sha256:{}", "ab".repeat(32));
        let signed = mac(&key, "gzip", &good, &good, 1);
        let text = serde_json::json!({
            "version": 2,
            "registries": {"r:5000": {
                format!("gzip:{good}"): {"digest": good, "size": 1, "repositories": ["team/app"], "mac": signed},
                format!("gzip:sha256:{}", "é".repeat(40)): {"digest": good, "size": 1, "repositories": []},
                "gzip:x": {"digest": good, "size": 1, "repositories": []},
                format!("zstd:{good}"): {"digest": "sha256:../../v2/x", "size": 1, "repositories": []},
                format!("zstd2:{good}"): {"digest": good, "size": 1, "repositories": ["a?mount=b"]},
            }}
        });
        std::fs::write(&path, text.to_string()).unwrap();
        let (cache, note) = BlobCache::load(Some(path));
        assert!(note.unwrap().contains("ignored 4 malformed entries"));
        assert_eq!(cache.get("r:5000", "gzip", &good).unwrap().repositories, vec!["team/app".to_string()]);
        assert!(cache.get("r:5000", "zstd", &good).is_none());
    }

    /// Entries moved between layers, given another size, or made under another key are
    /// not trusted; the rest are.
    #[test]
    fn only_signed_claims_are_trusted() {
        let digest = |c: &str| format!("sha256:{}", c.repeat(64));
        let (a, b, c) = (digest("a"), digest("b"), digest("c"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs.json");
        let (mut cache, _) = BlobCache::load(Some(path.clone()));
        cache.record("r:5000", "gzip", &a, &digest("1"), 10, "app");
        cache.record("r:5000", "gzip", &b, &digest("2"), 20, "app");
        cache.record("r:5000", "gzip", &c, &digest("3"), 30, "app");
        cache.save().unwrap();
        let key = std::fs::read_to_string(dir.path().join("blobs.key")).unwrap();
        assert_eq!(key.len(), 64);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("blobs.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");

        let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let entries = &mut json["registries"]["r:5000"];
        let (ka, kb, kc) = (format!("gzip:{a}"), format!("gzip:{b}"), format!("gzip:{c}"));
        let first = entries[&ka].clone();
        entries[&ka] = entries[&kb].clone();
        entries[&kb] = first;
        entries[&kc]["size"] = serde_json::json!(31);
        std::fs::write(&path, json.to_string()).unwrap();
        let (cache, note) = BlobCache::load(Some(path.clone()));
        assert!(note.unwrap().contains("ignored 3 entries not signed"));
        assert!(cache.get("r:5000", "gzip", &a).is_none() && cache.get("r:5000", "gzip", &b).is_none());

        // The same entries under a new key (another machine's cache) are not trusted either.
        let (mut cache, _) = BlobCache::load(Some(path.clone()));
        cache.record("r:5000", "gzip", &a, &digest("1"), 10, "app");
        cache.save().unwrap();
        assert_eq!(BlobCache::load(Some(path.clone())).0.get("r:5000", "gzip", &a).unwrap().size, 10);
        std::fs::remove_file(dir.path().join("blobs.key")).unwrap();
        let (cache, note) = BlobCache::load(Some(path));
        assert!(cache.get("r:5000", "gzip", &a).is_none());
        assert!(note.unwrap().contains("not signed"));
    }

    #[test]
    fn mac_is_hmac_sha256() {
        // Computed independently: python3 -c "import hmac; print(hmac.new(bytes(range(32)),
        // b'nixctr blob cache\x00gzip\x00d\x00g\x007', 'sha256').hexdigest())"
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let ours = mac(&key, "gzip", "d", "g", 7);
        assert_eq!(ours, "d7a49a7b1d023c8d2e8fdadb324cb531af43e0e4ca7febfc615d9dc420c49943");
        assert_ne!(ours, mac(&key, "gzip", "d", "g", 8));
        assert_ne!(ours, mac(&key, "zstd", "d", "g", 7));
    }
}
