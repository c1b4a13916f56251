#!/usr/bin/env bash
# `vmsnapctl vm list` against `virsh list --all` with many defined domains (BENCHMARKS.md,
# "Listing": issue 13's target, vm list within 1.2x of virsh list --all at 500 domains).
#   flock -o /tmp/vmsnap-lab.lock bash bench/vm_list.sh BIN_DIR... 9>&-
# Needs the lab's libvirtd (root, qemu:///system; lab/up.sh), hence the lab lock. Each BIN_DIR
# holds a vmsnapd and a vmsnapctl (for instance main's build and this tree's); each pair runs
# against its own private dbus-daemon, and the last BIN_DIR's vmsnapd is also listed with every
# other BIN_DIR's vmsnapctl. Environment: BENCH_VMS domains to define (default 500), BENCH_RUNS
# runs of each timing, the median is shown (default 5), BENCH_URI (default qemu:///system).
#
# What it does:
#  - defines BENCH_VMS shut-off domains vmsnap-vmlist-<pid>-NNN (TCG, 16 MiB, one virtio qcow2
#    disk whose image need not exist: libvirt does not look at it until a start) in one virsh
#    session;
#  - for each BIN_DIR: starts a dbus-daemon and that vmsnapd (state folder of its own, polkit
#    off), waits until vmsnapctl lists every domain, then times `vmsnapctl vm list` and
#    `virsh list --all` BENCH_RUNS times each, alternating (output to /dev/null), and stops it;
#  - prints a markdown table on stdout (ms, median (min-max)), progress on stderr;
#  - on exit, whatever happened, stops its daemons and undefines its domains.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
N=${BENCH_VMS:-500}
RUNS=${BENCH_RUNS:-5}
URI=${BENCH_URI:-qemu:///system}
PREFIX="vmsnap-vmlist-$$"

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[[ $N =~ ^[1-9][0-9]*$ ]] || die "BENCH_VMS must be a positive number"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
command -v dbus-daemon >/dev/null || die "dbus-daemon is needed"
command -v virsh >/dev/null || die "virsh is needed"
[ $# -ge 1 ] || die "usage: bench/vm_list.sh BIN_DIR..."
for d in "$@"; do [ -x "$d/vmsnapd" ] && [ -x "$d/vmsnapctl" ] || die "no vmsnapd and vmsnapctl in $d"; done

work=$(mktemp -d "${TMPDIR:-/tmp}/vmsnap-bench-vmlist.XXXXXX")
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

now_us() { local t=$EPOCHREALTIME; REPLY=${t/./}; }
# stats US...: "median (min-max)" in ms.
stats() {
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    printf "%.0f (%.0f-%.0f)", m / 1000, v[1] / 1000, v[NR] / 1000 }'
}
median_us() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
    print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

say "defining $N shut-off domains ($PREFIX-NNN)"
defined=1
for i in $(seq -f '%03g' "$N"); do
  cat >"$work/$i.xml" <<EOF
<domain type='qemu'>
  <name>$PREFIX-$i</name>
  <memory unit='MiB'>16</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$work/$PREFIX-$i.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
EOF
  echo "define $work/$i.xml"
done | virsh -q -c "$URI" >/dev/null
on_host=$(virsh -q -c "$URI" list --all --name | grep -c . || true)

start_daemon() { # BIN_DIR INDEX: sets ADDRESS
  local dir=$1 n=$2 listed=0
  cat >"$work/bus-$n.conf" <<EOF
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
  { read -r ADDRESS; read -r dbus_pid; } < <(dbus-daemon --config-file="$work/bus-$n.conf" \
    --fork --print-address=1 --print-pid=1)
  mkdir -p "$work/state-$n" "$work/locks-$n"
  printf 'libvirt_uri = "%s"\nstate_dir = "%s"\nvm_lock_dir = "%s"\npolkit = false\n' \
    "$URI" "$work/state-$n" "$work/locks-$n" >"$work/vmsnapd-$n.toml"
  VMSNAP_LOG=info "$dir/vmsnapd" --config "$work/vmsnapd-$n.toml" --bus-address "$ADDRESS" \
    >"$work/vmsnapd-$n.log" 2>&1 &
  vmsnapd_pid=$!
  for _ in $(seq 600); do
    listed=$("$dir/vmsnapctl" --bus-address "$ADDRESS" vm list 2>/dev/null | grep -c "^$PREFIX-" || true)
    [ "$listed" = "$N" ] && return 0
    kill -0 "$vmsnapd_pid" 2>/dev/null || die "vmsnapd exited: $(tail -5 "$work/vmsnapd-$n.log")"
    sleep 0.1
  done
  die "$dir/vmsnapd lists $listed of the $N domains after 60 s"
}

echo "Run of bench/vm_list.sh on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores, $on_host domains on the host, load average $(cut -d' ' -f1-3 /proc/loadavg) at the start; $RUNS runs each, ms: median (min-max)."
echo
echo "| vmsnapd | vmsnapctl | \`vmsnapctl vm list\` | \`virsh list --all\` | ratio of medians |"
echo "|---|---|---:|---:|---:|"
last=${!#}
n=0
for dir in "$@"; do
  n=$((n + 1))
  say "$dir: starting vmsnapd"
  start_daemon "$dir" "$n"
  ctls=("$dir")
  if [ "$dir" = "$last" ]; then
    for other in "$@"; do [ "$other" = "$dir" ] || ctls+=("$other"); done
  fi
  for ctl_dir in "${ctls[@]}"; do
    # The same table from both, first.
    "$ctl_dir/vmsnapctl" --bus-address "$ADDRESS" --output json vm list >"$work/out-$n.json"
    ctl_runs=() virsh_runs=()
    for _ in $(seq "$RUNS"); do
      now_us; t0=$REPLY
      "$ctl_dir/vmsnapctl" --bus-address "$ADDRESS" vm list >/dev/null
      now_us; ctl_runs+=($((REPLY - t0)))
      now_us; t0=$REPLY
      virsh -c "$URI" list --all >/dev/null
      now_us; virsh_runs+=($((REPLY - t0)))
    done
    ratio=$(awk -v a="$(median_us "${ctl_runs[@]}")" -v b="$(median_us "${virsh_runs[@]}")" \
      'BEGIN { printf "%.2f", a / b }')
    echo "| $dir | $ctl_dir | $(stats "${ctl_runs[@]}") | $(stats "${virsh_runs[@]}") | $ratio |"
    say "$dir with $ctl_dir's vmsnapctl: ratio $ratio"
  done
  if [ "$dir" = "$last" ] && [ $# -gt 1 ]; then
    cmp -s <("$dir/vmsnapctl" --bus-address "$ADDRESS" --output json vm list) \
      <("$1/vmsnapctl" --bus-address "$ADDRESS" --output json vm list) ||
      die "the first and the last vmsnapctl print different JSON"
    say "the first and the last vmsnapctl print the same JSON"
  fi
  stop_daemons
done
