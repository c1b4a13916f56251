#!/usr/bin/env bash
# Takes the vmsnap lab down: lab/down.sh [--purge]
#  - destroys and undefines every vmsnap-lab-* domain (with its snapshot/checkpoint metadata);
#  - stops the lab's Ceph cluster and removes its data (lab/ceph-down.sh);
#  - stops the lab's private dbus-daemon;
#  - stops libvirtd and virtlogd only if lab/up.sh started them ($LAB_DIR/started-daemons);
#  - removes the data disks, console logs and domain XML, keeping the cached guest kernel and
#    initramfs ($LAB_DIR/guest) so the next up is fast; --purge removes $LAB_DIR entirely.
# State dir: ${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}. Quiet unless something fails.
set -euo pipefail

LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
URI=qemu:///system
purge=0
case ${1:-} in
  --purge) purge=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "lab down: must run as root" >&2; exit 1; }
status=0
warn() { echo "lab down: $*" >&2; status=1; }

pid_alive() { # pid_alive PIDFILE COMM
  local pid state
  [ -s "$1" ] || return 1
  pid=$(head -n1 "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

# stop_daemon PIDFILE COMM: SIGTERM, then wait (bounded) until it is gone or a zombie
# (PID 1 here does not reap); SIGKILL if it does not go.
stop_daemon() {
  local pidfile=$1 comm=$2 pid i
  pid_alive "$pidfile" "$comm" || return 0
  pid=$(head -n1 "$pidfile" 2>/dev/null) || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    pid_alive "$pidfile" "$comm" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  sleep 0.2
  pid_alive "$pidfile" "$comm" && warn "$comm (pid $pid) does not stop"
  return 0
}

# --- the demo's vmsnapd (lab/demo.sh) ------------------------------------------------------
stop_daemon "$LAB_DIR/vmsnapd.pid" vmsnapd
rm -f "$LAB_DIR/vmsnapd.pid"

# --- domains --------------------------------------------------------------------------------
if timeout 10 virsh -c "$URI" version >/dev/null 2>&1; then
  # In parallel: libvirt takes about a second to destroy each TCG domain.
  remove_vm() {
    local vm=$1 out
    if [ "$(virsh -c "$URI" domstate "$vm" 2>/dev/null)" != "shut off" ]; then
      out=$(virsh -c "$URI" destroy "$vm" 2>&1) || { echo "lab down: destroy $vm: $out" >&2; return 1; }
    fi
    out=$(virsh -c "$URI" undefine "$vm" --snapshots-metadata --checkpoints-metadata \
      --managed-save --nvram 2>&1) || { echo "lab down: undefine $vm: $out" >&2; return 1; }
  }
  jobs_=()
  for vm in $(virsh -c "$URI" list --all --name | grep '^vmsnap-lab-' || true); do
    remove_vm "$vm" &
    jobs_+=($!)
  done
  for j in "${jobs_[@]}"; do wait "$j" || status=1; done
fi

# --- the lab's sshd (lab/sshd.sh) ------------------------------------------------------------
stop_daemon "$LAB_DIR/ssh/sshd.pid" sshd

# --- private D-Bus --------------------------------------------------------------------------
stop_daemon "$LAB_DIR/dbus.pid" dbus-daemon
rm -f "$LAB_DIR/dbus.pid" "$LAB_DIR/bus-address" "$LAB_DIR/bus.sock"

# --- Ceph: before libvirtd stops (ceph-down.sh undefines the lab's libvirt secret) ---------
bash "$(dirname "${BASH_SOURCE[0]}")/ceph-down.sh" >/dev/null || warn "lab/ceph-down.sh failed"

# --- libvirt daemons we started -------------------------------------------------------------
started=$LAB_DIR/started-daemons
if grep -qx libvirtd "$started" 2>/dev/null; then stop_daemon /run/libvirtd.pid libvirtd; fi
if grep -qx virtlogd "$started" 2>/dev/null; then stop_daemon /run/virtlogd.pid virtlogd; fi
if grep -qx polkitd "$started" 2>/dev/null; then stop_daemon "$LAB_DIR/polkitd.pid" polkitd; fi
if grep -qx system-dbus "$started" 2>/dev/null; then stop_daemon /run/dbus/pid dbus-daemon; fi
rm -f "$started"

# --- files ----------------------------------------------------------------------------------
if [ $purge = 1 ]; then
  case $LAB_DIR in
    "" | / | /var | /var/lib | /tmp | "$HOME") warn "refusing to remove $LAB_DIR" ;;
    *) rm -rf -- "$LAB_DIR" ;;
  esac
elif [ -d "$LAB_DIR" ]; then
  rm -rf -- "$LAB_DIR/disks"
  rm -f -- "$LAB_DIR"/vmsnap-lab-*.console.log "$LAB_DIR"/vmsnap-lab-*.xml
fi
exit $status
