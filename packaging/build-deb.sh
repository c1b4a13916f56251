#!/usr/bin/env bash
# Builds the Debian package vmsnap: packaging/build-deb.sh [--from DIR] [--version VERSION] OUTDIR
#
#   --from DIR          package the binaries in DIR (vmsnapd, vmsnapctl, vmsnapctl-gen) instead
#                       of building release binaries with cargo first
#   --version VERSION   the package's version [default: the workspace version, revision 1]
#
# Writes OUTDIR/vmsnap_VERSION_ARCH.deb and prints its path. The files and their places come from
# install.sh (DESTDIR, PREFIX=/usr): one list of what vmsnap installs, for both ways. This script
# only adds what makes it a Debian package: DEBIAN/control (Depends computed by dpkg-shlibdeps),
# conffiles, md5sums, the maintainer scripts in packaging/debian/, the copyright, changelog and
# lintian overrides (each with its reason).
# Needs dpkg-dev (dpkg-shlibdeps); run as any user (ownership is set with --root-owner-group).
set -euo pipefail
umask 022

me=build-deb.sh
die() {
  echo "$me: $*" >&2
  exit 1
}

root=$(cd "$(dirname "$0")/.." && pwd)
from=""
version=""
while [ $# -gt 0 ]; do
  case $1 in
    --from)
      [ $# -ge 2 ] || die "--from needs a directory"
      from=$2
      shift
      ;;
    --version)
      [ $# -ge 2 ] || die "--version needs a version"
      version=$2
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
      exit 0
      ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) break ;;
  esac
  shift
done
[ $# -eq 1 ] || die "usage: $me [--from DIR] [--version VERSION] OUTDIR"
mkdir -p "$1"
out=$(cd "$1" && pwd)
command -v dpkg-shlibdeps >/dev/null || die "dpkg-shlibdeps not found: apt-get install dpkg-dev"

if [ -z "$version" ]; then
  upstream=$(sed -n '/^\[workspace.package\]/,/^\[/{s/^version = "\(.*\)"/\1/p}' "$root/Cargo.toml")
  [ -n "$upstream" ] || die "cannot read the workspace version from Cargo.toml"
  version=$upstream-1
fi
arch=$(dpkg --print-architecture)

if [ -z "$from" ]; then
  (cd "$root" && cargo build --release --locked --quiet -p vmsnapd -p vmsnapctl) ||
    die "cargo build failed"
  from=$root/target/release
fi

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT
stage=$work/vmsnap
# The same date in every build of one commit (reproducible builds).
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$root" log -1 --format=%ct 2>/dev/null || date +%s)}

# The Cockpit page is left out: it would belong in a package of its own (cockpit-vmsnap), which
# needs npm to build.
DESTDIR=$stage PREFIX=/usr "$root/install.sh" --no-cockpit --from "$from" >/dev/null

# Debian 12's systemd and lintian look for units in /lib/systemd/system (usrmerge moves are not
# safe before Debian 13).
mkdir -p "$stage/lib/systemd"
mv "$stage/usr/lib/systemd/system" "$stage/lib/systemd/system"
rmdir "$stage/usr/lib/systemd" "$stage/usr/lib" 2>/dev/null || true

# Binaries as Debian ships them: without debug symbols.
for b in vmsnapd vmsnapctl; do
  strip --strip-unneeded --remove-section=.comment --remove-section=.note "$stage/usr/bin/$b"
done
gzip -9n "$stage"/usr/share/man/man*/*.[0-9]

doc=$stage/usr/share/doc/vmsnap
install -d -m 0755 "$doc"
install -m 0644 "$root/packaging/debian/copyright" "$doc/copyright"
{
  echo "vmsnap ($version) unstable; urgency=medium"
  echo
  echo "  * Package built from the vmsnap source tree (packaging/build-deb.sh)."
  echo
  echo " -- vmsnap maintainers <vmsnap@example.invalid>  $(date -u -R -d "@$SOURCE_DATE_EPOCH")"
} | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"
install -D -m 0644 "$root/packaging/debian/lintian-overrides" \
  "$stage/usr/share/lintian/overrides/vmsnap"

# Depends on the shared libraries the binaries link, as dpkg-shlibdeps computes them (it wants to
# run in a source tree: give it a minimal one).
mkdir -p "$work/src/debian"
printf 'Source: vmsnap\n\nPackage: vmsnap\nArchitecture: any\n' >"$work/src/debian/control"
shlibs=$(cd "$work/src" && dpkg-shlibdeps -O "$stage/usr/bin/vmsnapd" "$stage/usr/bin/vmsnapctl" 2>"$work/shlibdeps.log") ||
  die "dpkg-shlibdeps failed: $(cat "$work/shlibdeps.log")"
shlibs=${shlibs#shlibs:Depends=}
[ -n "$shlibs" ] || die "dpkg-shlibdeps found no libraries"

install -d -m 0755 "$stage/DEBIAN"
installed_size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SHLIBS@/$shlibs/" \
  -e "s/@SIZE@/$installed_size/" "$root/packaging/debian/control" >"$stage/DEBIAN/control"
# Every file under /etc is a conffile: the config and the libvirt hook (an administrator's edit
# survives upgrades; purge removes them). The hook's flock comes from util-linux, which is
# Essential (so not in Depends: lintian flags Depends on an essential package).
(cd "$stage" && find etc -type f -printf '/%p\n' | sort) >"$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
  install -m 0755 "$root/packaging/debian/$script" "$stage/DEBIAN/$script"
done
(cd "$stage" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z |
  xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"
# Every file's time is the commit's.
find "$stage" -newermt "@$SOURCE_DATE_EPOCH" -print0 | xargs -0 touch -h -d "@$SOURCE_DATE_EPOCH"

deb=$out/vmsnap_${version}_$arch.deb
dpkg-deb --build --root-owner-group -Zxz "$stage" "$deb" >/dev/null
echo "$deb"
