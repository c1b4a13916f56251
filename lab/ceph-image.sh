#!/usr/bin/env bash
# Makes an RBD image holding an ext4 filesystem in lab/ceph-up.sh's cluster:
#   lab/ceph-image.sh NAME SIZE [SEED_DIR]
#   NAME      image name in pool vmsnap (refused if it exists)
#   SIZE      size accepted by truncate, e.g. 64M
#   SEED_DIR  folder copied into the filesystem root; without it just /hello.txt (see
#             lab/make-data-disk.sh, which builds the filesystem; VMSNAP_DISK_LABEL sets its label)
# There is no krbd, nbd or device-mapper on these machines, so nothing can mount the image here:
# the filesystem is made in a local raw file, then `rbd import`ed (which skips zeroed blocks, so the
# image stays thin). Prints the image's QEMU name, rbd:vmsnap/NAME. Quiet unless something fails.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 NAME SIZE [SEED_DIR]" >&2
  exit 2
fi
name=$1 size=$2 seed=${3:-}
LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
CEPH_DIR=${VMSNAP_CEPH_DIR:-$LAB_DIR/ceph}
CONF=$CEPH_DIR/ceph.conf
POOL=vmsnap

die() { echo "ceph image: $*" >&2; exit 1; }
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad image name '$name' (letters, digits, . _ -)"
[ -s "$CONF" ] || die "$CONF is missing: run lab/ceph-up.sh first"
rbd_() { timeout 60 rbd -c "$CONF" "$@"; }

# rbd info's exit status does not tell "no such image" from "cluster down": read its message.
if out=$(rbd_ info "$POOL/$name" 2>&1); then
  die "image $POOL/$name already exists"
elif ! grep -q 'No such file or directory' <<<"$out"; then
  die "cannot reach the cluster (rbd info $POOL/$name: $(tail -n1 <<<"$out"))"
fi

tmp=$(mktemp -d "${TMPDIR:-/var/tmp}/vmsnap-ceph-image.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
"$LAB_SRC/make-data-disk.sh" "$tmp/disk.raw" "$size" ${seed:+"$seed"}
out=$(rbd_ import --no-progress "$tmp/disk.raw" "$POOL/$name" 2>&1) ||
  die "rbd import into $POOL/$name failed: $out"
echo "rbd:$POOL/$name"
