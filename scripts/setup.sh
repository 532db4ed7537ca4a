#!/usr/bin/env bash
# shellcheck disable=SC2015  # "A && B || true" is intended throughout
# nixctr test environment setup — idempotent; CI runs it from scratch (root,
# no stdin, CI=true) and developers rerun it freely (a no-op rerun takes <1 s;
# from scratch: ~1 min for the image plus the apt installs).
#
# Sets up, on this machine only (loopback):
#   * Debian packages: docker.io podman debootstrap docker-registry skopeo curl
#     ca-certificates openssl apache2-utils busybox-static uidmap openssh-server
#   * mirror registry   127.0.0.1:5000   (docker-registry, plain HTTP, no auth;
#                       storage /var/lib/nixctr-test/mirror), used as the
#                       docker.io mirror by both engines
#   * Docker engine     unix:///var/run/docker.sock   (dockerd, overlay2)
#   * Podman engine     unix:///run/podman/podman.sock (podman system service,
#                       Docker-compatible API, e.g. /v1.41/...; storage driver
#                       overlay if the kernel allows it, else vfs; cgroupfs,
#                       runc, default_ulimits kept below the hard limits)
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
#   * image nixos/nix:2.33.3 in the mirror, i.e. what `docker pull
#     nixos/nix:2.33.3` (docker.io/nixos/nix:2.33.3) gets in both engines.
#     It is NOT the upstream image: a Debian bookworm minbase root fs with
#     Debian's nix (2.8, nix-bin), configured for root without nixbld users,
#     sandbox or substituters (offline).  nix lives in /usr/bin; /nix holds
#     only an empty store and an initialised (empty) nix db, which the engines
#     copy into a new empty named volume mounted at /nix.
# Logs: /var/log/nixctr-test/*.log.  State/caches: /var/lib/nixctr-test.
# Daemons are started detached (setsid nohup) and keep running after exit.
#
# Usage: scripts/setup.sh [--verify]
#   --verify (or NIXCTR_SETUP_VERIFY=1): also run the end-to-end checks (pull
#   through the mirror in both engines, nix in a container, podman compat API
#   with a named volume on /nix); they always run after the image is (re)built.
# Stdout: KEY=VALUE summary of the endpoints.  Progress: one line per step on stderr.
set -euo pipefail

MIRROR=127.0.0.1:5000
DOCKER_SOCK=/var/run/docker.sock
PODMAN_SOCK=/run/podman/podman.sock
NIX_REPO=nixos/nix
NIX_TAG=2.33.3
STATE=/var/lib/nixctr-test
LOGS=/var/log/nixctr-test
CONF=/etc/nixctr-test
RUNDIR=/run/nixctr-test
TLS_PORT=2376
TLS_HOST=tcp://127.0.0.1:$TLS_PORT
TLS_SOCK=$RUNDIR/docker-tls.sock
TLS_DIR=$CONF/tls
TLS_BRIDGE=nixctr-br1
TLS_BRIDGE_CIDR=172.31.250.1/24
SSH_PORT=2222
SSH_DIR=$CONF/ssh
# Bump when the image recipe below changes: invalidates the cached root fs.
ROOTFS_VERSION=2
ROOTFS_CACHE=$STATE/nix-rootfs-v$ROOTFS_VERSION.tar
DEBIAN_MIRROR=${NIXCTR_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=(docker.io podman debootstrap docker-registry skopeo curl ca-certificates
          openssl apache2-utils busybox-static uidmap openssh-server openssh-client)
MARK="# Managed by nixctr scripts/setup.sh"

VERIFY=${NIXCTR_SETUP_VERIFY:-0}
for arg in "$@"; do
  case $arg in
    --verify) VERIFY=1 ;;
    -h|--help) sed -n '3,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: ERROR: %s\n' "$*" >&2; exit 1; }
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
mirror_has_nix() {
  curl -sf -m 5 -o /dev/null \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
    "http://$MIRROR/v2/$NIX_REPO/manifests/$NIX_TAG"
}

if [ "$IS_ROOT" -eq 1 ]; then
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
  cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys.tmp" && chmod 644 "$SSH_DIR/authorized_keys.tmp"
  cmp -s "$SSH_DIR/authorized_keys.tmp" "$SSH_DIR/authorized_keys" 2>/dev/null \
    && rm -f "$SSH_DIR/authorized_keys.tmp" || mv -f "$SSH_DIR/authorized_keys.tmp" "$SSH_DIR/authorized_keys"
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

# ---------------------------------------------------------------- 7. nix image
umount_under() { # unmount anything left mounted below $1 (failed debootstrap)
  local m
  awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
}

build_rootfs() {
  local r=$STATE/rootfs.tmp
  umount_under "$r"; rm -rf --one-file-system "$r"
  mkdir -p "$STATE/debootstrap-cache"
  log "image: debootstrap bookworm (+nix-bin) from $DEBIAN_MIRROR (log $LOGS/debootstrap.log)"
  # libdbi-perl satisfies a virtual dependency debootstrap cannot resolve.
  if ! debootstrap --variant=minbase --include=nix-bin,libdbi-perl,busybox-static,ca-certificates \
       --cache-dir="$STATE/debootstrap-cache" bookworm "$r" "$DEBIAN_MIRROR" >"$LOGS/debootstrap.log" 2>&1; then
    umount_under "$r"
    tail -20 "$LOGS/debootstrap.log" >&2
    die "debootstrap failed (log $LOGS/debootstrap.log)"
  fi
  umount_under "$r"

  # nix (Debian's 2.8) as root in a container: no build users, no sandbox,
  # no network substituters.
  mkdir -p "$r/etc/nix"
  cat >"$r/etc/nix/nix.conf" <<'EOF'
build-users-group =
sandbox = false
substituters =
experimental-features = nix-command flakes
EOF
  mkdir -p "$r/nix/store" "$r/nix/var/nix/gcroots" "$r/nix/var/nix/profiles/per-user/root" \
           "$r/nix/var/nix/temproots" "$r/nix/var/log/nix/drvs"
  chmod 1775 "$r/nix/store"
  # Initialise the (empty) nix database, like the upstream image has one.
  chroot "$r" /usr/bin/nix-store --init >>"$LOGS/debootstrap.log" 2>&1
  [ -f "$r/nix/var/nix/db/db.sqlite" ] || die "nix-store --init did not create the nix db"
  rm -f "$r/nix/var/nix/db/reserved" "$r/nix/var/nix/db/big-lock"  # 8 MiB GC reserve; recreated on demand
  install -d -m 700 "$r/root"
  install -d -m 1777 "$r/tmp" "$r/var/tmp"

  # Slim down: package caches/lists, docs, man pages, locales, logs.
  rm -rf "${r:?}"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/var/cache/debconf/*-old \
         "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
         "$r"/usr/share/locale/* "$r"/usr/share/lintian "$r"/var/log/* \
         "${r:?}"/dev/* "$r"/proc/* "$r"/sys/* "$r"/run/* "$r"/tmp/* "$r"/var/tmp/*
  : >"$r/etc/resolv.conf"; echo nix >"$r/etc/hostname"; : >"$r/etc/machine-id" 2>/dev/null || true

  tar -C "$r" --numeric-owner --xattrs -cf "$ROOTFS_CACHE.tmp" .
  mv "$ROOTFS_CACHE.tmp" "$ROOTFS_CACHE"
  rm -rf --one-file-system "$r"
}

IMAGE_BUILT=0
step_image() {
  if mirror_has_nix; then log "image: $MIRROR/$NIX_REPO:$NIX_TAG present"; return; fi
  need_root "building the nix image"
  local t0 ref=$MIRROR/$NIX_REPO:$NIX_TAG
  t0=$(date +%s)
  if [ -s "$ROOTFS_CACHE" ]; then
    log "image: using cached root fs $ROOTFS_CACHE"
  else
    build_rootfs
  fi
  log "image: docker import + push $ref"
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV HOME=/root' --change 'ENV USER=root' --change 'CMD ["/bin/bash"]' \
    - "$ref" <"$ROOTFS_CACHE" >/dev/null
  docker push "$ref" >"$LOGS/push.log" 2>&1 || { tail -20 "$LOGS/push.log" >&2; die "docker push $ref failed"; }
  mirror_has_nix || die "mirror does not serve $NIX_REPO:$NIX_TAG after push"
  docker rmi "$ref" >/dev/null 2>&1 || true
  IMAGE_BUILT=1
  log "image: built and pushed in $(( $(date +%s) - t0 ))s"
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
        '{"AttachStdout":true,"AttachStderr":true,"Cmd":["sh","-c","if [ -f /nix/var/nix/db/db.sqlite ]; then echo COPYUP=yes; else echo COPYUP=no; fi; cd /tmp && nix-build --no-out-link -E '\''derivation { name = \"x\"; system = builtins.currentSystem; builder = \"/bin/sh\"; args = [ \"-c\" \"echo hi > $out\" ]; }'\'' | xargs cat"]}' | json_id)
      if [ -z "$eid" ]; then fail="container start/exec create: $out"
      else
        out=$(api "$sock" POST "/exec/$eid/start" '{"Detach":false,"Tty":false}' | tr -c '[:print:]\n' ' ')
        rc=$(api "$sock" GET "/exec/$eid/json" | sed -n 's/.*"ExitCode" *: *\([0-9-]*\).*/\1/p')
        [ "$rc" = 0 ] && grep -q 'hi' <<<"$out" || fail="exec exit code '$rc': $out"
      fi
    fi
    check_cleanup "$sock" "$vol" "$vol"
    [ -z "$fail" ] || die "$name ($mode): $fail"
    log "verify: $name API ok ($mode): pull via mirror, create/start/exec, nix-build with a named volume on /nix; image /nix copied into the new volume: $(sed -n 's/.*COPYUP=\([a-z]*\).*/\1/p' <<<"$out")"
  done
}

step_verify() {
  local img=$NIX_REPO:$NIX_TAG v
  docker rmi -f "$img" "docker.io/$img" >/dev/null 2>&1 || true
  docker pull -q "$img" >/dev/null || die "docker pull $img (through the mirror) failed"
  v=$(docker run --rm "$img" nix --version) || die "nix --version failed in $img"
  docker run --rm "$img" sh -c 'cd /tmp && nix-build --no-out-link -E '\''derivation { name = "x"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; }'\'' | xargs cat' 2>>"$LOGS/verify.log" \
    | grep -qx hi || die "nix-build failed in $img"
  docker run --rm "$img" sh -c 'mkdir -p /tmp/f && echo "{ outputs = { self }: { }; }" >/tmp/f/flake.nix && nix --extra-experimental-features "nix-command flakes" flake metadata path:/tmp/f --json' 2>>"$LOGS/verify.log" \
    | grep -q '"locked"' || die "nix flake metadata failed in $img"
  log "verify: docker pull via mirror ok; $v; nix-build and flake metadata ok"
  check_engine docker "$DOCKER_SOCK"
  check_engine podman "$PODMAN_SOCK"
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

# ---------------------------------------------------------------- main
step_packages
step_mirror
step_docker
step_podman
step_tls_certs
step_docker_tls
step_sshd
step_image
if [ "$IMAGE_BUILT" -eq 1 ] || [ "$VERIFY" = 1 ]; then step_verify; fi

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
EOF
