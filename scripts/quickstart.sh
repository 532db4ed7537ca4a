#!/usr/bin/env bash
# Quick start: from a clone to a nix-built image running in the engine, in one command.
# Sets up the engines and nix image (scripts/setup.sh), builds nixctr, builds the fixture
# project's `hello` container with nixctr, loads it and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
image=$(target/release/nixctr -C fixtures/project build hello --load -o "${TMPDIR:-/tmp}/hello.tar.gz")
echo "+ docker run --rm $image" >&2
docker run --rm "$image"
