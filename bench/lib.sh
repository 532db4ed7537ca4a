# Shared by the benchmark scripts: the nixctr to measure, a scratch directory, a throwaway
# docker-registry on 127.0.0.1, and a timer. The caller sets $here (bench/) and $work (the
# scratch directory; emptied first when the caller sets fresh=1); registries live under
# $work/reg-NAME.

nixctr=${NIXCTR:-${CARGO_TARGET_DIR:-$here/../target}/release/nixctr}
[ -x "$nixctr" ] || { echo "no nixctr at $nixctr (cargo build --release, or set NIXCTR)" >&2; exit 1; }
[ "${fresh:-0}" = 1 ] && rm -rf "$work"
mkdir -p "$work"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"/reg-*; }
trap cleanup EXIT

# start_registry NAME -> sets $host to host:port; storage under $work/reg-NAME
start_registry() {
  local name=$1 dir="$work/reg-$1" port
  rm -rf "$dir"; mkdir -p "$dir/storage"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$dir/config.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
http:
  addr: 127.0.0.1:$port
YML
  docker-registry serve "$dir/config.yml" >"$dir/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
  host="127.0.0.1:$port"
}

# measure LABEL CMD... -> sets secs, rss_mb; keeps stderr in $work/LABEL.err
measure() {
  local label=$1; shift
  sync
  /usr/bin/time -v -o "$work/$label.time" "$@" >"$work/$label.out" 2>"$work/$label.err" || {
    echo "$label failed:" >&2; cat "$work/$label.err" >&2; exit 1; }
  secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {n=split($2,t,":"); s=0; for(i=1;i<=n;i++) s=s*60+t[i]; print s}' "$work/$label.time")
  rss_mb=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f", $2/1024}' "$work/$label.time")
  printf '%-28s %7.2f s  %5s MB peak RSS\n' "$label" "$secs" "$rss_mb"
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

