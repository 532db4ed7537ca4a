//! The store paths an image holds, read from its docker-archive: every `nix/store/HASH-NAME`
//! at the top of a layer's entries, in any layer. This is what the SBOM must cover, whichever
//! dockerTools builder made the image (the archive is not in its own closure, so the store
//! cannot say it).

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

use crate::archive::Archive;

/// What an archive is, for its SBOM: the image's config digest and the store paths in its
/// layers (sorted).
#[derive(Debug, Clone)]
pub(crate) struct ImageContents {
    pub(crate) config_digest: String,
    pub(crate) store_paths: Vec<String>,
}

/// Reads the archive at `path` (checked as `push` checks it).
pub(crate) fn read(path: &Path) -> Result<ImageContents> {
    let archive = Archive::open(path, None)?;
    let mut paths = BTreeSet::new();
    for (i, layer) in archive.layers.iter().enumerate() {
        let reader = archive.layer_reader(i)?;
        paths.extend(
            store_paths_in(reader)
                .with_context(|| format!("cannot read layer {} of {}", layer.name, path.display()))?,
        );
    }
    Ok(ImageContents { config_digest: archive.config_digest.clone(), store_paths: paths.into_iter().collect() })
}

/// The `/nix/store/HASH-NAME` paths whose entries a layer tar holds.
pub(crate) fn store_paths_in(layer: impl Read) -> Result<BTreeSet<String>> {
    let mut tar = tar::Archive::new(layer);
    let mut paths = BTreeSet::new();
    for entry in tar.entries()? {
        let entry = entry?;
        let name = entry.path_bytes();
        if let Some(path) = store_path_of(&name) {
            paths.insert(path);
        }
    }
    Ok(paths)
}

/// `/nix/store/HASH-NAME` of an entry `[./][/]nix/store/HASH-NAME[/…]`.
fn store_path_of(entry: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(entry).ok()?;
    let text = text.trim_start_matches("./").trim_start_matches('/');
    let rest = text.strip_prefix("nix/store/")?;
    let base = rest.split('/').next()?;
    let (hash, name) = base.split_once('-')?;
    (hash.len() == 32 && !name.is_empty() && hash.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| format!("/nix/store/{base}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HELLO: &str = "0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-hello-2.12.1";

    fn layer(entries: &[&str]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for name in entries {
            let mut header = tar::Header::new_gnu();
            let dir = name.ends_with('/');
            header.set_entry_type(if dir { tar::EntryType::Directory } else { tar::EntryType::Regular });
            header.set_size(0);
            header.set_mode(0o555);
            builder.append_data(&mut header, name, std::io::empty()).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn store_paths_are_the_tops_of_entries_under_nix_store() {
        let data = layer(&[
            "nix/",
            "nix/store/",
            &format!("nix/store/{HELLO}/"),
            &format!("nix/store/{HELLO}/bin/hello"),
            &format!("./nix/store/{}-busybox-1.35.0/bin/sh", "1".repeat(32)),
            "bin/hello",
            "nix/store/short-x/y",
            "nix/store/.links/x",
        ]);
        let paths: Vec<String> = store_paths_in(&data[..]).unwrap().into_iter().collect();
        assert_eq!(paths, vec![format!("/nix/store/{HELLO}"), format!("/nix/store/{}-busybox-1.35.0", "1".repeat(32))]);
    }
}
