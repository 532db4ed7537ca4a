#!/usr/bin/env bash
# Pushes a ~900 MB, ~60-layer image with nixctr and with skopeo, side by side, each to a fresh
# docker-registry on 127.0.0.1, and prints time, peak RSS and stored blob bytes, with ratios:
#   cold push            nixctr .tar      vs skopeo .tar      (target time ratio <= 0.6)
#   re-push, new tag     nixctr (cache)   vs skopeo (its blob-info cache)   (<= 1.0)
#   one layer changed    nixctr sends exactly one layer
#   compressed archive   nixctr .tar.gz   vs skopeo .tar      (<= 0.8)
# usage: bench/push.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default target-push release build)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench}
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
cd "$work"

if [ ! -f big.tar ] || [ ! -f changed.tar ]; then
  echo "generating images in $work" >&2
  python3 "$here/gen-image.py" big --layers 60 --size-mb 900 >&2
  python3 "$here/gen-image.py" changed --layers 60 --size-mb 900 --change-layer 30 >&2
fi

blob_bytes() { find "$work/reg-$1/storage" -path '*/blobs/*' -name data -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }

export XDG_CACHE_HOME="$work/nixctr-cache"
rm -rf "$XDG_CACHE_HOME"
skopeo_copy() { echo skopeo copy --quiet --dest-tls-verify=false "docker-archive:$1" "docker://$2"; }

echo "== cold push (.tar)"
start_registry nixctr; a=$host; start_registry skopeo; b=$host
measure nixctr-cold "$nixctr" push big.tar "$a/bench/app:1"; n_secs=$secs; n_rss=$rss_mb
measure skopeo-cold $(skopeo_copy big.tar "$b/bench/app:1"); s_secs=$secs; s_rss=$rss_mb
n_bytes=$(blob_bytes nixctr); s_bytes=$(blob_bytes skopeo)
echo "cold time ratio nixctr/skopeo: $(ratio "$n_secs" "$s_secs")   (target <= 0.6)"
echo "peak RSS: nixctr $n_rss MB, skopeo $s_rss MB   (target nixctr <= 100)"
echo "stored blob bytes: nixctr $n_bytes, skopeo $s_bytes, ratio $(ratio "$n_bytes" "$s_bytes")   (target within 10%)"

echo "== re-push under a new tag"
measure nixctr-retag "$nixctr" push big.tar "$a/bench/app:2"; n_secs=$secs
measure skopeo-retag $(skopeo_copy big.tar "$b/bench/app:2"); s_secs=$secs
echo "re-push time ratio nixctr/skopeo: $(ratio "$n_secs" "$s_secs")   (target <= 1.0)"

echo "== re-push with one layer changed"
measure nixctr-changed "$nixctr" push changed.tar "$a/bench/app:3"
summary=$(grep '^pushed ' "$work/nixctr-changed.err")
echo "nixctr: $summary"
measure skopeo-changed $(skopeo_copy changed.tar "$b/bench/app:3")
case $summary in "pushed 1 layer "*) echo "one layer sent: yes" ;; *) echo "one layer sent: NO" ;; esac

echo "== compressed archive: nixctr .tar.gz vs skopeo .tar (both cold)"
rm -rf "$XDG_CACHE_HOME"
start_registry nixctr-gz; c=$host; start_registry skopeo-2; d=$host
measure nixctr-cold-gz "$nixctr" push big.tar.gz "$c/bench/app:1"; n_secs=$secs; n_rss=$rss_mb
measure skopeo-cold-2 $(skopeo_copy big.tar "$d/bench/app:1"); s_secs=$secs
echo ".tar.gz time ratio nixctr/skopeo(.tar): $(ratio "$n_secs" "$s_secs")   (target <= 0.8); nixctr peak RSS $n_rss MB"
