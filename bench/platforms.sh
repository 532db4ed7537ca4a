#!/usr/bin/env bash
# Platforms, side by side in one run, printing ratios:
#   emulated  the same container built cold for linux/arm64 under QEMU by nixctr, against the
#             same nix-build run by hand in an arm64 container (`docker run --platform`): what
#             nixctr adds beyond QEMU's cost (target ~1.0); and native vs emulated (QEMU's cost)
#   bytes     blob bytes a two-platform publish sends, against two single-platform publishes
#             to another registry (shared layers go once)
# usage: bench/platforms.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default the release build)
# Needs scripts/setup.sh to have run (qemu binfmt, the two-platform nix image).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-platforms}
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
export DOCKER_HOST=unix:///var/run/docker.sock
cp -r "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
git -C "$work/project" init -q -b main
git -C "$work/project" -c user.name=b -c user.email=b@nixctr.invalid add -A
git -C "$work/project" -c user.name=b -c user.email=b@nixctr.invalid commit -qm one
cd "$work/project"
echo "machine: $(nproc) cores, $(. /etc/os-release; echo "$PRETTY_NAME"), $(docker version -f 'Docker {{.Server.Version}}'), $(qemu-aarch64-static --version | head -1)"

echo "== cold builds of hello (throwaway store)"
measure native "$nixctr" --no-cache build hello -o "$work/native.tar.gz"; native=$secs
measure emulated "$nixctr" --no-cache --platform linux/arm64 build hello -o "$work/arm64.tar.gz"; emulated=$secs
# The same build by hand: an arm64 nix container, the project and nixpkgs bound in.
measure by-hand docker run --rm --platform linux/arm64 -e NIX_CONFIG='filter-syscalls = false' \
  -v "$work:/w" -w /w/project -e NIX_PATH=nixpkgs=/w/nixpkgs nixos/nix:2.33.3 \
  nix-build containers/hello/default.nix --no-out-link; by_hand=$secs
docker pull -q nixos/nix:2.33.3 >/dev/null   # the tag back to the native image
echo "QEMU's cost, emulated / native: $(ratio "$emulated" "$native")"
echo "nixctr emulated / by hand emulated: $(ratio "$emulated" "$by_hand")   (target ~1.0: nixctr adds nothing beyond QEMU)"

echo "== bytes: one two-platform publish vs two single-platform publishes"
start_registry index; a=$host; start_registry single; b=$host
export XDG_CACHE_HOME="$work/cache-a"
measure publish-index "$nixctr" --platform linux/amd64,linux/arm64 publish ntfy --registry "$a" --json
index_bytes=$(sed -n 's/.*"pushed_bytes":\([0-9]*\).*/\1/p' "$work/publish-index.out")
export XDG_CACHE_HOME="$work/cache-b"
measure publish-amd64 "$nixctr" --platform linux/amd64 publish ntfy --registry "$b" --tag amd64 --json
measure publish-arm64 "$nixctr" --platform linux/arm64 publish ntfy --registry "$b" --tag arm64 --json
single_bytes=$(cat "$work/publish-amd64.out" "$work/publish-arm64.out" | sed -n 's/.*"pushed_bytes":\([0-9]*\).*/\1/p' | awk '{s+=$1} END {print s}')
echo "bytes sent: index $index_bytes, two single pushes $single_bytes, ratio $(ratio "$index_bytes" "$single_bytes")"
echo "blob bytes stored: index registry $(find "$work/reg-index/storage" -path '*/blobs/*' -name data -printf '%s\n' | awk '{s+=$1} END {print s}'), single registry $(find "$work/reg-single/storage" -path '*/blobs/*' -name data -printf '%s\n' | awk '{s+=$1} END {print s}')"
