#!/usr/bin/env bash
# The shared binary cache, side by side in one run, printing the ratio:
#   Docker builds the slow fixture container (`heavy`, whose busywork burns CPU seconds) with
#   --cache-to the test cache; then Podman — a second engine standing in for a second machine —
#   builds it cold (a throwaway store, --no-cache) without the cache, and cold with it.
#   The derivation is made unique to the run (a `rounds` nobody used), so no store has it.
# usage: bench/cache.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default the release build)
# Needs scripts/setup.sh to have run (the cache on 127.0.0.1:5081 and its signing key).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-cache}
keys=/etc/nixctr-test/cache
[ -s "$keys/signing-key" ] || { echo "no $keys/signing-key: run scripts/setup.sh" >&2; exit 1; }
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
docker_=unix:///var/run/docker.sock
podman_=unix:///run/podman/podman.sock
run=$(date +%s)$$
cache=http://127.0.0.1:5081/bench-$run
cache_dir=/var/lib/nixctr-test/cache/public/bench-$run

cp -r "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
cd "$work/project"
# A busywork of its own (48 rounds, as the fixture's): a salt in its build script.
sed -i "s|  start=\$(date +%s)|  start=\$(date +%s) # bench $run|" ../nixpkgs/pkgs/busywork.nix
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), $(docker version -f 'Docker {{.Server.Version}}'), Podman $(podman version -f '{{.Server.Version}}' 2>/dev/null || echo '?')"
echo "cache: $cache (nginx on loopback); build containers on --network host"

common=(--network host)
measure docker-build-upload "$nixctr" --engine "$docker_" -v build heavy -o "$work/docker.tar.gz" "${common[@]}" \
  --cache-to "$cache" --signing-key "$keys/signing-key"
grep -E '^cache .*paths uploaded' "$work/docker-build-upload.err" || true
echo "cache holds $(find "$cache_dir" -name '*.narinfo' | wc -l) narinfos, $(du -sb "$cache_dir" | cut -f1) bytes"

measure podman-cold-no-cache "$nixctr" --engine "$podman_" --no-cache -v build heavy -o "$work/podman-plain.tar.gz" "${common[@]}"
plain=$secs
measure podman-cold-with-cache "$nixctr" --engine "$podman_" --no-cache -v build heavy -o "$work/podman-cache.tar.gz" "${common[@]}" \
  --substituter "$cache" --trusted-public-key "$(cat "$keys/signing-key.pub")"
cached=$secs
echo "without the cache: $(grep -c "^building '" "$work/podman-cold-no-cache.err" || true) derivations built"
echo "with the cache: $(grep -E '^nix: ' "$work/podman-cold-with-cache.err" | sed 's/^nix: //')"
fetched=$(grep -h 'will be fetched' "$work/podman-cold-with-cache.err" | sed 's/.*(\(.*\)).*/\1/' | head -1)
busy=$(grep -c "^building '/nix/store/[a-z0-9]*-busywork" "$work/podman-cold-with-cache.err" || true)
cmp -s "$work/docker.tar.gz" "$work/podman-cache.tar.gz" && same=identical || same=DIFFERENT
echo "archive from the cache vs Docker's: $same; busywork built with the cache: $busy time(s)"
echo "fetched from the cache: ${fetched:-nothing}"
echo "time ratio cold with cache / cold without: $(ratio "$cached" "$plain") ($cached s vs $plain s)   (target <= 0.33)"
rm -rf "$cache_dir"
