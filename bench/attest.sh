#!/usr/bin/env bash
# What attaching costs a publish, side by side in one run: `publish --sign-key --provenance`
# against a plain `publish` of the same warm image (the nix store already holds the build),
# each round to two fresh docker-registries on 127.0.0.1, the order alternating per round.
# Prints each run, the medians and their ratio (target <= 1.15).
# usage: bench/attest.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default the release build;
#        ROUNDS=N, default 5; SBOM=1 adds --sbom to the attested side once the SBOM
#        generator is wired into `attachments::sbom_for`)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-attest}
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
export DOCKER_HOST=${DOCKER_HOST:-unix:///var/run/docker.sock}
# PROJECT=DIR CONTAINER=NAME: another project's container (a git checkout), e.g. the big
# image bench/publish.sh leaves in /tmp/nixctr-bench-publish/project (app-layered).
container=${CONTAINER:-ntfy}
# VERSION=V for a container whose version nixctr cannot find.
version=(); [ -n "${VERSION:-}" ] && version=(--version "$VERSION")
if [ -n "${PROJECT:-}" ]; then
  cp -r "$PROJECT" "$work/project"
else
  cp -r "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
  git -C "$work/project" init -q -b main
  git -C "$work/project" -c user.name=b -c user.email=b@nixctr.invalid add -A
  git -C "$work/project" -c user.name=b -c user.email=b@nixctr.invalid commit -qm one
fi
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$work/cosign.key" 2>/dev/null
chmod 600 "$work/cosign.key"
cd "$work/project"
export XDG_CACHE_HOME="$work/cache"
echo "machine: $(nproc) cores, $(. /etc/os-release; echo "$PRETTY_NAME"), $(docker version -f 'Docker {{.Server.Version}}')"

attached=(--sign-key "$work/cosign.key" --provenance)
[ "${SBOM:-0}" = 1 ] && attached+=(--sbom)
echo "attested side: publish ${attached[*]}"

start_registry warm
measure warm-up "$nixctr" publish "$container" "${version[@]}" --registry "$host"
plain=(); attest=()
rounds=${ROUNDS:-5}
for i in $(seq "$rounds"); do
  start_registry "plain-$i"; a=$host; start_registry "attest-$i"; b=$host
  if [ $((i % 2)) = 1 ]; then
    measure "plain-$i" "$nixctr" publish "$container" "${version[@]}" --registry "$a"; plain+=("$secs")
    measure "attest-$i" "$nixctr" publish "$container" "${version[@]}" --registry "$b" "${attached[@]}"; attest+=("$secs")
  else
    measure "attest-$i" "$nixctr" publish "$container" "${version[@]}" --registry "$b" "${attached[@]}"; attest+=("$secs")
    measure "plain-$i" "$nixctr" publish "$container" "${version[@]}" --registry "$a"; plain+=("$secs")
  fi
  grep -q '^signed ' "$work/attest-$i.err" || { echo "attest-$i did not sign" >&2; exit 1; }
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
p=$(median "${plain[@]}"); s=$(median "${attest[@]}")
echo "median: plain $p s, attested $s s"
echo "attested / plain: $(ratio "$s" "$p")   (target <= 1.15)"
