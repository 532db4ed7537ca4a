#!/usr/bin/env bash
# Pushes a ~900 MB, ~60-layer image with nixctr and with skopeo, side by side, each to a fresh
# docker-registry on 127.0.0.1, both at gzip level 1, and prints time, peak RSS and stored blob
# bytes, with ratios:
#   cold push            nixctr .tar      vs skopeo .tar      (target time ratio <= 0.6)
#   re-push, new tag     nixctr (cache)   vs skopeo (its blob-info cache)   (<= 1.0)
#   one layer changed    nixctr vs skopeo, each re-pushing to its registry   (<= 0.8);
#                        nixctr reads and sends exactly one layer
#   compressed archive   nixctr .tar.gz   vs skopeo .tar      (<= 0.6)
#   zstd                 nixctr --compression zstd vs nixctr gzip, both cold   (<= 1.0)
#   stream               nixctr push - < big.tar (cold), next to the .tar push
#   peak RSS of every nixctr push <= 100 MB (summed up at the end)
#   body-capped proxy    nixctr through nginx at 8 MiB vs nixctr direct   (<= 1.3)
#   one cut connection   nixctr cut at half its largest layer vs undisturbed   (<= 1.2)
# usage: bench/push.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default target-push release build;
#        SECTIONS=uploads runs only the last two, SECTIONS=issue17 all but those)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench}
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
cd "$work"
rm -f "$work"/nixctr-*.time

if [ ! -f big.tar ]; then
  echo "generating big.tar in $work" >&2
  python3 "$here/gen-image.py" big --layers 60 --size-mb 900 >&2
fi
if [ "${SECTIONS:-all}" != uploads ] && [ ! -f changed.tar ]; then
  python3 "$here/gen-image.py" changed --layers 60 --size-mb 900 --change-layer 30 >&2
fi

blob_bytes() { find "$work/reg-$1/storage" -path '*/blobs/*' -name data -printf '%s\n' | awk '{s+=$1} END {print s+0}'; }

export XDG_CACHE_HOME="$work/nixctr-cache"
rm -rf "$XDG_CACHE_HOME"
# Both compress gzip at level 1 (nixctr's level, src/compress.rs GZIP_LEVEL): skopeo's
# default is 6, which would flatter nixctr.
skopeo_copy() { echo skopeo copy --quiet --dest-tls-verify=false --dest-compress-level 1 "docker-archive:$1" "docker://$2"; }

if [ "${SECTIONS:-all}" != uploads ]; then
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
measure nixctr-changed "$nixctr" push changed.tar "$a/bench/app:3"; n_secs=$secs
summary=$(grep '^pushed ' "$work/nixctr-changed.err")
echo "nixctr: $summary"
measure skopeo-changed $(skopeo_copy changed.tar "$b/bench/app:3"); s_secs=$secs
case $summary in "pushed 1 layer "*"; read 1 of "*) echo "one layer read and sent: yes" ;; *) echo "one layer read and sent: NO" ;; esac
echo "one-changed-layer time ratio nixctr/skopeo: $(ratio "$n_secs" "$s_secs")   (target <= 0.8)"

echo "== compressed archive: nixctr .tar.gz vs skopeo .tar (both cold)"
rm -rf "$XDG_CACHE_HOME"
start_registry nixctr-gz; c=$host; start_registry skopeo-2; d=$host
measure nixctr-cold-gz "$nixctr" push big.tar.gz "$c/bench/app:1"; n_secs=$secs; n_rss=$rss_mb
measure skopeo-cold-2 $(skopeo_copy big.tar "$d/bench/app:1"); s_secs=$secs
echo ".tar.gz time ratio nixctr/skopeo(.tar): $(ratio "$n_secs" "$s_secs")   (target <= 0.6); nixctr peak RSS $n_rss MB"

echo "== zstd vs gzip (nixctr, both cold, .tar)"
rm -rf "$XDG_CACHE_HOME"
start_registry gzip; e=$host; start_registry zstd; f=$host
measure nixctr-gzip "$nixctr" -v push big.tar "$e/bench/app:1"; g_secs=$secs
rm -rf "$XDG_CACHE_HOME"
measure nixctr-zstd "$nixctr" -v push --compression zstd big.tar "$f/bench/app:1"; z_secs=$secs
echo "gzip:  $(grep -m1 '^push phases' "$work/nixctr-gzip.err")"
echo "zstd:  $(grep -m1 '^push phases' "$work/nixctr-zstd.err")"
echo "stored blob bytes: gzip $(blob_bytes gzip), zstd $(blob_bytes zstd)"
echo "zstd/gzip time ratio: $(ratio "$z_secs" "$g_secs")   (target <= 1.0)"

echo "== stream: nixctr push - < big.tar (cold), next to the .tar push above"
rm -rf "$XDG_CACHE_HOME"
start_registry stream; g=$host
measure nixctr-stream sh -c "\"\$0\" -v push - \"\$1\" < big.tar" "$nixctr" "$g/bench/app:1"; t_secs=$secs
echo "stream: $(grep -m1 '^push phases' "$work/nixctr-stream.err")"
echo "stream/.tar time ratio: $(ratio "$t_secs" "$g_secs")"

echo "== peak RSS of every nixctr push (target <= 100 MB)"
for f in "$work"/nixctr-*.time; do
  printf '%-24s %5s MB\n' "$(basename "$f" .time)" "$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$f")"
done
fi

[ "${SECTIONS:-all}" = issue17 ] && exit 0

# start_nginx NAME UPSTREAM_PORT BODY_LIMIT -> sets $host: nginx as a reverse proxy, as
# registries are often run, with client_max_body_size BODY_LIMIT.
start_nginx() {
  local dir="$work/reg-$1" port
  mkdir -p "$dir"/{body,proxy,fastcgi,uwsgi,scgi}
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$dir/nginx.conf" <<CONF
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 256; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy; fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server {
    listen 127.0.0.1:$port;
    client_max_body_size $3;
    location / { proxy_pass http://127.0.0.1:$2; proxy_set_header Host \$http_host; proxy_http_version 1.1; }
  }
}
CONF
  nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;' &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  host="127.0.0.1:$port"
}

# start_cut_proxy NAME UPSTREAM_PORT [--cut-at-half-of SIZE] -> sets $host
start_cut_proxy() {
  local name=$1 upstream=$2 port; shift 2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 "$here/cut-proxy.py" "$port" "$upstream" "$@" >/dev/null 2>"$work/$name.proxy.err" &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  host="127.0.0.1:$port"
}

port_of() { echo "${1##*:}"; }
sent_line() { grep '^sent ' "$work/$1.err" || echo "(no sent line)"; }

echo "== through nginx with client_max_body_size 8m vs direct (both cold, same nixctr)"
rm -rf "$XDG_CACHE_HOME"
start_registry direct; a=$host; start_registry behind-nginx; start_nginx nginx-8m "$(port_of "$host")" 8m; b=$host
measure nixctr-direct "$nixctr" push big.tar "$a/bench/app:1"; d_secs=$secs
rm -rf "$XDG_CACHE_HOME"
measure nixctr-nginx-8m "$nixctr" push big.tar "$b/bench/app:1"; p_secs=$secs; p_rss=$rss_mb
echo "direct: $(sent_line nixctr-direct)"
echo "nginx:  $(sent_line nixctr-nginx-8m)"
echo "8 MiB proxy time ratio proxy/direct: $(ratio "$p_secs" "$d_secs")   (target <= 1.3); nixctr peak RSS $p_rss MB"

echo "== one connection cut at half the largest layer vs undisturbed (both through the same proxy)"
largest=$(skopeo inspect --raw --tls-verify=false "docker://$a/bench/app:1" |
  python3 -c 'import json,sys; print(max(l["size"] for l in json.load(sys.stdin)["layers"]))')
rm -rf "$XDG_CACHE_HOME"
start_registry calm; start_cut_proxy calm "$(port_of "$host")"; c=$host
measure nixctr-undisturbed "$nixctr" push big.tar "$c/bench/app:1"; u_secs=$secs
rm -rf "$XDG_CACHE_HOME"
start_registry cut; start_cut_proxy cut "$(port_of "$host")" --cut-at-half-of "$largest"; e=$host
measure nixctr-cut "$nixctr" -v push big.tar "$e/bench/app:1"; x_secs=$secs
cat "$work/cut.proxy.err"
echo "nixctr: $(grep -m1 '^resumed ' "$work/nixctr-cut.err" || echo "NOT resumed")"
echo "undisturbed: $(sent_line nixctr-undisturbed)"
echo "cut:         $(sent_line nixctr-cut)"
echo "cut time ratio cut/undisturbed: $(ratio "$x_secs" "$u_secs")   (target <= 1.2)"
