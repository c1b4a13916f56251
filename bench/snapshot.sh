#!/usr/bin/env bash
# Snapshot benchmark: vmsnapctl/vmsnapd against plain virsh, on one scratch VM, in one run.
#   bash bench/snapshot.sh      (as root, on the lab; under a minute plus the build)
# Environment: BENCH_N rounds (default 10), BENCH_AUX_N runs of each auxiliary timing (default 10),
# BENCH_KEEP=DIR keeps the raw results and vmsnapd's log, BENCH_LOG vmsnapd's log filter (debug),
# BENCH_BIN_DIR=DIR uses the vmsnapctl and vmsnapd in DIR instead of building (CARGO_TARGET_DIR
# is honoured when building).
#
# What it does (BENCHMARKS.md explains the method and shows a run):
#  - builds the workspace (cargo build --release --workspace --locked) and makes sure the lab is
#    up (lab/up.sh, idempotent: it starts nothing that already runs);
#  - defines and boots its own TCG VM vmsnap-bench-<pid> from the lab's guest kernel/initramfs,
#    with a guest agent and a 256 MiB ext4 data disk (32 MiB seeded + 16 MiB written in the guest);
#  - starts its own dbus-daemon (private, permissive, system type) and its own vmsnapd on it
#    (VMSNAP_LOG=debug, state dir in the scratch directory);
#  - starts a writer loop in the guest (bench/guest-ticker.sh, detached with setsid) that appends
#    a nanosecond timestamp to /mnt/data/ticks about every millisecond and logs every write that
#    blocked for more than 2 ms to /run/stalls (on the initramfs, never frozen);
#  - BENCH_N times, one after the other: vmsnapctl snapshot create + snapshot delete; virsh
#    snapshot-create-as --disk-only --atomic --quiesce --no-metadata + blockcommit --active
#    --pivot --wait + removing the overlay ("virsh"); the same virsh create again, undone by one
#    virsh shell process that starts the active commit and retries the pivot without pausing
#    until libvirt accepts it, then removes the overlay ("virsh-shell", bench/virsh_undo.py:
#    --wait sleeps 500 ms between its checks of the job, which would measure virsh's sleep);
#    each timed on the host, with the freeze vmsnapd reports (freezeDurationMs) and the freeze
#    the guest observed (its longest blocked write);
#  - times the thaw guard alone (arm = spawn until "ready", disarm = "disarm" until exit), a
#    no-op of each client (virsh domstate, vmsnapctl vm show) and a durable record write, and
#    breaks vmsnapctl's create and delete times down from vmsnapd's log (bench/steps.py);
#  - reads vmsnapd's peak RSS (VmHWM) at the end;
#  - prints markdown tables on stdout (bench/report.py; progress goes to stderr);
#  - on exit, whatever happened, removes everything it made: the guest loop, the VM, vmsnapd,
#    the bus, overlays, records and the scratch directory under $VMSNAP_LAB_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
N=${BENCH_N:-10}
AUX_N=${BENCH_AUX_N:-10}
URI=qemu:///system
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
VM=vmsnap-bench-$$
export LIBVIRT_DEFAULT_URI=$URI

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "BENCH_N must be a positive number"
[[ $AUX_N =~ ^[1-9][0-9]*$ ]] || die "BENCH_AUX_N must be a positive number"

# --- cleanup ---------------------------------------------------------------------------------
work=""
vmsnapd_pid=""
dbus_pid=""
vm_defined=0
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ $vm_defined = 1 ] && [ "$(virsh domstate "$VM" 2>/dev/null)" = running ]; then
    # The writer loop dies with the VM; stop it first anyway so a thaw below has nothing waiting.
    GUEST_EXEC_TIMEOUT=5 bash lab/guest-exec.sh "$VM" \
      'kill $(cat /run/ticker.pid) 2>/dev/null; true' >/dev/null 2>&1
    virsh domfsthaw "$VM" >/dev/null 2>&1 # harmless when not frozen
  fi
  if [ -n "$vmsnapd_pid" ] && kill -0 "$vmsnapd_pid" 2>/dev/null; then
    kill -TERM "$vmsnapd_pid"
    for _ in $(seq 100); do kill -0 "$vmsnapd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$vmsnapd_pid" 2>/dev/null
    wait "$vmsnapd_pid" 2>/dev/null
  fi
  if [ -n "$dbus_pid" ]; then kill -TERM "$dbus_pid" 2>/dev/null; fi
  if [ $vm_defined = 1 ]; then
    virsh destroy "$VM" >/dev/null 2>&1
    virsh undefine "$VM" --snapshots-metadata >/dev/null 2>&1
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP"
      cp -f "$work"/{results,guard,steps,baseline}.tsv "$work/vmsnapd.log" "$BENCH_KEEP/" 2>/dev/null
    fi
    rm -rf -- "$work"
  fi
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_us() { local t=$EPOCHREALTIME; REPLY=${t/./}; } # microseconds, no fork
# json_get KEY < JSON: the top-level value (nan when absent or null; empty if not JSON).
json_get() {
  python3 -c 'import json, sys
try:
    v = json.load(sys.stdin).get(sys.argv[1])
except Exception:
    v = ""
print("nan" if v is None else v)' "$1"
}

# --- build and lab ---------------------------------------------------------------------------
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  BIN=$BENCH_BIN_DIR
  say "using the binaries in $BIN (BENCH_BIN_DIR; nothing built)"
else
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
  say "building (cargo build --release --workspace --locked)"
  cargo build --release --workspace --locked --quiet
fi
CTL=$BIN/vmsnapctl
VMSNAPD=$BIN/vmsnapd
[ -x "$CTL" ] && [ -x "$VMSNAPD" ] || die "no vmsnapctl/vmsnapd in $BIN"
say "checking the lab (lab/up.sh)"
bash lab/up.sh >/dev/null
GUEST=$LAB_DIR/guest
[ -s "$GUEST/vmlinuz" ] && [ -s "$GUEST/initrd.gz" ] || die "no guest kernel in $GUEST"

work=$(mktemp -d "$LAB_DIR/vmsnap-bench.XXXXXX")
chmod 755 "$work"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- scratch VM ------------------------------------------------------------------------------
say "making the scratch VM $VM (256 MiB data disk)"
mkdir "$work/seed"
head -c $((32 << 20)) /dev/urandom >"$work/seed/seed.bin"
disk=$work/$VM-vda.qcow2
bash lab/make-data-disk.sh "$disk" 256M "$work/seed"
rm -rf "$work/seed"
cat >"$work/domain.xml" <<EOF
<domain type='qemu'>
  <name>$VM</name>
  <memory unit='MiB'>192</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$GUEST/vmlinuz</kernel>
    <initrd>$GUEST/initrd.gz</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact'><model>qemu64</model></cpu>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='file'><source path='$work/console.log'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh define "$work/domain.xml" >/dev/null
vm_defined=1
virsh start "$VM" >/dev/null
deadline=$((SECONDS + 120))
until virsh qemu-agent-command --timeout 2 "$VM" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || die "the agent of $VM did not answer within 120 s ($work/console.log)"
  sleep 0.3
done
gexec() { GUEST_EXEC_TIMEOUT=${GEXEC_TIMEOUT:-60} bash lab/guest-exec.sh "$VM" "$@"; }
until gexec "grep -q ' /mnt/data ' /proc/mounts" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || die "/mnt/data is not mounted in $VM"
  sleep 0.3
done
gexec "head -c $((16 << 20)) /dev/urandom >/mnt/data/written.bin && sync"
uuid=$(virsh domuuid "$VM" | sed -n 1p) # sed reads it all: head could SIGPIPE virsh (pipefail)

# --- private bus and vmsnapd -----------------------------------------------------------------
say "starting a private dbus-daemon and vmsnapd"
cat >"$work/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$work/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
out=$(dbus-daemon --config-file="$work/bus.conf" --fork --print-address=1 --print-pid=1 2>/dev/null) ||
  die "dbus-daemon failed to start"
ADDR=$(sed -n 1p <<<"$out")
dbus_pid=$(sed -n 2p <<<"$out")
printf 'libvirt_uri = "%s"\nstate_dir = "%s"\n' "$URI" "$work/state" >"$work/vmsnapd.toml"
VMSNAP_LOG=${BENCH_LOG:-debug} "$VMSNAPD" --config "$work/vmsnapd.toml" --bus-address "$ADDR" \
  </dev/null >/dev/null 2>"$work/vmsnapd.log" &
vmsnapd_pid=$!
ctl() { "$CTL" --bus-address "$ADDR" "$@"; }
deadline=$((SECONDS + 30))
until [ "$(ctl --output json vm show "$VM" 2>/dev/null | json_get agent)" = connected ]; do
  kill -0 "$vmsnapd_pid" 2>/dev/null || { cat "$work/vmsnapd.log" >&2; die "vmsnapd exited"; }
  [ $SECONDS -lt $deadline ] || die "vmsnapd does not show $VM with a connected agent"
  sleep 0.2
done

# --- the guest's writer loop -----------------------------------------------------------------
say "starting the writer loop in the guest"
ticker=$(cat bench/guest-ticker.sh)
gexec "cat >/run/ticker.sh <<'TICKER_EOF'
$ticker
TICKER_EOF
setsid sh /run/ticker.sh </dev/null >/dev/null 2>&1 &
sleep 1; [ -s /run/ticker.pid ] && kill -0 \$(cat /run/ticker.pid)" ||
  die "the guest writer loop did not start"
clock=$(gexec "cat /run/ticker.clock")
say "guest clock: $clock"

# Resets the guest's records before a snapshot.
guest_reset() { gexec ': >/run/stalls; : >/mnt/data/ticks'; }
# After a snapshot: "<longest blocked write ms> <largest gap between ticks ms> <ticks> <span ms>".
guest_observed() {
  gexec "awk 'BEGIN { m = 0 } { d = \$2 - \$1; if (d > m) m = d } END { printf \"%.3f \", m / 1e6 }' /run/stalls
awk 'NR == 1 { f = \$1 } NR > 1 { d = \$1 - p; if (d > m) m = d } { p = \$1 }
  END { printf \"%.3f %d %.1f\\n\", m / 1e6, NR, (p - f) / 1e6 }' /mnt/data/ticks"
}

# --- the runs ------------------------------------------------------------------------------
results=$work/results.tsv
printf 'tool\titer\tcreate_ms\tundo_ms\treported_freeze_ms\tguest_blocked_ms\tguest_gap_ms\tticks\tspan_ms\tc0_us\tc1_us\td0_us\td1_us\n' >"$results"
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

for i in $(seq "$N"); do
  # vmsnapctl
  name=bench-$i
  guest_reset
  now_us; t0=$REPLY
  json=$(ctl --output json snapshot create "$VM" "$name" 2>>"$work/ctl.err") ||
    { cat "$work/ctl.err" >&2; die "vmsnapctl snapshot create failed"; }
  now_us; t1=$REPLY
  read -r blocked gap ticks span <<<"$(guest_observed)"
  [ "$(json_get phase <<<"$json")" = Succeeded ] || die "snapshot $name: $json"
  reported=$(json_get freezeDurationMs <<<"$json")
  now_us; d0=$REPLY
  ctl snapshot delete "$VM" "$name" >/dev/null 2>>"$work/ctl.err" ||
    { cat "$work/ctl.err" >&2; die "vmsnapctl snapshot delete failed"; }
  now_us; d1=$REPLY
  printf 'vmsnapctl\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$(ms "$t0" "$t1")" \
    "$(ms "$d0" "$d1")" "$reported" "$blocked" "$gap" "$ticks" "$span" "$t0" "$t1" "$d0" "$d1" >>"$results"
  say "$i/$N vmsnapctl: create $(ms "$t0" "$t1") ms (freeze reported ${reported} ms, guest ${blocked} ms), delete $(ms "$d0" "$d1") ms"

  # virsh
  overlay=$work/$VM-vda.virsh-$i.qcow2
  guest_reset
  now_us; t0=$REPLY
  virsh snapshot-create-as "$VM" "virsh-$i" --disk-only --atomic --quiesce --no-metadata \
    --diskspec "vda,file=$overlay" >/dev/null
  now_us; t1=$REPLY
  read -r blocked gap ticks span <<<"$(guest_observed)"
  now_us; d0=$REPLY
  virsh blockcommit "$VM" vda --active --pivot --wait >/dev/null
  rm -f -- "$overlay"
  now_us; d1=$REPLY
  printf 'virsh\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$(ms "$t0" "$t1")" \
    "$(ms "$d0" "$d1")" "nan" "$blocked" "$gap" "$ticks" "$span" "$t0" "$t1" "$d0" "$d1" >>"$results"
  say "$i/$N virsh:     create $(ms "$t0" "$t1") ms (guest ${blocked} ms), undo $(ms "$d0" "$d1") ms"

  # virsh again, undone without --wait's 500 ms poll (bench/virsh_undo.py)
  overlay=$work/$VM-vda.virsh-shell-$i.qcow2
  guest_reset
  now_us; t0=$REPLY
  virsh snapshot-create-as "$VM" "virsh-shell-$i" --disk-only --atomic --quiesce --no-metadata \
    --diskspec "vda,file=$overlay" >/dev/null
  now_us; t1=$REPLY
  read -r blocked gap ticks span <<<"$(guest_observed)"
  undo=$(python3 bench/virsh_undo.py "$URI" "$VM" vda "$overlay") || die "virsh_undo.py failed"
  read -r d0 d1 attempts <<<"$undo"
  printf 'virsh-shell\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$i" "$(ms "$t0" "$t1")" \
    "$(ms "$d0" "$d1")" "nan" "$blocked" "$gap" "$ticks" "$span" "$t0" "$t1" "$d0" "$d1" >>"$results"
  say "$i/$N virsh-shell: create $(ms "$t0" "$t1") ms (guest ${blocked} ms), undo $(ms "$d0" "$d1") ms ($attempts pivot attempts)"
done

# Both start from the same chain, so it must be back to the one image.
src=$(virsh domblklist "$VM" | awk '$1 == "vda" {print $2}')
[ "$src" = "$disk" ] || die "vda ends on $src, expected $disk"
chain=$(qemu-img info -U --backing-chain "$disk" | grep -c '^image:')
[ "$chain" = 1 ] || die "the chain of vda has $chain images after the runs"

# --- the thaw guard alone ------------------------------------------------------------------
say "timing the thaw guard alone ($AUX_N times)"
guard=$work/guard.tsv
printf 'arm_ms\tdisarm_ms\tdisarm_answer_ms\n' >"$guard"
for _ in $(seq "$AUX_N"); do
  now_us; g0=$REPLY
  coproc GUARD { exec "$VMSNAPD" --thaw-guard "$uuid" --guard-uri "$URI" --guard-deadline-ms 10000 2>>"$work/guard.err"; }
  read -r line <&"${GUARD[0]}"
  now_us; g1=$REPLY
  [ "$line" = ready ] || die "the thaw guard said '$line'"
  echo disarm >&"${GUARD[1]}"
  # Its answer, `disarmed` (what vmsnapd waits for since issue 13), or end of file (older ones).
  read -r -t 5 line <&"${GUARD[0]}" || true
  now_us; g2=$REPLY
  wait "$GUARD_PID" || die "the thaw guard did not exit 0 on disarm"
  now_us; g3=$REPLY
  printf '%s\t%s\t%s\n' "$(ms "$g0" "$g1")" "$(ms "$g1" "$g3")" "$(ms "$g1" "$g2")" >>"$guard"
done

# --- baselines: a no-op of each client, and a durable record write ---------------------------
say "timing baselines"
baseline=$work/baseline.tsv
printf 'what\tms\n' >"$baseline"
for _ in $(seq "$AUX_N"); do
  now_us; b0=$REPLY
  virsh domstate "$VM" >/dev/null
  now_us; b1=$REPLY
  ctl vm show "$VM" >/dev/null
  now_us; b2=$REPLY
  printf 'virsh\t%s\nvmsnapctl\t%s\n' "$(ms "$b0" "$b1")" "$(ms "$b1" "$b2")" >>"$baseline"
done
# As vmsnapd's store saves a record: write a temporary file, fsync, rename, fsync the directory.
python3 - "$work" "$AUX_N" >>"$baseline" <<'PY'
import os, sys, time
d = os.path.join(sys.argv[1], "fsync-test")
os.makedirs(d, exist_ok=True)
for i in range(int(sys.argv[2])):
    t = time.monotonic()
    tmp = os.path.join(d, "r.json.tmp")
    with open(tmp, "wb") as f:
        f.write(b"x" * 4096)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(d, "r.json"))
    fd = os.open(d, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    print(f"record\t{(time.monotonic() - t) * 1000:.1f}")
PY

gexec 'kill $(cat /run/ticker.pid)' >/dev/null || true

# --- memory ----------------------------------------------------------------------------------
hwm_kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$vmsnapd_pid/status")
rss_kb=$(awk '/^VmRSS:/ {print $2}' "/proc/$vmsnapd_pid/status")

# --- vmsnapd's steps per create and delete, from its log -------------------------------------
python3 bench/steps.py "$work/vmsnapd.log" "$results" >"$work/steps.tsv"

# --- report ----------------------------------------------------------------------------------
libvirt_version=$(virsh version | awk '/Using library:/ {print $4}')
qemu_version=$(virsh version | awk '/Running hypervisor:/ {print $4}')
echo "Run of bench/snapshot.sh on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores," \
  "libvirt $libvirt_version, QEMU $qemu_version (TCG guest, 1 vCPU, 192 MiB)," \
  "load average $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo
python3 bench/report.py "$results" "$guard" "$work/steps.tsv" "$baseline" "$hwm_kb" "$rss_kb" "$clock" "$N"
