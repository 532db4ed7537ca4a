//! What earlier pushes made of each layer: per registry, per diff_id and compression, the
//! compressed blob's digest and size and the repositories holding it. A re-push of unchanged
//! layers then checks those digests instead of compressing again, and mounts from another
//! repository of the same registry. The file is a hint: wrong or missing entries only cost
//! time, because every use is checked against the registry first.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct BlobCache {
    version: u32,
    /// registry -> "<compression>:<diff_id>" -> blob.
    registries: BTreeMap<String, BTreeMap<String, CachedBlob>>,
    #[serde(skip)]
    path: Option<PathBuf>,
    #[serde(skip)]
    dirty: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBlob {
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

    /// Loads the cache; an unreadable or outdated file is treated as empty.
    pub fn load(path: Option<PathBuf>) -> BlobCache {
        let mut cache = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice::<BlobCache>(&b).ok())
            .filter(|c| c.version == VERSION)
            .unwrap_or_default();
        cache.version = VERSION;
        cache.path = path;
        cache
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
            *entry = CachedBlob {
                digest: digest.to_string(),
                size,
                repositories: Vec::new(),
            };
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
        let on_disk = BlobCache::load(Some(path.clone()));
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
        file.persist(&path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
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
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/blobs.json");
        let mut a = BlobCache::load(Some(path.clone()));
        a.record("r:5000", "gzip", "sha256:d1", "sha256:c1", 10, "one");
        a.save().unwrap();
        let mut b = BlobCache::load(Some(path.clone()));
        b.record("r:5000", "gzip", "sha256:d1", "sha256:c1", 10, "two");
        b.record("r:5000", "zstd", "sha256:d1", "sha256:z1", 8, "two");
        b.save().unwrap();
        let c = BlobCache::load(Some(path));
        let blob = c.get("r:5000", "gzip", "sha256:d1").unwrap();
        assert_eq!(blob.repositories, vec!["one".to_string(), "two".to_string()]);
        assert_eq!(c.get("r:5000", "zstd", "sha256:d1").unwrap().digest, "sha256:z1");
        assert!(c.get("other", "gzip", "sha256:d1").is_none());
    }

    #[test]
    fn garbage_is_an_empty_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blobs.json");
        std::fs::write(&path, "{not json").unwrap();
        assert!(BlobCache::load(Some(path)).registries.is_empty());
    }
}
