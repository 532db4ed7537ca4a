//! What earlier pushes made of each layer: per registry, per diff_id and compression, the
//! compressed blob's digest and size and the repositories holding it. A re-push of unchanged
//! layers then checks those digests instead of compressing again, and mounts from another
//! repository of the same registry. The file is a hint: wrong or missing entries only cost
//! time, because every use is checked against the registry first. It is also user-writable:
//! entries whose digest or repository could not have come from a push are dropped on load,
//! so nothing from the file reaches a URL unchecked.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct BlobCache {
    version: u32,
    /// registry -> "<compression>:<diff_id>" -> blob.
    registries: BTreeMap<String, BTreeMap<String, CachedBlob>>,
    #[serde(skip)]
    path: Option<PathBuf>,
    #[serde(skip)]
    dirty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CachedBlob {
    pub digest: String,
    pub size: u64,
    /// Repositories known to hold the blob, most recent last.
    pub repositories: Vec<String>,
}

impl BlobCache {
    /// `~/.cache/nixctr/blobs.json` (XDG_CACHE_HOME respected).
    pub fn default_path() -> Option<PathBuf> {
        dirs::cache_dir().map(|d| d.join("nixctr").join("blobs.json"))
    }

    /// Loads the cache; an unreadable, corrupt or outdated file is treated as empty, and
    /// entries that could not have come from a push are dropped. The note says what was
    /// passed over, for `-v`.
    pub fn load(path: Option<PathBuf>) -> (BlobCache, Option<String>) {
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

    pub fn get(&self, registry: &str, compression: &str, diff_id: &str) -> Option<&CachedBlob> {
        self.registries.get(registry)?.get(&key(compression, diff_id))
    }

    pub fn record(
        &mut self,
        registry: &str,
        compression: &str,
        diff_id: &str,
        digest: &str,
        size: u64,
        repository: &str,
    ) {
        let entries = self.registries.entry(registry.to_string()).or_default();
        let entry = entries.entry(key(compression, diff_id)).or_insert_with(|| CachedBlob {
            digest: digest.to_string(),
            size,
            repositories: Vec::new(),
        });
        if entry.digest != digest {
            *entry = CachedBlob { digest: digest.to_string(), size, repositories: Vec::new() };
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
        let (on_disk, _) = BlobCache::load(Some(path.clone()));
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
        let good = format!("sha256:{}", "ab".repeat(32));
        let text = serde_json::json!({
            "version": 1,
            "registries": {"r:5000": {
                format!("gzip:{good}"): {"digest": good, "size": 1, "repositories": ["team/app"]},
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
}
