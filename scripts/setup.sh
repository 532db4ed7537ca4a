#!/usr/bin/env bash
# shellcheck disable=SC2015  # "A && B || true" is intended throughout
# nixctr test environment setup — idempotent; CI runs it from scratch (root,
# no stdin, CI=true) and developers rerun it freely (a no-op rerun takes <1 s;
# from scratch: see "Timing" below).
#
# Sets up, on this machine only (loopback):
#   * Debian packages: docker.io podman debootstrap docker-registry skopeo curl
#     ca-certificates openssl apache2-utils busybox-static uidmap nginx
#     qemu-user-static binfmt-support python3 openssh-server openssh-client
#   * binfmt_misc: qemu-aarch64 registered with the F (fix-binary) flag, so both
#     engines run linux/arm64 containers (emulated) on an amd64 machine
#   * mirror registry   127.0.0.1:5000   (docker-registry, plain HTTP, no auth;
#                       storage /var/lib/nixctr-test/mirror), used as the
#                       docker.io mirror by both engines
#   * Docker engine     unix:///var/run/docker.sock   (dockerd, overlay2)
#   * Podman engine     unix:///run/podman/podman.sock (podman system service,
#                       Docker-compatible API, e.g. /v1.41/...; storage driver
#                       overlay if the kernel allows it, else vfs; cgroupfs,
#                       runc, default_ulimits kept below the hard limits)
#   * binary cache     http://127.0.0.1:5081/ (nginx, own config
#                       /etc/nixctr-test/cache/nginx.conf; WebDAV PUT; files
#                       under /var/lib/nixctr-test/cache/public), and
#                       http://127.0.0.1:5081/private/ behind basic auth
#                       (netrc: /etc/nixctr-test/cache/netrc); a nix signing
#                       key pair /etc/nixctr-test/cache/signing-key{,.pub}
#                       (mode 600), made with `nix key generate-secret` in the
#                       nix image.  Build containers reach it with --network host.
#   * TLS Docker engine tcp://127.0.0.1:2376 (a second dockerd: --tlsverify,
#                       its own data-root /var/lib/nixctr-test/docker-tls,
#                       exec-root, pidfile, bridge nixctr-br1 172.31.250.1/24
#                       made with `ip link`, --iptables=false, the same mirror;
#                       also on unix:///run/nixctr-test/docker-tls.sock).  CA,
#                       server (SAN IP:127.0.0.1, DNS:localhost) and client
#                       certificates made with openssl under /etc/nixctr-test/tls;
#                       client material in /etc/nixctr-test/tls/client/{ca,cert,
#                       key}.pem (key mode 600), the CA's key in tls/ca-key.pem
#                       (tests sign an expired certificate with it)
#   * sshd              127.0.0.1:2222 (openssh-server, own config, host key,
#                       authorized keys and pid file under /etc/nixctr-test/ssh;
#                       PermitRootLogin prohibit-password, stream-local
#                       forwarding on), client key /etc/nixctr-test/ssh/id_ed25519,
#                       known_hosts /etc/nixctr-test/ssh/known_hosts: so
#                       ssh://root@127.0.0.1:2222 reaches the Docker socket and
#                       ssh://root@127.0.0.1:2222/run/podman/podman.sock Podman
#   * nix remote builders (section 9): containers nixctr-builder (linux/amd64) and
#                       nixctr-builder-arm64 (linux/arm64, under qemu) of the nix image, each
#                       with its own store volume, reached as ssh-ng://root@127.0.0.1:2222
#                       through the sshd above with a key of their own
#                       (/etc/nixctr-test/builders/id_builder{,_arm64}, mode 600) whose
#                       authorized_keys line forces `docker exec -i <builder> nix-daemon
#                       --stdio`; host keys in /etc/nixctr-test/builders/known_hosts
#   * image nixos/nix:2.33.3 in the mirror, i.e. what `docker pull
#     nixos/nix:2.33.3` (docker.io/nixos/nix:2.33.3) gets in both engines:
#     a manifest list for linux/amd64 and linux/arm64 (each platform also
#     tagged 2.33.3-amd64 / 2.33.3-arm64).  It is NOT the upstream image but
#     shaped like it (NixOS/nix docker.nix): Debian trixie minbase + Debian's
#     nix 2.26 (nix-bin), with all of /usr added to /nix/store (and registered
#     valid in the nix db) and /usr a symlink to it, so every tool -- /bin/sh,
#     /usr/bin/env, nix -- lives in the store; profile
#     /nix/var/nix/profiles/default (= /root/.nix-profile) on PATH; root;
#     nixbld1..32 build users, sandbox = false, no substituters (offline);
#     openssh-client (ssh, as the upstream image has, for remote builders).
#     Built by scripts/nix-image/ (build-rootfs.sh, push-index.py, config.json).
#     The engines copy the image's /nix into a new empty named volume mounted
#     at /nix; a container whose /nix is NOT seeded from the image has no shell.
#     Emulated (arm64) nix needs filter-syscalls = false (NIX_CONFIG; not in
#     the image's nix.conf).
# Timing (2 cores, busy): from scratch the image step takes ~7.5 min: both
# root fs are built in parallel, amd64 ~1-2.5 min, arm64 ~6-7 min (dpkg and nix
# under qemu), then ~20 s to push; --verify ~30 s more; the builders ~30 s.  The root fs tars
# (and their gzip'd layers) are cached in /var/lib/nixctr-test
# (nix-rootfs-vN-ARCH.tar; bump ROOTFS_VERSION when the recipe changes).
# Logs: /var/log/nixctr-test/*.log.  State/caches: /var/lib/nixctr-test.
# Daemons are started detached (setsid nohup) and keep running after exit.
#
# Usage: scripts/setup.sh [--quick] [--verify] [--dry-run]
#   --quick (or NIXCTR_SETUP=quick; scripts/quickstart.sh): only what a build
#   needs -- the packages docker.io docker-registry debootstrap curl
#   ca-certificates python3, the mirror, Docker, and nixos/nix:2.33.3 for this
#   machine's own platform only (an index of that one image; the amd64 root fs
#   takes ~70 s).  No Podman, binfmt/qemu, TLS dockerd, sshd or binary cache.
#   A quick setup accepts a full one as done; a full setup after a quick one
#   builds the missing platform and pushes the full index (stamp below).
#   --verify (or NIXCTR_SETUP_VERIFY=1): also run the end-to-end checks (pull
#   through the mirror in both engines, nix in a container, podman compat API
#   with a named volume on /nix, linux/arm64 under qemu; with --quick: Docker
#   only); they always run after the image is (re)built, which also makes the
#   engines' local nixos/nix:2.33.3 the new image.
#   --dry-run: print what this run would do (a line per step: done, or what it
#   would install, start or build), change nothing; needs no root.
#   NIXCTR_SETUP_NIX_TAG=TAG (development): build/verify the image as
#   nixos/nix:TAG instead, leaving 2.33.3 alone.
# Stdout: KEY=VALUE summary of the endpoints.  Progress: one line per step on stderr.
set -euo pipefail

MIRROR=127.0.0.1:5000
DOCKER_SOCK=/var/run/docker.sock
PODMAN_SOCK=/run/podman/podman.sock
NIX_REPO=nixos/nix
# NIXCTR_SETUP_NIX_TAG: development only -- build/verify the image under
# another tag (e.g. candidate) without touching the one the tests use.
NIX_TAG=${NIXCTR_SETUP_NIX_TAG:-2.33.3}
STATE=/var/lib/nixctr-test
LOGS=/var/log/nixctr-test
CONF=/etc/nixctr-test
RUNDIR=/run/nixctr-test
CACHE_ADDR=127.0.0.1:5081
CACHE_CONF=$CONF/cache
CACHE_STATE=$STATE/cache
TLS_PORT=2376
TLS_HOST=tcp://127.0.0.1:$TLS_PORT
TLS_SOCK=$RUNDIR/docker-tls.sock
TLS_DIR=$CONF/tls
TLS_BRIDGE=nixctr-br1
TLS_BRIDGE_CIDR=172.31.250.1/24
SSH_PORT=2222
SSH_DIR=$CONF/ssh
BUILDER_DIR=$CONF/builders
# Remote builders (section 9): "CONTAINER ARCH KEY-FILE".
BUILDERS=("nixctr-builder amd64 id_builder" "nixctr-builder-arm64 arm64 id_builder_arm64")
BUILDERS_STAMP=$STATE/builders.made
# Bump when the image recipe below changes: invalidates the cached root fs.
# (The recipe: scripts/nix-image/build-rootfs.sh and config.json.)
ROOTFS_VERSION=4
ROOTFS_CACHE=$STATE/nix-rootfs-v$ROOTFS_VERSION   # + -ARCH.tar
NIX_ARCHES=(amd64 arm64)
NIX_IMAGE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/nix-image
# What was pushed last: "vROOTFS_VERSION LIST_DIGEST" for the full index,
# "vROOTFS_VERSION LIST_DIGEST ARCH-only" for a quick setup's one-platform index.
IMAGE_STAMP=$STATE/nix-image-$NIX_TAG.pushed
DEBIAN_MIRROR=${NIXCTR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(docker.io podman debootstrap docker-registry skopeo curl ca-certificates
          openssl apache2-utils busybox-static uidmap nginx qemu-user-static binfmt-support
          python3 openssh-server openssh-client)
PACKAGES_QUICK=(docker.io debootstrap docker-registry curl ca-certificates python3)
MARK="# Managed by nixctr scripts/setup.sh"

VERIFY=${NIXCTR_SETUP_VERIFY:-0}
MODE=${NIXCTR_SETUP:-full}
DRY_RUN=0
for arg in "$@"; do
  case $arg in
    --quick) MODE=quick ;;
    --verify) VERIFY=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
case $MODE in
  full) ;;
  quick) PACKAGES=("${PACKAGES_QUICK[@]}") ;;
  *) echo "setup: NIXCTR_SETUP must be quick or full, not '$MODE'" >&2; exit 2 ;;
esac
# This machine's own platform, as Debian and the image index name it.
case $(uname -m) in
  x86_64) NATIVE_ARCH=amd64 ;;
  aarch64|arm64) NATIVE_ARCH=arm64 ;;
  *) die "no nix image recipe for this machine's platform ($(uname -m)); amd64 and arm64 have one" ;;
esac
[ "$MODE" = quick ] && NIX_ARCHES=("$NATIVE_ARCH")
IS_ROOT=0; [ "$(id -u)" -eq 0 ] && IS_ROOT=1
need_root() { [ "$IS_ROOT" -eq 1 ] || die "$* — this needs root; rerun as root (sudo $0)"; }

# write_file PATH MODE: write stdin to PATH if its content differs.
# Returns 0 when the file changed, 1 when it already had that content.
write_file() {
  local path=$1 mode=$2 tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if [ -f "$path" ] && cmp -s "$tmp" "$path"; then rm -f "$tmp"; return 1; fi
  need_root "writing $path"
  mkdir -p "$(dirname "$path")"
  if [ -f "$path" ] && ! grep -qF "$MARK" "$path" && [ ! -e "$path.pre-nixctr" ]; then
    cp -p "$path" "$path.pre-nixctr"
  fi
  install -m "$mode" "$tmp" "$path"
  rm -f "$tmp"
}

# wait_for DESCRIPTION SECONDS CMD...: poll CMD until it succeeds.
wait_for() {
  local secs=$2; shift 2
  local i
  for ((i = 0; i < secs * 4; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  return 1
}

# start_daemon NAME CMD...: start CMD detached, log to $LOGS/NAME.log, pid in $RUNDIR/NAME.pid
start_daemon() {
  local name=$1; shift
  mkdir -p "$LOGS" "$RUNDIR"
  # keep logs bounded: one previous generation once over 50 MB
  if [ "$(stat -c %s "$LOGS/$name.log" 2>/dev/null || echo 0)" -gt 50000000 ]; then
    mv -f "$LOGS/$name.log" "$LOGS/$name.log.old"
  fi
  printf '\n==== %s: %s\n' "$(date -Is)" "$*" >>"$LOGS/$name.log"
  # From /: a daemon whose working directory is deleted later (the clone that started it)
  # breaks, e.g. podman's conmon fails with "Failed to get working directory".
  (cd / && exec setsid nohup "$@" </dev/null >>"$LOGS/$name.log" 2>&1 9>&-) &
  local comm=${1##*/}
  echo "$! ${comm:0:15}" >"$RUNDIR/$name.pid"   # pid and /proc/PID/comm
}

# pid_is_live PID COMM: PID is a running (not zombie) process named COMM.
pid_is_live() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

pid_gone() { ! kill -0 "$1" 2>/dev/null || [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" = Z ]; }

# wait_daemon NAME SECONDS CHECK: wait for CHECK, giving up early if the
# daemon started by start_daemon NAME has died; on failure show its log and die.
wait_daemon() {
  local name=$1 secs=$2 check=$3 pid i
  read -r pid _ <"$RUNDIR/$name.pid"
  for ((i = 0; i < secs * 4; i++)); do
    "$check" && return 0
    if pid_gone "$pid"; then
      "$check" && return 0
      break
    fi
    sleep 0.25
  done
  tail -15 "$LOGS/$name.log" >&2
  die "$name did not come up (log $LOGS/$name.log)"
}

# stop_daemon NAME: stop a daemon this script started (by its pid file; only
# if that pid still is that program: /run may survive a reboot here).
stop_daemon() {
  local name=$1 pid comm
  [ -f "$RUNDIR/$name.pid" ] || return 0
  read -r pid comm <"$RUNDIR/$name.pid" || return 0
  if [ -n "$pid" ] && pid_is_live "$pid" "$comm"; then
    kill "$pid" 2>/dev/null || true
    wait_for "$name to exit" 30 pid_gone "$pid" || kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$RUNDIR/$name.pid"
}

mirror_up() { curl -sf -m 3 "http://$MIRROR/v2/" >/dev/null; }
docker_up() { curl -sf -m 5 --unix-socket "$DOCKER_SOCK" http://d/_ping >/dev/null; }
podman_up() { curl -sf -m 5 --unix-socket "$PODMAN_SOCK" http://d/_ping >/dev/null; }
docker_tls_up() { curl -sf -m 5 --unix-socket "$TLS_SOCK" http://d/_ping >/dev/null; }
docker_tls_tcp_up() {
  curl -sf -m 5 --cacert "$TLS_DIR/client/ca.pem" --cert "$TLS_DIR/client/cert.pem" \
    --key "$TLS_DIR/client/key.pem" "https://127.0.0.1:$TLS_PORT/_ping" >/dev/null
}
sshd_up() {
  ssh -F none -o BatchMode=yes -o ConnectTimeout=5 -o IdentitiesOnly=yes -i "$SSH_DIR/id_ed25519" \
    -o UserKnownHostsFile="$SSH_DIR/known_hosts" -o StrictHostKeyChecking=yes -p "$SSH_PORT" root@127.0.0.1 true \
    </dev/null >/dev/null 2>&1
}

# mirror_nix_digest: the digest of what the mirror serves as $NIX_REPO:$NIX_TAG
# (a manifest list), empty if nothing.
mirror_nix_digest() {
  curl -sfI -m 5 \
    -H 'Accept: application/vnd.docker.distribution.manifest.list.v2+json' \
    -H 'Accept: application/vnd.oci.image.index.v1+json' \
    "http://$MIRROR/v2/$NIX_REPO/manifests/$NIX_TAG" \
    | tr -d '\r' | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *//p'
}
# image_stamp DIGEST: what $IMAGE_STAMP says once this mode has pushed the list DIGEST.
image_stamp() {
  if [ "$MODE" = quick ]; then echo "v$ROOTFS_VERSION $1 $NATIVE_ARCH-only"; else echo "v$ROOTFS_VERSION $1"; fi
}
# mirror_has_nix: the mirror serves the list this recipe version pushed last, with the
# platforms this mode needs (a quick setup is content with the full index too).
mirror_has_nix() {
  local d stamp
  d=$(mirror_nix_digest) && [ -n "$d" ] || return 1
  stamp=$(cat "$IMAGE_STAMP" 2>/dev/null) || return 1
  [ "$stamp" = "v$ROOTFS_VERSION $d" ] || [ "$stamp" = "$(image_stamp "$d")" ]
}

if [ "$IS_ROOT" -eq 1 ] && [ "$DRY_RUN" -eq 0 ]; then
  mkdir -p "$STATE" "$LOGS" "$CONF" "$RUNDIR"
  # Serialise concurrent runs (two engineers / CI + developer).
  exec 9>"$RUNDIR/setup.lock"
  flock 9
fi

# ---------------------------------------------------------------- 1. packages
step_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then log "apt: all packages present"; return; fi
  need_root "installing packages: ${missing[*]}"
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Keep maintainer scripts from starting services (docker-registry would bind
  # *:5000 with Debian's default config, dockerd would start unconfigured);
  # this script starts them itself.  Only if no policy-rc.d exists already.
  local policy=/usr/sbin/policy-rc.d own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; own_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq >"$LOGS/apt.log" 2>&1 || { cat "$LOGS/apt.log" >&2; die "apt-get update failed"; }
  apt-get install -y -qq --no-install-recommends -o Dpkg::Options::=--force-confold \
    "${missing[@]}" >>"$LOGS/apt.log" 2>&1 \
    || { tail -30 "$LOGS/apt.log" >&2; die "apt-get install failed (log: $LOGS/apt.log)"; }
  if [ "$own_policy" -eq 1 ]; then rm -f "$policy"; trap - EXIT; fi
}

# ---------------------------------------------------------------- 1b. binfmt (qemu-user)
BINFMT=/proc/sys/fs/binfmt_misc
binfmt_ok() { # qemu-aarch64 is registered, enabled, with the F (fix-binary) flag
  [ -r "$BINFMT/qemu-aarch64" ] && grep -qx enabled "$BINFMT/qemu-aarch64" \
    && grep -q '^flags:.*F' "$BINFMT/qemu-aarch64"
}
step_binfmt() {
  local conf=/usr/lib/binfmt.d/qemu-aarch64.conf how=""
  if binfmt_ok; then log "binfmt: qemu-aarch64 registered ($(grep '^flags' "$BINFMT/qemu-aarch64"))"; return; fi
  need_root "registering qemu-aarch64 with binfmt_misc"
  if [ ! -e "$BINFMT/register" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc on $BINFMT"
    how="mounted $BINFMT; "
  fi
  [ "$(cat "$BINFMT/status" 2>/dev/null)" = enabled ] || echo 1 >"$BINFMT/status"
  # The F flag makes the kernel open the interpreter now, so it works inside
  # containers (whose root has no /usr/libexec/qemu-binfmt).  An entry
  # without it (registered by someone else) is replaced.
  if [ -e "$BINFMT/qemu-aarch64" ]; then echo -1 >"$BINFMT/qemu-aarch64"; how+="replaced an entry without F; "; fi
  if [ -r "$conf" ]; then
    grep -q ':[A-Z]*F[A-Z]*$' "$conf" || die "$conf does not ask for the F flag"
    cat "$conf" >"$BINFMT/register" || die "writing $conf to $BINFMT/register failed"
  else
    # Debian's qemu-user-static entry (magic/mask of an aarch64 ELF executable).
    printf '%s' ':qemu-aarch64:M::\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:OCPF' \
      >"$BINFMT/register" || die "registering qemu-aarch64 failed"
  fi
  binfmt_ok || die "qemu-aarch64 is not registered with the F flag after writing $BINFMT/register"
  log "binfmt: ${how}qemu-aarch64 registered ($(grep '^flags' "$BINFMT/qemu-aarch64"))"
}

# ---------------------------------------------------------------- 2. mirror registry
step_mirror() {
  local changed=0
  write_file "$CONF/registry.yml" 644 <<EOF && changed=1 || true
$MARK
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $STATE/mirror
  delete:
    enabled: true
http:
  addr: $MIRROR
EOF
  if mirror_up && [ $changed -eq 0 ]; then log "mirror: up at $MIRROR"; return; fi
  need_root "starting the mirror registry"
  [ $changed -eq 1 ] && stop_daemon registry
  if mirror_up; then
    log "mirror: WARNING: something not started by this script answers on $MIRROR; keeping it"
    return
  fi
  # Debian's own docker-registry service (if a package script started it: its
  # init script keeps /run/docker-registry.pid) listens on *:5000 too, with
  # auth, so the mirror check above fails with 401: stop it.
  if [ -x /etc/init.d/docker-registry ] && [ -s /run/docker-registry.pid ]; then
    log "mirror: stopping Debian's docker-registry service (it wants :5000)"
    /etc/init.d/docker-registry stop >/dev/null 2>&1 || true
  fi
  mkdir -p "$STATE/mirror"
  start_daemon registry docker-registry serve "$CONF/registry.yml"
  wait_daemon registry 30 mirror_up
  log "mirror: started at $MIRROR (log $LOGS/registry.log)"
}

# ---------------------------------------------------------------- 3. docker
json_merge_mirror() { # stdin: daemon.json, stdout: merged
  local m="http://$MIRROR"
  if command -v jq >/dev/null 2>&1; then
    jq --arg m "$m" '."registry-mirrors" = ([$m] + ((."registry-mirrors" // []) - [$m]))'
  elif command -v python3 >/dev/null 2>&1; then
    python3 -c 'import json,sys; m=sys.argv[1]; d=json.load(sys.stdin); l=[x for x in d.get("registry-mirrors",[]) if x!=m]; d["registry-mirrors"]=[m]+l; print(json.dumps(d, indent=2))' "$m"
  else
    die "need jq or python3 to merge /etc/docker/daemon.json"
  fi
}

step_docker() {
  local f=/etc/docker/daemon.json changed=0 new
  if [ ! -s "$f" ] || [ "$(tr -d ' \t\n' <"$f")" = "{}" ]; then
    new=$(printf '{\n  "registry-mirrors": ["http://%s"]\n}' "$MIRROR")
  elif grep -q "\"http://$MIRROR\"" "$f"; then
    new=$(cat "$f")
  else
    new=$(json_merge_mirror <"$f") || die "cannot parse $f"
  fi
  printf '%s\n' "$new" | write_file "$f" 644 && changed=1 || true

  local pid
  if docker_up; then
    if [ $changed -eq 1 ]; then
      # registry-mirrors is reloadable: SIGHUP instead of a restart (keeps containers).
      pid=$(cat /var/run/docker.pid 2>/dev/null || true)
      [ -n "$pid" ] && kill -HUP "$pid" 2>/dev/null || true
      sleep 1
      if ! docker info --format '{{json .RegistryConfig.Mirrors}}' 2>/dev/null | grep -q "$MIRROR"; then
        log "docker: restarting dockerd to apply daemon.json"
        [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
        [ -n "$pid" ] && wait_for "dockerd exit" 30 pid_gone "$pid" || true
      else
        log "docker: daemon.json updated, dockerd reloaded (SIGHUP)"
      fi
    fi
    if docker_up; then log "docker: up at unix://$DOCKER_SOCK"; return; fi
  fi
  [ "$IS_ROOT" -eq 1 ] || [ ! -S "$DOCKER_SOCK" ] || die "$DOCKER_SOCK exists but does not answer to $(id -un) (no permission, or dockerd hung); run as root"
  need_root "starting dockerd"
  command -v dockerd >/dev/null || die "dockerd not found (package docker.io)"
  # A dockerd that is still starting: give it time.  A stale pid file (dockerd
  # killed, or its pid still a zombie) makes a new dockerd refuse to start.
  pid=$(cat /var/run/docker.pid 2>/dev/null || true)
  if [ -n "$pid" ] && pid_is_live "$pid" dockerd; then
    wait_for "dockerd" 60 docker_up || die "dockerd (pid $pid) is running but $DOCKER_SOCK does not answer"
    log "docker: up at unix://$DOCKER_SOCK"; return
  fi
  rm -f /var/run/docker.pid
  # Same for the containerd that dockerd manages ("containerd is still running").
  pid=$(cat /var/run/docker/containerd/containerd.pid 2>/dev/null || true)
  if [ -n "$pid" ] && ! pid_is_live "$pid" containerd; then rm -f /var/run/docker/containerd/containerd.pid; fi
  start_daemon dockerd dockerd
  wait_daemon dockerd 60 docker_up
  log "docker: started at unix://$DOCKER_SOCK (log $LOGS/dockerd.log)"
}

# ---------------------------------------------------------------- 4. podman
overlay_works() { # can the kernel mount overlayfs on top of $1's filesystem?
  local base=$1 d ok=1
  mkdir -p "$base"
  d=$(mktemp -d "$base/.overlay-probe.XXXXXX")
  mkdir -p "$d/l" "$d/u" "$d/w" "$d/m"
  echo x >"$d/l/f"
  if mount -t overlay overlay -o "lowerdir=$d/l,upperdir=$d/u,workdir=$d/w" "$d/m" 2>/dev/null; then
    [ -f "$d/m/f" ] && echo y >"$d/m/f" 2>/dev/null && ok=0
    umount "$d/m" 2>/dev/null || umount -l "$d/m"
  fi
  rm -rf "$d"
  return $ok
}

podman_conf() { # podman_conf NOFILE NPROC; returns 0 when containers.conf changed
  write_file /etc/containers/containers.conf 644 <<EOF
$MARK
[containers]
# Must not exceed the podman service's own hard limits, else every container
# start fails with "error setting rlimits" (no CAP_SYS_RESOURCE here).
default_ulimits = [
  "nofile=$1:$1",
  "nproc=$2:$2",
]

[engine]
# no systemd here
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
EOF
}

start_podman() {
  mkdir -p "$(dirname "$PODMAN_SOCK")"
  rm -f "$PODMAN_SOCK"
  start_daemon podman podman system service --time=0 "unix://$PODMAN_SOCK"
  wait_daemon podman 60 podman_up
}

# cwd_lost PATTERN: the oldest process matching PATTERN runs in a deleted directory.
cwd_lost() {
  local pid
  pid=$(pgrep -of "$1") || return 1
  [[ $(readlink "/proc/$pid/cwd" 2>/dev/null) == *" (deleted)" ]]
}

min() { local m=$1 x; shift; for x; do [ "$x" -lt "$m" ] && m=$x; done; echo "$m"; }

step_podman() {
  local changed=0 hn hu pm nofile nproc driver pid sn su old
  # Podman as root asks for 1048576 files/processes unless default_ulimits says
  # otherwise; that fails here (hard limits lower, no CAP_SYS_RESOURCE).  Use at
  # most 65535 and at most the hard limits (podman also lowers its own NPROC
  # limit at start, to 32768 = pid_max here, so cap at pid_max too).  Never go
  # above what an earlier run settled on.
  hn=$(ulimit -Hn); hu=$(ulimit -Hu); pm=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
  [ "$hn" = unlimited ] && hn=65535; [ "$hu" = unlimited ] && hu=65535
  nofile=$(min 65535 "$hn"); nproc=$(min 65535 "$hu" "$pm")
  if grep -qF "$MARK" /etc/containers/containers.conf 2>/dev/null; then
    old=$(sed -n 's/.*"nofile=\([0-9]*\):.*/\1/p' /etc/containers/containers.conf); [ -n "$old" ] && nofile=$(min "$nofile" "$old")
    old=$(sed -n 's/.*"nproc=\([0-9]*\):.*/\1/p' /etc/containers/containers.conf); [ -n "$old" ] && nproc=$(min "$nproc" "$old")
  fi
  podman_conf "$nofile" "$nproc" && changed=1 || true
  write_file /etc/containers/registries.conf.d/50-nixctr-mirror.conf 644 <<EOF && changed=1 || true
$MARK
# docker.io is served by the local mirror (no Docker Hub access here).
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "$MIRROR"
insecure = true

[[registry]]
location = "$MIRROR"
insecure = true
EOF
  # Storage driver: keep the one already chosen (changing it orphans the store).
  if grep -qF "$MARK" /etc/containers/storage.conf 2>/dev/null; then
    driver=$(sed -n 's/^driver *= *"\(.*\)"/\1/p' /etc/containers/storage.conf)
  else
    need_root "configuring podman storage"
    if overlay_works /var/lib/containers; then driver=overlay; else driver=vfs; fi
  fi
  write_file /etc/containers/storage.conf 644 <<EOF && changed=1 || true
$MARK
[storage]
driver = "$driver"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
EOF
  if podman_up && cwd_lost "podman system service"; then
    log "podman: the service's working directory is gone (containers would not start); restarting it"
    changed=1
  fi
  if podman_up && [ $changed -eq 0 ]; then
    log "podman: up at unix://$PODMAN_SOCK (storage $driver, ulimits nofile=$nofile nproc=$nproc)"; return
  fi
  [ "$IS_ROOT" -eq 1 ] || [ ! -S "$PODMAN_SOCK" ] || podman_up || die "$PODMAN_SOCK exists but does not answer to $(id -un); run as root"
  need_root "starting the podman service"
  if podman_up; then
    stop_daemon podman
    podman_up && die "podman config changed, but a podman service not started by this script answers on $PODMAN_SOCK: stop it and rerun"
  fi
  start_podman
  # Check against the limits the service really runs with; align once if needed.
  read -r pid _ <"$RUNDIR/podman.pid"
  sn=$(awk '/^Max open files/ {print $5}' "/proc/$pid/limits")
  su=$(awk '/^Max processes/ {print $4}' "/proc/$pid/limits")
  [ "$sn" = unlimited ] && sn=$nofile; [ "$su" = unlimited ] && su=$nproc
  if [ "$nofile" -gt "$sn" ] || [ "$nproc" -gt "$su" ]; then
    nofile=$(min "$nofile" "$sn"); nproc=$(min "$nproc" "$su")
    podman_conf "$nofile" "$nproc" || true
    stop_daemon podman
    start_podman
  fi
  log "podman: started at unix://$PODMAN_SOCK (storage $driver, ulimits nofile=$nofile nproc=$nproc, log $LOGS/podman.log)"
}

# ---------------------------------------------------------------- 5. TLS docker engine
# make_cert NAME SUBJECT [EXTFILE]: $TLS_DIR/NAME-{key,cert}.pem signed by the CA (once).
make_cert() {
  local name=$1 subj=$2 ext=${3:-}
  [ -s "$TLS_DIR/$name-cert.pem" ] && [ -s "$TLS_DIR/$name-key.pem" ] && return 0
  openssl genrsa -out "$TLS_DIR/$name-key.pem" 2048 2>/dev/null
  chmod 600 "$TLS_DIR/$name-key.pem"
  openssl req -new -key "$TLS_DIR/$name-key.pem" -subj "$subj" -out "$TLS_DIR/$name.csr" 2>/dev/null
  openssl x509 -req -in "$TLS_DIR/$name.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca-key.pem" -CAcreateserial \
    -days 3650 -sha256 ${ext:+-extfile "$ext"} -out "$TLS_DIR/$name-cert.pem" 2>/dev/null
  rm -f "$TLS_DIR/$name.csr"
}

step_tls_certs() {
  if [ -s "$TLS_DIR/client/key.pem" ] && [ -s "$TLS_DIR/server-cert.pem" ]; then return; fi
  need_root "making the TLS certificates"
  mkdir -p "$TLS_DIR/client"; chmod 755 "$TLS_DIR"
  if [ ! -s "$TLS_DIR/ca.pem" ]; then
    openssl genrsa -out "$TLS_DIR/ca-key.pem" 2048 2>/dev/null; chmod 600 "$TLS_DIR/ca-key.pem"
    openssl req -new -x509 -days 3650 -sha256 -key "$TLS_DIR/ca-key.pem" -subj "/CN=nixctr test CA" \
      -out "$TLS_DIR/ca.pem" 2>/dev/null
  fi
  printf 'subjectAltName = IP:127.0.0.1,DNS:localhost\nextendedKeyUsage = serverAuth\n' >"$TLS_DIR/server.ext"
  printf 'extendedKeyUsage = clientAuth\n' >"$TLS_DIR/client.ext"
  make_cert server "/CN=localhost" "$TLS_DIR/server.ext"
  make_cert client "/CN=nixctr test client" "$TLS_DIR/client.ext"
  install -m 644 "$TLS_DIR/ca.pem" "$TLS_DIR/client/ca.pem"
  install -m 644 "$TLS_DIR/client-cert.pem" "$TLS_DIR/client/cert.pem"
  install -m 600 "$TLS_DIR/client-key.pem" "$TLS_DIR/client/key.pem"
  log "tls: CA, server and client certificates made in $TLS_DIR"
}

step_docker_tls() {
  local dir=$CONF/docker-tls changed=0
  write_file "$dir/daemon.json" 644 <<EOF && changed=1 || true
{
  "registry-mirrors": ["http://$MIRROR"]
}
EOF
  # Its own bridge: a dockerd with --bridge none would delete the first engine's docker0.
  if ! ip link show "$TLS_BRIDGE" >/dev/null 2>&1; then
    need_root "making bridge $TLS_BRIDGE"
    ip link add "$TLS_BRIDGE" type bridge
  fi
  ip -4 addr show dev "$TLS_BRIDGE" | grep -qF "${TLS_BRIDGE_CIDR%/*}/" || ip addr add "$TLS_BRIDGE_CIDR" dev "$TLS_BRIDGE"
  ip link set "$TLS_BRIDGE" up
  if docker_tls_up && docker_tls_tcp_up && [ $changed -eq 0 ]; then log "docker-tls: up at $TLS_HOST"; return; fi
  need_root "starting the TLS dockerd"
  stop_daemon docker-tls
  docker_tls_up && die "something not started by this script answers on $TLS_SOCK: stop it and rerun"
  if ss -Hltn "sport = :$TLS_PORT" | grep -q .; then die "port $TLS_PORT is taken by something else (ss -ltnp)"; fi
  rm -f "$RUNDIR/docker-tls.pidfile"
  mkdir -p "$STATE/docker-tls" "$RUNDIR/docker-tls-exec"
  start_daemon docker-tls dockerd --config-file "$dir/daemon.json" \
    --data-root "$STATE/docker-tls" --exec-root "$RUNDIR/docker-tls-exec" --pidfile "$RUNDIR/docker-tls.pidfile" \
    --bridge "$TLS_BRIDGE" --iptables=false --ip-masq=false \
    -H "unix://$TLS_SOCK" -H "$TLS_HOST" \
    --tlsverify --tlscacert "$TLS_DIR/ca.pem" --tlscert "$TLS_DIR/server-cert.pem" --tlskey "$TLS_DIR/server-key.pem"
  wait_daemon docker-tls 60 docker_tls_up
  wait_daemon docker-tls 30 docker_tls_tcp_up
  log "docker-tls: started at $TLS_HOST and unix://$TLS_SOCK (log $LOGS/docker-tls.log)"
}

# ---------------------------------------------------------------- 6. sshd
step_sshd() {
  local changed=0
  if [ ! -s "$SSH_DIR/ssh_host_ed25519_key" ] || [ ! -s "$SSH_DIR/id_ed25519" ]; then
    need_root "making ssh keys"
    mkdir -p "$SSH_DIR"; chmod 755 "$SSH_DIR"
    [ -s "$SSH_DIR/ssh_host_ed25519_key" ] || ssh-keygen -q -t ed25519 -N '' -C nixctr-test-host -f "$SSH_DIR/ssh_host_ed25519_key"
    [ -s "$SSH_DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -C nixctr-test-client -f "$SSH_DIR/id_ed25519"
  fi
  write_authorized_keys
  printf '[127.0.0.1]:%s %s\n' "$SSH_PORT" "$(cut -d' ' -f1-2 "$SSH_DIR/ssh_host_ed25519_key.pub")" \
    | write_file "$SSH_DIR/known_hosts" 644 || true
  write_file "$SSH_DIR/sshd_config" 644 <<EOF && changed=1 || true
$MARK
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_DIR/ssh_host_ed25519_key
PidFile $RUNDIR/sshd-own.pid
AuthorizedKeysFile $SSH_DIR/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowStreamLocalForwarding yes
# Stream-local forwarding is refused unless TCP forwarding is allowed too (OpenSSH 9.2).
AllowTcpForwarding local
X11Forwarding no
PrintMotd no
EOF
  if sshd_up && [ $changed -eq 0 ]; then log "sshd: up at 127.0.0.1:$SSH_PORT"; return; fi
  need_root "starting sshd"
  stop_daemon sshd
  if ss -Hltn "sport = :$SSH_PORT" | grep -q .; then die "port $SSH_PORT is taken by something else (ss -ltnp)"; fi
  mkdir -p /run/sshd; chmod 755 /run/sshd
  /usr/sbin/sshd -t -f "$SSH_DIR/sshd_config" || die "sshd -t rejects $SSH_DIR/sshd_config"
  start_daemon sshd /usr/sbin/sshd -D -e -f "$SSH_DIR/sshd_config"
  wait_daemon sshd 30 sshd_up
  log "sshd: started at 127.0.0.1:$SSH_PORT (log $LOGS/sshd.log)"
}

# write_authorized_keys: the client key, then the builders' forced-command lines (section 9);
# replaced whole (rename), so sshd never reads half a file.
write_authorized_keys() {
  cat "$SSH_DIR/id_ed25519.pub" "$BUILDER_DIR/authorized_keys" 2>/dev/null >"$SSH_DIR/authorized_keys.tmp" || true
  chmod 644 "$SSH_DIR/authorized_keys.tmp"
  cmp -s "$SSH_DIR/authorized_keys.tmp" "$SSH_DIR/authorized_keys" 2>/dev/null \
    && rm -f "$SSH_DIR/authorized_keys.tmp" || mv -f "$SSH_DIR/authorized_keys.tmp" "$SSH_DIR/authorized_keys"
}

# ---------------------------------------------------------------- 7. nix image
# build_rootfs ARCH: $ROOTFS_CACHE-ARCH.tar (scripts/nix-image/build-rootfs.sh).
build_rootfs() {
  local arch=$1 t0 rc=0
  t0=$(date +%s)
  DEBIAN_MIRROR=$DEBIAN_MIRROR DEBOOTSTRAP_CACHE=$STATE/debootstrap-cache-trixie-$arch \
    "$NIX_IMAGE_DIR/build-rootfs.sh" "$arch" "$ROOTFS_CACHE-$arch.tar" \
    >"$LOGS/rootfs-$arch.log" 2>&1 || rc=$?
  if [ $rc -ne 0 ]; then
    tail -20 "$LOGS/rootfs-$arch.log" >&2
    log "image: ERROR: $arch root fs failed (log $LOGS/rootfs-$arch.log)"
    return 1
  fi
  log "image: $arch root fs built in $(( $(date +%s) - t0 ))s ($(( $(stat -c %s "$ROOTFS_CACHE-$arch.tar") >> 20 )) MiB, log $LOGS/rootfs-$arch.log)"
}

IMAGE_BUILT=0
step_image() {
  if mirror_has_nix; then
    log "image: $MIRROR/$NIX_REPO:$NIX_TAG present ($(cut -d' ' -f2- "$IMAGE_STAMP"))"; return
  fi
  need_root "building the nix image"
  if [ "$NATIVE_ARCH" != arm64 ] && [[ " ${NIX_ARCHES[*]} " == *" arm64 "* ]]; then
    binfmt_ok || die "qemu-aarch64 binfmt is needed to build the arm64 image"
  fi
  local t0 arch pids=() failed=0 f digest specs=()
  t0=$(date +%s)
  # Root fs caches of older recipe versions are dead weight.
  for f in "$STATE"/nix-rootfs-v*.tar*; do
    case $f in "$ROOTFS_CACHE"-*) ;; *) [ -e "$f" ] && rm -f "$f" ;; esac
  done
  # Missing platforms are built in parallel (arm64 runs under qemu).
  for arch in "${NIX_ARCHES[@]}"; do
    if [ -s "$ROOTFS_CACHE-$arch.tar" ]; then
      log "image: using cached $arch root fs $ROOTFS_CACHE-$arch.tar"
    else
      log "image: building the $arch root fs (debootstrap trixie + nix-bin from $DEBIAN_MIRROR, log $LOGS/rootfs-$arch.log)"
      build_rootfs "$arch" & pids+=($!)
    fi
  done
  for f in "${pids[@]}"; do wait "$f" || failed=1; done
  [ $failed -eq 0 ] || die "building the nix image's root fs failed"
  for arch in "${NIX_ARCHES[@]}"; do specs+=("$arch=$ROOTFS_CACHE-$arch.tar"); done
  log "image: pushing $MIRROR/$NIX_REPO:$NIX_TAG (${NIX_ARCHES[*]}; log $LOGS/push.log)"
  digest=$(python3 "$NIX_IMAGE_DIR/push-index.py" "$MIRROR" "$NIX_REPO" "$NIX_TAG" \
             "$NIX_IMAGE_DIR/config.json" "${specs[@]}" 2>"$LOGS/push.log") \
    || { tail -20 "$LOGS/push.log" >&2; die "pushing $NIX_REPO:$NIX_TAG to the mirror failed"; }
  [ "$(mirror_nix_digest)" = "$digest" ] || die "mirror does not serve $NIX_REPO:$NIX_TAG = $digest after the push"
  image_stamp "$digest" >"$IMAGE_STAMP"
  IMAGE_BUILT=1
  log "image: built and pushed in $(( $(date +%s) - t0 ))s: $NIX_REPO:$NIX_TAG = $digest"
}

# ---------------------------------------------------------------- 8. binary cache
cache_up() { [ "$(curl -s -o /dev/null -w '%{http_code}' -m 3 "http://$CACHE_ADDR/nix-cache-info")" = 200 ]; }
step_cache() {
  local changed=0 t
  need_root_if_missing() { [ -e "$1" ] || need_root "$2"; }
  need_root_if_missing "$CACHE_CONF/signing-key" "making the binary cache signing key"
  mkdir -p "$CACHE_CONF" "$CACHE_STATE/public" "$CACHE_STATE/private" "$CACHE_STATE/tmp"
  chmod 700 "$CACHE_CONF"
  if [ ! -s "$CACHE_CONF/signing-key" ] || [ ! -s "$CACHE_CONF/signing-key.pub" ]; then
    log "cache: making the signing key pair (nix key generate-secret in $NIX_REPO:$NIX_TAG)"
    # Through the engine: this machine has no nix.  The secret goes through a pipe only.
    docker run --rm --network none "$NIX_REPO:$NIX_TAG" sh -c \
      'nix --extra-experimental-features nix-command key generate-secret --key-name nixctr-test-1 > /tmp/k 2>/dev/null &&
       cat /tmp/k && echo && nix --extra-experimental-features nix-command key convert-secret-to-public < /tmp/k 2>/dev/null' \
      >"$CACHE_CONF/keys.tmp" 2>>"$LOGS/cache-keys.log" || die "nix key generate-secret failed (log $LOGS/cache-keys.log)"
    chmod 600 "$CACHE_CONF/keys.tmp"
    (umask 077; sed -n 1p "$CACHE_CONF/keys.tmp" | tr -d '\n' >"$CACHE_CONF/signing-key"
     sed -n 2p "$CACHE_CONF/keys.tmp" | tr -d '\n' >"$CACHE_CONF/signing-key.pub")
    rm -f "$CACHE_CONF/keys.tmp"
    grep -q '^nixctr-test-1:' "$CACHE_CONF/signing-key.pub" || die "no public key came out of nix key convert-secret-to-public"
  fi
  chmod 600 "$CACHE_CONF/signing-key" "$CACHE_CONF/signing-key.pub"
  if [ ! -s "$CACHE_CONF/htpasswd" ] || [ ! -s "$CACHE_CONF/netrc" ]; then
    local pw
    pw=$(openssl rand -hex 12)
    htpasswd -bcB "$CACHE_CONF/htpasswd" nixctr "$pw" 2>/dev/null
    (umask 077; printf 'machine 127.0.0.1\nlogin nixctr\npassword %s\n' "$pw" >"$CACHE_CONF/netrc")
  fi
  chmod 644 "$CACHE_CONF/htpasswd"; chmod 600 "$CACHE_CONF/netrc"
  for d in public private; do
    t=$CACHE_STATE/$d/nix-cache-info
    [ -s "$t" ] || printf 'StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n' >"$t"
  done
  write_file "$CACHE_CONF/nginx.conf" 644 <<EOF && changed=1 || true
$MARK
# A nix binary cache for the tests: GET and WebDAV PUT, loopback only.
daemon off;
user root;
worker_processes 2;
pid $RUNDIR/cache-nginx.nginx.pid;   # not cache-nginx.pid: start_daemon keeps that one
error_log $LOGS/cache-nginx.log warn;
events { worker_connections 512; }
http {
  access_log off;
  client_body_temp_path $CACHE_STATE/tmp/body;
  proxy_temp_path $CACHE_STATE/tmp/proxy;
  fastcgi_temp_path $CACHE_STATE/tmp/fastcgi;
  uwsgi_temp_path $CACHE_STATE/tmp/uwsgi;
  scgi_temp_path $CACHE_STATE/tmp/scgi;
  client_max_body_size 0;
  default_type application/octet-stream;
  types { text/x-nix-narinfo narinfo; }
  server {
    listen $CACHE_ADDR;
    location / {
      root $CACHE_STATE/public;
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }
    location /private/ {
      root $CACHE_STATE;
      auth_basic "nixctr test cache";
      auth_basic_user_file $CACHE_CONF/htpasswd;
      dav_methods PUT;
      create_full_put_path on;
      dav_access user:rw group:r all:r;
    }
  }
}
EOF
  if cache_up && [ $changed -eq 0 ]; then log "cache: up at http://$CACHE_ADDR (nginx, WebDAV PUT)"; return; fi
  need_root "starting the binary cache (nginx)"
  [ $changed -eq 1 ] && stop_daemon cache-nginx
  if cache_up; then
    log "cache: WARNING: something not started by this script answers on $CACHE_ADDR; keeping it"
    return
  fi
  (exec 3<>"/dev/tcp/${CACHE_ADDR%:*}/${CACHE_ADDR#*:}") 2>/dev/null \
    && die "cache: port ${CACHE_ADDR#*:} is taken by something else (see ss -ltnp)"
  nginx -t -c "$CACHE_CONF/nginx.conf" >>"$LOGS/cache-nginx.log" 2>&1 \
    || { tail -5 "$LOGS/cache-nginx.log" >&2; die "nginx -t refused $CACHE_CONF/nginx.conf"; }
  start_daemon cache-nginx nginx -c "$CACHE_CONF/nginx.conf"
  wait_daemon cache-nginx 30 cache_up
  log "cache: started at http://$CACHE_ADDR (log $LOGS/cache-nginx.log)"
}

step_verify_cache() {
  local base=http://$CACHE_ADDR f=nixctr-verify-$$ code
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -T - "$base/verify/$f" <<<"hi") || true
  [ "$code" = 201 ] || [ "$code" = 204 ] || die "cache: PUT $base/verify/$f answered $code (want 201)"
  [ "$(curl -sf -m 5 "$base/verify/$f")" = hi ] || die "cache: GET of what was PUT differs"
  rm -f "$CACHE_STATE/public/verify/$f"
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 "$base/private/nix-cache-info")
  [ "$code" = 401 ] || die "cache: $base/private/ without credentials answered $code (want 401)"
  code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --netrc-file "$CACHE_CONF/netrc" "$base/private/nix-cache-info")
  [ "$code" = 200 ] || die "cache: $base/private/ with $CACHE_CONF/netrc answered $code (want 200)"
  log "verify: cache PUT/GET ok at $base, basic auth on /private/ ok (401 without, 200 with netrc)"
}

# ---------------------------------------------------------------- 9. nix remote builders
# Builders for nixctr's --builder ssh-ng://… (tests/it/builders.rs, bench/builders.sh): a
# container of the nix image per platform, with its own store volume, and a key whose
# authorized_keys line runs `docker exec -i CONTAINER nix-daemon --stdio` -- what ssh-ng://
# runs on a remote nix.  The arm64 one runs under qemu (filter-syscalls = false in its
# environment, which the exec'd daemon inherits).  They are made again, with fresh stores,
# when the nix image changes (stamp $BUILDERS_STAMP = the image's stamp).

# builder_answers KEY: a nix client in a throwaway container reaches the daemon behind KEY.
builder_answers() {
  docker run --rm --network host -v "$BUILDER_DIR:/b:ro" \
    -e NIX_SSHOPTS="-p $SSH_PORT -i /b/$1 -o IdentitiesOnly=yes -o UserKnownHostsFile=/b/known_hosts -o StrictHostKeyChecking=yes -o BatchMode=yes -o ConnectTimeout=10" \
    "$NIX_REPO:$NIX_TAG" nix --extra-experimental-features nix-command store ping --store ssh-ng://root@127.0.0.1 2>&1
}

builders_up() {
  local b name arch key
  [ "$(cat "$BUILDERS_STAMP" 2>/dev/null)" = "$(cat "$IMAGE_STAMP" 2>/dev/null)" ] || return 1
  for b in "${BUILDERS[@]}"; do
    read -r name arch key <<<"$b"
    [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ] || return 1
    [ -s "$BUILDER_DIR/$key" ] && grep -qF "$(cut -d' ' -f2 "$BUILDER_DIR/$key.pub")" "$SSH_DIR/authorized_keys" || return 1
  done
}

step_builders() {
  local b name arch key img out lines=""
  if builders_up; then log "builders: up (${BUILDERS[*]%% *})"; return; fi
  need_root "making the nix remote builders"
  local t0; t0=$(date +%s)
  mkdir -p "$BUILDER_DIR"; chmod 755 "$BUILDER_DIR"
  for b in "${BUILDERS[@]}"; do
    read -r name arch key <<<"$b"
    [ -s "$BUILDER_DIR/$key" ] || ssh-keygen -q -t ed25519 -N '' -C "nixctr-test-$name" -f "$BUILDER_DIR/$key"
    chmod 600 "$BUILDER_DIR/$key"
    lines+="command=\"docker exec -i $name nix-daemon --stdio\",restrict $(cut -d' ' -f1-2 "$BUILDER_DIR/$key.pub") nixctr-test-$name"$'\n'
  done
  printf '%s' "$lines" >"$BUILDER_DIR/authorized_keys"
  install -m 644 "$SSH_DIR/known_hosts" "$BUILDER_DIR/known_hosts"
  for b in "${BUILDERS[@]}"; do
    read -r name arch key <<<"$b"
    img=$NIX_REPO:$NIX_TAG; [ "$arch" = "$NATIVE_ARCH" ] || img=$NIX_REPO:$NIX_TAG-$arch
    docker pull -q --platform "linux/$arch" "$img" >/dev/null 2>>"$LOGS/builders.log" || die "builders: docker pull $img failed"
    docker rm -f "$name" >/dev/null 2>&1 || true
    docker volume rm "$name-store" >/dev/null 2>&1 || true
    local env=()
    [ "$arch" = "$NATIVE_ARCH" ] || env=(-e "NIX_CONFIG=filter-syscalls = false")
    docker run -d --name "$name" --platform "linux/$arch" --restart unless-stopped --network none \
      --label dev.nixctr.test=builder -v "$name-store:/nix" "${env[@]}" "$img" sleep infinity \
      >>"$LOGS/builders.log" 2>&1 || die "builders: cannot start $name (log $LOGS/builders.log)"
  done
  write_authorized_keys
  for b in "${BUILDERS[@]}"; do
    read -r name arch key <<<"$b"
    out=$(builder_answers "$key") || { printf '%s\n' "$out" >&2; die "builders: $name does not answer as a nix store through ssh-ng://root@127.0.0.1:$SSH_PORT"; }
    grep -q 'Trusted: 1' <<<"$out" || die "builders: $name does not trust the client (nix store ping: $out)"
  done
  cp "$IMAGE_STAMP" "$BUILDERS_STAMP"
  log "builders: ${BUILDERS[*]%% *} answer through ssh-ng://root@127.0.0.1:$SSH_PORT (keys in $BUILDER_DIR; made in $(( $(date +%s) - t0 ))s)"
}

# ---------------------------------------------------------------- 10. SBOM validators
# The SBOM tests validate nixctr's output with tools of the formats' own projects:
# cyclonedx-python-lib (its JSON validator: the CycloneDX 1.6 schema) and spdx-tools
# (`pyspdxtools`: SPDX 2.3). They live in a venv of their own; PyPI must be reachable.
SBOM_VENV=${NIXCTR_SBOM_VENV:-/opt/nixctr-test/sbom-venv}
SBOM_PIP=("cyclonedx-python-lib[json-validation]>=8,<12" "spdx-tools>=0.8,<0.9")
sbom_venv_ok() {
  "$SBOM_VENV/bin/python" -c 'import cyclonedx.validation.json, spdx_tools.spdx.parser.parse_anything' 2>/dev/null \
    && [ -x "$SBOM_VENV/bin/pyspdxtools" ]
}
step_sbom_venv() {
  if sbom_venv_ok; then log "sbom venv: ready ($SBOM_VENV)"; return; fi
  if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    need_root "installing python3-venv"
    apt-get install -y -qq --no-install-recommends python3-venv >>"$LOGS/apt.log" 2>&1 \
      || die "apt-get install python3-venv failed (log: $LOGS/apt.log)"
  fi
  log "sbom venv: installing ${SBOM_PIP[*]} into $SBOM_VENV"
  mkdir -p "$(dirname "$SBOM_VENV")"
  /usr/bin/python3 -m venv "$SBOM_VENV" || die "cannot create the venv $SBOM_VENV"
  "$SBOM_VENV/bin/pip" install -q --disable-pip-version-check "${SBOM_PIP[@]}" >"$LOGS/sbom-venv.log" 2>&1 \
    || { tail -20 "$LOGS/sbom-venv.log" >&2; die "pip install into $SBOM_VENV failed (log: $LOGS/sbom-venv.log)"; }
  sbom_venv_ok || die "the sbom venv $SBOM_VENV does not import its validators (log: $LOGS/sbom-venv.log)"
}

# ---------------------------------------------------------------- verification
# check_engine NAME SOCKET: drive the Docker-compatible API like nixctr does
# (bollard): pull through the mirror, named volume on /nix, create/start/exec.
api() { # api SOCKET METHOD PATH [JSON]
  local sock=$1 method=$2 path=$3 body=${4:-}
  if [ -n "$body" ]; then
    curl -sS -m 300 --unix-socket "$sock" -X "$method" -H 'Content-Type: application/json' -d "$body" "http://d/v1.41$path"
  else
    curl -sS -m 300 --unix-socket "$sock" -X "$method" "http://d/v1.41$path"
  fi
}
json_id() { sed -n 's/.*"Id" *: *"\([0-9a-f]*\)".*/\1/p' | head -1; }

check_cleanup() { # check_cleanup SOCKET CONTAINER VOLUME
  api "$1" DELETE "/containers/$2?force=true&v=true" >/dev/null 2>&1 || true
  api "$1" DELETE "/volumes/$3" >/dev/null 2>&1 || true
}

check_engine() {
  local name=$1 sock=$2 out cid eid vol mode hc rc fail
  # Drop the local tag (not forced: never touch containers of other users) so
  # the pull has to go through the mirror.
  api "$sock" DELETE "/images/$NIX_REPO:$NIX_TAG" >/dev/null 2>&1 || true
  out=$(api "$sock" POST "/images/create?fromImage=$NIX_REPO&tag=$NIX_TAG")
  if grep -qi '"error' <<<"$out" || ! api "$sock" GET "/images/$NIX_REPO:$NIX_TAG/json" | grep -q '"Id"'; then
    printf '%s\n' "$out" | tail -5 >&2; die "$name: pull of $NIX_REPO:$NIX_TAG through the compat API failed"
  fi
  # mounts: HostConfig.Mounts with a volume created beforehand (empty);
  # binds:  HostConfig.Binds "name:/nix", volume created implicitly.
  for mode in mounts binds; do
    vol=nixctr-setup-check-$$-$mode
    if [ $mode = mounts ]; then
      api "$sock" POST /volumes/create "{\"Name\":\"$vol\"}" >/dev/null
      hc="{\"Mounts\":[{\"Type\":\"volume\",\"Source\":\"$vol\",\"Target\":\"/nix\"}]}"
    else
      hc="{\"Binds\":[\"$vol:/nix\"]}"
    fi
    fail=
    out=$(api "$sock" POST "/containers/create?name=$vol" \
      "{\"Image\":\"$NIX_REPO:$NIX_TAG\",\"Cmd\":[\"sleep\",\"infinity\"],\"HostConfig\":$hc}")
    cid=$(json_id <<<"$out")
    if [ -z "$cid" ]; then fail="container create: $out"
    else
      out=$(api "$sock" POST "/containers/$cid/start")
      # shellcheck disable=SC2016  # $out is for the shell in the container
      eid=$(api "$sock" POST "/containers/$cid/exec" \
        '{"AttachStdout":true,"AttachStderr":true,"Cmd":["sh","-c","if [ -f /nix/var/nix/db/db.sqlite ]; then echo COPYUP=yes; else echo COPYUP=no; fi; cd /tmp && nix-build --no-out-link -E '\''derivation { name = \"x\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo hi $(/bin/id -un) > $out\" ]; }'\'' | xargs cat"]}' | json_id)
      if [ -z "$eid" ]; then fail="container start/exec create: $out"
      else
        out=$(api "$sock" POST "/exec/$eid/start" '{"Detach":false,"Tty":false}' | tr -c '[:print:]\n' ' ')
        rc=$(api "$sock" GET "/exec/$eid/json" | sed -n 's/.*"ExitCode" *: *\([0-9-]*\).*/\1/p')
        [ "$rc" = 0 ] && grep -q 'hi nixbld[0-9]' <<<"$out" || fail="exec exit code '$rc' (want 'hi nixbldN'): $out"
      fi
    fi
    check_cleanup "$sock" "$vol" "$vol"
    [ -z "$fail" ] || die "$name ($mode): $fail"
    log "verify: $name API ok ($mode): pull via mirror, create/start/exec, nix-build (as $(grep -o 'nixbld[0-9]*' <<<"$out" | head -1)) with a named volume on /nix; image /nix copied into the new volume: $(sed -n 's/.*COPYUP=\([a-z]*\).*/\1/p' <<<"$out")"
  done
}

NIXBUILD_CHECK='cd /tmp && nix-build --no-out-link -E '\''derivation { name = "x"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo hi $(/bin/id -un) $(/bin/uname -m) > $out" ]; }'\'' | xargs cat'

# check_arm64 NAME CLI: run the arm64 image (its own tag: pulling the list's
# tag with --platform would make that tag name arm64 locally in Docker 20.10)
# under qemu; nix there needs filter-syscalls = false.
check_arm64() {
  local name=$1 cli=$2 img=$NIX_REPO:$NIX_TAG-arm64 out
  $cli rmi -f "$img" "docker.io/$img" >/dev/null 2>&1 || true
  $cli pull -q --platform linux/arm64 "$img" >/dev/null 2>>"$LOGS/verify.log" || die "$name pull $img failed"
  out=$($cli run --rm --platform linux/arm64 -e NIX_CONFIG='filter-syscalls = false' "$img" \
          sh -c "uname -m; $NIXBUILD_CHECK" 2>>"$LOGS/verify.log") || die "$name: nix-build in $img (arm64, emulated) failed: $out"
  [ "$(head -1 <<<"$out")" = aarch64 ] && grep -qx 'hi nixbld[0-9]* aarch64' <<<"$out" \
    || die "$name: $img did not run as aarch64: $out"
  log "verify: $name runs linux/arm64 (qemu): uname -m = aarch64, nix-build as a build user ok"
}

# step_verify_docker: Docker pulls the image through the mirror (its local tag then names
# what the mirror serves) for this machine's platform, and nix builds in it.
step_verify_docker() {
  local img=$NIX_REPO:$NIX_TAG v out
  docker rmi -f "$img" "docker.io/$img" >/dev/null 2>&1 || true
  docker pull -q "$img" >/dev/null || die "docker pull $img (through the mirror) failed"
  [ "$(docker image inspect -f '{{.Architecture}}/{{.Os}}' "$img")" = "$NATIVE_ARCH/linux" ] \
    || die "docker pull $img did not get linux/$NATIVE_ARCH"
  v=$(docker run --rm "$img" nix --version) || die "nix --version failed in $img"
  out=$(docker run --rm "$img" sh -c "$NIXBUILD_CHECK" 2>>"$LOGS/verify.log") || true
  grep -qx "hi nixbld[0-9]* $(uname -m)" <<<"$out" || die "nix-build failed in $img (want 'hi nixbldN $(uname -m)'): $out"
  docker run --rm "$img" sh -c 'mkdir -p /tmp/f && echo "{ outputs = { self }: { }; }" >/tmp/f/flake.nix && nix --extra-experimental-features "nix-command flakes" flake metadata path:/tmp/f --json' 2>>"$LOGS/verify.log" \
    | grep -q '"locked"' || die "nix flake metadata failed in $img"
  log "verify: docker pull via mirror ok (linux/$NATIVE_ARCH); $v; nix-build (as a build user) and flake metadata ok"
}

step_verify() {
  local img=$NIX_REPO:$NIX_TAG
  # Both engines' local tag must name what the mirror now serves.
  step_verify_docker
  check_engine docker "$DOCKER_SOCK"
  check_engine podman "$PODMAN_SOCK"
  check_arm64 docker docker
  check_arm64 podman podman
  check_engine docker-tls "$TLS_SOCK"
  docker --tlsverify --tlscacert "$TLS_DIR/client/ca.pem" --tlscert "$TLS_DIR/client/cert.pem" \
    --tlskey "$TLS_DIR/client/key.pem" -H "$TLS_HOST" run --rm "$img" true \
    || die "docker run over TLS at $TLS_HOST failed"
  log "verify: docker-tls: docker run over $TLS_HOST with the client certificate ok"
  check_ssh_forward /var/run/docker.sock
  check_ssh_forward "$PODMAN_SOCK"
}

# check_ssh_forward REMOTE_SOCKET: the engine answers through an ssh-forwarded socket.
check_ssh_forward() {
  local d pid ok=1
  d=$(mktemp -d)
  ssh -F none -o BatchMode=yes -o ConnectTimeout=5 -o IdentitiesOnly=yes -i "$SSH_DIR/id_ed25519" \
    -o UserKnownHostsFile="$SSH_DIR/known_hosts" -o StrictHostKeyChecking=yes -o ExitOnForwardFailure=yes \
    -p "$SSH_PORT" -N -L "$d/s.sock:$1" root@127.0.0.1 </dev/null 2>>"$LOGS/verify.log" &
  pid=$!
  wait_for "forwarded socket" 15 curl -sf -m 5 --unix-socket "$d/s.sock" http://d/_ping && ok=0
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  rm -rf "$d"
  [ $ok -eq 0 ] || die "ssh -L to $1 through 127.0.0.1:$SSH_PORT: the engine does not answer"
  log "verify: ssh: engine at $1 answers through ssh://root@127.0.0.1:$SSH_PORT"
}

# ---------------------------------------------------------------- dry run
# dry_run: one line per step of this mode: done, or what a real run would do.  A service
# that answers counts as done (a real run also rewrites a config that changed).
dry_run() {
  local missing=() p arch build=() cached=()
  say() { printf 'setup (dry run): %s\n' "$*" >&2; }
  say "mode $MODE, nix image platforms: ${NIX_ARCHES[*]}"
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -eq 0 ]; then say "apt: all packages present"; else say "apt: would install ${missing[*]}"; fi
  if [ "$MODE" = full ]; then
    if binfmt_ok; then say "binfmt: qemu-aarch64 registered"; else say "binfmt: would register qemu-aarch64"; fi
  fi
  if mirror_up; then say "mirror: up at $MIRROR"; else say "mirror: would start at $MIRROR"; fi
  if docker_up; then say "docker: up at unix://$DOCKER_SOCK"; else say "docker: would start dockerd"; fi
  if [ "$MODE" = full ]; then
    if podman_up; then say "podman: up at unix://$PODMAN_SOCK"; else say "podman: would start the service"; fi
    if docker_tls_up; then say "docker-tls: up at $TLS_HOST"; else say "docker-tls: would start it"; fi
    if sshd_up; then say "sshd: up at 127.0.0.1:$SSH_PORT"; else say "sshd: would start it"; fi
  fi
  if mirror_has_nix; then
    say "image: $MIRROR/$NIX_REPO:$NIX_TAG present ($(cut -d' ' -f2- "$IMAGE_STAMP"))"
  else
    for arch in "${NIX_ARCHES[@]}"; do
      if [ -s "$ROOTFS_CACHE-$arch.tar" ]; then cached+=("$arch"); else build+=("$arch"); fi
    done
    say "image: would build the root fs of: ${build[*]:-none} (cached: ${cached[*]:-none}), push $NIX_REPO:$NIX_TAG (${NIX_ARCHES[*]}) and verify"
  fi
  if [ "$MODE" = full ]; then
    if cache_up; then say "cache: up at http://$CACHE_ADDR"; else say "cache: would start nginx"; fi
    if builders_up; then say "builders: up"; else say "builders: would (re)make ${BUILDERS[*]%% *}"; fi
  fi
  if sbom_venv_ok; then say "sbom venv: ready ($SBOM_VENV)"; else say "sbom venv: would install the SBOM validators into $SBOM_VENV"; fi
  if [ "$VERIFY" = 1 ]; then say "verify: would run the end-to-end checks"; fi
}

# ---------------------------------------------------------------- main
if [ "$DRY_RUN" -eq 1 ]; then dry_run; exit 0; fi
if [ "$MODE" = quick ]; then
  step_packages
  step_mirror
  step_docker
  step_image
  if [ "$IMAGE_BUILT" -eq 1 ] || [ "$VERIFY" = 1 ]; then step_verify_docker; fi
  log "done in $(( $(date +%s) - T0 ))s (quick: Docker, the mirror, the nix image for linux/$NATIVE_ARCH)"
  cat <<END
NIXCTR_DOCKER_HOST=unix://$DOCKER_SOCK
NIXCTR_MIRROR=$MIRROR
NIXCTR_NIX_IMAGE=$NIX_REPO:$NIX_TAG
END
  exit 0
fi
step_packages
step_binfmt
step_mirror
step_docker
step_podman
step_tls_certs
step_docker_tls
step_sshd
step_image
step_cache
step_sbom_venv
if [ "$IMAGE_BUILT" -eq 1 ] || [ "$VERIFY" = 1 ]; then step_verify; step_verify_cache; fi
step_builders

log "done in $(( $(date +%s) - T0 ))s"
cat <<EOF
NIXCTR_DOCKER_HOST=unix://$DOCKER_SOCK
NIXCTR_PODMAN_HOST=unix://$PODMAN_SOCK
NIXCTR_DOCKER_TLS_HOST=$TLS_HOST
NIXCTR_DOCKER_TLS_SOCKET=unix://$TLS_SOCK
NIXCTR_DOCKER_TLS_CERT_PATH=$TLS_DIR/client
NIXCTR_SSH=ssh://root@127.0.0.1:$SSH_PORT
NIXCTR_SSH_IDENTITY=$SSH_DIR/id_ed25519
NIXCTR_SSH_KNOWN_HOSTS=$SSH_DIR/known_hosts
NIXCTR_MIRROR=$MIRROR
NIXCTR_NIX_IMAGE=$NIX_REPO:$NIX_TAG
NIXCTR_TEST_CACHE=http://$CACHE_ADDR
NIXCTR_TEST_CACHE_PRIVATE=http://$CACHE_ADDR/private
NIXCTR_TEST_CACHE_NETRC=$CACHE_CONF/netrc
NIXCTR_TEST_CACHE_SIGNING_KEY=$CACHE_CONF/signing-key
NIXCTR_TEST_CACHE_PUBLIC_KEY=$(cat "$CACHE_CONF/signing-key.pub")
NIXCTR_TEST_BUILDER=ssh-ng://root@127.0.0.1:$SSH_PORT
NIXCTR_TEST_BUILDER_KEY=$BUILDER_DIR/id_builder
NIXCTR_TEST_BUILDER_ARM64_KEY=$BUILDER_DIR/id_builder_arm64
NIXCTR_TEST_BUILDER_KNOWN_HOSTS=$BUILDER_DIR/known_hosts
NIXCTR_SBOM_VENV=$SBOM_VENV
EOF
