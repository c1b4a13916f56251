#!/usr/bin/env bash
# Brings the vmsnap lab up on Debian 12 as root (no systemd needed). Idempotent: a second run only
# checks that everything is still there. Quiet unless something fails; ends with a short summary.
#
#  - installs packages (lab/install-packages.sh --ceph);
#  - a single-node Ceph cluster for RBD disks (lab/ceph-up.sh, once libvirtd answers);
#  - libvirt: user/group libvirt-qemu, qemu.conf user/group root, vmsnap's libvirt hook in
#    /etc/libvirt/hooks/qemu.d/vmsnap (a running libvirtd is restarted once when the hook is new or
#    changed: libvirtd looks for hooks only when it starts), virtlogd -d and libvirtd -d (only if
#    not running; the ones it starts are listed in $LAB_DIR/started-daemons for down.sh);
#  - a private system-type dbus-daemon on unix:path=$LAB_DIR/bus.sock with a permissive policy
#    (address in $LAB_DIR/bus-address, pid in $LAB_DIR/dbus.pid; extra policy files may be dropped
#    in $LAB_DIR/dbus.d/, then send the daemon SIGHUP);
#  - the guest kernel/initramfs, cached in $LAB_DIR/guest/ (lab/build-guest.sh);
#  - the systemd guest's image (Debian 12 with systemd as PID 1, for the package tests), cached
#    in $LAB_DIR/systemd-guest/ (lab/build-systemd-guest.sh; rebuilt only when the script changes);
#  - three TCG domains, each with its own data disk under $LAB_DIR/disks/ (ext4 holding /hello.txt,
#    mounted on /mnt/data in the guest), console logged to $LAB_DIR/<vm>.console.log:
#      vmsnap-lab-agent    vda qcow2; agent channel, qemu-ga running        -> agent connected
#      vmsnap-lab-noagent  vda qcow2; no agent channel                       -> agent not configured
#      vmsnap-lab-mixed    vda qcow2; agent channel but vmsnap.agent=off     -> agent disconnected;
#                          vdb raw <readonly/>; sda cdrom (sata, raw "cidata" image, readonly)
#  - an sshd of its own on 127.0.0.1:2222 for `vmsnapctl -H` (lab/sshd.sh);
#  - waits until vmsnap-lab-agent answers guest-ping.
# State dir: ${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}.
set -euo pipefail

LAB_SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
URI=qemu:///system
GUEST=$LAB_DIR/guest
DISKS=$LAB_DIR/disks
VMS=(vmsnap-lab-agent vmsnap-lab-noagent vmsnap-lab-mixed)
MEMORY_MIB=192

die() { echo "lab up: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

# Runs a command, showing its output only if it fails.
quiet() {
  local out
  if ! out=$("$@" 2>&1); then
    echo "lab up: '$*' failed:" >&2
    [ -n "$out" ] && echo "$out" >&2
    return 1
  fi
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is a live (not zombie) process named COMM.
pid_alive() {
  local pid state
  [ -s "$1" ] || return 1
  pid=$(head -n1 "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

mkdir -p "$LAB_DIR" "$DISKS"

# --- packages -------------------------------------------------------------------------------
quiet "$LAB_SRC/install-packages.sh" --ceph

# The guest build (a no-op when cached) overlaps libvirtd's first start, which probes QEMU.
"$LAB_SRC/build-guest.sh" "$GUEST" >"$LAB_DIR/build-guest.log" 2>&1 &
build_pid=$!
"$LAB_SRC/build-systemd-guest.sh" "$LAB_DIR/systemd-guest" >"$LAB_DIR/build-systemd-guest.log" 2>&1 &
systemd_build_pid=$!

# --- libvirt --------------------------------------------------------------------------------
getent group libvirt-qemu >/dev/null || quiet groupadd --system libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
  quiet useradd --system --gid libvirt-qemu --no-create-home --home-dir /var/lib/libvirt \
    --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /etc/libvirt /var/log/libvirt
qemu_conf=/etc/libvirt/qemu.conf
touch "$qemu_conf"
grep -qE '^[[:space:]]*user[[:space:]]*=' "$qemu_conf" || echo 'user = "root"' >>"$qemu_conf"
grep -qE '^[[:space:]]*group[[:space:]]*=' "$qemu_conf" || echo 'group = "root"' >>"$qemu_conf"

record_started() {
  grep -qx "$1" "$LAB_DIR/started-daemons" 2>/dev/null || echo "$1" >>"$LAB_DIR/started-daemons"
}

# vmsnap's libvirt hook refuses to start a VM while vmsnapd holds that VM's lock. libvirtd looks
# for hooks only when it starts, so the hook goes in first; a libvirtd already running while the
# hook is missing or differs is stopped, then started again below with the hook in place. Stopped
# before the copy: a run interrupted in between finds the hook still different and libvirtd
# stopped, and finishes the job. Running guests keep running (QEMU does not depend on libvirtd,
# which reconnects to them and their agents when it starts: tests/tests/lab_libvirtd_restart.rs);
# open libvirt connections (a vmsnapd, virsh) drop and reconnect.
hook_src=$LAB_SRC/../config/libvirt/hooks/qemu.d/vmsnap
hook=/etc/libvirt/hooks/qemu.d/vmsnap
libvirtd_restarted=0
if ! cmp -s "$hook_src" "$hook"; then
  if pid_alive /run/libvirtd.pid libvirtd; then
    kill -TERM "$(head -n1 /run/libvirtd.pid)" 2>/dev/null || true
    deadline=$((SECONDS + 30))
    # libvirtd removes its pid file when it exits (PID 1 may not reap it: pid_alive, not kill -0).
    while pid_alive /run/libvirtd.pid libvirtd; do
      [ $SECONDS -lt $deadline ] || die "libvirtd did not stop within 30 s (to pick up the hook $hook)"
      sleep 0.2
    done
    libvirtd_restarted=1
  fi
  install -D -m 0755 "$hook_src" "$hook" || die "cannot install $hook"
fi

if ! pid_alive /run/virtlogd.pid virtlogd; then
  quiet virtlogd -d
  record_started virtlogd
fi
if ! pid_alive /run/libvirtd.pid libvirtd; then
  quiet libvirtd -d
  # A restart for the hook leaves who owns libvirtd as it was (down.sh stops only the lab's).
  [ $libvirtd_restarted = 1 ] || record_started libvirtd
fi
deadline=$((SECONDS + 60))
until timeout 10 virsh -c "$URI" version >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || die "libvirtd did not answer within 60 s (virsh -c $URI version)"
  pid_alive /run/libvirtd.pid libvirtd || die "libvirtd exited; see /var/log/libvirt or run 'libvirtd -v'"
  sleep 0.2
done

# --- Ceph (RBD disks) -----------------------------------------------------------------------
# After libvirtd answers: ceph-up.sh defines the libvirt secret with the Ceph user's key. Its
# daemons must not inherit a caller's lock descriptors (9>&-: see lab/ceph-up.sh).
if ! "$LAB_SRC/ceph-up.sh" >"$LAB_DIR/ceph-up.log" 2>&1 9>&-; then
  echo "lab up: the Ceph cluster did not come up:" >&2
  cat "$LAB_DIR/ceph-up.log" >&2
  exit 1
fi

# --- private D-Bus --------------------------------------------------------------------------
bus_alive() {
  pid_alive "$LAB_DIR/dbus.pid" dbus-daemon && [ -s "$LAB_DIR/bus-address" ] &&
    timeout 5 dbus-send --bus="$(cat "$LAB_DIR/bus-address")" --print-reply \
      --dest=org.freedesktop.DBus / org.freedesktop.DBus.GetId >/dev/null 2>&1
}
if ! bus_alive; then
  mkdir -p "$LAB_DIR/dbus.d"
  cat >"$LAB_DIR/dbus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- vmsnap lab: private system-type bus, written by lab/up.sh -->
<busconfig>
  <type>system</type>
  <listen>unix:path=$LAB_DIR/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
  <includedir>$LAB_DIR/dbus.d</includedir>
</busconfig>
EOF
  rm -f "$LAB_DIR/bus.sock" "$LAB_DIR/bus-address" "$LAB_DIR/dbus.pid"
  out=$(dbus-daemon --config-file="$LAB_DIR/dbus.conf" --fork --print-address=1 --print-pid=1) ||
    die "dbus-daemon failed to start"
  sed -n 1p <<<"$out" >"$LAB_DIR/bus-address"
  sed -n 2p <<<"$out" >"$LAB_DIR/dbus.pid"
  bus_alive || die "the private bus does not answer ($(cat "$LAB_DIR/bus-address"))"
fi

# --- sshd for vmsnapctl -H (lab/sshd.sh) -----------------------------------------------------
"$LAB_SRC/sshd.sh"

# --- guest kernel and initramfs (built in the background, see above) ------------------------
if ! wait "$build_pid"; then
  echo "lab up: building the guest failed:" >&2
  cat "$LAB_DIR/build-guest.log" >&2
  exit 1
fi

# --- disks ----------------------------------------------------------------------------------
make_disk() { # make_disk PATH SIZE [SEED]
  [ -e "$1" ] || quiet "$LAB_SRC/make-data-disk.sh" "$@"
}
make_disk "$DISKS/vmsnap-lab-agent-vda.qcow2" 64M
make_disk "$DISKS/vmsnap-lab-noagent-vda.qcow2" 64M
make_disk "$DISKS/vmsnap-lab-mixed-vda.qcow2" 64M
if [ ! -e "$DISKS/vmsnap-lab-mixed-vdb.raw" ] || [ ! -e "$DISKS/vmsnap-lab-mixed-cidata.img" ]; then
  seed=$(mktemp -d "$LAB_DIR/.seed.XXXXXX")
  printf 'read-only disk of vmsnap-lab-mixed\n' >"$seed/readonly.txt"
  VMSNAP_DISK_LABEL=vmsnap-ro make_disk "$DISKS/vmsnap-lab-mixed-vdb.raw" 16M "$seed"
  rm -f "$seed/readonly.txt"
  printf 'instance-id: vmsnap-lab-mixed\nlocal-hostname: vmsnap-lab-mixed\n' >"$seed/meta-data"
  printf '#cloud-config\n{}\n' >"$seed/user-data"
  VMSNAP_DISK_LABEL=cidata make_disk "$DISKS/vmsnap-lab-mixed-cidata.img" 4M "$seed"
  rm -rf "$seed"
fi

# --- domains --------------------------------------------------------------------------------
# domain_xml NAME CMDLINE_EXTRA AGENT_CHANNEL(yes|no) EXTRA_DEVICES
domain_xml() {
  local name=$1 extra_cmdline=$2 channel=$3 extra_devices=$4
  cat <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>$MEMORY_MIB</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST/vmlinuz</kernel>
    <initrd>$GUEST/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet$extra_cmdline</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$DISKS/$name-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
$extra_devices
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='$LAB_DIR/$name.console.log'/>
      <target port='0'/>
    </serial>
$(if [ "$channel" = yes ]; then
    echo "    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
  fi)
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}
mixed_devices="    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$DISKS/vmsnap-lab-mixed-vdb.raw'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='$DISKS/vmsnap-lab-mixed-cidata.img'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>"

define_vm() { # define_vm NAME XML
  virsh -c "$URI" dominfo "$1" >/dev/null 2>&1 && return 0
  printf '%s\n' "$2" >"$LAB_DIR/$1.xml"
  quiet virsh -c "$URI" define "$LAB_DIR/$1.xml"
}
define_vm vmsnap-lab-agent "$(domain_xml vmsnap-lab-agent '' yes '')"
define_vm vmsnap-lab-noagent "$(domain_xml vmsnap-lab-noagent '' no '')"
define_vm vmsnap-lab-mixed "$(domain_xml vmsnap-lab-mixed ' vmsnap.agent=off' yes "$mixed_devices")"

# start_vm NAME: virsh start, run again (5 attempts in all) only when libvirt 9.0 fails with
# "failed to load cgroup BPF prog: Resource temporarily unavailable": the kernel's BPF verifier
# gives up with EAGAIN when a signal is pending, libvirt does not retry, and the failed start
# changed nothing. vmsnapd and the tests' virsh_output retry the same message the same way.
start_vm() {
  local out attempt
  for attempt in 1 2 3 4 5; do
    out=$(virsh -c "$URI" start "$1" 2>&1) && return 0
    [[ $out == *"failed to load cgroup BPF prog: Resource temporarily unavailable"* ]] || break
  done
  echo "lab up: 'virsh -c $URI start $1' failed (attempt $attempt):" >&2
  echo "$out" >&2
  return 1
}

for vm in "${VMS[@]}"; do
  state=$(virsh -c "$URI" domstate "$vm" 2>/dev/null || true)
  case $state in
    running) ;;
    paused) quiet virsh -c "$URI" resume "$vm" ;;
    *) start_vm "$vm" ;;
  esac
done

# --- wait for the guests --------------------------------------------------------------------
deadline=$((SECONDS + 120))
for vm in "${VMS[@]}"; do
  until grep -q 'vmsnap-lab: ready' "$LAB_DIR/$vm.console.log" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || die "$vm did not boot within 120 s; see $LAB_DIR/$vm.console.log"
    sleep 0.2
  done
done
until timeout 10 virsh -c "$URI" qemu-agent-command --timeout 2 vmsnap-lab-agent \
  '{"execute":"guest-ping"}' >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] ||
    die "vmsnap-lab-agent's agent did not answer within 120 s; see $LAB_DIR/vmsnap-lab-agent.console.log"
  sleep 0.2
done

# --- system bus and polkit, for authorization --------------------------------------------
# vmsnapd asks polkitd (on the system bus) whether a caller may create, delete or restore. The
# machine has no systemd to start them, so the lab does, and installs vmsnap's polkit actions.
install -D -m 0644 "$(dirname "$0")/../config/polkit/org.vmsnap.policy" \
  /usr/share/polkit-1/actions/org.vmsnap.policy
if ! [ -S /run/dbus/system_bus_socket ] || ! busctl --system status >/dev/null 2>&1; then
  mkdir -p /run/dbus
  rm -f /run/dbus/system_bus_socket /run/dbus/pid
  dbus-daemon --system --fork >/dev/null
  record_started system-dbus
fi
if ! busctl --system status org.freedesktop.PolicyKit1 >/dev/null 2>&1; then
  /usr/lib/polkit-1/polkitd --no-debug >"$LAB_DIR/polkitd.log" 2>&1 &
  echo $! >"$LAB_DIR/polkitd.pid"
  record_started polkitd
  deadline=$((SECONDS + 30))
  until busctl --system status org.freedesktop.PolicyKit1 >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "polkitd did not start; see $LAB_DIR/polkitd.log"
    sleep 0.2
  done
fi

# --- systemd guest image (built in the background, see above) -------------------------------
if ! wait "$systemd_build_pid"; then
  echo "lab up: building the systemd guest failed:" >&2
  cat "$LAB_DIR/build-systemd-guest.log" >&2
  exit 1
fi

# --- summary --------------------------------------------------------------------------------
echo "vmsnap lab up ($LAB_DIR)"
for vm in "${VMS[@]}"; do
  state=$(virsh -c "$URI" domstate "$vm")
  agent=$(virsh -c "$URI" dumpxml "$vm" |
    sed -n "s/.*<target type='virtio' name='org.qemu.guest_agent.0' state='\([a-z]*\)'.*/\1/p")
  disks=$(virsh -c "$URI" domblklist "$vm" | awk 'NR > 2 && NF {printf "%s%s", sep, $1; sep=","}')
  printf '  %-20s %-8s agent=%-13s disks=%s\n' "$vm" "$state" "${agent:-none}" "$disks"
done
echo "  bus: $(cat "$LAB_DIR/bus-address")"
