#!/usr/bin/env bash
# Installs the Debian 12 packages the lab and the tests need. Idempotent; run as root.
# qemu-system-x86 7.2 breaks the image's backported qemu-utils 10.x, and apt would quietly remove
# qemu-img; so qemu-utils is pinned to qemu-system-x86's own version in the same transaction.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

packages=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev
  qemu-system-x86 qemu-guest-agent qemu-utils
  dbus polkitd pkexec busybox-static e2fsprogs cpio kmod gzip
  lvm2 thin-provisioning-tools pkg-config
  openssh-server openssh-client
  cockpit-ws cockpit-bridge cockpit-system chromium chromium-driver sudo
  mmdebstrap dpkg-dev
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
qemu_img_ok=1
command -v qemu-img >/dev/null || qemu_img_ok=0
if [ ${#missing[@]} -eq 0 ] && [ $qemu_img_ok = 1 ]; then
  echo "lab: packages already installed"
  exit 0
fi

apt-get update -qq
qemu_version=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
install=()
for p in "${packages[@]}"; do
  case $p in
    qemu-utils) install+=("qemu-utils=$qemu_version") ;;
    *) install+=("$p") ;;
  esac
done
apt-get install -y -qq --no-install-recommends --allow-downgrades "${install[@]}" \
  -o Dpkg::Options::=--force-confold >/dev/null
command -v qemu-img >/dev/null || { echo "lab: qemu-img missing after install" >&2; exit 1; }
echo "lab: packages installed (qemu $qemu_version)"
