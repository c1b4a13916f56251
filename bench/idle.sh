#!/usr/bin/env bash
# Idle cost: the CPU that vmsnapd, and libvirtd on its behalf, use while nothing happens, with
# many defined, shut-off domains (BENCHMARKS.md, "Idle cost").
#   flock /tmp/vmsnap-lab.lock bash bench/idle.sh [VMSNAPD...] 9>&-
# Needs the lab's libvirtd (root, qemu:///system; lab/up.sh) and nothing else running against
# it (hence the lab lock): libvirtd's CPU is measured as a whole.
# Arguments: the vmsnapd binaries to compare (default: this tree's debug build), each run with
# its own built-in defaults (only the URI, the folders and polkit are set), so a before/after
# compares what each ships. Environment: BENCH_VMS domains to define (default 100),
# BENCH_SECONDS the measured window (default 60), BENCH_SETTLE seconds between vmsnapd listing
# every domain and the window (default 10), BENCH_URI (default qemu:///system), BENCH_CTL the
# vmsnapctl used to wait for the listing (default this tree's debug build).
#
# What it does:
#  - defines BENCH_VMS domains vmsnap-idle-<pid>-NNN (TCG, 16 MiB, no disks: about 200 bytes of
#    XML each), shut off;
#  - measures libvirtd with no vmsnapd for BENCH_SECONDS: the baseline;
#  - for each VMSNAPD: starts its own dbus-daemon (private, permissive) and that vmsnapd, waits
#    until it lists every domain, lets it settle, then reads utime+stime of vmsnapd and of
#    libvirtd (/proc/PID/stat) at the start and the end of BENCH_SECONDS, and stops it;
#  - prints a markdown table on stdout (CPU seconds in the window, and percent of one core),
#    progress on stderr;
#  - on exit, whatever happened, stops its daemons and undefines its domains.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${BENCH_VMS:-100}
SECONDS_=${BENCH_SECONDS:-60}
SETTLE=${BENCH_SETTLE:-10}
URI=${BENCH_URI:-qemu:///system}
PREFIX="vmsnap-idle-$$"

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[[ $N =~ ^[1-9][0-9]*$ ]] || die "BENCH_VMS must be a positive number"
[[ $SECONDS_ =~ ^[1-9][0-9]*$ ]] || die "BENCH_SECONDS must be a positive number"
[[ $SETTLE =~ ^[0-9]+$ ]] || die "BENCH_SETTLE must be a number"
command -v dbus-daemon >/dev/null || die "dbus-daemon is needed"
command -v virsh >/dev/null || die "virsh is needed"
[ -r /run/libvirtd.pid ] || die "no /run/libvirtd.pid: is the lab up (lab/up.sh)?"

BINARIES=("$@")
if [ ${#BINARIES[@]} = 0 ]; then
  BINARIES=("${CARGO_TARGET_DIR:-$PWD/target}/debug/vmsnapd")
fi
for b in "${BINARIES[@]}"; do [ -x "$b" ] || die "$b is not executable"; done
CTL=${BENCH_CTL:-${CARGO_TARGET_DIR:-$PWD/target}/debug/vmsnapctl}
[ -x "$CTL" ] || die "no vmsnapctl at $CTL (set BENCH_CTL)"
TCK=$(getconf CLK_TCK)

# --- cleanup ---------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/vmsnap-bench-idle.XXXXXX")
vmsnapd_pid=""
dbus_pid=""
defined=0
stop_daemons() {
  if [ -n "$vmsnapd_pid" ] && kill -0 "$vmsnapd_pid" 2>/dev/null; then
    kill -TERM "$vmsnapd_pid"
    for _ in $(seq 100); do kill -0 "$vmsnapd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$vmsnapd_pid" 2>/dev/null || true
    wait "$vmsnapd_pid" 2>/dev/null || true
  fi
  vmsnapd_pid=""
  if [ -n "$dbus_pid" ]; then kill -TERM "$dbus_pid" 2>/dev/null || true; fi
  dbus_pid=""
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  stop_daemons
  if [ "$defined" = 1 ]; then
    say "undefining the $N domains"
    for i in $(seq -f '%03g' "$N"); do echo "undefine $PREFIX-$i"; done |
      virsh -q -c "$URI" >/dev/null 2>&1
  fi
  rm -rf -- "$work"
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# cpu_ticks PID: utime+stime of a process, in clock ticks (fields 14 and 15 of its stat; the
# name in parentheses may hold spaces, so they are counted after it).
cpu_ticks() {
  local stat
  stat=$(<"/proc/$1/stat")
  stat=${stat##*) }
  awk '{ print $12 + $13 }' <<<"$stat"
}
libvirtd_pid() { cat /run/libvirtd.pid; }

# --- domains ---------------------------------------------------------------------------------
say "defining $N shut-off domains ($PREFIX-NNN)"
defined=1
for i in $(seq -f '%03g' "$N"); do
  cat >"$work/$i.xml" <<EOF
<domain type='qemu'>
  <name>$PREFIX-$i</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
</domain>
EOF
  echo "define $work/$i.xml"
done | virsh -q -c "$URI" >/dev/null

# measure LABEL VMSNAPD_PID_OR_EMPTY: prints one table row.
measure() {
  local label=$1 pid=$2 lv v0=0 v1=0 l0 l1
  lv=$(libvirtd_pid)
  l0=$(cpu_ticks "$lv")
  [ -z "$pid" ] || v0=$(cpu_ticks "$pid")
  sleep "$SECONDS_"
  [ "$(libvirtd_pid)" = "$lv" ] || die "libvirtd restarted during the window"
  l1=$(cpu_ticks "$lv")
  [ -z "$pid" ] || v1=$(cpu_ticks "$pid")
  awk -v label="$label" -v v=$((v1 - v0)) -v l=$((l1 - l0)) -v tck="$TCK" -v s="$SECONDS_" \
    -v has="${pid:+1}" 'BEGIN {
      vs = v / tck; ls = l / tck
      if (has) printf "| %s | %.2f s (%.2f %%) | %.2f s (%.2f %%) |\n", label, vs, 100 * vs / s, ls, 100 * ls / s
      else printf "| %s | - | %.2f s (%.2f %%) |\n", label, ls, 100 * ls / s
    }'
}

echo "| vmsnapd | vmsnapd CPU in ${SECONDS_} s | libvirtd CPU in ${SECONDS_} s |"
echo "|---|---|---|"
say "libvirtd alone for $SECONDS_ s"
measure "none (libvirtd alone)" ""

n=0
for bin in "${BINARIES[@]}"; do
  n=$((n + 1))
  cat >"$work/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$work/bus-$n.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
  { read -r address; read -r dbus_pid; } < <(dbus-daemon --config-file="$work/bus.conf" --fork \
    --print-address=1 --print-pid=1)
  mkdir -p "$work/state-$n" "$work/locks-$n"
  cat >"$work/vmsnapd-$n.toml" <<EOF
libvirt_uri = "$URI"
state_dir = "$work/state-$n"
vm_lock_dir = "$work/locks-$n"
polkit = false
EOF
  say "$bin: starting"
  VMSNAP_LOG=info "$bin" --config "$work/vmsnapd-$n.toml" --bus-address "$address" \
    >"$work/vmsnapd-$n.log" 2>&1 &
  vmsnapd_pid=$!
  listed=0
  for _ in $(seq 300); do
    listed=$("$CTL" --bus-address "$address" vm list 2>/dev/null | grep -c "^$PREFIX-" || true)
    [ "$listed" = "$N" ] && break
    kill -0 "$vmsnapd_pid" 2>/dev/null || die "vmsnapd exited: $(tail -5 "$work/vmsnapd-$n.log")"
    sleep 0.1
  done
  [ "$listed" = "$N" ] || die "vmsnapd lists $listed of the $N domains after 30 s"
  say "$bin: lists all $N; settling $SETTLE s, then measuring $SECONDS_ s"
  sleep "$SETTLE"
  measure "$bin" "$vmsnapd_pid"
  stop_daemons
done
