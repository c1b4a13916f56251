#!/usr/bin/env bash
# Builds the lab's tiny guest: lab/build-guest.sh [--force] OUTDIR
# Writes OUTDIR/vmlinuz and OUTDIR/initrd.gz and OUTDIR/stamp, skipping the work when the stamp
# (the kernel package plus this script's checksum) is unchanged. Run as root; called by up.sh.
#
# Kernel: Debian's linux-image-6.1.*-amd64 (the one linux-image-amd64 depends on), fetched with
# apt-get download and unpacked with dpkg-deb -x (nothing in /boot changes).
# Initramfs (cpio newc, gzip): busybox-static with applet links; qemu-ga, lvm, dmsetup, thin_check,
# mke2fs (mkfs.ext4) and e2fsck (fsck.ext4)
# with their ldd libraries; the virtio/ext4/dm modules (insmod in modules.dep order); an /init that
# mounts /dev/vda on /mnt/data and starts qemu-ga unless the kernel command line has
# vmsnap.agent=off; /sbin/shutdown for qemu-ga's guest-shutdown; busybox acpid for the ACPI button.
set -euo pipefail

force=0
if [ "${1:-}" = --force ]; then force=1; shift; fi
[ $# -eq 1 ] || { echo "usage: $0 [--force] OUTDIR" >&2; exit 2; }
out=$1
mkdir -p "$out"

# Modules wanted in the guest (dependencies are added from modules.dep).
modules=(
  virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk virtio_console
  crc32c_generic jbd2 mbcache crc16 ext4
  dm-mod dm-bufio dm-snapshot libcrc32c dm-bio-prison dm-persistent-data dm-thin-pool
  button evdev
)
binaries=(/usr/sbin/qemu-ga /usr/sbin/lvm /usr/sbin/dmsetup /usr/sbin/thin_check /usr/sbin/mke2fs
  /usr/sbin/e2fsck)

apt_quiet() {
  local log
  if ! log=$("$@" 2>&1); then
    echo "build-guest: '$*' failed:" >&2
    echo "$log" >&2
    return 1
  fi
}

kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
kpkg=$(kernel_package || true)
if [ -z "$kpkg" ]; then
  apt_quiet apt-get update -qq
  kpkg=$(kernel_package || true)
fi
[ -n "$kpkg" ] || { echo "build-guest: cannot find the package linux-image-amd64 depends on" >&2; exit 1; }

stamp="$kpkg $(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if [ $force = 0 ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.gz" ] &&
  [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi

tmp=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf -- "$tmp"' EXIT
chmod 755 "$tmp"

# --- kernel and modules ---------------------------------------------------------------------
(cd "$tmp" && apt_quiet apt-get download -qq "$kpkg")
deb=$(ls "$tmp"/linux-image-*.deb)
dpkg-deb -x "$deb" "$tmp/k"
rm -f "$deb"
kver=$(ls "$tmp/k/lib/modules")
depmod -b "$tmp/k" "$kver"
moddir=$tmp/k/lib/modules/$kver

root=$tmp/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,etc,proc,sys,dev,run,tmp,root,mnt/data,var/lib,var/log}
ln -s ../run "$root/var/run"

# Module load order: each module after its dependencies (modules.dep lists them transitively;
# modprobe loads them from last to first).
declare -A mod_path=() mod_deps=() loaded=()
while IFS= read -r line; do
  path=${line%%:*}
  name=${path##*/}; name=${name%.ko*}; name=${name//-/_}
  mod_path[$name]=$path
  mod_deps[$name]=${line#*:}
done <"$moddir/modules.dep"
order=()
add_module() {
  local n=${1//-/_} d deps i
  if [ -n "${loaded[$n]:-}" ]; then return 0; fi
  [ -n "${mod_path[$n]:-}" ] || { echo "build-guest: module $1 not in $kpkg" >&2; exit 1; }
  loaded[$n]=1
  read -r -a deps <<<"${mod_deps[$n]}"
  for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
    d=${deps[i]##*/}; add_module "${d%.ko*}"
  done
  order+=("${mod_path[$n]}")
}
for m in "${modules[@]}"; do add_module "$m"; done
: >"$root/etc/modules.list"
for p in "${order[@]}"; do
  mkdir -p "$root/lib/modules/$(dirname "$p")"
  cp "$moddir/$p" "$root/lib/modules/$p"
  echo "$p" >>"$root/etc/modules.list"
done

# --- busybox and binaries -------------------------------------------------------------------
cp /bin/busybox "$root/bin/busybox"
while IFS= read -r applet; do
  case $applet in bin/busybox | linuxrc) continue ;; esac
  mkdir -p "$root/$(dirname "$applet")"
  ln -sf /bin/busybox "$root/$applet"
done < <(/bin/busybox --list-full)

copy_with_libs() {
  local bin=$1 lib
  mkdir -p "$root$(dirname "$bin")"
  # Drop busybox applets of the same name (cp would write through such a link, and PATH
  # could find the applet first).
  for d in /bin /sbin /usr/bin /usr/sbin; do
    if [ -L "$root$d/${bin##*/}" ]; then rm -f "$root$d/${bin##*/}"; fi
  done
  cp -L "$bin" "$root$bin"
  while IFS= read -r lib; do
    if [ -e "$root$lib" ]; then continue; fi
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
}
for b in "${binaries[@]}"; do copy_with_libs "$b"; done
for f in /usr/sbin/*; do # lvcreate, vgcreate, ... are symlinks to lvm; mkfs.ext4 to mke2fs
  case $(readlink "$f") in
    lvm | mke2fs | e2fsck) rm -f "$root$f"; ln -s "$(readlink "$f")" "$root$f" ;;
  esac
done
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"

# --- configuration --------------------------------------------------------------------------
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"
echo vmsnap-lab-guest >"$root/etc/hostname"
mkdir -p "$root/etc/lvm" "$root/run/lock/lvm"
cat >"$root/etc/lvm/lvm.conf" <<'EOF'
# No udev, no dmeventd, no lvmpolld in the lab guest.
devices {
	obtain_device_list_from_udev = 0
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
global {
	use_lvmpolld = 0
	thin_check_executable = "/usr/sbin/thin_check"
}
EOF

# qemu-ga's guest-shutdown runs "/sbin/shutdown -h -P +0 msg" (or -r / -H) and waits for it:
# answer at once and power off a moment later, so the agent's reply goes out first.
cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
# Lab guest shutdown: -r reboots, anything else powers off, one second later.
act=poweroff
for a in "$@"; do [ "$a" = -r ] && act=reboot; done
(
  sleep 1
  sync
  umount /mnt/data 2>/dev/null || mount -o remount,ro /mnt/data 2>/dev/null
  $act -f
) </dev/null >/dev/null 2>&1 &
exit 0
EOF
chmod 755 "$root/sbin/shutdown"

# busybox acpid runs /etc/acpi/PWRF/00000080 when the ACPI power button is pressed
# (virsh shutdown --mode acpi).
mkdir -p "$root/etc/acpi/PWRF"
cat >"$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
exec /sbin/shutdown -h -P +0 "ACPI power button"
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"

cat >"$root/init" <<'EOF'
#!/bin/sh
# vmsnap lab guest init: modules, /dev/virtio-ports links, /mnt/data, qemu-ga, then idle forever.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root
log() { echo "vmsnap-lab: $*" >/dev/console; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/virtio-ports /run/lock/lvm /tmp /var/lib /mnt/data
mount -t devpts devpts /dev/pts
hostname -F /etc/hostname

while read -r m; do
  insmod "/lib/modules/$m" || log "insmod $m failed"
done </etc/modules.list

# virtio-serial ports get their names asynchronously after the driver loads.
link_ports() {
  for p in /sys/class/virtio-ports/*; do
    [ -r "$p/name" ] || continue
    n=$(cat "$p/name")
    [ -n "$n" ] && ln -sf "../${p##*/}" "/dev/virtio-ports/$n"
  done
}
if ls /sys/bus/virtio/drivers/virtio_console/virtio* >/dev/null 2>&1; then
  i=0
  while [ $i -lt 100 ]; do
    link_ports
    [ -n "$(ls /dev/virtio-ports)" ] && break
    sleep 0.05; i=$((i + 1))
  done
  sleep 0.1; link_ports
fi

i=0
while [ ! -b /dev/vda ] && [ -e /sys/block/vda ] && [ $i -lt 60 ]; do sleep 0.05; i=$((i + 1)); done
if [ -b /dev/vda ]; then
  if mount -t ext4 /dev/vda /mnt/data; then log "mounted /dev/vda on /mnt/data"
  else log "mount /dev/vda failed"; fi
fi

ls /dev/input/event* >/dev/null 2>&1 && acpid

if grep -qw 'vmsnap.agent=off' /proc/cmdline; then
  log "qemu-ga disabled (vmsnap.agent=off)"
elif [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
  if qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /run -f /run/qemu-ga.pid -d; then
    log "qemu-ga started"
  else log "qemu-ga failed to start"; fi
else
  log "no agent channel"
fi

# busybox halt/poweroff/reboot (without -f) signal PID 1.
stop() { sync; umount /mnt/data 2>/dev/null; "$1" -f; }
trap 'stop halt' USR1
trap 'stop poweroff' USR2
trap 'stop reboot' TERM
log "ready"
while :; do
  sleep 3600 &
  wait $!
done
EOF
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet | gzip -1) >"$tmp/initrd.gz"
cp "$tmp/k/boot/vmlinuz-$kver" "$tmp/vmlinuz"
mv -f "$tmp/vmlinuz" "$out/vmlinuz"
mv -f "$tmp/initrd.gz" "$out/initrd.gz"
echo "$stamp" >"$out/stamp"
