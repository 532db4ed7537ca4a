//! `publish --sign-key --provenance` and `nixctr verify`, against the local registry (CNCF
//! distribution 2.8, which has no referrers API: the `sha256-HEX` fallback tag is used).
//! What nixctr pushed is read back independently of it: Python's `cryptography` checks the
//! signatures as cosign's format defines them, skopeo reads the image. The attachments are
//! registry-side work, so one engine (Docker) builds.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::harness::*;
use crate::registry_harness::{error_answer, Proxy, Registry, TestImage};

/// An ECDSA P-256 key pair made with Python's `cryptography`: PKCS#8 PEM (mode 0600) and
/// the SubjectPublicKeyInfo PEM cosign writes as `cosign.pub`.
fn key_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (private, public) = (dir.join(format!("{name}.key")), dir.join(format!("{name}.pub")));
    let script = r#"
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
k = ec.generate_private_key(ec.SECP256R1())
open(sys.argv[1], "wb").write(k.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
open(sys.argv[2], "wb").write(k.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
"#;
    Cmd::tool("python3").arg("-c").arg(script).arg(&private).arg(&public).run().success();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (private, public)
}

/// Checks, without nixctr, what cosign would: the `.sig` manifest of DIGEST holds one simple
/// signing payload naming DIGEST and the repository, whose ECDSA signature (the layer
/// annotation) verifies with the public key. Then the fallback referrers index: each entry's
/// manifest has DIGEST as `subject`, and a signed provenance envelope verifies (DSSE PAE)
/// and says where the build came from. Prints the artifact types listed, as JSON.
const COSIGN_CHECK: &str = r#"
import sys, json, base64, urllib.request
from cryptography.hazmat.primitives import serialization, hashes
from cryptography.hazmat.primitives.asymmetric import ec
host, repo, digest, pubfile, commit = sys.argv[1:6]
def get(path, accept=None):
    req = urllib.request.Request(f"http://{host}/v2/{repo}/{path}")
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req) as r:
        return r.read()
key = serialization.load_pem_public_key(open(pubfile, "rb").read())
tag = digest.replace(":", "-")
sig_manifest = json.loads(get(f"manifests/{tag}.sig", "application/vnd.oci.image.manifest.v1+json"))
layers = [l for l in sig_manifest["layers"] if l["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"]
assert len(layers) == 1, layers
payload = get(f"blobs/{layers[0]['digest']}")
p = json.loads(payload)
assert p["critical"]["image"]["docker-manifest-digest"] == digest, p
assert p["critical"]["type"] == "cosign container image signature", p
assert p["critical"]["identity"]["docker-reference"] == f"{host}/{repo}", p
sig = base64.b64decode(layers[0]["annotations"]["dev.cosignproject.cosign/signature"])
key.verify(sig, payload, ec.ECDSA(hashes.SHA256()))
index = json.loads(get(f"manifests/{tag}", "application/vnd.oci.image.index.v1+json"))
assert index["mediaType"] == "application/vnd.oci.image.index.v1+json", index
for m in index["manifests"]:
    art = json.loads(get(f"manifests/{m['digest']}", "application/vnd.oci.image.manifest.v1+json"))
    assert art["subject"]["digest"] == digest, art
    assert art.get("artifactType") == m.get("artifactType"), (art, m)
    if m.get("artifactType") == "application/vnd.dsse.envelope.v1+json":
        assert art["config"]["mediaType"] == "application/vnd.oci.empty.v1+json", art
        env = json.loads(get(f"blobs/{art['layers'][0]['digest']}"))
        body = base64.b64decode(env["payload"])
        kind = env["payloadType"].encode()
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)
        key.verify(base64.b64decode(env["signatures"][0]["sig"]), pae, ec.ECDSA(hashes.SHA256()))
        st = json.loads(body)
        assert st["_type"] == "https://in-toto.io/Statement/v1", st
        assert m["annotations"]["in-toto.io/predicate-type"] == st["predicateType"], m
        assert st["subject"][0]["digest"]["sha256"] == digest.split(":")[1], st
        if st["predicateType"] == "https://cyclonedx.org/bom":
            bom = st["predicate"]
            assert (bom["bomFormat"], bom["specVersion"]) == ("CycloneDX", "1.6"), bom
            assert bom["metadata"]["component"]["type"] == "container", bom["metadata"]
            props = {p["name"]: p["value"] for p in bom["metadata"]["component"]["properties"]}
            assert props.get("nixctr:git:commit") == commit, props
            paths = [c["bom-ref"] for c in bom["components"]]
            assert paths and all(p.startswith("/nix/store/") for p in paths), paths
            assert all(c["purl"].startswith("pkg:nix/") for c in bom["components"]), bom["components"]
            print("sbom:" + ",".join(sorted(c["name"] for c in bom["components"])), file=sys.stderr)
            continue
        assert st["predicateType"] == "https://slsa.dev/provenance/v1", st
        bd = st["predicate"]["buildDefinition"]
        assert bd["externalParameters"]["container"] == "containers/ntfy/default.nix", bd
        assert bd["internalParameters"]["derivation"].endswith(".drv"), bd
        deps = bd["resolvedDependencies"]
        assert any(d.get("digest", {}).get("gitCommit") == commit for d in deps), deps
        assert any(d.get("name") == "nixpkgs" and d["annotations"]["storePath"].startswith("/nix/store/") for d in deps), deps
        assert any(d.get("name") == "nix-image" and len(d["digest"]["sha256"]) == 64 for d in deps), deps
        run = st["predicate"]["runDetails"]
        assert run["metadata"]["startedOn"] <= run["metadata"]["finishedOn"], run
print(json.dumps(sorted(m.get("artifactType") for m in index["manifests"])))
"#;

/// Flips a byte of the signature in the `.sig` manifest of DIGEST and puts it back.
const TAMPER: &str = r#"
import sys, json, base64, urllib.request
host, repo, digest = sys.argv[1:4]
url = f"http://{host}/v2/{repo}/manifests/{digest.replace(':', '-')}.sig"
kind = "application/vnd.oci.image.manifest.v1+json"
req = urllib.request.Request(url, headers={"Accept": kind})
manifest = json.loads(urllib.request.urlopen(req).read())
annotations = manifest["layers"][0]["annotations"]
sig = bytearray(base64.b64decode(annotations["dev.cosignproject.cosign/signature"]))
sig[-1] ^= 0x01
annotations["dev.cosignproject.cosign/signature"] = base64.b64encode(bytes(sig)).decode()
put = urllib.request.Request(url, data=json.dumps(manifest).encode(), method="PUT", headers={"Content-Type": kind})
urllib.request.urlopen(put)
"#;

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_str(out.stdout().trim()).unwrap_or_else(|e| panic!("{e}: {}", out.stdout()))
}

#[test]
fn publish_signs_and_attests_as_cosign_reads_it_and_verify_checks_it() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    let head = fx.git_commit_all();
    let registry = Registry::plain();
    let host = registry.host();
    let keys = tempfile::tempdir().expect("temp dir");
    let (private, public) = key_pair(keys.path(), "cosign");
    let publish = || {
        fx.nixctr(Some(engine))
            .args(["publish", "ntfy", "--registry", &host, "--namespace", "team", "--json", "--provenance", "--sbom"])
            .env("NIXCTR_SIGN_KEY_FILE", &private)
            .run()
    };
    let out = publish();
    out.success();
    let json = json_of(&out);
    assert_eq!(json["status"], "pushed", "{json}");
    assert_eq!(json["attached"], serde_json::json!(["provenance", "sbom", "signature"]), "{json}");
    let digest = json["digest"].as_str().expect("digest").to_string();
    let tag = format!("v2.17.0-{}-nix", &head[..7]);
    let inspected = registry.skopeo_inspect(&format!("team/ntfy:{tag}"), false).expect("skopeo reads the image");
    assert_eq!(inspected["Digest"], digest.as_str());
    assert!(!out.stderr().contains("BEGIN"), "the key is never shown: {}", out.stderr());

    let check = || {
        let out = Cmd::tool("python3")
            .arg("-c")
            .arg(COSIGN_CHECK)
            .args([&host, "team/ntfy", &digest])
            .arg(&public)
            .arg(&head)
            .run();
        out.success();
        // The SBOM lists the image's store paths: ntfy's own among them.
        assert!(out.stderr().contains("sbom:") && out.stderr().contains("ntfy"), "{}", out.stderr());
        out.stdout().trim().to_string()
    };
    let types = r#"["application/vnd.dev.cosign.artifact.sig.v1+json", "application/vnd.dsse.envelope.v1+json", "application/vnd.dsse.envelope.v1+json"]"#;
    assert_eq!(check(), types);

    let reference = format!("{host}/team/ntfy:{tag}");
    let verified = fx.nixctr(None).args(["verify", &reference, "--key"]).arg(&public).run();
    verified.success();
    let said = verified.stdout();
    assert!(said.contains(&format!("{host}/team/ntfy@{digest}: signed by")), "{said}");
    assert!(said.contains("provenance: https://slsa.dev/provenance/v1, signed"), "{said}");
    assert!(said.contains("sbom"), "{said}");
    assert!(said.contains("signature: cosign signatures"), "{said}");

    // A re-run: the image is not pushed again, and nothing is attached twice.
    let again = publish();
    again.success();
    let json = json_of(&again);
    assert_eq!((json["status"].as_str(), json["error"].as_str()), (Some("skipped"), Some("already published")));
    assert_eq!(json["digest"], digest.as_str());
    assert_eq!(
        json["attached"],
        serde_json::json!(["provenance (there already)", "sbom (there already)", "signature (there already)"]),
        "{json}"
    );
    assert_eq!(check(), types); // still one signature, and the same referrers

    // Another key: no signature verifies.
    let (_, other) = key_pair(keys.path(), "other");
    let out = fx.nixctr(None).args(["verify", &reference, "--key"]).arg(&other).run();
    out.assert_exit(1).stderr_has("no signature of").stderr_has("does not verify with");

    // A tampered signature: refused with the right key too.
    Cmd::tool("python3").arg("-c").arg(TAMPER).args([&host, "team/ntfy", &digest]).run().success();
    let out = fx.nixctr(None).args(["verify", &format!("{host}/team/ntfy@{digest}"), "--key"]).arg(&public).run();
    out.assert_exit(1).stderr_has("signature 1 does not verify with");

    // An image with no signature at all.
    let unsigned = TestImage::new(1, 1000, 11).write(keys.path(), "unsigned", false);
    let to = format!("{host}/team/unsigned:v1");
    fx.nixctr(None).arg("push").arg(&unsigned).arg(&to).run().success();
    let out = fx.nixctr(None).args(["verify", &to, "--key"]).arg(&public).run();
    out.assert_exit(1).stderr_has("has no signature");
}

/// A key readable by others, or not a PKCS#8 P-256 key, is refused before anything is
/// built or pushed, and its text is never shown.
#[test]
fn bad_sign_keys_are_refused_before_anything_is_built() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let registry = Registry::plain();
    let keys = tempfile::tempdir().expect("temp dir");
    let (private, _) = key_pair(keys.path(), "cosign");
    let secret_line = std::fs::read_to_string(&private).expect("key").lines().nth(1).expect("a body line").to_string();

    let sec1 = keys.path().join("sec1.key");
    Cmd::tool("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"])
        .arg(&sec1)
        .run()
        .success();
    let rsa = keys.path().join("rsa.key");
    Cmd::tool("openssl")
        .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"])
        .arg(&rsa)
        .run()
        .success();
    for path in [&sec1, &rsa] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let open = keys.path().join("open.key");
    std::fs::copy(&private, &open).expect("copy");
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).expect("chmod");

    let cases: [(&Path, &str); 3] = [
        (&open, "may be read by group or others (mode 644): run `chmod 600"),
        (&sec1, "is a SEC1 EC key, not PKCS#8: convert it with `openssl pkcs8 -topk8 -nocrypt"),
        (&rsa, "is not an ECDSA P-256 key"),
    ];
    for (key, expected) in cases {
        let out = fx
            .nixctr(None)
            .args(["publish", "ntfy", "--registry", &registry.host(), "--provenance", "--sign-key"])
            .arg(key)
            .env("NIXCTR_ENGINE", "unix:///nonexistent/engine.sock")
            .run();
        out.assert_exit(1).stderr_has(expected).stderr_has(&key.display().to_string());
        // Refused before any engine was asked (there is none here) or anything evaluated.
        assert!(!out.stderr().contains("evaluating") && !out.stderr().contains("engine"), "{}", out.stderr());
        assert!(!out.stderr().contains(&secret_line), "the key's text is shown: {}", out.stderr());
    }
    // Nothing reached the registry.
    let catalog = Cmd::tool("curl").args(["-sf", &format!("http://{}/v2/_catalog", registry.host())]).run();
    catalog.success();
    assert_eq!(catalog.stdout().trim(), r#"{"repositories":[]}"#);
}

/// A registry that refuses artifact manifests (400 MANIFEST_INVALID to any manifest with an
/// `artifactType`): the container fails with a clear error naming what was pushed, the image
/// itself is in the registry and reads back whole, and a re-run against a registry that
/// takes artifacts adds the signature without pushing the image again.
#[test]
fn a_registry_refusing_artifacts_fails_the_container_but_keeps_the_image() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let registry = Registry::plain();
    let proxy = Proxy::start(registry.port, |seen| {
        let artifact = seen.method == "PUT"
            && seen.path.contains("/manifests/")
            && String::from_utf8_lossy(seen.body).contains("\"artifactType\"");
        artifact.then(|| error_answer("400 Bad Request", "MANIFEST_INVALID", "manifest invalid"))
    });
    let keys = tempfile::tempdir().expect("temp dir");
    let (private, public) = key_pair(keys.path(), "cosign");
    let archive = TestImage::new(2, 50_000, 5).write(keys.path(), "app", true);
    let publish = |host: &str| {
        fx.nixctr(None)
            .args(["publish", "ntfy", "--registry", host, "--namespace", "team", "--tag", "v1", "--archive"])
            .arg(&archive)
            .arg("--sign-key")
            .arg(&private)
            .run()
    };
    let out = publish(&proxy.host());
    out.assert_exit(1)
        .stderr_has("but not all its attachments: failed: signature: registry")
        .stderr_has("MANIFEST_INVALID")
        .stderr_has("may not take OCI 1.1 artifacts")
        .stderr_has("a re-run adds what is missing");
    let stderr = out.stderr();
    let digest = stderr
        .split("pushed as ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("the error names the digest pushed: {stderr}"))
        .to_string();
    let inspected = registry.skopeo_inspect("team/ntfy:v1", false).expect("skopeo reads the image");
    assert_eq!(inspected["Digest"], digest.as_str());
    let copied = tempfile::tempdir().expect("temp dir");
    registry.skopeo_copy_to_dir("team/ntfy:v1", copied.path());
    let sig_tag = format!("team/ntfy:{}.sig", digest.replace(':', "-"));
    assert!(registry.skopeo_inspect(&sig_tag, true).is_none(), "no signature went up");

    let again = publish(&registry.host());
    again.success().stderr_has("already published");
    let signatures =
        fx.nixctr(None).args(["verify", &format!("{}/team/ntfy:v1", registry.host()), "--key"]).arg(&public).run();
    signatures.success();
    assert!(signatures.stdout().contains(&format!("@{digest}: signed by")), "{}", signatures.stdout());
}

/// Two platforms: one unsigned provenance per platform image, each listed under that image's
/// fallback tag with the image as `subject`; a re-run with a key pushes no image again,
/// signs the index and adds the signed provenance the first run lacked, beside the unsigned.
#[test]
fn an_index_gets_one_provenance_per_platform_image() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    let head = fx.git_commit_all();
    let registry = Registry::plain();
    let host = registry.host();
    let keys = tempfile::tempdir().expect("temp dir");
    let (private, public) = key_pair(keys.path(), "cosign");
    let publish = |extra: &[&str]| {
        fx.nixctr(Some(engine))
            .args(["--platform", "linux/amd64,linux/arm64", "publish", "ntfy", "--registry", &host])
            .args(["--namespace", "team", "--json", "--provenance"])
            .args(extra)
            .deadline(std::time::Duration::from_secs(900))
            .run()
    };
    let out = publish(&[]);
    out.success();
    let json = json_of(&out);
    assert_eq!(json["attached"], serde_json::json!(["provenance (linux/amd64)", "provenance (linux/arm64)"]));
    let tag = format!("v2.17.0-{}-nix", &head[..7]);
    let index = registry.skopeo_inspect(&format!("team/ntfy:{tag}"), true).expect("skopeo reads the index");
    let images: Vec<String> = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(images.len(), 2, "{index}");
    for image in &images {
        let listed = registry
            .skopeo_inspect(&format!("team/ntfy:{}", image.replace(':', "-")), true)
            .unwrap_or_else(|| panic!("no referrers tag for {image}"));
        let entries = listed["manifests"].as_array().expect("entries");
        assert_eq!(entries.len(), 1, "{listed}");
        assert_eq!(entries[0]["artifactType"], "application/vnd.in-toto+json");
        assert_eq!(entries[0]["annotations"]["in-toto.io/predicate-type"], "https://slsa.dev/provenance/v1");
        let artifact = registry
            .skopeo_inspect(&format!("team/ntfy@{}", entries[0]["digest"].as_str().unwrap()), true)
            .expect("the provenance manifest");
        assert_eq!(artifact["subject"]["digest"], image.as_str(), "{artifact}");
    }
    let reference = format!("{host}/team/ntfy:{tag}");
    let unsigned = fx.nixctr(None).args(["verify", &reference, "--key"]).arg(&public).run();
    unsigned.assert_exit(1).stderr_has("has no signature");

    let signed = publish(&["--sign-key", private.to_str().unwrap()]);
    signed.success();
    let json = json_of(&signed);
    assert_eq!(json["error"], "already published", "{json}");
    assert_eq!(
        json["attached"],
        serde_json::json!(["provenance (linux/amd64)", "provenance (linux/arm64)", "signature"])
    );
    let verified = fx.nixctr(None).args(["verify", &reference, "--key"]).arg(&public).run();
    verified.success();
    for platform in ["linux/amd64", "linux/arm64"] {
        for signed in ["signed", "not signed"] {
            let line = format!("provenance {platform}: https://slsa.dev/provenance/v1, {signed}, sha256:");
            assert!(verified.stdout().contains(&line), "{line}: {}", verified.stdout());
        }
    }
}

/// A registry with the referrers API (played by a proxy answering it, with an empty list):
/// nixctr relies on it and writes no `sha256-HEX` fallback tag; the signature still goes to
/// cosign's `.sig` tag.
#[test]
fn a_registry_with_the_referrers_api_gets_no_fallback_tag() {
    let fx = Fixture::new();
    fx.git_commit_all();
    let registry = Registry::plain();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = asked.clone();
    let proxy = Proxy::start(registry.port, move |seen| {
        (seen.method == "GET" && seen.path.contains("/referrers/sha256:")).then(|| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let body = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
        })
    });
    let keys = tempfile::tempdir().expect("temp dir");
    let (private, public) = key_pair(keys.path(), "cosign");
    let archive = TestImage::new(1, 10_000, 7).write(keys.path(), "app", true);
    let out = fx
        .nixctr(None)
        .args(["publish", "ntfy", "--registry", &proxy.host(), "--namespace", "team", "--tag", "v1", "--json"])
        .arg("--archive")
        .arg(&archive)
        .arg("--sign-key")
        .arg(&private)
        .run();
    out.success();
    let digest = json_of(&out)["digest"].as_str().expect("digest").to_string();
    assert!(asked.load(std::sync::atomic::Ordering::SeqCst) > 0, "the referrers API was asked");
    let fallback = format!("team/ntfy:{}", digest.replace(':', "-"));
    assert!(registry.skopeo_inspect(&fallback, true).is_none(), "no fallback tag where the API answers");
    let sig = registry.skopeo_inspect(&format!("{fallback}.sig"), true).expect("the .sig manifest");
    assert_eq!(sig["subject"]["digest"], digest.as_str(), "{sig}");
    fx.nixctr(None)
        .args(["verify", &format!("{}/team/ntfy:v1", registry.host()), "--key"])
        .arg(&public)
        .run()
        .success();
}
