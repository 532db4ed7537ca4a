//! `nixctr sbom` against the real engines and nix: the documents validate with the formats'
//! own tools (cyclonedx-python-lib's JSON validator, spdx-tools' `pyspdxtools`, from the venv
//! `scripts/setup.sh` makes), and cover every store path the archive's layers hold, read here
//! with tar of our own.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::harness::*;

/// The venv with the validators (`NIXCTR_SBOM_VENV`, as setup.sh prints it).
fn venv() -> PathBuf {
    let dir = PathBuf::from(std::env::var("NIXCTR_SBOM_VENV").unwrap_or_else(|_| "/opt/nixctr-test/sbom-venv".into()));
    assert!(dir.join("bin/pyspdxtools").is_file(), "no SBOM validators in {}: {SETUP_HINT}", dir.display());
    dir
}

const CYCLONEDX_CHECK: &str = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
errors = JsonStrictValidator(SchemaVersion.V1_6).validate_str(open(sys.argv[1]).read())
if errors is not None:
    print(errors)
    sys.exit(1)
"#;

fn assert_valid_cyclonedx(file: &Path) {
    let out = Cmd::tool(venv().join("bin/python").to_str().unwrap()).arg("-c").arg(CYCLONEDX_CHECK).arg(file).run();
    assert_eq!(out.code(), Some(0), "{} is not CycloneDX 1.6: {}{}", file.display(), out.stdout(), out.stderr());
}

fn assert_valid_spdx(file: &Path) {
    let out = Cmd::tool(venv().join("bin/pyspdxtools").to_str().unwrap()).arg("-i").arg(file).run();
    assert_eq!(out.code(), Some(0), "{} is not SPDX 2.3: {}{}", file.display(), out.stdout(), out.stderr());
}

/// The `/nix/store/HASH-NAME` paths in the layers of a docker-archive (gzip or not).
fn store_paths_in_layers(archive: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(archive).unwrap();
    let plain: Box<dyn Read> = if bytes[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(&bytes[..]))
    } else {
        Box::new(&bytes[..])
    };
    let mut entries: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for entry in tar::Archive::new(plain).entries().unwrap() {
        let mut entry = entry.unwrap();
        let name = entry.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        entries.insert(name, data);
    }
    let manifest: serde_json::Value = serde_json::from_slice(&entries["manifest.json"]).unwrap();
    let mut paths = BTreeSet::new();
    for layer in manifest[0]["Layers"].as_array().unwrap() {
        let data = &entries[layer.as_str().unwrap()];
        for entry in tar::Archive::new(&data[..]).entries().unwrap() {
            let entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut parts = name.trim_start_matches("./").split('/');
            if let (Some("nix"), Some("store"), Some(top)) = (parts.next(), parts.next(), parts.next()) {
                if !top.is_empty() {
                    paths.insert(format!("/nix/store/{top}"));
                }
            }
        }
    }
    paths
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn sbom_covers_the_layers_validates_and_names_the_app_version() {
    venv();
    for engine in engines() {
        let fx = Fixture::new();
        let commit = fx.git_commit_all();
        let out = fx.nixctr(Some(&engine)).args(["sbom", "hello"]).run();
        out.success();
        assert_eq!(out.stdout().trim(), "hello.cdx.json", "{}", engine.name);
        let cdx_file = fx.project().join("hello.cdx.json");
        assert_valid_cyclonedx(&cdx_file);
        assert_no_containers_left(&engine, &out);

        let in_layers = store_paths_in_layers(&fx.project().join("hello.tar.gz"));
        assert!(in_layers.len() >= 2, "{}: hello and busybox at least: {in_layers:?}", engine.name);
        let bom = json(&cdx_file);
        let components = bom["components"].as_array().unwrap();
        let refs: BTreeSet<String> = components.iter().map(|c| c["bom-ref"].as_str().unwrap().to_string()).collect();
        assert_eq!(refs, in_layers, "{}: one component per store path of the layers", engine.name);

        let version = fx.nixctr(Some(&engine)).args(["version", "hello"]).run();
        version.success();
        assert_eq!(bom["metadata"]["component"]["version"].as_str(), Some(version.stdout().trim()), "{}", engine.name);
        let props: BTreeMap<&str, &str> = bom["metadata"]["properties"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap(), p["value"].as_str().unwrap()))
            .collect();
        assert_eq!(bom["metadata"]["component"]["properties"][1]["value"], commit.as_str(), "the git commit");
        assert!(props["nixctr:nixpkgs:store_path"].starts_with("/nix/store/"), "{props:?}");
        assert!(props["nixctr:nixpkgs:nar_hash"].starts_with("sha256-"), "{props:?}");
        assert!(props["nixctr:nix_image:id"].starts_with("sha256:"), "{props:?}");

        let hello = components.iter().find(|c| c["name"] == "hello").expect("a hello component");
        assert_eq!(hello["version"], "2.12.1");
        assert_eq!(hello["purl"], "pkg:nix/hello@2.12.1");
        assert_eq!(hello["licenses"][0]["expression"], "GPL-3.0-or-later");
        // The component hash is the NAR hash the property holds, as hex.
        let nar = hello["properties"].as_array().unwrap().iter().find(|p| p["name"] == "nix:nar_hash").unwrap();
        let b64 = nar["value"].as_str().unwrap().strip_prefix("sha256-").expect("an SRI NAR hash");
        let hex: String =
            base64::engine::general_purpose::STANDARD.decode(b64).unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hello["hashes"][0]["content"].as_str(), Some(hex.as_str()));
        // hello refers to busybox (its #! line): the graph says so.
        let busybox = components.iter().find(|c| c["name"] == "busybox").expect("a busybox component");
        let hello_deps = bom["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["ref"] == hello["bom-ref"])
            .expect("hello's deps");
        assert!(hello_deps["dependsOn"].as_array().unwrap().contains(&busybox["bom-ref"]), "{hello_deps}");

        // SPDX, to a file named with -o: the same store paths.
        let out = fx.nixctr(Some(&engine)).args(["-q", "sbom", "hello", "--format", "spdx", "-o", "hello.json"]).run();
        out.success();
        let spdx_file = fx.project().join("hello.json");
        assert_valid_spdx(&spdx_file);
        let doc = json(&spdx_file);
        let packages = doc["packages"].as_array().unwrap();
        let described: BTreeSet<String> = packages
            .iter()
            .filter_map(|p| p["comment"].as_str()?.strip_prefix("nix store path ")?.split(' ').next().map(String::from))
            .collect();
        assert_eq!(described, in_layers, "{}: one SPDX package per store path", engine.name);
        assert_eq!(packages[0]["versionInfo"].as_str(), Some(version.stdout().trim()));
        assert_no_containers_left(&engine, &out);
    }
}

#[test]
fn sbom_of_several_containers_writes_one_file_each_into_a_directory() {
    venv();
    // How files are named is the engine's business in no way: one engine is enough.
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    std::fs::create_dir(fx.project().join("sboms")).unwrap();
    let out = fx.nixctr(Some(engine)).args(["-q", "sbom", "hello", "curl", "-o", "sboms"]).run();
    out.success();
    for name in ["hello", "curl"] {
        let file = fx.project().join(format!("sboms/{name}.cdx.json"));
        assert_valid_cyclonedx(&file);
        let refs: BTreeSet<String> = json(&file)["components"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["bom-ref"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(refs, store_paths_in_layers(&fx.project().join(format!("{name}.tar.gz"))), "{name}");
    }
    assert_eq!(out.stdout().lines().count(), 2, "{}", out.stdout());
}

/// The SBOM is read in the container that built the image: a throwaway store is no obstacle.
#[test]
fn sbom_with_a_throwaway_store_covers_the_layers() {
    venv();
    let engines = engines();
    let engine = engines.by_name("podman");
    let fx = Fixture::new();
    let out = fx.nixctr(Some(engine)).args(["-q", "--no-cache", "sbom", "hello", "-o", "h.cdx.json"]).run();
    out.success();
    let file = fx.project().join("h.cdx.json");
    assert_valid_cyclonedx(&file);
    let refs: BTreeSet<String> = json(&file)["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bom-ref"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(refs, store_paths_in_layers(&fx.project().join("hello.tar.gz")));
    assert_no_containers_left(engine, &out);
}

#[test]
fn sbom_refuses_bad_input_before_building() {
    let fx = Fixture::new();
    let out = fx.nixctr(None).args(["sbom", "hello", "--format", "xml"]).run();
    out.assert_exit(2).stderr_has("'xml'");

    let out = fx.nixctr(None).args(["sbom", "hello", "-o", "/no/such/dir/hello.cdx.json"]).run();
    out.assert_exit(1).stderr_has("/no/such/dir does not exist");

    // A file, not a directory, for two SBOMs.
    let out = fx.nixctr(None).args(["sbom", "hello", "curl", "-o", "one.json"]).run();
    out.assert_exit(1).stderr_has("\"one.json\" names one file, but 2 SBOMs");

    let out = fx.nixctr(None).args(["sbom", "hello", "-o", "-"]).run();
    out.assert_exit(1).stderr_has("-o -");

    let out = fx.nixctr(None).args(["sbom", "nosuch"]).run();
    out.assert_exit(1).stderr_has("no containers/nosuch/default.nix");

    // Nothing was built or written.
    let names: Vec<String> = std::fs::read_dir(fx.project())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with(".json") && !n.ends_with(".tar.gz") && !n.contains(".part")),
        "{names:?}"
    );
}
