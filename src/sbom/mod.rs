//! SBOMs of built images, from the nix store rather than from a scan: one component per store
//! path in the image's layers (its runtime closure), named by its deriver, identified by its
//! NAR hash, with the store's references as the dependency graph and the licences the
//! evaluation declares. CycloneDX 1.6 JSON or SPDX 2.3 JSON.
//!
//! [`generate::generate`] is the entry point for commands: given what `build` returned and each
//! container's metadata, it queries the store in one nix container per engine and platform
//! (on the store volume the image was built in) and returns the documents' bytes.

mod cyclonedx;
pub(crate) mod generate;
mod layers;
pub(crate) mod names;
mod spdx;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::nix::{DrvNames, NixContainer, NixImage, PathInfo, ResolvedNixpkgs};
use crate::progress::Progress;
pub(crate) use layers::ImageContents;

/// An SBOM format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Format {
    /// CycloneDX 1.6 JSON.
    #[default]
    CycloneDx,
    /// SPDX 2.3 JSON.
    Spdx,
}

impl Format {
    /// The media type of the document (an OCI artifact's `artifactType`).
    pub(crate) fn media_type(self) -> &'static str {
        match self {
            Format::CycloneDx => "application/vnd.cyclonedx+json",
            Format::Spdx => "application/spdx+json",
        }
    }

    /// The file name ending: `NAME.cdx.json`, `NAME.spdx.json`.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Format::CycloneDx => "cdx.json",
            Format::Spdx => "spdx.json",
        }
    }
}

/// One SBOM document, ready to write or push.
#[derive(Debug, Clone)]
pub struct Sbom {
    /// `application/vnd.cyclonedx+json` or `application/spdx+json`.
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

/// What the SBOM says of a container besides its store paths.
#[derive(Debug, Clone, Default)]
pub(crate) struct Metadata {
    /// The container's name (`containers/NAME`).
    pub name: String,
    /// The app version `nixctr version NAME` finds, if any.
    pub app_version: Option<String>,
    /// The git commit the project is at, if it is in a repository.
    pub commit: Option<String>,
}

/// One store path of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Component {
    pub path: String,
    pub name: String,
    /// `None` when neither the deriver nor the path's name has one.
    pub version: Option<String>,
    /// The NAR hash as nix prints it, and as hex when it is SHA-256.
    pub nar_hash: String,
    pub sha256: Option<String>,
    pub nar_size: u64,
    pub deriver: Option<String>,
    /// SPDX identifiers, sorted.
    pub licences: Vec<String>,
    /// Store paths of the image it refers to, sorted.
    pub references: Vec<String>,
}

impl Component {
    pub(crate) fn purl(&self) -> String {
        names::purl(&self.name, self.version.as_deref())
    }

    /// All of nixpkgs' licences of the package, as one SPDX expression.
    pub(crate) fn licence_expression(&self) -> Option<String> {
        match self.licences.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            many => Some(format!("({})", many.join(" AND "))),
        }
    }
}

/// Everything one SBOM says, whatever its format: the store's answers and the container's
/// metadata.
#[derive(Debug, Clone)]
pub(crate) struct Document {
    pub meta: Metadata,
    pub tool_version: &'static str,
    pub closure: Closure,
}

impl Document {
    fn image_sha256(&self) -> Option<String> {
        self.closure.image_digest.strip_prefix("sha256:").map(str::to_string)
    }

    /// nixctr's facts about the build, as `(name, value)` pairs, in a fixed order.
    fn facts(&self) -> Vec<(&'static str, String)> {
        let n = &self.closure.nixpkgs;
        let mut facts = vec![("nixctr:container", self.meta.name.clone())];
        if let Some(v) = &self.meta.app_version {
            facts.push(("nixctr:app_version", v.clone()));
        }
        facts.push(("nixctr:image_digest", self.closure.image_digest.clone()));
        facts.push(("nixctr:nixpkgs:ref", n.reference.clone()));
        facts.push(("nixctr:nixpkgs:store_path", n.path.clone()));
        if let Some(h) = &n.nar_hash {
            facts.push(("nixctr:nixpkgs:nar_hash", h.clone()));
        }
        if let Some(r) = &n.revision {
            facts.push(("nixctr:nixpkgs:revision", r.clone()));
        }
        facts.push(("nixctr:nix_image", self.closure.nix_image.name.clone()));
        facts.push(("nixctr:nix_image:id", self.closure.nix_image.id.clone()));
        for digest in &self.closure.nix_image.digests {
            facts.push(("nixctr:nix_image:digest", digest.clone()));
        }
        facts
    }

    /// The document in `format`, stamped as [`Stamp::for_document`] says.
    pub(crate) fn render(&self, format: Format) -> Result<Sbom> {
        let epoch = std::env::var("SOURCE_DATE_EPOCH").ok().and_then(|s| s.trim().parse::<u64>().ok());
        self.render_at(format, epoch)
    }

    fn render_at(&self, format: Format, epoch: Option<u64>) -> Result<Sbom> {
        // The stamp of a reproducible document hangs on its content: render it unstamped first.
        let content = match format {
            Format::CycloneDx => cyclonedx::render(self, &Stamp::blank())?,
            Format::Spdx => spdx::render(self, &Stamp::blank())?,
        };
        let stamp = Stamp::for_document(&content, epoch);
        let bytes = match format {
            Format::CycloneDx => cyclonedx::render(self, &stamp)?,
            Format::Spdx => spdx::render(self, &stamp)?,
        };
        Ok(Sbom { media_type: format.media_type(), bytes })
    }
}

/// The creation time and serial number the formats require: now and random, or, with
/// `SOURCE_DATE_EPOCH` set, that time and a UUID made of the document's content, so the same
/// inputs give the same bytes.
pub(crate) struct Stamp {
    pub timestamp: String,
    /// A UUID (`8-4-4-4-12` hex).
    pub serial: String,
}

impl Stamp {
    fn blank() -> Stamp {
        Stamp { timestamp: names::rfc3339(0), serial: names::uuid([0; 16]) }
    }

    fn for_document(content: &[u8], epoch: Option<u64>) -> Stamp {
        match epoch {
            Some(secs) => {
                let digest = Sha256::new().chain_update(secs.to_be_bytes()).chain_update(content).finalize();
                let mut bytes = [0u8; 16];
                bytes.copy_from_slice(&digest[..16]);
                Stamp { timestamp: names::rfc3339(secs), serial: names::uuid(bytes) }
            }
            None => {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
                Stamp { timestamp: names::rfc3339(now), serial: names::uuid(random_bytes()) }
            }
        }
    }
}

/// 16 bytes from the system's random source; the clock and the process id if that fails
/// (a serial number must be unique, not secret).
fn random_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).is_ok() {
        return bytes;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let digest =
        Sha256::new().chain_update(now.to_be_bytes()).chain_update(std::process::id().to_be_bytes()).finalize();
    bytes.copy_from_slice(&digest[..16]);
    bytes
}

/// What the store and the evaluation said of an image's store paths.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoreFacts {
    pub infos: Vec<PathInfo>,
    pub derivers: BTreeMap<String, DrvNames>,
    pub licences: BTreeMap<String, Vec<String>>,
}

/// The components of an image from what the store said: one per store path, references kept
/// within the image; and the roots (paths nothing else in the image refers to).
pub(crate) fn components(facts: &StoreFacts) -> Result<(Vec<Component>, Vec<String>)> {
    let inside: BTreeSet<&str> = facts.infos.iter().map(|i| i.path.as_str()).collect();
    let mut referred: BTreeSet<&str> = BTreeSet::new();
    let mut components = Vec::new();
    for info in &facts.infos {
        let (parsed_name, parsed_version) = names::parse_drv_name(names::store_name(&info.path));
        let drv = info.deriver.as_ref().and_then(|d| facts.derivers.get(d));
        let name = drv.and_then(|d| d.pname.clone()).unwrap_or_else(|| parsed_name.to_string());
        let version = drv
            .and_then(|d| d.version.clone())
            .or_else(|| (!parsed_version.is_empty()).then(|| parsed_version.to_string()));
        let references: Vec<String> = info.references.iter().filter(|r| inside.contains(r.as_str())).cloned().collect();
        referred.extend(info.references.iter().map(String::as_str).filter(|r| inside.contains(r)));
        let sha256 = if info.nar_hash.starts_with("sha256") {
            Some(names::sha256_hex(&info.nar_hash).with_context(|| format!("the NAR hash of {}", info.path))?)
        } else {
            None
        };
        components.push(Component {
            path: info.path.clone(),
            name,
            version,
            nar_hash: info.nar_hash.clone(),
            sha256,
            nar_size: info.nar_size,
            deriver: info.deriver.clone(),
            licences: facts.licences.get(&info.path).cloned().unwrap_or_default(),
            references,
        });
    }
    let roots = components.iter().filter(|c| !referred.contains(c.path.as_str())).map(|c| c.path.clone()).collect();
    Ok((components, roots))
}

/// Asks the store (and the evaluation, for licences) about the image whose layers hold
/// `contents`, in the running nix container `nix` (which must hold the project).
pub(crate) async fn query(
    nix: &NixContainer,
    name: &str,
    contents: &ImageContents,
    progress: &Progress,
) -> Result<StoreFacts> {
    let started = Instant::now();
    // The evaluation needs nothing from the store's answers: both at once.
    let store = async {
        let infos = nix.path_infos(&contents.store_paths).await?;
        let derivers: BTreeSet<String> = infos.iter().filter_map(|i| i.deriver.clone()).collect();
        let derivers = nix.derivation_names(&derivers.into_iter().collect::<Vec<_>>()).await?;
        Ok::<_, anyhow::Error>((infos, derivers))
    };
    let (store, licences) = tokio::join!(store, nix.licences(name));
    let (infos, derivers) = store?;
    let facts = StoreFacts { infos, derivers, licences: licences? };
    progress.debug(format!(
        "sbom {name}: {} store paths, {} derivations, {} with a licence, in {:.2}s",
        facts.infos.len(),
        facts.derivers.len(),
        facts.licences.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(facts)
}

/// What the store says of one built image, before its metadata and format: everything of
/// its SBOM that needs the nix container. Components are sorted by store path.
#[derive(Debug, Clone)]
pub(crate) struct Closure {
    /// The image's platform (`linux/amd64`).
    pub platform: String,
    /// The image's config digest (`sha256:…`), its image ID.
    pub image_digest: String,
    pub nixpkgs: ResolvedNixpkgs,
    pub nix_image: NixImage,
    pub components: Vec<Component>,
    /// The store paths no other path of the image refers to: what the image's contents are.
    pub roots: Vec<String>,
}

/// The closure of the image whose archive is at `archive` (container `name`), its store paths
/// queried in `nix`, the container that built it or one on the same store.
pub(crate) async fn closure(nix: &NixContainer, archive: &Path, name: &str, progress: &Progress) -> Result<Closure> {
    let path = archive.to_path_buf();
    let started = Instant::now();
    let contents = tokio::task::spawn_blocking(move || layers::read(&path))
        .await
        .map_err(|e| anyhow!("reading the archive stopped: {e}"))??;
    progress.debug(format!(
        "{}: {} store paths in the layers, read in {:.2}s",
        archive.display(),
        contents.store_paths.len(),
        started.elapsed().as_secs_f64()
    ));
    let facts = query(nix, name, &contents, progress).await?;
    let (components, roots) = components(&facts)?;
    let in_store: BTreeSet<&str> = components.iter().map(|c| c.path.as_str()).collect();
    if let Some(missing) = contents.store_paths.iter().find(|p| !in_store.contains(p.as_str())) {
        bail!("the store did not describe {missing}, which is in the image's layers");
    }
    Ok(Closure {
        platform: nix.platform().to_string(),
        image_digest: contents.config_digest,
        nixpkgs: nix.nixpkgs.clone(),
        nix_image: nix.image.clone(),
        components,
        roots,
    })
}

impl Document {
    pub(crate) fn new(meta: Metadata, closure: Closure) -> Document {
        Document { meta, tool_version: env!("CARGO_PKG_VERSION"), closure }
    }
}

#[cfg(test)]
mod tests;
