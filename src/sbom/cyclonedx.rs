//! CycloneDX 1.6 JSON: the image as `metadata.component` (type `container`), one `library`
//! component per store path (its `bom-ref` is the store path), and the store's references as
//! `dependencies`. nixctr's own facts (store path, NAR hash, nixpkgs, commit) are properties
//! in the `nixctr:` and `nix:` namespaces.

use serde::Serialize;

use super::{Document, Stamp};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom<'a> {
    bom_format: &'static str,
    spec_version: &'static str,
    serial_number: String,
    version: u32,
    metadata: Metadata<'a>,
    components: Vec<Component<'a>>,
    dependencies: Vec<Dependency<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    timestamp: &'a str,
    tools: Tools,
    component: Component<'a>,
    properties: Vec<Property>,
}

#[derive(Serialize)]
struct Tools {
    components: Vec<Tool>,
}

#[derive(Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
    version: &'static str,
}

#[derive(Serialize)]
struct Component<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    licenses: Vec<Licence>,
    #[serde(skip_serializing_if = "Option::is_none")]
    purl: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    properties: Vec<Property>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

/// One SPDX expression: nixpkgs' list of licences, all of which apply.
#[derive(Serialize)]
struct Licence {
    expression: String,
}

#[derive(Serialize)]
struct Property {
    name: String,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dependency<'a> {
    #[serde(rename = "ref")]
    reference: &'a str,
    depends_on: Vec<&'a str>,
}

fn property(name: &str, value: impl Into<String>) -> Property {
    Property { name: name.to_string(), value: value.into() }
}

/// The image's own `bom-ref`.
const IMAGE_REF: &str = "nixctr:image";

pub(crate) fn render(doc: &Document, stamp: &Stamp) -> serde_json::Result<Vec<u8>> {
    let mut image_properties = vec![property("nixctr:platform", &doc.closure.platform)];
    if let Some(commit) = &doc.meta.commit {
        image_properties.push(property("nixctr:git:commit", commit));
    }
    let image = Component {
        kind: "container",
        bom_ref: IMAGE_REF,
        name: &doc.meta.name,
        version: doc.meta.app_version.as_deref(),
        hashes: doc.image_sha256().map(|content| vec![Hash { alg: "SHA-256", content }]).unwrap_or_default(),
        licenses: Vec::new(),
        purl: None,
        properties: image_properties,
    };
    let components = doc
        .closure
        .components
        .iter()
        .map(|c| {
            let mut properties = vec![
                property("nix:store_path", &c.path),
                property("nix:nar_hash", &c.nar_hash),
                property("nix:nar_size", c.nar_size.to_string()),
            ];
            if let Some(deriver) = &c.deriver {
                properties.push(property("nix:deriver", deriver));
            }
            Component {
                kind: "library",
                bom_ref: &c.path,
                name: &c.name,
                version: c.version.as_deref(),
                hashes: c.sha256.iter().map(|h| Hash { alg: "SHA-256", content: h.clone() }).collect(),
                licenses: c.licence_expression().map(|expression| vec![Licence { expression }]).unwrap_or_default(),
                purl: Some(c.purl()),
                properties,
            }
        })
        .collect();
    let mut dependencies =
        vec![Dependency { reference: IMAGE_REF, depends_on: doc.closure.roots.iter().map(String::as_str).collect() }];
    dependencies.extend(
        doc.closure
            .components
            .iter()
            .map(|c| Dependency { reference: &c.path, depends_on: c.references.iter().map(String::as_str).collect() }),
    );
    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.6",
        serial_number: format!("urn:uuid:{}", stamp.serial),
        version: 1,
        metadata: Metadata {
            timestamp: &stamp.timestamp,
            tools: Tools { components: vec![Tool { kind: "application", name: "nixctr", version: doc.tool_version }] },
            component: image,
            properties: doc.facts().into_iter().map(|(name, value)| property(name, value)).collect(),
        },
        components,
        dependencies,
    };
    let mut bytes = serde_json::to_vec_pretty(&bom)?;
    bytes.push(b'\n');
    Ok(bytes)
}
