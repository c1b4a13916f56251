#!/usr/bin/env bash
# Takes lab/ceph-up.sh's Ceph cluster down: lab/ceph-down.sh [--keep-data]
#  - undefines the lab's libvirt secret (if libvirtd answers on qemu:///system);
#  - stops the OSD, then the monitor (SIGTERM, SIGKILL after 15 s);
#  - removes ${VMSNAP_CEPH_DIR:-${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}/ceph} (every RBD image
#    with it). --keep-data only stops the daemons: the next ceph-up.sh restarts them on the same
#    data, secret and keys.
# Packages stay installed. A VM still using an RBD disk of this cluster will hang on its I/O: stop
# it first. Quiet unless something fails.
set -euo pipefail

LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
CEPH_DIR=${VMSNAP_CEPH_DIR:-$LAB_DIR/ceph}
URI=qemu:///system
SECRET_USAGE="vmsnap-lab client.libvirt"
keep=0
case ${1:-} in
  --keep-data) keep=1 ;;
  "") ;;
  *) echo "usage: $0 [--keep-data]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "ceph down: must run as root" >&2; exit 1; }
status=0
warn() { echo "ceph down: $*" >&2; status=1; }

pid_alive() { # pid_alive PIDFILE COMM (PID 1 does not reap: a dead daemon may linger as a zombie)
  local pid state
  [ -s "$1" ] || return 1
  pid=$(head -n1 "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

stop_daemon() { # stop_daemon PIDFILE COMM
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

mkdir -p "$LAB_DIR"
exec 9>"$LAB_DIR/.ceph.lock"
flock -w 300 9 || { echo "ceph down: another lab/ceph-up.sh or ceph-down.sh holds $LAB_DIR/.ceph.lock" >&2; exit 1; }

# --- libvirt secret (by the UUID ceph-up.sh recorded, and any other one with our usage name) ---
if [ $keep = 0 ] && timeout 10 virsh -c "$URI" version >/dev/null 2>&1; then
  uuids=$(timeout 10 virsh -c "$URI" secret-list | awk -v u="ceph $SECRET_USAGE" \
    'NR > 2 && NF { uuid = $1; $1 = ""; sub(/^ +/, ""); if ($0 == u) print uuid }') ||
    warn "cannot list libvirt's secrets"
  for uuid in $uuids; do
    out=$(timeout 10 virsh -c "$URI" secret-undefine "$uuid" 2>&1) || warn "secret-undefine $uuid: $out"
  done
fi

# --- daemons: the OSD first, so it does not wait on a monitor that is gone -------------------
for d in osd.0:ceph-osd mon.a:ceph-mon; do
  stop_daemon "$CEPH_DIR/run/${d%%:*}.pid" "${d#*:}"
  pid_alive "$CEPH_DIR/run/${d%%:*}.pid" "${d#*:}" || rm -f "$CEPH_DIR/run/${d%%:*}.pid"
done

# --- files ---------------------------------------------------------------------------------
if [ $keep = 0 ] && [ $status = 0 ]; then
  case $CEPH_DIR in
    "" | / | /var | /var/lib | /tmp | "$HOME" | "$LAB_DIR") warn "refusing to remove $CEPH_DIR" ;;
    *) rm -rf -- "$CEPH_DIR" ;;
  esac
fi
exit $status
