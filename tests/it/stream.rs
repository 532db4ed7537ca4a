//! Streamed images (`dockerTools.streamLayeredImage`): the container's output is a program
//! that writes the image. `build` runs it in the nix container and compresses on this side,
//! `--load` feeds it to the engine and `publish` to the registry as it comes; its layers are
//! those of the same image as `buildLayeredImage`; a program that fails mid-way leaves
//! nothing behind. Read back with skopeo and the engines.

use std::path::Path;

use crate::harness::*;
use crate::registry_harness::Registry;

/// `containers/hello`'s `passthru.stream`: the same image as the hello archive, streamed.
const HELLO_STREAM: &str = "{ pkgs ? import <nixpkgs> { } }:\n(import ../hello/default.nix { inherit pkgs; }).stream\n";

/// A stream program that writes the first 100 kB of a real image, then fails (exit code 3).
const BROKEN_STREAM: &str = "{ pkgs ? import <nixpkgs> { } }:\n\
let image = pkgs.dockerTools.streamLayeredImage {\n  \
  name = \"broken-stream\"; tag = \"latest\"; contents = [ pkgs.busybox pkgs.hello ];\n};\n\
in pkgs.writeScript \"stream-broken-stream\" ''\n  #!/bin/sh\n  ${image} | head -c 100000\n  \
  echo \"broken-stream: the disk is full (uid $(id -u))\" >&2\n  exit 3\n''\n";

/// A stream program that writes a whole image, then fails (exit code 3).
const LATE_FAILING_STREAM: &str = "{ pkgs ? import <nixpkgs> { } }:\n\
let image = pkgs.dockerTools.streamLayeredImage {\n  \
  name = \"late-failure\"; tag = \"latest\"; contents = [ pkgs.busybox pkgs.hello ];\n};\n\
in pkgs.writeScript \"stream-late-failure\" ''\n  #!/bin/sh\n  ${image}\n  \
  echo \"late-failure: could not clean up\" >&2\n  exit 3\n''\n";

/// The config of a docker-archive file, read by skopeo (a gzip one unpacked by gzip first:
/// skopeo reads only plain ones).
fn archive_config(path: &Path) -> serde_json::Value {
    let plain = path.with_extension("unpacked.tar");
    let tar = if std::fs::read(path).unwrap().starts_with(&[0x1f, 0x8b]) {
        let out = Cmd::tool("gzip").arg("-dc").arg(path).quiet().run();
        out.success();
        std::fs::write(&plain, &out.stdout).unwrap();
        plain.clone()
    } else {
        path.to_path_buf()
    };
    let out = Cmd::tool("skopeo").args(["inspect", "--config"]).arg(format!("docker-archive:{}", tar.display())).run();
    let _ = std::fs::remove_file(&plain);
    out.success();
    serde_json::from_slice(&out.stdout).expect("skopeo printed JSON")
}

fn diff_ids(config: &serde_json::Value) -> Vec<String> {
    let ids = config["rootfs"]["diff_ids"].as_array().unwrap_or_else(|| panic!("no diff_ids in {config}"));
    ids.iter().map(|d| d.as_str().unwrap().to_string()).collect()
}

fn has_part_files(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().contains(".part"))
}

#[test]
fn a_streamed_image_loads_straight_into_the_engine_and_runs() {
    for engine in engines() {
        let fx = Fixture::new();
        let image = format!("streamed:{}", unique("load"));
        let text = fx
            .read("containers/streamed/default.nix")
            .replace("tag = \"latest\";", &format!("tag = \"{}\";", &image[9..]));
        fx.write("containers/streamed/default.nix", &text);
        let out = fx.nixctr(Some(&engine)).args(["build", "streamed", "--load", "-v"]).run();
        out.success().stderr_has("streaming the image").stderr_has("streamed: evaluate ").stderr_has(", stream ");
        let loaded = out.stdout().trim().to_string();
        assert!(loaded.ends_with(&image), "{}: loaded {loaded:?}", engine.name);
        let ran = engine.cli().args(["run", "--rm", "--network", "none", &loaded]).run();
        ran.success();
        assert!(ran.stdout().contains("Hello, world!"), "{}: {}", engine.name, ran.stdout());
        // Straight from the stream: no archive written.
        assert!(!fx.project().join("streamed.tar.gz").exists(), "{}: --load wrote an archive", engine.name);
        assert!(!has_part_files(&fx.project()));
        assert_no_containers_left(&engine, &out);
        engine.remove_image(&loaded);
    }
}

/// `.tar.gz` by default and `.tar` with `-o NAME.tar`, both read back by skopeo, with the
/// layers and config of the same image built as `buildLayeredImage` (and as its
/// `passthru.stream`).
#[test]
fn a_streamed_image_is_written_compressed_or_not_with_the_layers_of_the_archive() {
    let engines = engines();
    let docker = engines.by_name("docker");
    let fx = Fixture::new();
    fx.write("containers/hello-stream/default.nix", HELLO_STREAM);
    let out = fx.nixctr(Some(docker)).args(["build", "hello", "streamed", "hello-stream"]).run();
    out.success();
    let archive = archive_config(&fx.project().join("hello.tar.gz"));
    for name in ["streamed", "hello-stream"] {
        let path = fx.project().join(format!("{name}.tar.gz"));
        assert_eq!(&std::fs::read(&path).unwrap()[..2], &[0x1f, 0x8b], "{name}.tar.gz is gzip");
        let config = archive_config(&path);
        assert_eq!(diff_ids(&config), diff_ids(&archive), "{name}: not the layers of the hello archive");
        assert_eq!(config, archive, "{name}: not the config of the hello archive");
    }
    assert_no_containers_left(docker, &out);

    let out = fx.nixctr(Some(docker)).args(["build", "streamed", "-o", "streamed.tar"]).run();
    out.success();
    assert_eq!(out.stdout().trim(), "streamed.tar");
    let plain = std::fs::read(fx.project().join("streamed.tar")).unwrap();
    assert_eq!(&plain[257..262], b"ustar", "streamed.tar is an uncompressed tar");
    assert_eq!(diff_ids(&archive_config(&fx.project().join("streamed.tar"))), diff_ids(&archive));

    // Twice the same image: the same bytes (the compression is deterministic).
    let first = std::fs::read(fx.project().join("streamed.tar.gz")).unwrap();
    fx.nixctr(Some(docker)).args(["build", "streamed", "-q"]).run().success();
    assert!(first == std::fs::read(fx.project().join("streamed.tar.gz")).unwrap(), "a rebuild changed the .tar.gz");
}

#[test]
fn a_streamed_image_is_published_and_reads_back() {
    for engine in engines() {
        let fx = Fixture::new();
        fx.git_commit_all();
        let registry = Registry::plain();
        let out = fx
            .nixctr(Some(&engine))
            .args(["publish", "streamed", "--registry", &registry.host(), "--tag", "v1", "-v"])
            .run();
        out.success().stderr_has("streamed: evaluate ").stderr_has(", stream ");
        let printed = out.stdout();
        let (reference, digest) = printed.trim().split_once('@').expect("REF@DIGEST");
        assert_eq!(reference, format!("{}/streamed:v1", registry.host()));
        let inspected = registry.skopeo_inspect("streamed:v1", false).expect("skopeo reads the pushed image");
        assert_eq!(inspected["Digest"], digest, "{}", engine.name);
        let config = registry.skopeo_config("streamed:v1");
        assert_eq!(config["config"]["Cmd"][0], "/bin/hello");
        assert_eq!(diff_ids(&config).len(), 3, "{config}");
        // What was pushed is what a build writes.
        fx.nixctr(Some(&engine)).args(["build", "streamed", "-q"]).run().success();
        assert_eq!(diff_ids(&config), diff_ids(&archive_config(&fx.project().join("streamed.tar.gz"))));
        assert_no_containers_left(&engine, &out);
    }
}

/// A stream program that exits non-zero mid-way: `build` writes no file, `--load` loads no
/// image, `publish` pushes no tag, each fails naming the program's exit code and its last
/// words, and no container is left.
#[test]
fn a_broken_stream_leaves_nothing_behind() {
    for engine in engines() {
        let fx = Fixture::new();
        fx.write("containers/broken-stream/default.nix", BROKEN_STREAM);
        fx.git_commit_all();
        let out = fx.nixctr(Some(&engine)).args(["build", "broken-stream"]).run();
        // The program is the project's: it never runs as root (which could read staged secrets).
        out.assert_exit(1).stderr_has("exit code 3").stderr_has("the disk is full (uid 65534)");
        assert!(!fx.project().join("broken-stream.tar.gz").exists(), "{}: a file was written", engine.name);
        assert!(!has_part_files(&fx.project()), "{}: a partial file is left", engine.name);
        assert_no_containers_left(&engine, &out);

        let out = fx.nixctr(Some(&engine)).args(["build", "broken-stream", "--load"]).run();
        out.assert_exit(1).stderr_has("exit code 3");
        assert!(engine.image_id("broken-stream:latest").is_none(), "{}: an image was loaded", engine.name);
        assert!(engine.image_id("localhost/broken-stream:latest").is_none(), "{}: an image was loaded", engine.name);
        assert_no_containers_left(&engine, &out);

        let registry = Registry::plain();
        let out = fx
            .nixctr(Some(&engine))
            .args(["publish", "broken-stream", "--registry", &registry.host(), "--tag", "v1"])
            .run();
        out.assert_exit(1).stderr_has("exit code 3");
        assert!(registry.skopeo_inspect("broken-stream:v1", false).is_none(), "{}: a tag was pushed", engine.name);
        assert_no_containers_left(&engine, &out);
    }
}

/// A streamed image whose customisation layer holds `marker`.
fn marked_stream(marker: &str) -> String {
    format!(
        "{{ pkgs ? import <nixpkgs> {{ }} }}:\npkgs.dockerTools.streamLayeredImage {{\n  \
         name = \"marked\"; tag = \"latest\"; contents = [ pkgs.busybox pkgs.hello ];\n  \
         extraCommands = \"echo {marker} > marker\";\n  config.Cmd = [ \"/bin/hello\" ];\n}}\n"
    )
}

/// Re-publishing a streamed image after a one-file change, to a registry it was sent to:
/// the stream is hashed whole but only the changed layer is compressed and sent, and the
/// image reads back whole.
#[test]
fn a_republished_stream_compresses_only_the_changed_layer() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    let registry = Registry::plain();
    for (marker, tag) in [("one", "v1"), ("two", "v2")] {
        fx.write("containers/marked/default.nix", &marked_stream(marker));
        fx.git_commit_all();
        let out = fx
            .nixctr(Some(engine))
            .args(["publish", "marked", "--registry", &registry.host(), "--tag", tag, "-v"])
            .run();
        out.success();
        if tag == "v1" {
            out.stderr_has("pushed 3 layers").stderr_has("read 3 of 3 layers");
        } else {
            out.stderr_has("pushed 1 layer (")
                .stderr_has("2 already there")
                .stderr_has("read 3 of 3 layers, compressed 1");
        }
        assert_no_containers_left(engine, &out);
    }
    let first = registry.skopeo_inspect("marked:v1", false).expect("v1 reads back");
    let second = registry.skopeo_inspect("marked:v2", false).expect("v2 reads back");
    let layers = |v: &serde_json::Value| v["Layers"].as_array().unwrap().clone();
    assert_eq!(layers(&first)[..2], layers(&second)[..2], "the unchanged layers are the same blobs");
    assert_ne!(layers(&first)[2], layers(&second)[2]);
    // The registry holds what a build writes.
    fx.nixctr(Some(engine)).args(["build", "marked", "-q"]).run().success();
    let config = registry.skopeo_config("marked:v2");
    assert_eq!(diff_ids(&config), diff_ids(&archive_config(&fx.project().join("marked.tar.gz"))));
}

/// A program that writes its whole image and then fails: its exit status is waited for
/// before the file is kept, the image loaded or the tag pushed, so none of them happens and
/// the failure is the error.
#[test]
fn a_stream_that_fails_after_its_image_gets_no_tag() {
    let engines = engines();
    let engine = engines.by_name("docker");
    let fx = Fixture::new();
    fx.write("containers/late-failure/default.nix", LATE_FAILING_STREAM);
    fx.git_commit_all();
    let out = fx.nixctr(Some(engine)).args(["build", "late-failure"]).run();
    out.assert_exit(1).stderr_has("exit code 3");
    assert!(!fx.project().join("late-failure.tar.gz").exists(), "a file was written");
    let out = fx.nixctr(Some(engine)).args(["build", "late-failure", "--load"]).run();
    out.assert_exit(1).stderr_has("exit code 3");
    assert!(engine.image_id("late-failure:latest").is_none(), "an image was loaded");
    let registry = Registry::plain();
    let out =
        fx.nixctr(Some(engine)).args(["publish", "late-failure", "--registry", &registry.host(), "--tag", "v1"]).run();
    out.assert_exit(1).stderr_has("exit code 3").stderr_has("could not clean up");
    assert!(registry.skopeo_inspect("late-failure:v1", false).is_none(), "a tag was pushed");
    assert_no_containers_left(engine, &out);
}
