#!/usr/bin/env bash
# Installs vmsnap on this machine (or into DESTDIR for a package), or removes it again.
#
#   ./install.sh                    build release binaries (cargo), then install them
#   ./install.sh --no-build         install the binaries already in target/release
#   ./install.sh --from DIR         install the binaries in DIR (implies --no-build)
#   ./install.sh --uninstall        remove what install put (the config file stays)
#   ./install.sh --no-cockpit       leave out the Cockpit page (no Node.js/npm needed)
#
# Environment: PREFIX (default /usr) and DESTDIR (default empty), as packagers expect: every file
# goes to $DESTDIR$PREFIX/..., except the config, which vmsnapd reads from /etc/vmsnap whatever
# PREFIX is, and the libvirt hook, which libvirtd looks for only in /etc/libvirt/hooks. dbus-daemon and polkitd only read /usr/share (and /etc): with another PREFIX, the
# D-Bus policy and the polkit actions must be linked there by hand.
#
# Installed:
#   $PREFIX/bin/vmsnapd, $PREFIX/bin/vmsnapctl                                     0755
#   $PREFIX/lib/systemd/system/vmsnapd.service                                     0644
#   $PREFIX/share/dbus-1/system.d/org.vmsnap.VmSnap1.conf                          0644
#   $PREFIX/share/dbus-1/system-services/org.vmsnap.VmSnap1.service                0644
#   $PREFIX/share/polkit-1/actions/org.vmsnap.policy                               0644
#   $PREFIX/share/man/man1/vmsnapctl.1, vmsnapctl-<command>.1                      0644
#   $PREFIX/share/man/man5/vmsnapd.toml.5, $PREFIX/share/man/man8/vmsnapd.8         0644
#   $PREFIX/share/bash-completion/completions/vmsnapctl                            0644
#   $PREFIX/share/zsh/vendor-completions/_vmsnapctl                                0644
#   $PREFIX/share/fish/vendor_completions.d/vmsnapctl.fish                         0644
#   /etc/vmsnap/vmsnapd.toml (the documented defaults; an existing one is kept)    0644
#   /etc/libvirt/hooks/qemu.d/vmsnap (refuses to start a VM vmsnapd works on)      0755
#   $PREFIX/share/cockpit/vmsnap/ (the Cockpit page, cockpit/dist/)                0644
#
# The Cockpit page is built with npm and esbuild (lab/build-cockpit.sh): a build (the default)
# builds it; with --no-build or --from, cockpit/dist/ must have been built before.
# libvirtd looks for hooks only when it starts: after the hook's first install, restart libvirtd
# (or virtqemud) once, which install prints when it installs into this system (no DESTDIR).
# Man pages and completions are generated from vmsnapctl's command line by vmsnapctl-gen, built
# with the binaries. Running it again installs the same files again (idempotent).
set -euo pipefail
umask 022

me=install.sh
die() {
  echo "$me: $*" >&2
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

root=$(cd "$(dirname "$0")" && pwd)
build=1
uninstall=0
cockpit=1
from=""
while [ $# -gt 0 ]; do
  case $1 in
    --no-build) build=0 ;;
    --from)
      [ $# -ge 2 ] || die "--from needs a directory"
      from=$2
      build=0
      shift
      ;;
    --from=*)
      from=${1#--from=}
      build=0
      ;;
    --uninstall) uninstall=1 ;;
    --no-cockpit) cockpit=0 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

PREFIX=${PREFIX:-/usr}
DESTDIR=${DESTDIR:-}
case $PREFIX in
  /*) ;;
  *) die "PREFIX must be an absolute path, not '$PREFIX'" ;;
esac
PREFIX=${PREFIX%/}
case $DESTDIR in
  "" | /*) ;;
  *) DESTDIR=$(pwd)/$DESTDIR ;;
esac
DESTDIR=${DESTDIR%/}

bindir=$PREFIX/bin
unitdir=$PREFIX/lib/systemd/system
dbus_policy_dir=$PREFIX/share/dbus-1/system.d
dbus_service_dir=$PREFIX/share/dbus-1/system-services
polkit_dir=$PREFIX/share/polkit-1/actions
man1dir=$PREFIX/share/man/man1
man5dir=$PREFIX/share/man/man5
man8dir=$PREFIX/share/man/man8
bash_dir=$PREFIX/share/bash-completion/completions
zsh_dir=$PREFIX/share/zsh/vendor-completions
fish_dir=$PREFIX/share/fish/vendor_completions.d
cockpit_dir=$PREFIX/share/cockpit/vmsnap
confdir=/etc/vmsnap
hookdir=/etc/libvirt/hooks/qemu.d

# Every file install puts, but the man pages (their names come from vmsnapctl's commands).
files=(
  "$bindir/vmsnapd"
  "$bindir/vmsnapctl"
  "$unitdir/vmsnapd.service"
  "$dbus_policy_dir/org.vmsnap.VmSnap1.conf"
  "$dbus_service_dir/org.vmsnap.VmSnap1.service"
  "$polkit_dir/org.vmsnap.policy"
  "$man5dir/vmsnapd.toml.5"
  "$man8dir/vmsnapd.8"
  "$bash_dir/vmsnapctl"
  "$zsh_dir/_vmsnapctl"
  "$fish_dir/vmsnapctl.fish"
  "$hookdir/vmsnap"
)

if [ $uninstall = 1 ]; then
  for f in "${files[@]}"; do
    rm -f -- "$DESTDIR$f"
  done
  # vmsnapctl.1 and vmsnapctl-<command>.1: all of vmsnapctl's pages, whatever its commands were.
  rm -f -- "$DESTDIR$man1dir"/vmsnapctl.1 "$DESTDIR$man1dir"/vmsnapctl-*.1
  # The page's asset names carry content hashes: the whole directory is the page's.
  rm -rf -- "$DESTDIR$cockpit_dir"
  rmdir -- "$DESTDIR$PREFIX/share/cockpit" 2>/dev/null || true
  if [ -e "$DESTDIR$confdir/vmsnapd.toml" ]; then
    echo "$me: vmsnap removed; $DESTDIR$confdir/vmsnapd.toml is kept (remove it by hand if unwanted)"
  else
    echo "$me: vmsnap removed"
  fi
  exit 0
fi

if [ $build = 1 ]; then
  command -v cargo >/dev/null || die "cargo not found: install Rust, or build first and use --no-build"
  (cd "$root" && cargo build --release --locked --quiet -p vmsnapd -p vmsnapctl) ||
    die "cargo build failed"
  if [ $cockpit = 1 ]; then
    bash "$root/lab/build-cockpit.sh" || die "the Cockpit page's build failed (or use --no-cockpit)"
  fi
fi
if [ $cockpit = 1 ] && ! [ -f "$root/cockpit/dist/index.html" ]; then
  die "$root/cockpit/dist is missing: build the Cockpit page first (lab/build-cockpit.sh) or use --no-cockpit"
fi
from=${from:-$root/target/release}
[ -d "$from" ] || die "$from does not exist: build first (cargo build --release) or name the binaries' directory with --from"
for b in vmsnapd vmsnapctl vmsnapctl-gen; do
  [ -x "$from/$b" ] || die "$from/$b is missing: build first (cargo build --release) or name the binaries' directory with --from"
done

work=$(mktemp -d)
trap 'rm -rf -- "$work"' EXIT

# Generated from vmsnapctl's clap definition; without the environment's bus address, which clap
# would print as the option's current value.
env -u VMSNAP_BUS_ADDRESS "$from/vmsnapctl-gen" man "$work/man" || die "cannot generate the man pages"
env -u VMSNAP_BUS_ADDRESS "$from/vmsnapctl-gen" completions "$work/completions" ||
  die "cannot generate the shell completions"

# The shipped files name /usr/bin/vmsnapd; with another PREFIX they name $bindir/vmsnapd.
sed "s|/usr/bin/vmsnapd|$bindir/vmsnapd|g" "$root/systemd/vmsnapd.service" >"$work/vmsnapd.service"
sed "s|/usr/bin/vmsnapd|$bindir/vmsnapd|g" \
  "$root/config/dbus/system-services/org.vmsnap.VmSnap1.service" >"$work/org.vmsnap.VmSnap1.service"

put() { # mode source destination-directory [name]
  local mode=$1 source=$2 dir=$DESTDIR$3 name=${4:-$(basename "$2")}
  install -d -m 0755 "$dir" || die "cannot create $dir"
  install -m "$mode" "$source" "$dir/$name" || die "cannot install $dir/$name"
}

put 0755 "$from/vmsnapd" "$bindir"
put 0755 "$from/vmsnapctl" "$bindir"
put 0644 "$work/vmsnapd.service" "$unitdir"
put 0644 "$root/config/dbus/system.d/org.vmsnap.VmSnap1.conf" "$dbus_policy_dir"
put 0644 "$work/org.vmsnap.VmSnap1.service" "$dbus_service_dir"
put 0644 "$root/config/polkit/org.vmsnap.policy" "$polkit_dir"
for page in "$work"/man/*.1; do
  put 0644 "$page" "$man1dir"
done
put 0644 "$root/man/vmsnapd.toml.5" "$man5dir"
put 0644 "$root/man/vmsnapd.8" "$man8dir"
put 0644 "$work/completions/vmsnapctl.bash" "$bash_dir" vmsnapctl
put 0644 "$work/completions/_vmsnapctl" "$zsh_dir"
put 0644 "$work/completions/vmsnapctl.fish" "$fish_dir"
# libvirtd must be told (restarted) when the hook is new or changed on this system.
hook=$root/config/libvirt/hooks/qemu.d/vmsnap
hook_note=""
if [ -z "$DESTDIR" ] && ! cmp -s -- "$hook" "$hookdir/vmsnap"; then
  hook_note="$me: restart libvirtd (or virtqemud) once so that it runs the new hook $hookdir/vmsnap"
fi
put 0755 "$hook" "$hookdir"
if [ $cockpit = 1 ]; then
  # A fresh copy: no asset of an older build stays behind.
  rm -rf -- "$DESTDIR$cockpit_dir"
  (cd "$root/cockpit/dist" && find . -type f | sort) | while read -r f; do
    put 0644 "$root/cockpit/dist/$f" "$cockpit_dir/$(dirname "$f")"
  done
fi
if [ -e "$DESTDIR$confdir/vmsnapd.toml" ]; then
  kept=" (kept the existing $DESTDIR$confdir/vmsnapd.toml)"
else
  put 0644 "$root/config/vmsnapd.toml" "$confdir"
  kept=""
fi

if [ -z "$DESTDIR" ]; then
  echo "$me: vmsnap installed under $PREFIX$kept; start it with: systemctl daemon-reload && systemctl enable --now vmsnapd"
  if [ -n "$hook_note" ]; then echo "$hook_note"; fi
else
  echo "$me: vmsnap installed into $DESTDIR$kept"
fi
