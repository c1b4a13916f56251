#!/usr/bin/env bash
# Installs the Debian 12 packages the lab and the tests need: lab/install-packages.sh [--ceph]
# Idempotent; run as root.
# qemu-system-x86 7.2 breaks the image's backported qemu-utils 10.x, and apt would quietly remove
# qemu-img; so qemu-utils is pinned to qemu-system-x86's own version in the same transaction.
# --ceph adds the single-node Ceph cluster's packages (lab/ceph-up.sh, about 55 more): ceph-mon,
# ceph-osd, ceph-common (rbd, ceph-authtool, monmaptool) and qemu-block-extra, QEMU's rbd driver,
# which only loads at exactly qemu-system-x86's version, so it is pinned like qemu-utils.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

ceph=0
case ${1:-} in
  --ceph) ceph=1 ;;
  "") ;;
  *) echo "usage: $0 [--ceph]" >&2; exit 2 ;;
esac

packages=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-guest-agent qemu-utils
  dbus polkitd pkexec busybox-static e2fsprogs cpio kmod gzip
  lvm2 thin-provisioning-tools pkg-config
  openssh-server openssh-client
  cockpit-ws cockpit-bridge cockpit-system chromium chromium-driver sudo
  mmdebstrap dpkg-dev
)
[ $ceph = 0 ] || packages+=(ceph-mon ceph-osd ceph-common qemu-block-extra)

# installed_version PACKAGE: its version if installed, else nothing.
installed_version() {
  dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null |
    awk '$1 == "install" && $3 == "installed" {print $4}'
}

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_img_ok=1
command -v qemu-img >/dev/null || qemu_img_ok=0
# A qemu-block-extra left at another version than QEMU is installed but useless (rbd: unknown).
block_ok=1
if [ $ceph = 1 ] &&
  [ "$(installed_version qemu-block-extra)" != "$(installed_version qemu-system-x86)" ]; then
  block_ok=0
fi
if [ ${#missing[@]} -eq 0 ] && [ $qemu_img_ok = 1 ] && [ $block_ok = 1 ]; then
  echo "lab: packages already installed"
  exit 0
fi

apt-get update -qq
qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
install=()
for p in "${packages[@]}"; do
  case $p in
    qemu-utils | qemu-block-extra) install+=("$p=$qemu_version") ;;
    *) install+=("$p") ;;
  esac
done
# Another lab session may be installing too: wait for dpkg's lock rather than fail at once.
apt-get install -y -qq --no-install-recommends --allow-downgrades "${install[@]}" \
  -o Dpkg::Options::=--force-confold -o DPkg::Lock::Timeout=300 >/dev/null
command -v qemu-img >/dev/null || { echo "lab: qemu-img missing after install" >&2; exit 1; }
if [ $ceph = 1 ] &&
  [ "$(installed_version qemu-block-extra)" != "$(installed_version qemu-system-x86)" ]; then
  echo "lab: qemu-block-extra $(installed_version qemu-block-extra) does not match" \
    "qemu-system-x86 $(installed_version qemu-system-x86)" >&2
  exit 1
fi
echo "lab: packages installed (qemu $qemu_version)"
