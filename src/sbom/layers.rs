//! The store paths an image holds, read from its docker-archive: every `nix/store/HASH-NAME`
//! at the top of a layer's entries, in any layer. This is what the SBOM must cover, whichever
//! dockerTools builder made the image (the archive is not in its own closure, so the store
//! cannot say it). The archive is one `build` has just written and checked: it is read in one
//! pass, each entry's tar listing kept until `manifest.json` (first or last) says which are
//! the layers, without the digest checks of a push.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

/// What an archive is, for its SBOM: the image's config digest and the store paths in its
/// layers (sorted).
#[derive(Debug, Clone)]
pub(crate) struct ImageContents {
    pub(crate) config_digest: String,
    pub(crate) store_paths: Vec<String>,
}

/// Reads the docker-archive (plain or gzip) at `path`.
pub(crate) fn read(path: &Path) -> Result<ImageContents> {
    let file = File::open(path).with_context(|| format!("cannot open archive {}", path.display()))?;
    read_from(BufReader::with_capacity(1 << 20, file))
        .with_context(|| format!("cannot read archive {}", path.display()))
}

fn read_from(mut input: impl Read) -> Result<ImageContents> {
    let mut magic = [0u8; 2];
    input.read_exact(&mut magic)?;
    let chained = std::io::Cursor::new(magic).chain(input);
    // Buffered: the tar readers ask for 512 bytes at a time.
    let plain: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(chained)))
    } else {
        Box::new(chained)
    };
    let mut manifest = None;
    let mut json_digests: BTreeMap<String, String> = BTreeMap::new();
    // An entry that is no tar is an error only if the manifest calls it a layer.
    let mut listings: BTreeMap<String, Result<BTreeSet<String>>> = BTreeMap::new();
    let mut outer = tar::Archive::new(plain);
    for entry in outer.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_string();
        if name.ends_with(".json") {
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            json_digests.insert(name.clone(), format!("sha256:{}", hex::encode(Sha256::digest(&data))));
            if name == "manifest.json" {
                manifest = Some(data);
            }
            continue;
        }
        let mut head = [0u8; 2];
        let n = crate::archive::read_up_to(&mut entry, &mut head)?;
        let rest = std::io::Cursor::new(head[..n].to_vec()).chain(entry);
        let paths = if n == 2 && head == [0x1f, 0x8b] {
            store_paths_in(flate2::read::MultiGzDecoder::new(rest))
        } else {
            store_paths_in(rest)
        };
        listings.insert(name, paths);
    }
    let manifest = manifest.ok_or_else(|| anyhow!("no manifest.json: not a docker-archive"))?;
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).context("manifest.json")?;
    let [image] = manifest.as_array().map(Vec::as_slice).unwrap_or_default() else {
        bail!("manifest.json does not describe one image");
    };
    let config = image["Config"].as_str().ok_or_else(|| anyhow!("manifest.json names no Config"))?;
    let config_digest = json_digests
        .get(config)
        .cloned()
        .ok_or_else(|| anyhow!("no {config} in the archive (manifest.json's Config)"))?;
    let mut store_paths = BTreeSet::new();
    for layer in image["Layers"].as_array().into_iter().flatten() {
        let layer = layer.as_str().ok_or_else(|| anyhow!("manifest.json: a layer is not a string"))?;
        match listings.get(layer) {
            Some(Ok(listing)) => store_paths.extend(listing.iter().cloned()),
            Some(Err(e)) => bail!("cannot read layer {layer}: {e:#}"),
            None => bail!("no {layer} in the archive (manifest.json's Layers)"),
        }
    }
    Ok(ImageContents { config_digest, store_paths: store_paths.into_iter().collect() })
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

    fn archive(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, &data[..]).unwrap();
        }
        builder.into_inner().unwrap()
    }

    #[test]
    fn an_archive_gives_its_config_digest_and_the_paths_of_its_layers_only() {
        let config = br#"{"architecture":"amd64"}"#.to_vec();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&config)));
        let manifest = br#"[{"Config":"c.json","RepoTags":["x:1"],"Layers":["a/layer.tar"]}]"#.to_vec();
        let entries = vec![
            ("a/layer.tar", layer(&[&format!("nix/store/{HELLO}/bin/hello")])),
            ("b/layer.tar", layer(&["nix/store/22222222222222222222222222222222-not-listed/x"])),
            ("c.json", config),
            ("manifest.json", manifest),
        ];
        let plain = archive(&entries);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &plain).unwrap();
        for bytes in [plain.clone(), gz.finish().unwrap()] {
            let contents = read_from(&bytes[..]).unwrap();
            assert_eq!(contents.config_digest, digest);
            assert_eq!(contents.store_paths, vec![format!("/nix/store/{HELLO}")]);
        }
        let no_manifest = archive(&entries[..3]);
        assert!(format!("{:#}", read_from(&no_manifest[..]).unwrap_err()).contains("no manifest.json"));
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
