#!/usr/bin/env bash
# The test command (README, .ci/run): bring up Docker, Podman, the registry mirror and the
# nix image (scripts/setup.sh, idempotent), then run every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo test --locked -- --test-threads "${NIXCTR_TEST_THREADS:-3}" "$@"
