#!/usr/bin/env bash
# Builds the systemd lab guest: lab/build-systemd-guest.sh [--force] OUTDIR
# A Debian 12 system with systemd as PID 1, journald, udev, dbus, polkitd, LVM (with dmeventd and
# thin_check), libvirt0 (whose test driver stands in for the hypervisor), qemu-utils and
# qemu-guest-agent, built by mmdebstrap from Debian's own packages only (the mirrors of this
# machine's apt sources). Writes, skipping the work when OUTDIR/stamp matches this script:
#   OUTDIR/root.raw     ext4 root filesystem (sparse); boot it through a qcow2 overlay
#   OUTDIR/vmlinuz      the image's own kernel, and OUTDIR/initrd.img its initramfs, for <kernel>
#                       and <initrd> (cmdline: root=/dev/vda rw console=ttyS0)
# Root has no password (serial console login only; the tests use the guest agent); a login user
# "alice" (uid 1001, no privileges) exists for the polkit tests. Run as root; called by up.sh.
set -euo pipefail

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--force] OUTDIR" >&2; exit 2; }
out=$1
mkdir -p "$out"

stamp=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)
if [ $force = 0 ] && [ -s "$out/root.raw" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] &&
  [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
command -v mmdebstrap >/dev/null || { echo "build-systemd-guest: mmdebstrap is missing" >&2; exit 1; }

packages=(
  systemd systemd-sysv udev dbus polkitd pkexec libpam-systemd
  lvm2 thin-provisioning-tools libvirt0 qemu-utils qemu-guest-agent
  linux-image-amd64 initramfs-tools kmod e2fsprogs procps util-linux
)

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
root=$tmp/root

# The initramfs only needs to find an ext4 root on virtio: MODULES=list keeps it small and quick to
# build (MODULES=dep cannot look at the hardware from a chroot); a hook adds and loads the three
# modules (not the modules conffile, which dpkg would then ask about).
initramfs_hook='#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
for m in virtio_pci virtio_blk ext4; do manual_add_modules $m; echo $m >>"$DESTDIR/conf/modules"; done
'
export initramfs_hook
mmdebstrap --quiet --variant=apt --include="$(IFS=,; echo "${packages[*]}")" \
  --setup-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"
    echo MODULES=list >"$1/etc/initramfs-tools/conf.d/vmsnap-lab"
    printf "%s" "$initramfs_hook" >"$1/etc/initramfs-tools/hooks/vmsnap-lab"
    chmod 755 "$1/etc/initramfs-tools/hooks/vmsnap-lab"' \
  --customize-hook='set -e
    echo vmsnap-systemd-guest >"$1/etc/hostname"
    echo "/dev/vda / ext4 defaults 0 1" >"$1/etc/fstab"
    chroot "$1" passwd -d root >/dev/null
    chroot "$1" useradd --uid 1001 --create-home --shell /bin/bash alice
    # Nothing to fetch in the lab; apt would only wait for a network the guest does not have.
    chroot "$1" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer \
      fstrim.timer man-db.timer >/dev/null 2>&1 || true
    mkdir -p "$1/etc/systemd/journald.conf.d"
    printf "[Journal]\nStorage=persistent\n" >"$1/etc/systemd/journald.conf.d/lab.conf"' \
  bookworm "$root" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"

cp -L "$root/vmlinuz" "$tmp/vmlinuz"
cp -L "$root/initrd.img" "$tmp/initrd.img"
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*_Packages
# 3 GiB, sparse: room for the packages' upgrades and the tests' files.
truncate -s 3G "$tmp/root.raw"
mkfs.ext4 -q -L vmsnap-root -d "$root" "$tmp/root.raw"
mv "$tmp/root.raw" "$tmp/vmlinuz" "$tmp/initrd.img" "$out/"
echo "$stamp" >"$out/stamp"
