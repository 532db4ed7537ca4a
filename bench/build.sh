#!/usr/bin/env bash
# Benchmarks for `nixctr build` and `nixctr version`, each measured side by side with the
# thing a user would do instead, in one run; prints ratios (targets from the issues):
#   context   nixctr's upload of 20,000 files / 300 MB vs `tar -c | docker cp -`  (<= 1.0, RSS < 50 MB)
#   overhead  `nixctr build hello` vs the hand-written docker create/cp/exec/cp   (<= 1.2)
#   warm      second build of `heavy` vs the cold one                              (<= 0.33)
#   version   5 nixpkgs names vs 1                                                 (< 1.5)
#   files     a version answered from default.nix / Dockerfile                     (< 50 ms)
# Needs scripts/setup.sh to have run. Uses Docker at /var/run/docker.sock.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORK=${BENCH_DIR:-/var/tmp/nixctr-bench}
IMAGE=nixos/nix:2.33.3
command -v /usr/bin/time >/dev/null || { apt-get install -y -qq time >/dev/null; }
cargo build --release --locked -q
NIXCTR=$PWD/target/release/nixctr
export DOCKER_HOST=unix:///var/run/docker.sock

now() { date +%s.%N; }
# median of the arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }
peak_kb() { awk '/Maximum resident set size/ {print $6}' "$1"; }

mkdir -p "$WORK"
# --- a project with 20,000 files / ~300 MB (binaries and text, generated once) ---
BIG=$WORK/big-project
if [ ! -f "$BIG/.done" ]; then
  rm -rf "$BIG"; mkdir -p "$BIG/containers/tiny"
  python3 - "$BIG" <<'PY'
import os, sys, random
root = sys.argv[1]; random.seed(7)
srcs = [os.path.join(d, f) for d in ("/usr/bin", "/usr/lib/x86_64-linux-gnu", "/usr/share/doc") for f in sorted(os.listdir(d))[:400]]
srcs = [p for p in srcs if os.path.isfile(p) and not os.path.islink(p)]
total, n = 0, 0
while n < 20000:
    src = srcs[n % len(srcs)]
    data = open(src, "rb").read()[: random.randint(1000, 30000)]
    d = os.path.join(root, "data", "d%03d" % (n // 200))
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "f%05d" % n), "wb").write(data)
    total += len(data); n += 1
pad = 300_000_000 - total
for i in range(30):  # a few large files make up the rest
    open(os.path.join(root, "data", "blob%02d" % i), "wb").write(os.urandom(pad // 60) + b"x" * (pad // 60))
PY
  cat > "$BIG/containers/tiny/default.nix" <<'NIX'
{ pkgs ? import <nixpkgs> { } }:
pkgs.dockerTools.buildLayeredImage { name = "tiny"; tag = "latest"; contents = [ pkgs.hello ]; }
NIX
  printf 'nixpkgs = "%s"\n' "$PWD/fixtures/nixpkgs" > "$BIG/nixctr.toml"
  touch "$BIG/.done"
fi
files=$(find "$BIG" -type f | wc -l); bytes=$(du -sb "$BIG" | cut -f1)
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), $(docker version -f 'Docker {{.Server.Version}}')"
echo "context tree: $files files, $((bytes / 1000000)) MB"

# --- context upload: nixctr (its own -v timing line) vs tar | docker cp ---
docker pull -q "$IMAGE" >/dev/null
ours=(); theirs=(); rss=0
for _ in $(seq "$ROUNDS"); do
  /usr/bin/time -v "$NIXCTR" -v -C "$BIG" build tiny -o "$WORK/tiny.tar.gz" 2>"$WORK/ctx.log" >/dev/null
  t=$(sed -n 's/^context: .* in \([0-9.]*\)s$/\1/p' "$WORK/ctx.log"); ours+=("$t")
  kb=$(peak_kb "$WORK/ctx.log"); [ "$kb" -gt "$rss" ] && rss=$kb
  ctr=$(docker create "$IMAGE" sleep 600)
  s=$(now); tar -c -C "$BIG" --exclude=.git --exclude=.done . | docker cp - "$ctr:/"; e=$(now)
  docker rm -f "$ctr" >/dev/null
  theirs+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')")
done
o=$(median "${ours[@]}"); t=$(median "${theirs[@]}")
echo "context: nixctr ${o}s vs tar|docker cp ${t}s -> ratio $(ratio "$o" "$t") (target <= 1.0); nixctr peak RSS $((rss / 1024)) MB (target < 50)"

# --- overhead: nixctr build vs the hand-written docker sequence (warm store both) ---
PROJ=$PWD/fixtures/project
# The nix image's own store volume (README: nixctr-store-<first 12 hex of its ID>), not
# whichever store volume the engine lists first.
# Docker 20.10 retags the tag on a platform pull (the arm64 tests do one): name the native image.
docker pull -q --platform "linux/$(dpkg --print-architecture)" "$IMAGE" >/dev/null
id=$(docker image inspect -f '{{.Id}}' "$IMAGE"); id=${id#sha256:}
vol=nixctr-store-${id:0:12}
"$NIXCTR" -q -C "$PROJ" build hello -o "$WORK/hello.tar.gz" >/dev/null # warm the store
ours=(); theirs=()
for _ in $(seq "$ROUNDS"); do
  s=$(now); "$NIXCTR" -q -C "$PROJ" build hello -o "$WORK/hello.tar.gz" >/dev/null; e=$(now)
  ours+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')")
  s=$(now)
  ctr=$(docker create -v "$vol:/nix" -e XDG_CACHE_HOME=/nix/var/nixctr/cache "$IMAGE" sleep 600)
  # A failed step must not leave the container holding the store volume.
  trap 'docker rm -f "$ctr" >/dev/null 2>&1 || true' EXIT
  docker start "$ctr" >/dev/null
  tar -c -C "$PWD/fixtures" --transform 's,^project,workspace,;s,^nixpkgs,nixctr/nixpkgs,' project nixpkgs | docker cp - "$ctr:/"
  np=$(docker exec "$ctr" nix --extra-experimental-features 'nix-command flakes' flake metadata path:/nixctr/nixpkgs --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')
  out=$(docker exec -w /workspace -e NIX_PATH="nixpkgs=$np" "$ctr" nix-build containers/hello/default.nix --no-out-link 2>/dev/null)
  docker cp "$ctr:$out" - | tar -xO > "$WORK/hello-by-hand.tar.gz"
  docker rm -f "$ctr" >/dev/null
  e=$(now); theirs+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')")
done
o=$(median "${ours[@]}"); t=$(median "${theirs[@]}")
cmp -s "$WORK/hello.tar.gz" "$WORK/hello-by-hand.tar.gz" && same=identical || same=DIFFERENT
echo "overhead: nixctr build ${o}s vs docker create/cp/exec/cp ${t}s -> ratio $(ratio "$o" "$t") (target <= 1.2; archives $same)"

# --- warm vs cold: a fresh store volume, then the same build again ---
"$NIXCTR" -q cache rm >/dev/null || true
s=$(now); "$NIXCTR" -q -C "$PROJ" build heavy -o "$WORK/heavy.tar.gz" >/dev/null; e=$(now)
cold=$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')
s=$(now); "$NIXCTR" -q -C "$PROJ" build heavy -o "$WORK/heavy.tar.gz" >/dev/null; e=$(now)
warm=$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')
echo "warm build: cold ${cold}s, warm ${warm}s -> ratio $(ratio "$warm" "$cold") (target <= 0.33)"

# --- version: 5 nixpkgs names vs 1, and a file-answered name ---
one=(); five=(); file=()
for _ in $(seq "$ROUNDS"); do
  s=$(now); "$NIXCTR" -q -C "$PROJ" version curl >/dev/null; e=$(now); one+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')")
  s=$(now); "$NIXCTR" -q -C "$PROJ" version curl web ntfy-sh authentik busybox >/dev/null; e=$(now); five+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print e-s}')")
  s=$(now); "$NIXCTR" -q -C "$PROJ" --engine unix:///nonexistent.sock version ntfy >/dev/null; e=$(now); file+=("$(awk -v s="$s" -v e="$e" 'BEGIN {print (e-s)*1000}')")
done
o=$(median "${one[@]}"); f=$(median "${five[@]}")
echo "version: 5 names ${f}s vs 1 name ${o}s -> ratio $(ratio "$f" "$o") (target < 1.5); from default.nix $(median "${file[@]}") ms (target < 50)"
