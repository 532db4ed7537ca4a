//! The SBOM model and both formats, on in-memory answers of the store.

use super::*;

const HELLO: &str = "/nix/store/0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-hello-2.12.1";
const BUSYBOX: &str = "/nix/store/1a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-busybox-1.35.0";
const NOVERS: &str = "/nix/store/2a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-novers";
const HASH: &str = "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=";
const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn info(path: &str, references: &[&str], deriver: Option<&str>) -> PathInfo {
    PathInfo {
        path: path.to_string(),
        nar_hash: HASH.to_string(),
        nar_size: 100,
        references: references.iter().map(|r| r.to_string()).collect(),
        deriver: deriver.map(str::to_string),
    }
}

fn facts() -> StoreFacts {
    let mut derivers = BTreeMap::new();
    derivers.insert(
        "/nix/store/x-hello.drv".to_string(),
        DrvNames { name: Some("hello-2.12.1".into()), pname: Some("hello".into()), version: Some("2.12.1".into()) },
    );
    // No pname: the name comes from the path, the version from the derivation.
    derivers.insert(
        "/nix/store/x-busybox.drv".to_string(),
        DrvNames { name: Some("busybox-1.35.0".into()), pname: None, version: Some("1.35.0".into()) },
    );
    let mut licences = BTreeMap::new();
    licences.insert(HELLO.to_string(), vec!["GPL-3.0-or-later".to_string()]);
    licences.insert(BUSYBOX.to_string(), vec!["GPL-2.0-only".to_string(), "MIT".to_string()]);
    StoreFacts {
        infos: vec![
            info(
                HELLO,
                &[BUSYBOX, "/nix/store/9a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q-not-in-image"],
                Some("/nix/store/x-hello.drv"),
            ),
            info(BUSYBOX, &[], Some("/nix/store/x-busybox.drv")),
            info(NOVERS, &[], Some("/nix/store/missing-novers.drv")),
        ],
        derivers,
        licences,
    }
}

fn document() -> Document {
    let (components, roots) = components(&facts()).unwrap();
    Document {
        meta: Metadata { name: "hello".into(), app_version: Some("2.12.1".into()), commit: Some("a".repeat(40)) },
        tool_version: "0.0.0-test",
        closure: Closure {
            platform: "linux/amd64".into(),
            image_digest: format!("sha256:{}", "c".repeat(64)),
            nixpkgs: ResolvedNixpkgs {
                reference: "github:NixOS/nixpkgs/nixos-25.05".into(),
                path: "/nix/store/s-source".into(),
                nar_hash: Some("sha256-AAAA".into()),
                revision: Some("0123".into()),
            },
            nix_image: NixImage {
                name: "nixos/nix:2.33.3".into(),
                id: format!("sha256:{}", "d".repeat(64)),
                digests: vec![format!("nixos/nix@sha256:{}", "e".repeat(64))],
            },
            components,
            roots,
        },
    }
}

fn json(sbom: &Sbom) -> serde_json::Value {
    serde_json::from_slice(&sbom.bytes).unwrap()
}

#[test]
fn components_are_named_by_their_deriver_else_by_their_path() {
    let (components, roots) = components(&facts()).unwrap();
    let named: Vec<(&str, Option<&str>)> = components.iter().map(|c| (c.name.as_str(), c.version.as_deref())).collect();
    assert_eq!(named, vec![("hello", Some("2.12.1")), ("busybox", Some("1.35.0")), ("novers", None)]);
    assert_eq!(components[0].references, vec![BUSYBOX.to_string()], "references outside the image are left out");
    assert_eq!(components[0].sha256.as_deref(), Some(HEX));
    assert_eq!(components[0].purl(), "pkg:nix/hello@2.12.1");
    assert_eq!(components[2].purl(), "pkg:nix/novers");
    assert_eq!(components[1].licence_expression().as_deref(), Some("(GPL-2.0-only AND MIT)"));
    assert_eq!(roots, vec![HELLO.to_string(), NOVERS.to_string()], "busybox is referred to by hello");
}

#[test]
fn cyclonedx_has_every_store_path_its_hash_and_graph() {
    let bom = json(&document().render_at(Format::CycloneDx, Some(1)).unwrap());
    assert_eq!(bom["bomFormat"], "CycloneDX");
    assert_eq!(bom["specVersion"], "1.6");
    assert_eq!(bom["metadata"]["timestamp"], "1970-01-01T00:00:01Z");
    assert_eq!(bom["metadata"]["component"]["type"], "container");
    assert_eq!(bom["metadata"]["component"]["version"], "2.12.1");
    let components = bom["components"].as_array().unwrap();
    assert_eq!(components.len(), 3);
    let hello = &components[0];
    assert_eq!(hello["bom-ref"], HELLO);
    assert_eq!(hello["purl"], "pkg:nix/hello@2.12.1");
    assert_eq!(hello["hashes"][0]["content"], HEX);
    assert_eq!(hello["licenses"][0]["expression"], "GPL-3.0-or-later");
    assert!(components[2].get("licenses").is_none() && components[2].get("version").is_none());
    let deps = bom["dependencies"].as_array().unwrap();
    assert_eq!(deps[0]["dependsOn"], serde_json::json!([HELLO, NOVERS]));
    assert_eq!(deps[1], serde_json::json!({"ref": HELLO, "dependsOn": [BUSYBOX]}));
    let props: BTreeMap<String, String> = bom["metadata"]["properties"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_string(), p["value"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(props["nixctr:nixpkgs:revision"], "0123");
    assert_eq!(props["nixctr:nixpkgs:nar_hash"], "sha256-AAAA");
    assert_eq!(props["nixctr:nix_image"], "nixos/nix:2.33.3");
    assert!(props["nixctr:nix_image:digest"].starts_with("nixos/nix@sha256:"));
}

#[test]
fn spdx_has_a_package_per_store_path_and_their_relationships() {
    let doc = json(&document().render_at(Format::Spdx, Some(1)).unwrap());
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");
    let packages = doc["packages"].as_array().unwrap();
    assert_eq!(packages.len(), 4, "the image and its three store paths");
    assert_eq!(packages[1]["SPDXID"], "SPDXRef-nix-0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q");
    assert_eq!(packages[1]["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(packages[3]["licenseDeclared"], "NOASSERTION");
    assert_eq!(packages[1]["externalRefs"][0]["referenceLocator"], "pkg:nix/hello@2.12.1");
    let relations: Vec<(String, String, String)> = doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap().to_string();
            (s("spdxElementId"), s("relationshipType"), s("relatedSpdxElement"))
        })
        .collect();
    let depends = (
        "SPDXRef-nix-0a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q".to_string(),
        "DEPENDS_ON".to_string(),
        "SPDXRef-nix-1a1b2c3d4e5f6g7h8i9j0k1l2m3n4p5q".to_string(),
    );
    assert!(relations.contains(&depends), "{relations:?}");
    assert_eq!(relations.iter().filter(|r| r.1 == "CONTAINS").count(), 3);
}

#[test]
fn the_same_inputs_give_the_same_bytes_but_for_the_stamp() {
    for format in [Format::CycloneDx, Format::Spdx] {
        let a = document().render_at(format, Some(7)).unwrap();
        let b = document().render_at(format, Some(7)).unwrap();
        assert_eq!(a.bytes, b.bytes, "{format:?} with SOURCE_DATE_EPOCH");
        let c = document().render_at(format, None).unwrap();
        let d = document().render_at(format, None).unwrap();
        assert_ne!(c.bytes, d.bytes, "{format:?}: a fresh serial each time");
        let mut other = document();
        other.meta.app_version = Some("2.12.2".into());
        assert_ne!(other.render_at(format, Some(7)).unwrap().bytes, a.bytes, "the serial follows the content");
    }
}
