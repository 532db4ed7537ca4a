//! The platform a docker-archive's image config says (`os`, `architecture`, `variant`), read
//! in one pass over the file without keeping its layers.

use std::collections::HashMap;
use std::io::{BufReader, Read};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::platform::Platform;

/// JSON entries bigger than this are not an image config or manifest.
const SMALL: u64 = 4 << 20;

#[derive(Deserialize)]
struct ManifestEntry {
    #[serde(rename = "Config")]
    config: String,
}

#[derive(Deserialize)]
struct Config {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
}

/// The platform of the (first) image in the archive at `path`, plain or gzip-compressed.
pub(crate) fn platform_of(path: &Path) -> Result<Platform> {
    let shown = path.display();
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open archive {shown}"))?;
    let mut magic = [0u8; 2];
    let n = super::read_up_to(&mut file, &mut magic).with_context(|| format!("cannot read archive {shown}"))?;
    let file = std::fs::File::open(path).with_context(|| format!("cannot open archive {shown}"))?;
    let reader: Box<dyn Read> = if n == 2 && magic == super::GZIP_MAGIC {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(256 << 10, file)))
    } else {
        Box::new(BufReader::with_capacity(256 << 10, file))
    };
    let mut small: HashMap<String, Vec<u8>> = HashMap::new();
    let mut archive = tar::Archive::new(reader);
    let not_archive = || anyhow!("{shown:?} is not a docker-archive (its tar headers do not parse)");
    for entry in archive.entries().map_err(|_| not_archive())? {
        let mut entry = entry.map_err(|_| not_archive())?;
        let name = entry.path().map_err(|_| not_archive())?.to_string_lossy().trim_start_matches("./").to_string();
        if name.ends_with(".json") && entry.size() <= SMALL {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).with_context(|| format!("cannot read {name} in {shown}"))?;
            small.insert(name, bytes);
        }
    }
    let manifest = small.get("manifest.json").ok_or_else(|| anyhow!("{shown:?} has no manifest.json"))?;
    let entries: Vec<ManifestEntry> =
        serde_json::from_slice(manifest).map_err(|e| anyhow!("{shown:?}: manifest.json does not parse: {e}"))?;
    let first = entries.first().ok_or_else(|| anyhow!("{shown:?}: manifest.json names no image"))?;
    let config = small
        .get(first.config.trim_start_matches("./"))
        .ok_or_else(|| anyhow!("{shown:?}: no config {}", first.config))?;
    let config: Config =
        serde_json::from_slice(config).map_err(|e| anyhow!("{shown:?}: the image config does not parse: {e}"))?;
    let arch = config.architecture.ok_or_else(|| anyhow!("{shown:?}: the image config names no architecture"))?;
    Ok(Platform::new(config.os.as_deref().unwrap_or("linux"), &arch, config.variant.as_deref()))
}
