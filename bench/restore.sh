#!/usr/bin/env bash
# Restore benchmark: vmsnapctl restore of a 1 GiB and a 64 GiB (sparse) qcow2 disk, in one run,
# next to doing the same restore by hand on the host.
#   bash bench/restore.sh       (as root, on the lab; 20-50 s plus the build)
# Environment: BENCH_N restores of each size without the safety snapshot (default 10),
# BENCH_SAFETY_N with it (default 5), BENCH_KEEP=DIR keeps the raw results and vmsnapd's log,
# BENCH_LOG vmsnapd's log filter (debug).
#
# What it does (BENCHMARKS.md, section "Restore", explains the method and shows a run):
#  - builds the workspace and makes sure the lab is up (lab/up.sh, idempotent);
#  - defines two shut-off TCG VMs that never boot, vmsnap-bench-r1g-<pid> and
#    vmsnap-bench-r64g-<pid>, each with one qcow2 data disk (vda) of 1 GiB and 64 GiB virtual
#    size, and writes 256 MiB into each image from the host with qemu-io (16 chunks of 16 MiB,
#    byte 0xab, one at every 1/16 of the disk, so the 64 GiB one is sparse but spread out);
#  - starts its own dbus-daemon (private, permissive, system type) and its own vmsnapd on it;
#  - takes snapshot "base" of each VM with vmsnapctl (offline);
#  - before every restore, writes 20 MiB after the snapshot (byte 0xcd: 4 MiB inside four of the
#    chunks above and 4 MiB where nothing was written before), so each restore has data to undo;
#  - BENCH_N rounds, alternating which size goes first: `vmsnapctl restore VM base
#    --no-safety-snapshot --output json`, then the same restore by hand (qemu-img create of an
#    overlay on the snapshot's image, virsh define of the recorded definition pointing at it,
#    rm of the old top), each timed on the host;
#  - after the first vmsnapctl restore of each size, checks that the VM is on a new overlay of
#    the snapshot's image and, with qemu-io, that it reads back the snapshot's content and that
#    the post-snapshot write is gone;
#  - BENCH_SAFETY_N rounds of the restore with the safety snapshot (the default), each round
#    followed by `vmsnapctl snapshot delete` of the two safety snapshots (timed on its own).
#    vmsnapd does not publish a safety snapshot on D-Bus, so vmsnapctl cannot find it until
#    vmsnapd has restarted: when `snapshot show` cannot see it, the script restarts its own
#    vmsnapd (untimed) before the deletes;
#  - once per size, the naive alternative: qemu-img convert of the snapshot's image into a new,
#    standalone qcow2 image, virsh define, rm of the old top;
#  - reads the peak RSS (VmHWM) of each vmsnapd it ran and reports the largest;
#  - times `qemu-img info -U --backing-chain` alone and vmsnapd's image scan redone by hand (one
#    such call per disk of every domain on the host), and splits vmsnapd's restores into steps
#    from its log (bench/restore_report.py, which prints markdown tables on stdout; progress goes
#    to stderr);
#  - on exit, whatever happened, removes everything it made: the VMs, vmsnapd, the bus, every
#    image and record, and the scratch directory under $VMSNAP_LAB_DIR.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
N=${BENCH_N:-10}
SAFETY_N=${BENCH_SAFETY_N:-5}
URI=qemu:///system
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
SIZES=(1g 64g)
declare -A VSIZE=([1g]=$((1 << 30)) [64g]=$((64 << 30)))
declare -A VM=([1g]=vmsnap-bench-r1g-$$ [64g]=vmsnap-bench-r64g-$$)
export LIBVIRT_DEFAULT_URI=$URI

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "BENCH_N must be a positive number"
[[ $SAFETY_N =~ ^[1-9][0-9]*$ ]] || die "BENCH_SAFETY_N must be a positive number"

# --- cleanup ---------------------------------------------------------------------------------
work=""
vmsnapd_pid=""
dbus_pid=""
declare -A defined=()
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$vmsnapd_pid" ] && kill -0 "$vmsnapd_pid" 2>/dev/null; then
    kill -TERM "$vmsnapd_pid"
    for _ in $(seq 100); do kill -0 "$vmsnapd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$vmsnapd_pid" 2>/dev/null
    wait "$vmsnapd_pid" 2>/dev/null
  fi
  if [ -n "$dbus_pid" ]; then kill -TERM "$dbus_pid" 2>/dev/null; fi
  for vm in "${!defined[@]}"; do
    virsh destroy "$vm" >/dev/null 2>&1 # never started; harmless
    virsh undefine "$vm" --snapshots-metadata >/dev/null 2>&1
  done
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP"
      cp -f "$work"/{results,aux}.tsv "$work/vmsnapd.log" "$BENCH_KEEP/" 2>/dev/null
    fi
    rm -rf -- "$work"
  fi
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_us() { local t=$EPOCHREALTIME; REPLY=${t/./}; } # microseconds, no fork
ms() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }
# json_get EXPR < JSON: a Python expression on the document `d` (empty if not JSON).
json_get() {
  python3 -c 'import json, sys
try:
    d = json.load(sys.stdin)
    v = eval(sys.argv[1], {"d": d})
except Exception:
    v = ""
print("" if v is None else v)' "$1"
}

# --- build and lab ---------------------------------------------------------------------------
say "building (cargo build --release --workspace --locked)"
cargo build --release --workspace --locked --quiet
CTL=$ROOT/target/release/vmsnapctl
VMSNAPD=$ROOT/target/release/vmsnapd
say "checking the lab (lab/up.sh)"
bash lab/up.sh >/dev/null
GUEST=$LAB_DIR/guest
[ -s "$GUEST/vmlinuz" ] && [ -s "$GUEST/initrd.gz" ] || die "no guest kernel in $GUEST"

work=$(mktemp -d "$LAB_DIR/vmsnap-bench-r.XXXXXX")
chmod 755 "$work"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# --- the data patterns -----------------------------------------------------------------------
MIB=$((1 << 20))
# Before the snapshot: 16 chunks of 16 MiB of 0xab, chunk k at k/16 of the disk (256 MiB).
pre_cmds() { # SIZE -> qemu-io -c arguments, one a line
  local size=${VSIZE[$1]} k
  for k in $(seq 0 15); do echo "write -q -P 0xab $((k * size / 16)) 16M"; done
}
# After the snapshot: 4 MiB of 0xcd 1 MiB into the chunks at 0, 1/4, 1/2 and 3/4 of the disk,
# and 4 MiB at 1/32 of the disk, between two chunks, where nothing was written before (20 MiB).
post_offsets() { local size=${VSIZE[$1]}; echo $((MIB)) $((size / 4 + MIB)) $((size / 2 + MIB)) $((3 * size / 4 + MIB)); }
gap_offset() { echo $((${VSIZE[$1]} / 32)); }
qemu_io() { # IMAGE [-r] CMD...
  local image=$1 ro=""; shift
  if [ "${1:-}" = -r ]; then ro=-r; shift; fi
  local args=() c
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f qcow2 $ro "${args[@]}" "$image"
}
top_of() { virsh domblklist "$1" | awk '$1 == "vda" {print $2}'; }
post_write() { # SIZE: the post-snapshot write into the VM's current top image
  local s=$1 cmds=() o
  for o in $(post_offsets "$s"); do cmds+=("write -q -P 0xcd $o 4M"); done
  cmds+=("write -q -P 0xcd $(gap_offset "$s") 4M")
  qemu_io "$(top_of "${VM[$s]}")" "${cmds[@]}" >/dev/null
}
# verify SIZE IMAGE: the snapshot's content, without the post-snapshot write.
verify() {
  local s=$1 image=$2 size=${VSIZE[$1]} cmds=() k out
  for k in $(seq 0 15); do cmds+=("read -q -P 0xab $((k * size / 16)) 16M"); done
  cmds+=("read -q -P 0 $(gap_offset "$s") 4M")
  out=$(qemu_io "$image" -r "${cmds[@]}" 2>&1) || die "qemu-io read of $image failed: $out"
  if grep -qi 'fail\|error' <<<"$out"; then die "$image does not hold the snapshot's content: $out"; fi
  # and the opposite check, so that a broken read could not pass silently
  out=$(qemu_io "$image" -r "read -q -P 0xcd $MIB 4M" 2>&1) || true
  grep -qi 'verification failed' <<<"$out" || die "$image still holds the post-snapshot write"
}

# --- scratch VMs -----------------------------------------------------------------------------
declare -A DISK=() XML=()
for s in "${SIZES[@]}"; do
  vm=${VM[$s]}
  disk=$work/$vm-vda.qcow2
  DISK[$s]=$disk
  say "making $vm: ${s^^} qcow2 disk, 256 MiB written"
  qemu-img create -q -f qcow2 "$disk" "${VSIZE[$s]}"
  mapfile -t cmds < <(pre_cmds "$s")
  qemu_io "$disk" "${cmds[@]}" >/dev/null
  cat >"$work/$vm.xml" <<EOF
<domain type='qemu'>
  <name>$vm</name>
  <memory unit='MiB'>128</memory>
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
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
  virsh define "$work/$vm.xml" >/dev/null
  defined[$vm]=1
  # The definition vmsnapd records with the snapshot (inactive, secure), for the by-hand restore.
  virsh dumpxml --inactive --security-info "$vm" >"$work/$vm.recorded.xml"
  XML[$s]=$work/$vm.recorded.xml
done

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
ctl() { "$CTL" --bus-address "$ADDR" "$@"; }
start_vmsnapd() {
  VMSNAP_LOG=${BENCH_LOG:-debug} "$VMSNAPD" --config "$work/vmsnapd.toml" --bus-address "$ADDR" \
    </dev/null >/dev/null 2>>"$work/vmsnapd.log" &
  vmsnapd_pid=$!
  local deadline=$((SECONDS + 30)) s
  for s in "${SIZES[@]}"; do
    until [ "$(ctl --output json vm show "${VM[$s]}" 2>/dev/null | json_get 'd["state"]')" = shut-off ]; do
      kill -0 "$vmsnapd_pid" 2>/dev/null || { cat "$work/vmsnapd.log" >&2; die "vmsnapd exited"; }
      [ $SECONDS -lt $deadline ] || die "vmsnapd does not show ${VM[$s]} shut off"
      sleep 0.1
    done
  done
}
hwm_max_kb=0
note_hwm() { # the largest VmHWM of every vmsnapd this run started
  local kb
  kb=$(awk '/^VmHWM:/ {print $2}' "/proc/$vmsnapd_pid/status")
  [ "${kb:-0}" -le "$hwm_max_kb" ] || hwm_max_kb=$kb
}
stop_vmsnapd() {
  note_hwm
  kill -TERM "$vmsnapd_pid"
  wait "$vmsnapd_pid" || die "vmsnapd did not stop cleanly"
  vmsnapd_pid=""
}
start_vmsnapd

# --- one vmsnapctl command, timed ------------------------------------------------------------
# timed_ctl ARGS...: runs vmsnapctl, output in CTL_OUT, host stamps in T0/T1. vmsnapctl returns
# as soon as the phase is final, a moment before vmsnapd marks the VM idle again, and other
# sessions' tests may restart libvirtd: a command refused as busy or because libvirt is
# unavailable is run again (and timed again) after 200 ms, for up to 20 s.
timed_ctl() {
  local attempt
  for attempt in $(seq 100); do
    now_us; T0=$REPLY
    if CTL_OUT=$(ctl "$@" 2>"$work/ctl.last"); then
      now_us; T1=$REPLY
      cat "$work/ctl.last" >>"$work/ctl.err"
      return 0
    fi
    cat "$work/ctl.last" >>"$work/ctl.err"
    grep -q 'is busy:\|libvirt is unavailable' "$work/ctl.last" || break
    say "vmsnapctl $*: $(head -c 200 "$work/ctl.last"); again (attempt $attempt)"
    sleep 0.2
  done
  cat "$work/ctl.last" >&2
  [ -z "$CTL_OUT" ] || echo "$CTL_OUT" >&2
  die "vmsnapctl $* failed"
}

# --- the snapshots ---------------------------------------------------------------------------
results=$work/results.tsv
printf 'variant\tsize\titer\tms\tt0_us\tt1_us\textra\n' >"$results"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(ms "$4" "$5")" "$4" "$5" "${6:-}" >>"$results"; }
declare -A SNAP_IMAGE=()
for s in "${SIZES[@]}"; do
  vm=${VM[$s]}
  timed_ctl --output json snapshot create "$vm" base
  json=$CTL_OUT t0=$T0 t1=$T1
  [ "$(json_get 'd["phase"]' <<<"$json")" = Succeeded ] || die "snapshot of $vm: $json"
  SNAP_IMAGE[$s]=$(json_get 'd["snapshotVolumes"]["includedVolumes"][0]["image"]' <<<"$json")
  [ "${SNAP_IMAGE[$s]}" = "${DISK[$s]}" ] || die "snapshot image of $vm is ${SNAP_IMAGE[$s]}"
  row snapshot "$s" 1 "$t0" "$t1"
  say "snapshot base of $vm (offline): $(ms "$t0" "$t1") ms"
done

# --- one vmsnapctl restore, timed -------------------------------------------------------------
# restore_once VARIANT SIZE ITER [--no-safety-snapshot]: the restore's JSON in REPLY.
restore_once() {
  local variant=$1 s=$2 i=$3 json; shift 3
  post_write "$s"
  timed_ctl --output json restore "${VM[$s]}" base "$@"
  json=$CTL_OUT
  [ "$(json_get 'd["phase"]' <<<"$json")" = Succeeded ] || die "restore of ${VM[$s]}: $json"
  row "$variant" "$s" "$i" "$T0" "$T1" "$(json_get 'd["safetySnapshot"]' <<<"$json")"
  say "$i $variant ${s^^}: $(ms "$T0" "$T1") ms"
  REPLY=$json
}

# --- the same restore by hand ----------------------------------------------------------------
# by_hand VARIANT SIZE ITER overlay|convert: new image from the snapshot's image, virsh define of
# the recorded definition pointing at it, rm of the old top (as vmsnapd prunes it).
by_hand() {
  local variant=$1 s=$2 i=$3 how=$4 vm=${VM[$2]} old new t0 tc t1
  post_write "$s"
  old=$(top_of "$vm")
  new=$work/$vm-vda-hand-$variant-$i.qcow2
  now_us; t0=$REPLY
  if [ "$how" = overlay ]; then
    qemu-img create -q -f qcow2 -b "${SNAP_IMAGE[$s]}" -F qcow2 "$new"
  else
    qemu-img convert -f qcow2 -O qcow2 "${SNAP_IMAGE[$s]}" "$new"
  fi
  now_us; tc=$REPLY
  sed "s|<source file='${DISK[$s]}'/>|<source file='$new'/>|" "${XML[$s]}" >"$work/$vm.hand.xml"
  virsh define "$work/$vm.hand.xml" >/dev/null
  rm -f -- "$old"
  now_us; t1=$REPLY
  [ "$(top_of "$vm")" = "$new" ] || die "by-hand restore of $vm did not take"
  local extra="image_ms=$(ms "$t0" "$tc")"
  [ "$how" = convert ] && extra+=";allocated_mib=$(($(stat -c %b "$new") * 512 / MIB))"
  row "$variant" "$s" "$i" "$t0" "$t1" "$extra"
  say "$i $variant ${s^^}: $(ms "$t0" "$t1") ms ($extra)"
}

# --- the runs ------------------------------------------------------------------------------
say "$N rounds: vmsnapctl restore --no-safety-snapshot, then by hand (overlay + define)"
for i in $(seq "$N"); do
  order=("${SIZES[@]}")
  [ $((i % 2)) = 0 ] && order=(64g 1g)
  for s in "${order[@]}"; do
    restore_once nosafety "$s" "$i" --no-safety-snapshot
    if [ "$i" = 1 ]; then
      json=$REPLY
      top=$(top_of "${VM[$s]}")
      [ "$top" = "$(json_get 'd["restores"][0]["toImage"]' <<<"$json")" ] ||
        die "${VM[$s]} is not on the restore's new image ($top)"
      [ "$(qemu-img info -U --output json "$top" | json_get 'd["full-backing-filename"]')" = "${SNAP_IMAGE[$s]}" ] ||
        die "$top is not an overlay of the snapshot's image"
      verify "$s" "$top"
      say "verified: ${VM[$s]} reads back the snapshot's content, without the later write"
    fi
    by_hand overlay "$s" "$i" overlay
  done
done

say "$SAFETY_N rounds: vmsnapctl restore with the safety snapshot"
# vmsnapd does not publish the safety snapshot on D-Bus (it only updates snapshot objects that
# exist), so `vmsnapctl snapshot delete` cannot find it until vmsnapd has restarted and read the
# records again: while that is so, each round restarts this vmsnapd (untimed) before deleting
# the two.
declare -A SAFETY=()
restarts=0
for i in $(seq "$SAFETY_N"); do
  order=("${SIZES[@]}")
  [ $((i % 2)) = 0 ] && order=(64g 1g)
  for s in "${order[@]}"; do
    restore_once safety "$s" "$i"
    SAFETY[$s]=$(json_get 'd["safetySnapshot"]' <<<"$REPLY")
    [ -n "${SAFETY[$s]}" ] || die "no safety snapshot in $REPLY"
    [ "$i" = 1 ] && verify "$s" "$(top_of "${VM[$s]}")"
  done
  if ! ctl snapshot show "${VM[1g]}" "${SAFETY[1g]}" >/dev/null 2>&1; then
    stop_vmsnapd
    start_vmsnapd
    restarts=$((restarts + 1))
  fi
  for s in "${order[@]}"; do
    timed_ctl snapshot delete "${VM[$s]}" "${SAFETY[$s]}"
    row safety_delete "$s" "$i" "$T0" "$T1"
  done
done
[ $restarts = 0 ] || say "restarted vmsnapd $restarts times to see its safety snapshots on the bus"
# Everything vmsnapd made along the way is gone again: the base image, the VM's top, nothing else.
for s in "${SIZES[@]}"; do
  left=$(ls "$work" | grep -c "^${VM[$s]}-vda.*\.qcow2$" || true)
  [ "$left" = 2 ] || die "${VM[$s]}: $left images left after the restores, expected 2: $(ls "$work")"
done

say "once per size: the naive alternative (qemu-img convert into a standalone image + define)"
for s in "${SIZES[@]}"; do by_hand convert "$s" 1 convert; done

# --- auxiliary: what one backing-chain read costs, and how many vmsnapd makes -----------------
say "timing qemu-img info -U --backing-chain alone"
aux=$work/aux.tsv
printf 'what\tms\n' >"$aux"
for _ in $(seq 10); do
  now_us; a0=$REPLY
  qemu-img info -U --backing-chain --output json "${DISK[1g]}" >/dev/null
  now_us; a1=$REPLY
  printf 'qemu_img_info\t%s\n' "$(ms "$a0" "$a1")" >>"$aux"
done
# vmsnapd's image scan (Forest::scan in daemon/src/images.rs), redone by hand: one
# `qemu-img info -U --backing-chain` per file disk of every domain on the host that vmsnapd would
# snapshot (device disk, not read-only, shareable or transient); the records' images (here the
# two snapshot images) are already in those chains.
python3 - >"$work/tops" <<'PY'
import subprocess, xml.etree.ElementTree as ET
names = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True).stdout.split()
for name in names:
    state = subprocess.run(["virsh", "domstate", name], capture_output=True, text=True).stdout.strip()
    args = ["virsh", "dumpxml", name] + ([] if state in ("running", "paused") else ["--inactive"])
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        continue
    for disk in ET.fromstring(out.stdout).iter("disk"):
        src = disk.find("source")
        if disk.get("type") != "file" or disk.get("device", "disk") != "disk" or src is None or not src.get("file"):
            continue
        if any(disk.find(t) is not None for t in ("readonly", "shareable", "transient")):
            continue
        print(src.get("file"))
PY
domains=$(virsh list --all --name | grep -c . || true)
tops=$(grep -c . "$work/tops" || true)
printf 'domains\t%s\ntops\t%s\n' "$domains" "$tops" >>"$aux"
for _ in $(seq 5); do
  now_us; a0=$REPLY
  while read -r top; do qemu-img info -U --backing-chain --output json "$top" >/dev/null 2>&1 || true; done <"$work/tops"
  now_us; a1=$REPLY
  printf 'scan\t%s\n' "$(ms "$a0" "$a1")" >>"$aux"
done
note_hwm
hwm_kb=$hwm_max_kb
printf 'restarts\t%s\n' "$restarts" >>"$aux"

# --- report ----------------------------------------------------------------------------------
libvirt_version=$(virsh version | awk '/Using library:/ {print $4}')
qemu_version=$(virsh version | awk '/Running hypervisor:/ {print $4}')
echo "Run of bench/restore.sh on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores," \
  "libvirt $libvirt_version, QEMU $qemu_version, $domains domains defined on the host ($tops disks vmsnapd scans)," \
  "load average $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo
python3 bench/restore_report.py "$results" "$aux" "$work/vmsnapd.log" "$hwm_kb"
