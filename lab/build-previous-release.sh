#!/usr/bin/env bash
# Builds the Debian package of vmsnap's previous release (the commit named in
# packaging/previous-release), from that commit's own tree and packaging script, for the package
# test's upgrade from it: lab/build-previous-release.sh OUTDIR VERSION. Prints the .deb's path.
# Cached: a no-op when OUTDIR holds the build of that commit and version. The first build compiles
# the workspace in a target folder of its own under OUTDIR (a few minutes on two cores).
set -euo pipefail
me=build-previous-release.sh
die() {
  echo "$me: $*" >&2
  exit 1
}
[ $# -eq 2 ] || die "usage: $me OUTDIR VERSION"
root=$(cd "$(dirname "$0")/.." && pwd)
out=$1
version=$2
commit=$(grep -m1 -o '^[0-9a-f]\{40\}' "$root/packaging/previous-release") ||
  die "packaging/previous-release names no commit"
git -C "$root" cat-file -e "$commit^{commit}" 2>/dev/null ||
  die "commit $commit is not in this clone (a shallow clone?): the package test needs vmsnap's history"
stamp=$out/built-$commit-$version
if [ -e "$stamp" ] && ls "$out"/vmsnap_*.deb >/dev/null 2>&1; then
  ls "$out"/vmsnap_*.deb
  exit 0
fi
mkdir -p "$out"
src=$(mktemp -d)
trap 'rm -rf -- "$src"' EXIT
git -C "$root" archive "$commit" | tar -x -C "$src"
(cd "$src" && CARGO_TARGET_DIR="$out/target" cargo build --locked --quiet -p vmsnapd -p vmsnapctl) ||
  die "cannot build $commit"
rm -f "$out"/vmsnap_*.deb "$out"/built-*
bash "$src/packaging/build-deb.sh" --from "$out/target/debug" --version "$version" "$out" >/dev/null
touch "$stamp"
ls "$out"/vmsnap_*.deb
