//! Project code is untrusted: a `default.nix` from a stranger's branch finds no secret, at
//! evaluation or at build time, and nixctr's own caches never outvote what is really there.

use std::path::{Path, PathBuf};

use crate::harness::*;

const CACHE: &str = "http://127.0.0.1:5081";
const CACHE_DIR: &str = "/var/lib/nixctr-test/cache";
const KEYS: &str = "/etc/nixctr-test/cache";

/// A directory of nginx's cache root, removed when the test ends.
struct CacheDir(PathBuf);

impl Drop for CacheDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `fixtures/leaky` as `containers/NAME`, with a derivation no earlier run built.
fn write_leaky(fx: &Fixture, name: &str) {
    let text = std::fs::read_to_string(repo_root().join("fixtures/leaky/default.nix")).unwrap();
    fx.write(&format!("containers/{name}/default.nix"), &text.replace("@NONCE@", &unique("nonce")));
}

fn gunzip(path: &Path) -> Vec<u8> {
    let out = Cmd::tool("gzip").arg("-dc").arg(path).quiet().run();
    out.success();
    out.stdout.clone()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The files of an uncompressed docker-archive, layers unpacked too: (path, bytes).
fn archive_files(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut outer = tar::Archive::new(tar);
    for entry in outer.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
        if path.ends_with(".tar") {
            for inner in tar::Archive::new(&bytes[..]).entries().unwrap() {
                let mut inner = inner.unwrap();
                let name = inner.path().unwrap().display().to_string();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut inner, &mut data).unwrap();
                files.push((format!("{path}:{name}"), data));
            }
        }
        files.push((path, bytes));
    }
    files
}

/// The leaking `default.nix` (fixtures/leaky), built with a signing key, a netrc and `AWS_*`
/// set, a private (netrc) cache to read from and to upload to: the image, the store and
/// nixctr's output (nix's log with `-v`) hold none of them; the snooping really ran (it saw
/// the staged directory at build time and was refused it); the upload worked and is signed.
#[test]
fn project_code_finds_no_secret() {
    let engines = engines();
    for engine in engines.iter() {
        let fx = Fixture::new();
        let name = unique("leaky");
        write_leaky(&fx, &name);
        let cache_name = unique("it-leak-");
        let private = format!("{CACHE}/private/{cache_name}");
        let dir = CacheDir(Path::new(CACHE_DIR).join("private").join(&cache_name));
        let key = Path::new(KEYS).join("signing-key");
        let netrc = Path::new(KEYS).join("netrc");
        let public = std::fs::read_to_string(Path::new(KEYS).join("signing-key.pub")).unwrap();
        let signing_secret = std::fs::read_to_string(&key).unwrap().trim().split_once(':').unwrap().1.to_string();
        let netrc_text = std::fs::read_to_string(&netrc).unwrap();
        let password = netrc_text.split_whitespace().last().unwrap().to_string();
        let aws_secret = unique("AWSSECRETnixctrleak");
        let aws_id = unique("AKIAnixctrleak");
        let archive = fx.path().join("leaky.tar.gz");

        let out = fx
            .nixctr(Some(engine))
            .args(["-v", "build", &name, "-o"])
            .arg(&archive)
            .args(["--network", "host", "--cache-to", &private, "--substituter", &private])
            .args(["--trusted-public-key", public.trim(), "--signing-key"])
            .arg(&key)
            .arg("--netrc")
            .arg(&netrc)
            .env("AWS_SECRET_ACCESS_KEY", &aws_secret)
            .env("AWS_ACCESS_KEY_ID", &aws_id)
            .deadline(COLD_BUILD_DEADLINE)
            .run();
        out.success().stderr_has("paths uploaded");
        let secrets = [signing_secret.as_str(), password.as_str(), aws_secret.as_str(), aws_id.as_str()];
        for secret in secrets {
            assert!(
                !out.stdout().contains(secret) && !out.stderr().contains(secret),
                "{}: nixctr printed a secret",
                engine.name
            );
        }

        // The image: no secret in its config or any file of any layer.
        let files = archive_files(&gunzip(&archive));
        for (path, bytes) in &files {
            for secret in secrets {
                assert!(!contains(bytes, secret), "{}: {path} of the image holds a secret", engine.name);
            }
        }
        // The snooping ran: evaluation listed /nixctr (the local nixpkgs is there), and the
        // build user saw the staged directory but could read nothing in it.
        let config = files.iter().find(|(p, _)| p.ends_with(".json") && !p.ends_with("manifest.json")).unwrap();
        let config = String::from_utf8_lossy(&config.1);
        assert!(config.contains("leak.at-evaluation") && config.contains("nixpkgs"), "{config}");
        assert!(!config.contains("secrets-"), "{}: evaluation saw a secrets directory: {config}", engine.name);
        let at_build =
            files.iter().find(|(p, _)| p.ends_with("leak/at-build.txt")).expect("the build-time snoop's file");
        let at_build = String::from_utf8_lossy(&at_build.1);
        assert!(at_build.contains("uid=30"), "{}: not built by a build user: {at_build}", engine.name);
        assert!(at_build.contains("secrets-"), "{}: the build did not see the staged netrc: {at_build}", engine.name);
        assert!(at_build.contains("Permission denied"), "{}: {at_build}", engine.name);

        // The store volume holds none of them either.
        let volume = engine.store_volume_of(NIX_IMAGE);
        let grep = format!(
            "grep -rlF -e '{}' -e '{}' -e '{}' -e '{}' /nix/store /nix/var/nix/db /nix/var/nixctr 2>/dev/null; echo searched",
            signing_secret, password, aws_secret, aws_id
        );
        let found = engine.on_store(&volume, &["sh", "-c", &grep]);
        assert_eq!(found.trim(), "searched", "{}: the store holds a secret", engine.name);

        // The upload worked, through the netrc, and is signed.
        let signed = std::fs::read_dir(&dir.0)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .filter(|t| {
                t.lines().any(|l| {
                    l.starts_with("StorePath:") && (l.ends_with("-leaky.tar.gz") || l.ends_with("-leak-at-build"))
                })
            })
            .collect::<Vec<_>>();
        assert_eq!(signed.len(), 2, "{}: the image and the snoop derivation's output are in the cache", engine.name);
        let key_name = public.trim().split_once(':').unwrap().0;
        assert!(signed.iter().all(|t| t.contains(&format!("Sig: {key_name}:"))), "{signed:?}");
        assert_no_containers_left(engine, &out);
    }
}

/// A cache emptied between two builds with `--cache-to` is filled again: nix's narinfo disk
/// cache (kept in the store volume) must not answer "it is there already".
#[test]
fn an_emptied_cache_is_filled_again() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    let cache_name = unique("it-refill-");
    let url = format!("{CACHE}/{cache_name}");
    let dir = CacheDir(Path::new(CACHE_DIR).join("public").join(&cache_name));
    let key = Path::new(KEYS).join("signing-key");
    let build = || {
        let mut cmd = fx.nixctr(Some(docker));
        cmd.args(["build", "hello", "--network", "host", "--cache-to", &url, "--signing-key"]).arg(&key);
        cmd.run()
    };
    let narinfos = || {
        std::fs::read_dir(&dir.0)
            .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo")).count())
            .unwrap_or(0)
    };
    build().success().stderr_has("paths uploaded");
    let first = narinfos();
    assert!(first > 0, "the first build uploaded nothing");
    std::fs::remove_dir_all(&dir.0).unwrap();
    let out = build();
    out.success().stderr_lacks(" 0 paths uploaded");
    assert_eq!(narinfos(), first, "the emptied cache was not filled again: {}", out.stderr());
}
