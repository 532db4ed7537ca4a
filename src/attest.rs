//! in-toto statements about a pushed image: the SLSA v1 provenance of a nixctr build (what
//! it was built from, by what, when), and the statement an SBOM becomes when it is signed.
//! Pure data: the facts come from the build, the bytes go to `attachments`.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::sbom::names::{rfc3339, sha256_hex};
use serde_json::{json, Value};

pub(crate) const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub(crate) const SLSA_PROVENANCE: &str = "https://slsa.dev/provenance/v1";
/// How nixctr builds: `containers/NAME/default.nix` evaluated and realised by nix in a
/// container of the nix image, on a Docker or Podman engine.
pub(crate) const BUILD_TYPE: &str = "https://nixctr.dev/buildtypes/nix-container/v1";
pub(crate) const BUILDER_ID: &str = "https://nixctr.dev/builder/v1";
/// The annotation naming an attestation's predicate, on its manifest (as buildx and cosign
/// name it).
pub(crate) const PREDICATE_TYPE_ANNOTATION: &str = "in-toto.io/predicate-type";

/// What a provenance statement says about one image.
#[derive(Debug, Clone)]
pub(crate) struct BuildFacts {
    /// The container's name and its file (`containers/NAME/default.nix`).
    pub container: String,
    pub platform: Option<String>,
    pub derivation: String,
    /// The git repository's address (when known) and the commit.
    pub repository: Option<String>,
    pub commit: Option<String>,
    /// The nixpkgs asked for, its store path, NAR hash (`sha256-…`) and revision.
    pub nixpkgs: String,
    pub nixpkgs_path: String,
    pub nixpkgs_nar_hash: Option<String>,
    pub nixpkgs_revision: Option<String>,
    /// The nix image's name and the engine's ID (the digest of its config).
    pub nix_image: String,
    pub nix_image_id: String,
    /// The engine's address.
    pub engine: String,
    pub started: SystemTime,
    pub finished: SystemTime,
}

/// An in-toto v1 statement about the manifest `digest` of `name` (`host/path`).
pub(crate) fn statement(name: &str, digest: &str, predicate_type: &str, predicate: Value) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let statement = json!({
        "_type": STATEMENT_TYPE,
        "subject": [{ "name": name, "digest": { "sha256": hex } }],
        "predicateType": predicate_type,
        "predicate": predicate,
    });
    serde_json::to_vec(&statement).unwrap_or_default()
}

/// The SLSA v1 provenance predicate of a build.
pub(crate) fn provenance(facts: &BuildFacts) -> Value {
    let mut dependencies = Vec::new();
    if let Some(commit) = &facts.commit {
        let mut source = json!({ "name": "source", "digest": { "gitCommit": commit } });
        if let Some(repository) = &facts.repository {
            source["uri"] = json!(format!("git+{repository}@{commit}"));
        }
        dependencies.push(source);
    }
    // A local directory is written as the flake reference nix would take for it.
    let uri = if facts.nixpkgs.starts_with('/') { format!("path:{}", facts.nixpkgs) } else { facts.nixpkgs.clone() };
    let mut nixpkgs = json!({
        "name": "nixpkgs",
        "uri": uri,
        "annotations": { "storePath": facts.nixpkgs_path },
    });
    if let Some(nar) = &facts.nixpkgs_nar_hash {
        nixpkgs["annotations"]["narHash"] = json!(nar);
        if let Ok(hex) = sha256_hex(nar) {
            nixpkgs["digest"] = json!({ "sha256": hex });
        }
    }
    if let Some(rev) = &facts.nixpkgs_revision {
        nixpkgs["annotations"]["revision"] = json!(rev);
        nixpkgs["digest"]["gitCommit"] = json!(rev);
    }
    dependencies.push(nixpkgs);
    // The engine's image ID: the digest of the image's config, which names its layers.
    let mut image = json!({ "name": "nix-image", "uri": format!("docker-image://{}", facts.nix_image) });
    if let Some(hex) = facts.nix_image_id.strip_prefix("sha256:") {
        image["digest"] = json!({ "sha256": hex });
        image["annotations"] = json!({ "imageId": facts.nix_image_id });
    }
    dependencies.push(image);
    let mut external = json!({ "container": format!("containers/{}/default.nix", facts.container) });
    if let Some(platform) = &facts.platform {
        external["platform"] = json!(platform);
    }
    json!({
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": external,
            "internalParameters": { "derivation": facts.derivation },
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {
                "id": BUILDER_ID,
                "version": { "nixctr": env!("CARGO_PKG_VERSION") },
                "builderDependencies": [{ "name": "engine", "uri": facts.engine }],
            },
            "metadata": {
                "startedOn": rfc3339(epoch_seconds(facts.started)),
                "finishedOn": rfc3339(epoch_seconds(facts.finished)),
            },
        },
    })
}

/// The predicate type of an SBOM of `media_type`, as cosign names it.
pub(crate) fn sbom_predicate_type(media_type: &str) -> &'static str {
    if media_type.contains("spdx") {
        "https://spdx.dev/Document"
    } else {
        "https://cyclonedx.org/bom"
    }
}

fn epoch_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    #[test]
    fn provenance_names_what_the_build_came_from() {
        let facts = BuildFacts {
            container: "ntfy".into(),
            platform: Some("linux/amd64".into()),
            derivation: "/nix/store/x-ntfy.drv".into(),
            repository: Some("https://git.example/team/app".into()),
            commit: Some("abc".into()),
            nixpkgs: "nixpkgs".into(),
            nixpkgs_path: "/nix/store/y-source".into(),
            nixpkgs_nar_hash: Some(format!("sha256-{}", base64::engine::general_purpose::STANDARD.encode([1u8; 32]))),
            nixpkgs_revision: None,
            nix_image: "nixos/nix:2.33.3".into(),
            nix_image_id: format!("sha256:{}", "0f".repeat(32)),
            engine: "unix:///var/run/docker.sock".into(),
            started: UNIX_EPOCH,
            finished: UNIX_EPOCH,
        };
        let bytes = statement("r:5000/ntfy", "sha256:ab", SLSA_PROVENANCE, provenance(&facts));
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["subject"][0]["digest"]["sha256"], "ab");
        let definition = &value["predicate"]["buildDefinition"];
        assert_eq!(definition["internalParameters"]["derivation"], "/nix/store/x-ntfy.drv");
        let deps = definition["resolvedDependencies"].as_array().expect("deps");
        assert_eq!(deps[0]["digest"]["gitCommit"], "abc");
        assert_eq!(deps[1]["digest"]["sha256"], "01".repeat(32));
        assert_eq!(deps[2]["digest"]["sha256"], "0f".repeat(32));
    }
}
