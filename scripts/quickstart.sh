#!/usr/bin/env bash
# Quick start: from a clone to a nix-built image running in the engine, in one command.
# It builds nixctr (cargo build --release) and meanwhile, as root on Debian/Ubuntu, sets up what a
# build needs and nothing more (scripts/setup.sh --quick: Docker, a local docker.io mirror, the nix
# image for this machine's platform); elsewhere it uses the Docker or Podman engine already running
# (and pulls nixos/nix). Then it builds the fixture project's `hello` container, loads it and runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
setup=
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # The engine and the nix image come up while cargo builds (most of the setup is debootstrap).
  bash scripts/setup.sh --quick >/dev/null &
  setup=$!
fi
built=0
cargo build --release --locked && built=1
if [ -n "$setup" ] && ! wait "$setup"; then
  echo "quickstart: scripts/setup.sh --quick failed (its error is above)" >&2
  exit 1
fi
[ "$built" = 1 ] || exit 1
image=$("${CARGO_TARGET_DIR:-target}/release/nixctr" -C fixtures/project build hello --load -o "${TMPDIR:-/tmp}/hello.tar.gz")
if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker; else engine=podman; fi
echo "+ $engine run --rm $image" >&2
"$engine" run --rm "$image"
