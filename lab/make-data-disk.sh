#!/usr/bin/env bash
# Makes an ext4 data disk for a lab guest: lab/make-data-disk.sh OUT SIZE [SEED_DIR]
#   OUT       output image; qcow2 unless it ends in .raw/.img (then a raw file is left as is)
#   SIZE      size accepted by truncate, e.g. 64M
#   SEED_DIR  folder copied into the filesystem root (mkfs.ext4 -d); without it the filesystem
#             holds just /hello.txt ("hello from the vmsnap lab").
# The image is built in a temporary file next to OUT and renamed at the end, so OUT is either
# complete or absent. Needs mkfs.ext4 (e2fsprogs) and qemu-img; quiet unless something fails.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  echo "usage: $0 OUT.qcow2 SIZE [SEED_DIR]" >&2
  exit 2
fi
out=$1 size=$2 seed=${3:-}
label=${VMSNAP_DISK_LABEL:-vmsnap-data}

dir=$(dirname -- "$out")
mkdir -p -- "$dir"
tmp=$(mktemp -d "$dir/.mkdisk.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT

if [ -z "$seed" ]; then
  seed=$tmp/seed
  mkdir "$seed"
  printf 'hello from the vmsnap lab\n' >"$seed/hello.txt"
elif [ ! -d "$seed" ]; then
  echo "make-data-disk: seed folder $seed does not exist" >&2
  exit 2
fi

truncate -s "$size" "$tmp/disk.raw"
if ! log=$(mkfs.ext4 -q -F -L "$label" -d "$seed" "$tmp/disk.raw" 2>&1); then
  echo "make-data-disk: mkfs.ext4 failed: $log" >&2
  exit 1
fi

case $out in
  *.raw | *.img) mv -f -- "$tmp/disk.raw" "$out" ;;
  *)
    if ! log=$(qemu-img convert -f raw -O qcow2 "$tmp/disk.raw" "$tmp/disk.qcow2" 2>&1); then
      echo "make-data-disk: qemu-img convert failed: $log" >&2
      exit 1
    fi
    mv -f -- "$tmp/disk.qcow2" "$out"
    ;;
esac
