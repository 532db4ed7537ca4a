#!/usr/bin/env bash
# Many containers in one run, side by side in one run, printing ratios:
#   warm    `nixctr publish --changed HEAD~1` with three containers changed, against three
#           separate `nixctr publish NAME` runs (what a CI matrix runs, without its runners'
#           start-up), each to a fresh registry, warm store          (target <= 0.6)
#   cold    `nixctr build --all` in a throwaway store: how often the derivation every
#           container shares (busybox) is built                       (target: once)
# usage: bench/many.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default the release build)
# Needs scripts/setup.sh to have run. Uses Docker at /var/run/docker.sock.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-many}
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
export DOCKER_HOST=unix:///var/run/docker.sock
git_() { git -C "$work/project" -c user.name=bench -c user.email=bench@nixctr.invalid "$@"; }

# The fixture project without its broken containers, as a git repository.
cp -r "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
rm -rf "$work"/project/containers/broken-*
git_ init -q -b main && git_ add -A && git_ commit -qm one
cd "$work/project"
names=$("$nixctr" list --all | tr '\n' ' ')
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(. /etc/os-release; echo "$PRETTY_NAME"), $(docker version -f 'Docker {{.Server.Version}}')"
echo "containers: $names"

echo "== warm store: one run for three changed containers vs three runs"
"$nixctr" -q build --all -o /dev/null 2>/dev/null || "$nixctr" -q build --all >/dev/null
rm -f ./*.tar.gz
changed=(hello ntfy web)
for n in "${changed[@]}"; do echo "# bench change" >> "containers/$n/default.nix"; done
git_ commit -qam two
start_registry batch; a=$host; start_registry matrix; b=$host
export XDG_CACHE_HOME="$work/cache-batch"
measure publish-changed "$nixctr" publish --changed HEAD~1 --registry "$a" --namespace team; one=$secs
export XDG_CACHE_HOME="$work/cache-matrix"
total=0
for n in "${changed[@]}"; do
  measure "publish-$n" "$nixctr" publish "$n" --registry "$b" --namespace team
  total=$(awk -v a="$total" -v b="$secs" 'BEGIN {print a + b}')
done
pushed=$(grep -c '@sha256:' "$work/publish-changed.out")
echo "pushed by the one run: $pushed of ${#changed[@]}"
echo "time ratio one run / three runs: $(ratio "$one" "$total") ($one s vs $total s)   (target <= 0.6)"

echo "== cold store: shared derivations"
measure build-all-cold "$nixctr" -v --no-cache build --all
count=$(grep -c "^building '/nix/store/[a-z0-9]*-busybox-[^']*\.drv'" "$work/build-all-cold.err" || true)
users=$(grep -l 'pkgs.busybox' containers/*/default.nix | wc -l)
built=$(grep -c '^building ' "$work/build-all-cold.err" || true)
echo "busybox derivation built $count time(s) for $users containers that use it; $built derivations built in all   (target: once)"
