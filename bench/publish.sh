#!/usr/bin/env bash
# Whole `publish` against the CI steps it replaces, run by hand in the same engine: a nix
# container on nixctr's store volume, `nix-build` of the buildLayeredImage archive, `docker cp`
# of it out, gunzip (skopeo reads only plain docker-archives) and `skopeo copy` to the
# registry, at nixctr's gzip level (1; skopeo's default, 6, would flatter nixctr). Warm store, a fresh docker-registry on 127.0.0.1 for every run. Prints times,
# peak RSS of nixctr, each run's `-v` phase lines, and the ratios (targets from issue 17):
#   publish of a streamLayeredImage   vs the hand-run steps   (target <= 0.5)
#   publish of a buildLayeredImage    vs the hand-run steps   (target <= 0.7)
# and the floor of a streamed publish: the same container steps and the image program alone,
# its output thrown away. Last, a re-publish of the streamed image after a one-file change,
# to the registry it went to: with the blob cache (the stream spooled and hashed, only the
# changed layer compressed) against without it (every layer compressed as it passes).
# The image: busybox and two app paths built from the nix image's own /usr (binaries,
# libraries, text; the second rot13-ed so the two do not compress alike), ~BENCH_MB in all.
# usage: bench/publish.sh [WORKDIR]   (NIXCTR=path/to/nixctr; ROUNDS=1; BENCH_MB=350)
# Uses Docker at /var/run/docker.sock; needs scripts/setup.sh to have run.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-publish}
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
ROUNDS=${ROUNDS:-1}
BENCH_MB=${BENCH_MB:-350}
IMAGE=nixos/nix:2.33.3
export DOCKER_HOST=unix:///var/run/docker.sock
export XDG_CACHE_HOME="$work/nixctr-cache"
command -v /usr/bin/time >/dev/null || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

# --- the project: the same image as streamLayeredImage and as buildLayeredImage ---------
cd "$work"
proj=$work/project
mkdir -p "$proj/containers/app-stream" "$proj/containers/app-layered"
printf 'nixpkgs = "%s"\n' "$(cd "$here/../fixtures/nixpkgs" && pwd)" > "$proj/nixctr.toml"
cat > "$proj/containers/app.nix" <<'NIX'
# Two store paths of real files from the nix image's /usr (copied until each is about
# @HALF_MB@ MB); the second rot13-ed, so the two are not the same bytes.
{ pkgs }:
let
  usr = name: rot13: pkgs.runCommand name { inherit rot13; } ''
    mkdir -p $out
    i=0
    while [ "$(du -sm $out | cut -f1)" -lt $((@HALF_MB@ - 40)) ]; do
      mkdir $out/copy$i
      (cd / && tar -cf - usr/lib usr/bin usr/share 2>/dev/null || true) | (cd $out/copy$i && tar -xf - 2>/dev/null || true)
      chmod -R u+w,a-s $out/copy$i
      if [ -n "$rot13" ]; then
        find $out/copy$i -type f | while IFS= read -r f; do
          tr a-zA-Z n-za-mN-ZA-M < "$f" > "$f.r" && mv "$f.r" "$f" || true
        done
      fi
      i=$((i + 1))
    done
  '';
in
[ (usr "app-lib" "") (usr "app-data" "1") ]
NIX
sed -i "s/@HALF_MB@/$((BENCH_MB / 2))/g" "$proj/containers/app.nix"
for kind in stream layered; do
  fn=$([ $kind = stream ] && echo streamLayeredImage || echo buildLayeredImage)
  cat > "$proj/containers/app-$kind/default.nix" <<NIX
{ pkgs ? import <nixpkgs> { } }:
pkgs.dockerTools.$fn {
  name = "app-$kind";
  tag = "latest";
  contents = [ pkgs.busybox ] ++ import ../app.nix { inherit pkgs; };
  config.Cmd = [ "/bin/sh" "-c" "echo ok" ];
}
NIX
done
(cd "$proj" && git init -q -b main && git add -A && git -c user.name=bench -c user.email=bench@nixctr.invalid commit -qm bench)

# --- warm: everything built in nixctr's store volume ------------------------------------
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(docker version -f 'Docker {{.Server.Version}}')"
"$nixctr" -q -C "$proj" build app-stream app-layered >/dev/null
rm -f "$work"/app-*.tar.gz
id=$(docker image inspect -f '{{.Id}}' "$IMAGE"); id=${id#sha256:}
vol=nixctr-store-${id:0:12}
"$nixctr" -q -C "$proj" build app-stream -o "$work/size.tar" >/dev/null
size=$(du -m "$work/size.tar" | cut -f1); rm -f "$work/size.tar"
echo "image: $size MB uncompressed, 4 layers (busybox, app-lib, app-data, customisation)"

# The hand-run CI steps, one script: nix container on the store volume, project in,
# nix-build, copy out, gunzip, skopeo copy, container removed. With `stream-only`, the floor
# of a streamed publish instead: the same container steps, then the image program alone, its
# output thrown away (what any consumer of the stream waits for at least).
cat > "$work/by-hand.sh" <<'SH'
set -euo pipefail
mode=$1 vol=$2 image=$3 proj=$4 nixpkgs=$5 dest=${6:-} out_dir=${7:-}
ctr=$(docker create -v "$vol:/nix" -e XDG_CACHE_HOME=/nix/var/nixctr/cache "$image" sleep 600)
trap 'docker rm -f "$ctr" >/dev/null 2>&1 || true' EXIT
docker start "$ctr" >/dev/null
tar -c -C "$(dirname "$proj")" --exclude=.git --transform 's,^project,workspace,' project | docker cp - "$ctr:/"
tar -c -C "$(dirname "$nixpkgs")" --transform 's,^nixpkgs,nixctr/nixpkgs,' nixpkgs | docker cp - "$ctr:/"
np=$(docker exec "$ctr" nix --extra-experimental-features 'nix-command flakes' flake metadata path:/nixctr/nixpkgs --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
container=$([ "$mode" = stream-only ] && echo app-stream || echo app-layered)
out=$(docker exec -w /workspace -e NIX_PATH="nixpkgs=$np" "$ctr" nix-build "containers/$container/default.nix" --no-out-link 2>/dev/null)
if [ "$mode" = stream-only ]; then
  docker exec "$ctr" "$out" 2>/dev/null | wc -c >/dev/null
  exit 0
fi
docker cp "$ctr:$out" - | tar -xO > "$out_dir/app.tar.gz"
gunzip -f "$out_dir/app.tar.gz"
skopeo copy --quiet --dest-tls-verify=false --dest-compress-level 1 "docker-archive:$out_dir/app.tar" "docker://$dest"
rm -f "$out_dir/app.tar"
SH

nixpkgs=$(cd "$here/../fixtures/nixpkgs" && pwd)
hand=(); floor=(); stream=(); layered=(); s_rss=0; l_rss=0
for r in $(seq "$ROUNDS"); do
  start_registry "hand-$r"
  measure "by-hand-$r" bash "$work/by-hand.sh" by-hand "$vol" "$IMAGE" "$proj" "$nixpkgs" "$host/bench/app:1" "$work"
  hand+=("$secs")
  measure "stream-only-$r" bash "$work/by-hand.sh" stream-only "$vol" "$IMAGE" "$proj" "$nixpkgs"
  floor+=("$secs")
  start_registry "stream-$r"; rm -rf "$XDG_CACHE_HOME"
  measure "publish-stream-$r" "$nixctr" -v -C "$proj" publish app-stream --registry "$host" --tag v1
  stream+=("$secs"); [ "$rss_mb" -gt "$s_rss" ] && s_rss=$rss_mb
  grep -E '^app-stream: evaluate|^pushed ' "$work/publish-stream-$r.err" | sed 's/^/    /'
  start_registry "layered-$r"; rm -rf "$XDG_CACHE_HOME"
  measure "publish-layered-$r" "$nixctr" -v -C "$proj" publish app-layered --registry "$host" --tag v1
  layered+=("$secs"); [ "$rss_mb" -gt "$l_rss" ] && l_rss=$rss_mb
  grep -E '^app-layered: evaluate|^pushed ' "$work/publish-layered-$r.err" | sed 's/^/    /'
done
h=$(median "${hand[@]}"); f=$(median "${floor[@]}"); s=$(median "${stream[@]}"); l=$(median "${layered[@]}")
echo "the image program alone (stream to nowhere): ${f}s -> the floor of a streamed publish is $(ratio "$f" "$h") of by hand"
echo "publish streamLayeredImage: ${s}s vs by hand ${h}s -> ratio $(ratio "$s" "$h") (target <= 0.5); peak RSS $s_rss MB"
echo "publish buildLayeredImage:  ${l}s vs by hand ${h}s -> ratio $(ratio "$l" "$h") (target <= 0.7); peak RSS $l_rss MB"

# --- re-publish of the streamed image after a one-file change ---------------------------
start_registry republish; rm -rf "$XDG_CACHE_HOME"
"$nixctr" -q -C "$proj" publish app-stream --registry "$host" --tag v1 >/dev/null
sed -i 's|config.Cmd|extraCommands = "echo changed > marker";\n  config.Cmd|' "$proj/containers/app-stream/default.nix"
(cd "$proj" && git commit -qam change)
"$nixctr" -q -C "$proj" build app-stream -o "$work/warm.tar" >/dev/null; rm -f "$work/warm.tar"
measure republish-cache "$nixctr" -v -C "$proj" publish app-stream --registry "$host" --tag v2; warm=$secs
grep -E '^pushed ' "$work/republish-cache.err" | sed 's/^/    /'
rm -rf "$XDG_CACHE_HOME"
measure republish-no-cache "$nixctr" -v -C "$proj" publish app-stream --registry "$host" --tag v3
grep -E '^pushed ' "$work/republish-no-cache.err" | sed 's/^/    /'
echo "re-publish of the stream after a one-file change, blob cache vs none: ${warm}s vs ${secs}s -> ratio $(ratio "$warm" "$secs")"
