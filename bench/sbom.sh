#!/usr/bin/env bash
# Benchmark for `nixctr sbom`: the SBOM of an image of a few hundred store paths (the fixture's
# `manyDeps`: 300 tiny packages, each with a licence, plus busybox), on a warm store.
# Prints:
#   query    the store and evaluation queries for all paths (nixctr's own timing, -v)  (< 1 s)
#   sbom     the whole `nixctr sbom many` (a warm build included)
#   build    `nixctr build many` alone, warm: sbom - build is what the SBOM adds
# Needs scripts/setup.sh to have run. Uses Docker at /var/run/docker.sock (ENGINE to change).
# NIXCTR names the binary (default: target/release/nixctr).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${BENCH_DIR:-/var/tmp/nixctr-bench-sbom}
fresh=1
. "$here/lib.sh"
ROUNDS=${ROUNDS:-3}
ENGINE=${ENGINE:-unix:///var/run/docker.sock}

cp -a "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
mkdir -p "$work/project/containers/many"
cat > "$work/project/containers/many/default.nix" <<'NIX'
{ pkgs ? import <nixpkgs> { } }:
pkgs.dockerTools.buildLayeredImage {
  name = "many";
  tag = "latest";
  contents = [ pkgs.busybox pkgs.manyDeps ];
}
NIX
cd "$work/project"


measure "sbom many (first)" "$nixctr" -H "$ENGINE" sbom many
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
queries=() sboms=() builds=()
for i in $(seq "$ROUNDS"); do
  measure "sbom many (warm) $i" "$nixctr" -H "$ENGINE" -v sbom many
  sboms+=("$secs")
  q=$(sed -n 's/^sbom many: \([0-9]*\) store paths.* in \([0-9.]*\)s$/\1 \2/p' "$work/sbom many (warm) $i.err")
  [ -n "$q" ] || { echo "no query timing in the -v output" >&2; exit 1; }
  paths=${q% *}; queries+=("${q#* }")
  measure "build many (warm) $i" "$nixctr" -H "$ENGINE" build many
  builds+=("$secs")
done
components=$(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["components"]))' many.cdx.json)
q=$(median "${queries[@]}"); s=$(median "${sboms[@]}"); b=$(median "${builds[@]}")
echo
echo "store paths: $paths, components in many.cdx.json: $components"
printf 'query   %6.2f s   (median of %s; target < 1 s)\n' "$q" "$ROUNDS"
printf 'sbom    %6.2f s   build %6.2f s   the SBOM adds %.2f s (%sx)\n' "$s" "$b" "$(awk -v a="$s" -v b="$b" 'BEGIN {print a-b}')" "$(ratio "$s" "$b")"
