#!/usr/bin/env bash
# Quick start: from a clone to a nix-built image running in the engine, in one command.
# As root on Debian/Ubuntu it first sets up the engines and the nix image (scripts/setup.sh);
# elsewhere it uses the Docker or Podman engine already running (and pulls nixos/nix).
# Then it builds nixctr, builds the fixture project's `hello` container, loads it and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash scripts/setup.sh >/dev/null
fi
cargo build --release --locked
image=$(target/release/nixctr -C fixtures/project build hello --load -o "${TMPDIR:-/tmp}/hello.tar.gz")
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
echo "+ $engine run --rm $image" >&2
"$engine" run --rm "$image"
