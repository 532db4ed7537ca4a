#!/usr/bin/env bash
# Builds the root fs of nixctr's stand-in nixos/nix image for one platform and
# writes it as a plain tar.  Called by scripts/setup.sh; runs as root.
#
# Usage: build-rootfs.sh ARCH OUT.tar     (ARCH: amd64 | arm64)
# Env:   DEBIAN_MIRROR (http://deb.debian.org/debian), DEBOOTSTRAP_CACHE (a
#        directory kept between runs), SUITE (trixie).  Progress goes to stdout
#        (setup.sh sends it to a log).
#
# Shape (like NixOS/nix docker.nix, with Debian trixie's nix-bin inside):
#   * debootstrap minbase + nix-bin; then all of Debian's /usr is added to the
#     store (`nix-store --add`, so it is registered as valid) and /usr becomes
#     a symlink to that store path: /bin, /sbin, /lib, /lib64 (merged-usr
#     links into /usr), /bin/sh and /usr/bin/env all resolve into /nix/store.
#   * profile /nix/var/nix/profiles/default (-> default-1-link -> a
#     user-environment built by `nix-env -i`): bin (nix, bash, coreutils, ...),
#     sbin, etc/ssl/certs/ca-bundle.crt; /root/.nix-profile -> it; root's
#     channels profile (an empty channel) and /root/.nix-defexpr/channels.
#   * /etc/nix/nix.conf: build-users-group = nixbld, sandbox = false, no
#     substituters (offline), no experimental-features; nixbld1..32
#     (uid 30001..30032) in group nixbld (gid 30000).
# A foreign ARCH runs under qemu-user (binfmt with the F flag, set up by
# setup.sh); nix there needs filter-syscalls = false (seccomp is not
# emulated), which is passed on the command line here, never written to nix.conf.
set -euo pipefail
arch=$1 out=$2
suite=${SUITE:-trixie}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache=${DEBOOTSTRAP_CACHE:-$(dirname "$out")/debootstrap-cache-$suite-$arch}
r=$out.root

umount_under() { # unmount anything mounted below $1
  local m
  awk -v p="$1/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
    umount "$m" 2>/dev/null || umount -l "$m" || true
  done
}
cleanup() { umount_under "$r"; }
trap cleanup EXIT

t0=$(date +%s)
umount_under "$r"; rm -rf --one-file-system "$r"
mkdir -p "$cache"
echo "== debootstrap $suite $arch"
# libdbi-perl satisfies a virtual dependency debootstrap cannot resolve.
if [ -n "${DEBOOTSTRAPPED:-}" ]; then   # development aid: start from a copy
  cp -a "$DEBOOTSTRAPPED" "$r"
else
  debootstrap --variant=minbase --arch="$arch" \
    --include=nix-bin,libdbi-perl,busybox-static,ca-certificates,xz-utils,less,openssh-client \
    --cache-dir="$cache" "$suite" "$r" "$mirror"
fi
umount_under "$r"
echo "== debootstrap done in $(( $(date +%s) - t0 ))s"

# --- slim down (before /usr goes into the store) ----------------------------
rm -rf "${r:?}"/var/cache/apt/* "$r"/var/lib/apt/lists/* "$r"/var/cache/debconf/*-old \
       "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* \
       "$r"/usr/share/locale/* "$r"/usr/share/lintian "$r"/var/log/* \
       "${r:?}"/dev/* "$r"/proc/* "$r"/sys/* "$r"/run/* "$r"/tmp/* "$r"/var/tmp/*
: >"$r/etc/resolv.conf"; echo nix >"$r/etc/hostname"; : >"$r/etc/machine-id"

# --- users, nix.conf ----------------------------------------------------------
members=$(seq -f 'nixbld%g' -s, 1 32)
grep -q '^nixbld:' "$r/etc/group" || echo "nixbld:x:30000:$members" >>"$r/etc/group"
grep -q '^nixbld:' "$r/etc/gshadow" 2>/dev/null || echo "nixbld:!::$members" >>"$r/etc/gshadow"
for i in $(seq 1 32); do
  grep -q "^nixbld$i:" "$r/etc/passwd" || \
    echo "nixbld$i:x:$((30000 + i)):30000:Nix build user $i:/var/empty:/usr/sbin/nologin" >>"$r/etc/passwd"
  grep -q "^nixbld$i:" "$r/etc/shadow" || echo "nixbld$i:!:1::::::" >>"$r/etc/shadow"
done
install -d -m 555 "$r/var/empty"
install -d -m 700 "$r/root"
install -d -m 1777 "$r/tmp" "$r/var/tmp"
mkdir -p "$r/etc/nix"
cat >"$r/etc/nix/nix.conf" <<'CONF'
# nixctr's stand-in for nixos/nix (Debian's nix-bin; see scripts/nix-image).
# Like the upstream image: root, build users, no sandbox.  Offline: no
# substituters.  No experimental-features (callers pass their own).
build-users-group = nixbld
sandbox = false
substituters =
CONF
mkdir -p "$r/nix/store" "$r/nix/var/nix/gcroots" "$r/nix/var/nix/profiles/per-user/root" \
         "$r/nix/var/nix/temproots" "$r/nix/var/log/nix/drvs"
chown 0:30000 "$r/nix/store"; chmod 1775 "$r/nix/store"
ln -sfn /nix/var/nix/profiles "$r/nix/var/nix/gcroots/profiles"

# --- /usr into the store, the profile ----------------------------------------
mount -t proc proc "$r/proc"
mount --rbind /dev "$r/dev"; mount --make-rslave "$r/dev"   # nix builds need /dev/ptmx, /dev/null
inch() { chroot "$r" /usr/bin/env -i HOME=/root USER=root PATH=/usr/bin:/usr/sbin "$@"; }
nixopt=(--option filter-syscalls false)
t1=$(date +%s)
inch nix-store "${nixopt[@]}" --init
usr=$(inch nix-store "${nixopt[@]}" --add /usr)
echo "== /usr is $usr ($(( $(date +%s) - t1 ))s)"
mkdir -p "$r/tmp/cacert/etc/ssl/certs" "$r/tmp/channel"
cp "$r/etc/ssl/certs/ca-certificates.crt" "$r/tmp/cacert/etc/ssl/certs/ca-bundle.crt"
echo '[]' >"$r/tmp/channel/manifest.nix"
cacert=$(inch nix-store "${nixopt[@]}" --add /tmp/cacert)
channel=$(inch nix-store "${nixopt[@]}" --add /tmp/channel)
rm -rf "${r:?}/usr"
ln -s "$usr" "$r/usr"
# From here on every tool in the chroot runs from the store.
inch nix-env "${nixopt[@]}" -p /nix/var/nix/profiles/default -i "$usr" "$cacert"
ln -sfn "$channel" "$r/nix/var/nix/profiles/per-user/root/channels-1-link"
ln -sfn /nix/var/nix/profiles/per-user/root/channels-1-link "$r/nix/var/nix/profiles/per-user/root/channels"
ln -sfn /nix/var/nix/profiles/default "$r/root/.nix-profile"
mkdir -p "$r/root/.nix-defexpr"
ln -sfn /nix/var/nix/profiles/per-user/root/channels "$r/root/.nix-defexpr/channels"
ln -sfn /nix/var/nix/profiles/default/etc/ssl/certs/ca-bundle.crt "$r/etc/ssl/certs/ca-bundle.crt"
# Also root what /usr points at directly (the profile references it too).
ln -sfn "$usr" "$r/nix/var/nix/gcroots/nixctr-usr"
# checks
inch /nix/var/nix/profiles/default/bin/sh -c 'nix-store --verify-path '"$usr"' && test -x /root/.nix-profile/bin/sleep && test -x /root/.nix-profile/bin/nix && test -s /root/.nix-profile/etc/ssl/certs/ca-bundle.crt'
inch nix-store "${nixopt[@]}" --check-validity "$usr" "$cacert" "$channel"
inch nix --version
umount_under "$r"

rm -rf "${r:?}"/tmp/* "$r"/proc/* "${r:?}"/dev/* "$r"/root/.cache "$r"/nix/var/nix/temproots/* "$r"/nix/var/nix/userpool* \
       "$r/nix/var/nix/db/reserved" "$r/nix/var/nix/db/big-lock" "$r/nix/var/nix/gc.lock"
echo "== store: $(ls "$r/nix/store" | tr '\n' ' ')"
tar -C "$r" --numeric-owner --xattrs -cf "$out.tmp" .
mv "$out.tmp" "$out"
rm -rf --one-file-system "$r"
trap - EXIT
echo "== $out written in $(( $(date +%s) - t0 ))s"
