#!/usr/bin/env bash
# Benchmark for remote builders: a cold build of a container whose closure holds two
# derivations of a few seconds of real work each (sha256 rounds, as fixtures' busywork), built
#   local     by the one engine (nix --max-jobs = its CPUs)
#   builders  with --builders-only and two builders (nix spreads the derivations, one job each)
# and prints the ratio builders/local (median of ROUNDS) and the bytes nix copied back from the
# builders (NAR sizes of the paths it copied, read from the builder's store).
# This machine has one amd64 builder (scripts/setup.sh, section 9): the two builders are two
# machine entries reaching that container, so the work shares the same cores as the local
# build; the ratio shows nix's spreading and the ssh/copy overhead, not extra CPU.
# Needs scripts/setup.sh to have run. Uses Docker at /var/run/docker.sock.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
WORK_ROUNDS=${WORK_ROUNDS:-24}   # sha256 passes over 64 MiB per derivation (~3 s on one core)
WORK=${BENCH_DIR:-/var/tmp/nixctr-bench-builders}
# A debug build is enough: the time is nix's (NIXCTR=path to use another binary).
if [ -z "${NIXCTR:-}" ]; then cargo build --locked -q; NIXCTR=${CARGO_TARGET_DIR:-$PWD/target}/debug/nixctr; fi
export DOCKER_HOST=unix:///var/run/docker.sock
B=/etc/nixctr-test/builders
BUILDER=ssh-ng://root@127.0.0.1:2222
[ -s "$B/id_builder" ] || { echo "no test builders: run scripts/setup.sh" >&2; exit 1; }

now() { date +%s.%N; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a/b}'; }

rm -rf "$WORK"; mkdir -p "$WORK/project/containers/work"
printf 'nixpkgs = "%s"\n' "$PWD/fixtures/nixpkgs" >"$WORK/project/nixctr.toml"
# write_project NONCE: two independent derivations of real work, and the image holding both.
write_project() {
  cat >"$WORK/project/containers/work/default.nix" <<NIX
{ pkgs ? import <nixpkgs> { } }:
let
  work = part: pkgs.runCommand "work-\${part}" { nonce = "$1"; rounds = $WORK_ROUNDS; } ''
    yes "nixctr \${part} $1" | head -c 67108864 > data
    i=0; : > sums
    while [ "\$i" -lt "\$rounds" ]; do sha256sum data >> sums; i=\$((i + 1)); done
    mkdir -p \$out/share; sha256sum < sums > \$out/share/\${part}; rm -f data
  '';
in
pkgs.dockerTools.buildLayeredImage {
  name = "work";
  tag = "latest";
  contents = [ pkgs.busybox (work "a") (work "b") ];
}
NIX
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $("$NIXCTR" --version)"
echo "work: 2 derivations x $WORK_ROUNDS sha256 rounds over 64 MiB; $ROUNDS rounds, median"
local_s=(); remote_s=(); copied=()
for r in $(seq 1 "$ROUNDS"); do
  write_project "local-$r-$RANDOM$RANDOM"
  t0=$(now)
  "$NIXCTR" -C "$WORK/project" -q build work --network host -o "$WORK/local.tar.gz" >/dev/null
  local_s+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b-a}')")

  write_project "remote-$r-$RANDOM$RANDOM"
  t0=$(now)
  "$NIXCTR" -C "$WORK/project" -v build work --network host --builders-only \
    --builder "$BUILDER x86_64-linux - 1" --builder "$BUILDER?compress=false x86_64-linux - 1" \
    --builder-key "$B/id_builder" --builder-known-hosts "$B/known_hosts" \
    -o "$WORK/remote.tar.gz" >/dev/null 2>"$WORK/remote.log"
  remote_s+=("$(awk -v a="$t0" -v b="$(now)" 'BEGIN {print b-a}')")
  grep -q ', 0 here' "$WORK/remote.log" || { tail -20 "$WORK/remote.log" >&2; echo "something was built locally" >&2; exit 1; }
  mapfile -t paths < <(sed -n "s/^copying path '\(\/nix\/store\/[^']*\)' from 'ssh-ng:\/\/'.*/\1/p" "$WORK/remote.log")
  bytes=0
  if [ ${#paths[@]} -gt 0 ]; then
    bytes=$(docker exec nixctr-builder nix-store --query --size "${paths[@]}" | awk '{s += $1} END {print s + 0}')
  fi
  copied+=("$bytes")
  printf 'round %s: local %.1fs, builders %.1fs (%s), %s paths / %s bytes copied back\n' "$r" \
    "${local_s[-1]}" "${remote_s[-1]}" "$(grep -o 'builders: derivations built.*' "$WORK/remote.log")" \
    "${#paths[@]}" "$bytes"
done
l=$(median "${local_s[@]}"); b=$(median "${remote_s[@]}")
printf 'cold build: local %.1fs, two builders %.1fs: ratio builders/local %s; copied back (median) %s bytes\n' \
  "$l" "$b" "$(ratio "$b" "$l")" "$(median "${copied[@]}")"
