//! SPDX 2.3 JSON: the image as a package the document DESCRIBES, which CONTAINS one package
//! per store path (`SPDXRef-nix-HASH`), with the store's references as DEPENDS_ON. nixctr's own
//! facts (nixpkgs, commit, nix image) are annotations on the image package.

use serde::Serialize;

use super::names::{percent_encode, store_hash};
use super::{Document, Stamp};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SpdxDocument<'a> {
    spdx_version: &'static str,
    data_license: &'static str,
    #[serde(rename = "SPDXID")]
    spdx_id: &'static str,
    name: String,
    document_namespace: String,
    creation_info: CreationInfo,
    packages: Vec<Package<'a>>,
    relationships: Vec<Relationship>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CreationInfo {
    created: String,
    creators: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Package<'a> {
    name: &'a str,
    #[serde(rename = "SPDXID")]
    spdx_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    version_info: Option<&'a str>,
    #[serde(rename = "primaryPackagePurpose")]
    purpose: &'static str,
    download_location: &'static str,
    files_analyzed: bool,
    license_concluded: &'static str,
    license_declared: String,
    copyright_text: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    checksums: Vec<Checksum>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    external_refs: Vec<ExternalRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    annotations: Vec<Annotation>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Checksum {
    algorithm: &'static str,
    checksum_value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ExternalRef {
    reference_category: &'static str,
    reference_type: &'static str,
    reference_locator: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Annotation {
    annotation_date: String,
    annotation_type: &'static str,
    annotator: String,
    comment: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Relationship {
    spdx_element_id: String,
    relationship_type: &'static str,
    related_spdx_element: String,
}

const IMAGE_ID: &str = "SPDXRef-Image";
const NOASSERTION: &str = "NOASSERTION";

fn package_id(path: &str) -> String {
    format!("SPDXRef-nix-{}", store_hash(path))
}

fn relationship(from: &str, kind: &'static str, to: &str) -> Relationship {
    Relationship { spdx_element_id: from.to_string(), relationship_type: kind, related_spdx_element: to.to_string() }
}

pub(crate) fn render(doc: &Document, stamp: &Stamp) -> serde_json::Result<Vec<u8>> {
    let tool = format!("Tool: nixctr-{}", doc.tool_version);
    let annotations = doc
        .facts()
        .into_iter()
        .chain(doc.meta.commit.as_deref().map(|c| ("nixctr:git:commit", c.to_string())))
        .chain([("nixctr:platform", doc.closure.platform.clone())])
        .map(|(name, value)| Annotation {
            annotation_date: stamp.timestamp.clone(),
            annotation_type: "OTHER",
            annotator: tool.clone(),
            comment: format!("{name}={value}"),
        })
        .collect();
    let mut packages = vec![Package {
        name: &doc.meta.name,
        spdx_id: IMAGE_ID.to_string(),
        version_info: doc.meta.app_version.as_deref(),
        purpose: "CONTAINER",
        download_location: NOASSERTION,
        files_analyzed: false,
        license_concluded: NOASSERTION,
        license_declared: NOASSERTION.to_string(),
        copyright_text: NOASSERTION,
        checksums: doc
            .image_sha256()
            .map(|value| vec![Checksum { algorithm: "SHA256", checksum_value: value }])
            .unwrap_or_default(),
        external_refs: Vec::new(),
        comment: Some(format!("image config digest {}", doc.closure.image_digest)),
        annotations,
    }];
    packages.extend(doc.closure.components.iter().map(|c| Package {
        name: &c.name,
        spdx_id: package_id(&c.path),
        version_info: c.version.as_deref(),
        purpose: "LIBRARY",
        download_location: NOASSERTION,
        files_analyzed: false,
        license_concluded: NOASSERTION,
        license_declared: c.licence_expression().unwrap_or_else(|| NOASSERTION.to_string()),
        copyright_text: NOASSERTION,
        checksums: c.sha256.iter().map(|h| Checksum { algorithm: "SHA256", checksum_value: h.clone() }).collect(),
        external_refs: vec![ExternalRef {
            reference_category: "PACKAGE-MANAGER",
            reference_type: "purl",
            reference_locator: c.purl(),
        }],
        comment: Some(format!("nix store path {} (NAR hash {}, {} bytes)", c.path, c.nar_hash, c.nar_size)),
        annotations: Vec::new(),
    }));
    let mut relationships = vec![relationship("SPDXRef-DOCUMENT", "DESCRIBES", IMAGE_ID)];
    relationships
        .extend(doc.closure.components.iter().map(|c| relationship(IMAGE_ID, "CONTAINS", &package_id(&c.path))));
    relationships.extend(doc.closure.roots.iter().map(|r| relationship(IMAGE_ID, "DEPENDS_ON", &package_id(r))));
    for c in &doc.closure.components {
        let from = package_id(&c.path);
        relationships.extend(c.references.iter().map(|r| relationship(&from, "DEPENDS_ON", &package_id(r))));
    }
    let document = SpdxDocument {
        spdx_version: "SPDX-2.3",
        data_license: "CC0-1.0",
        spdx_id: "SPDXRef-DOCUMENT",
        name: format!("{} (nixctr)", doc.meta.name),
        document_namespace: format!("https://nixctr.invalid/spdx/{}/{}", percent_encode(&doc.meta.name), stamp.serial),
        creation_info: CreationInfo { created: stamp.timestamp.clone(), creators: vec![tool.clone()] },
        packages,
        relationships,
    };
    let mut bytes = serde_json::to_vec_pretty(&document)?;
    bytes.push(b'\n');
    Ok(bytes)
}
