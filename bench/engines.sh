#!/usr/bin/env bash
# Several engines, side by side in one run: `build --all` of the fixture, cold (throwaway
# stores), on two engines (the local Docker socket and the TLS engine on 127.0.0.1:2376)
# against the local one alone. Both engines share this machine's two cores, so the ratio
# says little about two machines; what matters is the overhead of spreading: per-engine
# set-up time (container, upload, nixpkgs) and the bytes uploaded to each engine.
# usage: bench/engines.sh [WORKDIR]   (NIXCTR=path/to/nixctr, default the release build)
# Needs scripts/setup.sh to have run.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
work=${1:-/tmp/nixctr-bench-engines}
fresh=1
# shellcheck source=bench/lib.sh
. "$here/lib.sh"
cp -r "$here/../fixtures/project" "$here/../fixtures/nixpkgs" "$work/"
rm -rf "$work"/project/containers/broken-*
cd "$work/project"
export DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=/etc/nixctr-test/tls/client XDG_CACHE_HOME="$work/cache"
local_engine=unix:///var/run/docker.sock
tls_engine=tcp://127.0.0.1:2376
echo "machine: $(nproc) cores, $(. /etc/os-release; echo "$PRETTY_NAME"); containers: $("$nixctr" list --all | tr '\n' ' ')"

measure one-engine "$nixctr" -v --no-cache --engine "$local_engine" build --all; one=$secs
rm -f ./*.tar.gz
measure two-engines "$nixctr" -v --no-cache --engine "$local_engine" --engine "$tls_engine" build --all; two=$secs
echo "time ratio two engines / one: $(ratio "$two" "$one")   (both engines share 2 cores here)"
for e in "$local_engine" "$tls_engine"; do
  # -v: "[ENGINE] context: N files, M bytes in S s" and the nixpkgs resolution per engine.
  grep -F "[$e] context:" "$work/two-engines.err" | sed "s|^|  |" || true
done
grep -F "context:" "$work/one-engine.err" | sed 's|^|  one engine: |' || true
