#!/usr/bin/env bash
# Makes a payload disk for a lab guest: lab/guest-payload.sh OUT.raw BINARY...
# OUT.raw is a raw ext4 image (label vmsnap-payload) holding bin/<name> for every BINARY, copied
# with debug info stripped, and lib/ with the libraries `ldd` lists for them (the lab guest's
# glibc and ld.so come from this host too, see build-guest.sh, so in the guest
#   LD_LIBRARY_PATH=/mnt/payload/lib /mnt/payload/bin/NAME
# runs them). Cheap (a few seconds): rebuild it whenever a binary changes. The image is built in
# a temporary folder next to OUT and renamed at the end, so OUT is either complete or absent.
# Needs strip (binutils), ldd and mkfs.ext4 (e2fsprogs).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 OUT.raw BINARY..." >&2
  exit 2
fi
out=$1; shift

dir=$(dirname -- "$out")
mkdir -p -- "$dir"
tmp=$(mktemp -d "$dir/.payload.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
root=$tmp/root
mkdir -p "$root/bin" "$root/lib"

for b in "$@"; do
  [ -x "$b" ] || { echo "guest-payload: $b is not an executable file" >&2; exit 1; }
  name=${b##*/}
  cp -L -- "$b" "$root/bin/$name"
  chmod 755 "$root/bin/$name"
  strip --strip-debug "$root/bin/$name" 2>/dev/null || true
  while IFS= read -r lib; do
    [ -e "$root/lib/${lib##*/}" ] && continue
    cp -L -- "$lib" "$root/lib/${lib##*/}"
  done < <(ldd "$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3}')
done

# Room for the files plus ext4's own metadata and a little slack.
kib=$(du -sk "$root" | cut -f1)
size=$(( (kib * 5 / 4 + 16384) / 1024 ))M
truncate -s "$size" "$tmp/payload.raw"
if ! log=$(mkfs.ext4 -q -F -L vmsnap-payload -d "$root" "$tmp/payload.raw" 2>&1); then
  echo "guest-payload: mkfs.ext4 failed: $log" >&2
  exit 1
fi
mv -f -- "$tmp/payload.raw" "$out"
