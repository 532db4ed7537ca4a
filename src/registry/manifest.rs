//! What gets written into a registry besides blobs: the image manifest that names the config
//! and layers, and the image index (Docker: manifest list) that names one manifest per
//! platform. Pure functions from digests to bytes, so every field is unit-tested without a
//! registry. The manifest types are oci-client's; the index is small enough to spell here.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use oci_client::manifest::{
    OciDescriptor, OciImageManifest, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE,
    IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE,
};
use serde::Serialize;

pub(crate) use crate::platform::Platform;

const IMAGE_LAYER_ZSTD_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// Every manifest media type nixctr may find under a tag: what a tag lookup accepts.
pub(crate) const ACCEPTED_MANIFEST_TYPES: [&str; 4] =
    [OCI_IMAGE_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE, OCI_IMAGE_INDEX_MEDIA_TYPE, IMAGE_MANIFEST_LIST_MEDIA_TYPE];

/// The manifest schema to push.
// pub: used by tests/it/push.rs
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ManifestFormat {
    /// OCI image manifest.
    #[default]
    Oci,
    /// Docker image manifest v2 schema 2.
    Docker,
}

impl ManifestFormat {
    /// The name people know it by, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ManifestFormat::Oci => "OCI",
            ManifestFormat::Docker => "Docker schema 2",
        }
    }

    /// The other format: what to try when a registry refuses this one.
    pub(crate) fn other(self) -> ManifestFormat {
        match self {
            ManifestFormat::Oci => ManifestFormat::Docker,
            ManifestFormat::Docker => ManifestFormat::Oci,
        }
    }
}

/// How layers are compressed into blobs.
// pub: used by tests/it/push.rs
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    Gzip,
    /// OCI manifests only.
    Zstd,
}

impl Compression {
    /// The codec's name; also the blob cache's key prefix, so it must not change.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The one combination no manifest can express.
pub(crate) const ZSTD_NEEDS_OCI: &str =
    "--compression zstd needs --format oci (Docker schema 2 manifests have no zstd layers)";

/// The manifest bytes and their media type, for a config and layers given as (digest, size).
pub(crate) fn image_manifest(
    format: ManifestFormat,
    compression: Compression,
    config: (&str, u64),
    layers: &[(String, u64)],
) -> Result<(&'static str, Vec<u8>)> {
    let (manifest_type, config_type, layer_type) = match (format, compression) {
        (ManifestFormat::Oci, Compression::Gzip) => {
            (OCI_IMAGE_MEDIA_TYPE, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_GZIP_MEDIA_TYPE)
        }
        (ManifestFormat::Oci, Compression::Zstd) => {
            (OCI_IMAGE_MEDIA_TYPE, IMAGE_CONFIG_MEDIA_TYPE, IMAGE_LAYER_ZSTD_MEDIA_TYPE)
        }
        (ManifestFormat::Docker, Compression::Gzip) => {
            (IMAGE_MANIFEST_MEDIA_TYPE, IMAGE_DOCKER_CONFIG_MEDIA_TYPE, IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE)
        }
        (ManifestFormat::Docker, Compression::Zstd) => bail!(ZSTD_NEEDS_OCI),
    };
    let descriptor = |media_type: &str, digest: &str, size: u64| OciDescriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        urls: None,
        annotations: None,
        artifact_type: None,
    };
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(manifest_type.to_string()),
        config: descriptor(config_type, config.0, config.1),
        layers: layers.iter().map(|(digest, size)| descriptor(layer_type, digest, *size)).collect(),
        subject: None,
        artifact_type: None,
        annotations: None,
    };
    Ok((manifest_type, serde_json::to_vec_pretty(&manifest)?))
}

/// One pushed manifest, as an index lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IndexEntry {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    pub platform: Platform,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index<'a> {
    schema_version: u8,
    media_type: &'static str,
    manifests: &'a [IndexEntry],
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

/// An OCI image index (or Docker manifest list) naming one manifest per platform, and its
/// media type. The entries must be manifests of the same family: a Docker manifest list
/// cannot name OCI manifests, and two entries for one platform leave pullers guessing.
pub(crate) fn image_index(
    format: ManifestFormat,
    entries: &[IndexEntry],
    annotations: &BTreeMap<String, String>,
) -> Result<(&'static str, Vec<u8>)> {
    let (index_type, manifest_type) = match format {
        ManifestFormat::Oci => (OCI_IMAGE_INDEX_MEDIA_TYPE, OCI_IMAGE_MEDIA_TYPE),
        ManifestFormat::Docker => (IMAGE_MANIFEST_LIST_MEDIA_TYPE, IMAGE_MANIFEST_MEDIA_TYPE),
    };
    if entries.is_empty() {
        bail!("an image index needs at least one manifest");
    }
    for (i, entry) in entries.iter().enumerate() {
        if entry.media_type != manifest_type {
            bail!("a {} index cannot list a {} manifest ({})", format.name(), entry.media_type, entry.digest);
        }
        if entries[..i].iter().any(|e| e.platform == entry.platform) {
            bail!("two manifests for platform {} in one index", entry.platform);
        }
    }
    // A Docker manifest list has no annotations.
    let none = BTreeMap::new();
    let annotations = if format == ManifestFormat::Oci { annotations } else { &none };
    let index = Index { schema_version: 2, media_type: index_type, manifests: entries, annotations };
    Ok((index_type, serde_json::to_vec_pretty(&index)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_say_what_the_bytes_are() {
        let layers = vec![("sha256:aa".to_string(), 10)];
        let (ty, body) = image_manifest(ManifestFormat::Oci, Compression::Zstd, ("sha256:cc", 5), &layers).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ty, OCI_IMAGE_MEDIA_TYPE);
        assert_eq!(json["layers"][0]["mediaType"], IMAGE_LAYER_ZSTD_MEDIA_TYPE);
        assert_eq!(json["config"]["mediaType"], IMAGE_CONFIG_MEDIA_TYPE);
        assert_eq!(json["config"]["size"], 5);
        let (ty, body) = image_manifest(ManifestFormat::Docker, Compression::Gzip, ("sha256:cc", 5), &layers).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(ty, IMAGE_MANIFEST_MEDIA_TYPE);
        assert_eq!(json["mediaType"], IMAGE_MANIFEST_MEDIA_TYPE);
        assert_eq!(json["schemaVersion"], 2);
        assert_eq!(json["layers"][0]["mediaType"], IMAGE_DOCKER_LAYER_GZIP_MEDIA_TYPE);
        assert_eq!(json["layers"][0]["digest"], "sha256:aa");
        let err = image_manifest(ManifestFormat::Docker, Compression::Zstd, ("sha256:cc", 5), &layers).unwrap_err();
        assert_eq!(err.to_string(), ZSTD_NEEDS_OCI);
    }

    fn entry(media_type: &str, digest: &str, arch: &str, variant: Option<&str>) -> IndexEntry {
        IndexEntry {
            media_type: media_type.to_string(),
            digest: digest.to_string(),
            size: 42,
            platform: Platform {
                architecture: arch.to_string(),
                os: "linux".to_string(),
                variant: variant.map(str::to_string),
            },
        }
    }

    #[test]
    fn an_index_lists_one_manifest_per_platform() {
        let entries = [
            entry(OCI_IMAGE_MEDIA_TYPE, "sha256:a1", "amd64", None),
            entry(OCI_IMAGE_MEDIA_TYPE, "sha256:b2", "arm64", Some("v8")),
        ];
        let notes = BTreeMap::from([("org.opencontainers.image.version".to_string(), "2.17.0".to_string())]);
        let (ty, body) = image_index(ManifestFormat::Oci, &entries, &notes).unwrap();
        assert_eq!(ty, OCI_IMAGE_INDEX_MEDIA_TYPE);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["schemaVersion"], 2);
        assert_eq!(json["mediaType"], OCI_IMAGE_INDEX_MEDIA_TYPE);
        assert_eq!(json["manifests"][0]["mediaType"], OCI_IMAGE_MEDIA_TYPE);
        assert_eq!(json["manifests"][0]["digest"], "sha256:a1");
        assert_eq!(json["manifests"][0]["size"], 42);
        assert_eq!(json["manifests"][0]["platform"], serde_json::json!({"architecture": "amd64", "os": "linux"}));
        assert_eq!(json["manifests"][1]["platform"]["variant"], "v8");
        assert_eq!(json["annotations"]["org.opencontainers.image.version"], "2.17.0");

        let docker = [entry(IMAGE_MANIFEST_MEDIA_TYPE, "sha256:a1", "amd64", None)];
        let (ty, body) = image_index(ManifestFormat::Docker, &docker, &notes).unwrap();
        assert_eq!(ty, IMAGE_MANIFEST_LIST_MEDIA_TYPE);
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["mediaType"], IMAGE_MANIFEST_LIST_MEDIA_TYPE);
        assert!(json.get("annotations").is_none(), "a Docker manifest list has no annotations");
    }

    #[test]
    fn an_index_refuses_what_pullers_cannot_use() {
        assert!(image_index(ManifestFormat::Oci, &[], &BTreeMap::new()).is_err());
        let mixed = [entry(IMAGE_MANIFEST_MEDIA_TYPE, "sha256:a1", "amd64", None)];
        assert!(image_index(ManifestFormat::Oci, &mixed, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("cannot list"));
        let twice = [
            entry(OCI_IMAGE_MEDIA_TYPE, "sha256:a1", "amd64", None),
            entry(OCI_IMAGE_MEDIA_TYPE, "sha256:b2", "amd64", None),
        ];
        assert!(image_index(ManifestFormat::Oci, &twice, &BTreeMap::new())
            .unwrap_err()
            .to_string()
            .contains("two manifests"));
    }
}
