#!/usr/bin/env bash
# RBD restore benchmark: vmsnapctl restore of a VM whose disk is a 1 GiB RBD image against one
# whose disk is a 64 GiB (sparse) RBD image, in one run, next to the alternatives by hand on the
# same images (rbd snap rollback; rbd clone + virsh define), and snapshot create/delete times.
#   flock /tmp/vmsnap-lab.lock bash bench/rbd.sh 9>&-     (as root, on the lab; 4-5 min + build)
# Environment: BENCH_N rounds without the safety snapshot (default 10), BENCH_SAFETY_N with it
# (default 5), BENCH_SNAP_N snapshot create/delete rounds (default 10), BENCH_TRACE_N traced
# restores per size (default 3), BENCH_KEEP=DIR keeps the raw results and logs, BENCH_LOG
# vmsnapd's log filter (debug).
#
# What it does (BENCHMARKS.md, section "RBD restore", explains the method and shows a run):
#  - builds the workspace (into $CARGO_TARGET_DIR if set) and makes sure the lab and its Ceph
#    cluster are up (lab/up.sh, idempotent);
#  - makes two RBD images in the lab pool, vmsnap-bench-rbd1g-<pid> and vmsnap-bench-rbd64g-<pid>
#    (rbd create: default features, object map included), writes 256 MiB into each with qemu-io
#    through QEMU's rbd driver (16 chunks of 16 MiB of 0xab, one at every 1/16 of the disk), and
#    defines a shut-off TCG VM of the same name on each (<disk type='network'> with the lab's
#    Ceph user and libvirt secret; never started: an in-place restore needs a shut-off VM);
#  - makes two more images of the same sizes and data without the object map
#    (vmsnap-bench-rbdnm1g/64g-<pid>), for rollback only;
#  - starts its own dbus-daemon and vmsnapd ([rbd] ceph_conf = the lab's), takes snapshot "base"
#    of each VM with vmsnapctl (an RBD snapshot vmsnap-<uuid>) and exports it (sparse file, sum
#    of its non-zero blocks: bench/rbd_report.py sum);
#  - before every restore writes 20 MiB after the snapshot into the image it restores over
#    (0xcd), untimed, so that each restore has something to undo;
#  - BENCH_N rounds, alternating which size goes first: `vmsnapctl restore VM base
#    --no-safety-snapshot`; by hand `rbd clone SNAP NEW` + `virsh define` of the recorded
#    definition pointing at NEW (the floor: what vmsnapd does, without its checks and records);
#    `rbd snap rollback SNAP` of the original image; the same rollback of the image without
#    object map. vmsnapd keeps the image a restore replaced (by design: the old image's
#    snapshots live in it); the script checks it is still there and removes it, untimed;
#  - after the first restore of each size: the VM's disk is a new clone whose parent is the
#    snapshot, and `rbd export` of it sums as the snapshot's; after the first rollback likewise;
#  - BENCH_SAFETY_N rounds with the safety snapshot, each followed by `vmsnapctl snapshot delete`
#    of the safety snapshots (timed on their own);
#  - BENCH_SNAP_N rounds of `vmsnapctl snapshot create` + `delete` (offline) against
#    `rbd snap create` + `rbd snap rm` by hand, on the image the VM uses;
#  - restarts vmsnapd with a logging `rbd` wrapper first in its PATH, checks that it still knows
#    snapshot base, takes snapshot tbase of each VM and makes BENCH_TRACE_N more restores (of
#    tbase) and snapshot create/deletes per size, to list the rbd commands vmsnapd runs and their
#    times;
#  - prints markdown tables (bench/rbd_report.py) on stdout, progress on stderr;
#  - on exit, whatever happened, removes everything it made: the VMs, vmsnapd, the bus, every
#    image with its snapshots (clones before their parents), and its scratch directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
N=${BENCH_N:-10}
SAFETY_N=${BENCH_SAFETY_N:-5}
SNAP_N=${BENCH_SNAP_N:-10}
TRACE_N=${BENCH_TRACE_N:-3}
URI=qemu:///system
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SIZES=(1g 64g)
declare -A VSIZE=([1g]=$((1 << 30)) [64g]=$((64 << 30)))
# The VM and its image share the name; the no-object-map images differ in more than a suffix, so
# that a name prefix never mixes the two.
declare -A VM=([1g]=vmsnap-bench-rbd1g-$$ [64g]=vmsnap-bench-rbd64g-$$)
declare -A NOMAP=([1g]=vmsnap-bench-rbdnm1g-$$ [64g]=vmsnap-bench-rbdnm64g-$$)
export LIBVIRT_DEFAULT_URI=$URI

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
for v in N SAFETY_N SNAP_N TRACE_N; do
  [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "BENCH_$v must be a positive number"
done

# --- the lab's Ceph cluster --------------------------------------------------------------------
CEPH_ENV=$LAB_DIR/ceph/ceph.env
[ -s "$CEPH_ENV" ] || die "no $CEPH_ENV: run lab/up.sh first"
ceph_env() { sed -n "s/^VMSNAP_CEPH_$1=//p" "$CEPH_ENV"; }
CONF=$(ceph_env CONF)
POOL=$(ceph_env POOL)
# Bounded: a cluster that stops answering would otherwise hang the run (and the cleanup).
rbd_() { timeout 120 rbd -c "$CONF" "$@"; }

# --- cleanup -----------------------------------------------------------------------------------
work=""
vmsnapd_pid=""
dbus_pid=""
declare -A defined=()
# Every image of this run: a name from VM or NOMAP, or one that starts with it plus '-' (clones).
my_images() {
  rbd_ ls "$POOL" 2>/dev/null | grep -E "^vmsnap-bench-rbd(nm)?(1g|64g)-$$(-|$)" || true
}
purge_images() {
  local img
  for _ in 1 2 3; do
    mapfile -t imgs < <(my_images)
    [ ${#imgs[@]} -gt 0 ] || return 0
    # Clones (names with a suffix) before the images they were cloned from.
    for img in $(printf '%s\n' "${imgs[@]}" | grep -- "-$$-") $(printf '%s\n' "${imgs[@]}" | grep -v -- "-$$-"); do
      rbd_ snap purge --no-progress "$POOL/$img" >/dev/null 2>&1
      rbd_ rm --no-progress "$POOL/$img" >/dev/null 2>&1
    done
  done
  left=$(my_images | tr '\n' ' ')
  [ -z "$left" ] || say "could not remove these images: $left"
}
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
  purge_images
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP"
      cp -f "$work"/{results,checks}.tsv "$work"/{vmsnapd,rbd-trace}.log "$work/notes.txt" "$BENCH_KEEP/" 2>/dev/null
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

# --- build and lab -----------------------------------------------------------------------------
say "building (cargo build --release --workspace --locked, target $TARGET_DIR)"
CARGO_TARGET_DIR=$TARGET_DIR cargo build --release --workspace --locked --quiet
CTL=$TARGET_DIR/release/vmsnapctl
VMSNAPD=$TARGET_DIR/release/vmsnapd
say "checking the lab (lab/up.sh)"
bash lab/up.sh >/dev/null 9>&-
GUEST=$LAB_DIR/guest
[ -s "$GUEST/vmlinuz" ] && [ -s "$GUEST/initrd.gz" ] || die "no guest kernel in $GUEST"
SECRET=$(ceph_env SECRET_UUID)
[ -n "$SECRET" ] || die "no libvirt secret in $CEPH_ENV: run lab/ceph-up.sh again"
rbd_ ls "$POOL" >/dev/null || die "the Ceph cluster does not answer (rbd ls $POOL)"

work=$(mktemp -d "$LAB_DIR/vmsnap-bench-rbd.XXXXXX")
chmod 755 "$work"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
results=$work/results.tsv
checks=$work/checks.tsv
printf 'variant\tsize\titer\tms\tt0_us\tt1_us\textra\n' >"$results"
printf 'size\twhat\texpected\tgot\tok\n' >"$checks"
# note TEXT: something odd, shown with the report.
note() { say "note: $*"; echo "$*" >>"$work/notes.txt"; }
: >"$work/notes.txt"
row() { printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(ms "$4" "$5")" "$4" "$5" "${6:-}" >>"$results"; }

# --- the data ----------------------------------------------------------------------------------
MIB=$((1 << 20))
qemu_io() { # IMAGE CMD...: qemu-io through QEMU's rbd driver, as the lab's admin
  local image=$1 args=() c out; shift
  for c in "$@"; do args+=(-c "$c"); done
  out=$(qemu-io -f raw "${args[@]}" "rbd:$POOL/$image:conf=$CONF" 2>&1) ||
    die "qemu-io on $POOL/$image failed: $(tail -n1 <<<"$out")"
}
# Before the snapshot: 16 chunks of 16 MiB of 0xab, chunk k at k/16 of the disk (256 MiB).
pre_write() { # SIZE IMAGE
  local size=${VSIZE[$1]} k cmds=()
  for k in $(seq 0 15); do cmds+=("write -q -P 0xab $((k * size / 16)) 16M"); done
  qemu_io "$2" "${cmds[@]}"
}
# After the snapshot: 4 MiB of 0xcd 1 MiB into the chunks at 0, 1/4, 1/2 and 3/4 of the disk, and
# 4 MiB at 1/32 of the disk, where nothing was written before (20 MiB).
post_write() { # SIZE IMAGE
  local size=${VSIZE[$1]} o cmds=()
  for o in $((MIB)) $((size / 4 + MIB)) $((size / 2 + MIB)) $((3 * size / 4 + MIB)) $((size / 32)); do
    cmds+=("write -q -P 0xcd $o 4M")
  done
  qemu_io "$2" "${cmds[@]}"
}
# content_sum SPEC: rbd export into a sparse file (to stdout, 64 GiB of zeros would take a
# minute), then a sum of its size and non-zero blocks: equal for equal content.
content_sum() {
  local out
  out=$(rbd_ export --no-progress "$1" "$work/export.raw" 2>&1) || die "rbd export $1 failed: $(tail -n1 <<<"$out")"
  python3 bench/rbd_report.py sum "$work/export.raw"
  rm -f -- "$work/export.raw"
}
check() { # SIZE WHAT EXPECTED GOT
  local ok=yes
  [ "$3" = "$4" ] || ok=no
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$ok" >>"$checks"
  [ $ok = yes ] || die "${1^^}: $2: content differs from the snapshot's ($4, expected $3)"
  say "verified ${1^^}: $2"
}
disk_of() { # VM -> the image its vda uses (name in the pool)
  virsh dumpxml --inactive "$1" | python3 -c 'import sys, xml.etree.ElementTree as ET
for d in ET.fromstring(sys.stdin.read()).iter("disk"):
    if d.find("target").get("dev") == "vda":
        print(d.find("source").get("name").split("/", 1)[1])'
}
parent_of() { # IMAGE -> pool/image@snap of its parent, or nothing
  rbd_ info --format json "$POOL/$1" | json_get '"%s/%s@%s" % (d["parent"]["pool"], d["parent"]["image"], d["parent"]["snapshot"])'
}
exists() { rbd_ info "$POOL/$1" >/dev/null 2>&1; }

# --- images and VMs ----------------------------------------------------------------------------
declare -A XML=()
for s in "${SIZES[@]}"; do
  vm=${VM[$s]}
  say "making $POOL/$vm and $POOL/${NOMAP[$s]}: ${s^^}, 256 MiB written, and VM $vm"
  rbd_ create --size "${s^^}" "$POOL/$vm" >/dev/null
  pre_write "$s" "$vm"
  # Without object map (and fast-diff, which needs it): what rollback costs when it has to visit
  # every object of the image.
  rbd_ create --size "${s^^}" --image-feature layering,exclusive-lock "$POOL/${NOMAP[$s]}" >/dev/null
  pre_write "$s" "${NOMAP[$s]}"
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
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw' cache='writeback'/>
      <auth username='$(ceph_env USER)'><secret type='ceph' uuid='$SECRET'/></auth>
      <source protocol='rbd' name='$POOL/$vm'><host name='$(ceph_env MON_HOST)' port='$(ceph_env MON_PORT)'/></source>
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

# --- private bus and vmsnapd -------------------------------------------------------------------
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
# Top-level keys first: after the [rbd] header they would belong to that table.
printf 'libvirt_uri = "%s"\nstate_dir = "%s"\n[rbd]\nceph_conf = "%s"\ncommand_timeout = "60s"\n' \
  "$URI" "$work/state" "$CONF" >"$work/vmsnapd.toml"
# A logging `rbd` for the traced rounds: start and end stamps, exit status and arguments.
mkdir -p "$work/bin"
cat >"$work/bin/rbd" <<EOF
#!/bin/bash
t0=\${EPOCHREALTIME/./}
/usr/bin/rbd "\$@"
rc=\$?
printf '%s\t%s\t%s\t%s\n' "\$t0" "\${EPOCHREALTIME/./}" "\$rc" "\$*" >>"$work/rbd-trace.log"
exit \$rc
EOF
chmod 755 "$work/bin/rbd"
: >"$work/rbd-trace.log"
ctl() { "$CTL" --bus-address "$ADDR" "$@"; }
start_vmsnapd() { # [PATH]: vmsnapd's PATH (the traced rounds put the logging rbd first)
  PATH=${1:-$PATH} VMSNAP_LOG=${BENCH_LOG:-debug} "$VMSNAPD" --config "$work/vmsnapd.toml" \
    --bus-address "$ADDR" </dev/null >/dev/null 2>>"$work/vmsnapd.log" &
  vmsnapd_pid=$!
  local deadline=$((SECONDS + 30)) s
  for s in "${SIZES[@]}"; do
    until [ "$(ctl --output json vm show "${VM[$s]}" 2>/dev/null | json_get 'd["state"]')" = shut-off ]; do
      kill -0 "$vmsnapd_pid" 2>/dev/null || { tail -n 20 "$work/vmsnapd.log" >&2; die "vmsnapd exited"; }
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

# --- one vmsnapctl command, timed --------------------------------------------------------------
# timed_ctl ARGS...: runs vmsnapctl, output in CTL_OUT, host stamps in T0/T1. A command refused as
# busy (vmsnapctl returns a moment before vmsnapd marks the VM idle) or because libvirt is
# unavailable (other sessions may restart libvirtd) is run again after 200 ms, for up to 20 s.
retries=0
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
    retries=$((retries + 1))
    sleep 0.2
  done
  cat "$work/ctl.last" >&2
  [ -z "$CTL_OUT" ] || echo "$CTL_OUT" >&2
  die "vmsnapctl $* failed"
}
# timed CMD...: any other command, stamps in T0/T1; its failure ends the run.
timed() {
  local out
  now_us; T0=$REPLY
  out=$("$@" 2>&1) || die "$* failed: $(tail -n1 <<<"$out")"
  now_us; T1=$REPLY
}

# --- the snapshots -----------------------------------------------------------------------------
declare -A SNAP=() SNAPSUM=()
for s in "${SIZES[@]}"; do
  vm=${VM[$s]}
  timed_ctl --output json snapshot create "$vm" base
  json=$CTL_OUT t0=$T0 t1=$T1
  [ "$(json_get 'd["phase"]' <<<"$json")" = Succeeded ] || die "snapshot of $vm: $json"
  SNAP[$s]=$(json_get 'd["snapshotVolumes"]["includedVolumes"][0]["image"]' <<<"$json")
  SNAP[$s]=${SNAP[$s]#rbd:}
  [[ ${SNAP[$s]} == "$POOL/$vm@vmsnap-"* ]] || die "snapshot image of $vm is ${SNAP[$s]}"
  [ "$(disk_of "$vm")" = "$vm" ] || die "an RBD snapshot changed $vm's disk to $(disk_of "$vm")"
  row snapshot_setup "$s" 1 "$t0" "$t1"
  say "snapshot base of $vm (offline): $(ms "$t0" "$t1") ms, ${SNAP[$s]}"
  # The same state by hand on the no-object-map image, for its rollback.
  rbd_ snap create --no-progress "$POOL/${NOMAP[$s]}@base"
  SNAPSUM[$s]=$(content_sum "${SNAP[$s]}")
  say "snapshot ${s^^}: $(cut -d' ' -f1 <<<"${SNAPSUM[$s]}") non-zero MiB blocks"
done

# drop_replaced SIZE IMAGE [hand]: vmsnapd keeps the image a restore replaced; nothing uses it any
# more, so it goes (untimed) to keep the pool small. Only this run's clones: never the original
# image, nor one holding the snapshot restores clone from (KEEP). `kept` counts vmsnapd's.
kept=0
declare -A KEEP=()
drop_replaced() {
  [ "$2" != "${VM[$1]}" ] && [ "$2" != "${KEEP[$1]:-}" ] || return 0
  exists "$2" || die "the image $2 that the restore replaced is gone"
  [ -n "${3:-}" ] || kept=$((kept + 1))
  rbd_ rm --no-progress "$POOL/$2" >/dev/null
}

# --- one vmsnapctl restore, timed --------------------------------------------------------------
# restore_once VARIANT SIZE ITER [--no-safety-snapshot]: a restore of snapshot FROM, its JSON in
# REPLY, the image the VM used before in OLD.
FROM=base
restore_once() {
  local variant=$1 s=$2 i=$3 json new; shift 3
  OLD=$(disk_of "${VM[$s]}")
  post_write "$s" "$OLD"
  timed_ctl --output json restore "${VM[$s]}" "$FROM" "$@"
  json=$CTL_OUT
  [ "$(json_get 'd["phase"]' <<<"$json")" = Succeeded ] || die "restore of ${VM[$s]}: $json"
  row "$variant" "$s" "$i" "$T0" "$T1" "$(json_get 'd["safetySnapshot"]' <<<"$json")"
  say "$i $variant ${s^^}: $(ms "$T0" "$T1") ms"
  new=$(disk_of "${VM[$s]}")
  [ "rbd:$POOL/$new" = "$(json_get 'd["restores"][0]["toImage"]' <<<"$json")" ] ||
    die "${VM[$s]} is not on the restore's new image ($new): $json"
  if [ "$i" = 1 ]; then
    [ "$(parent_of "$new")" = "${SNAP[$s]}" ] || die "$new is not a clone of ${SNAP[$s]}"
  fi
  REPLY=$json
}

# --- the same restore by hand: rbd clone + virsh define ------------------------------------------
by_hand() { # SIZE ITER
  local s=$1 i=$2 vm=${VM[$1]} old new t0 tc t1 out
  old=$(disk_of "$vm")
  post_write "$s" "$old"
  new=$vm-hand$i
  sed "s|name='$POOL/$vm'|name='$POOL/$new'|" "${XML[$s]}" >"$work/$vm.hand.xml"
  now_us; t0=$REPLY
  out=$(rbd_ clone "${SNAP[$s]}" "$POOL/$new" 2>&1) || die "rbd clone failed: $(tail -n1 <<<"$out")"
  now_us; tc=$REPLY
  virsh define "$work/$vm.hand.xml" >/dev/null
  now_us; t1=$REPLY
  [ "$(disk_of "$vm")" = "$new" ] || die "by-hand restore of $vm did not take"
  row hand "$s" "$i" "$t0" "$t1" "clone_ms=$(ms "$t0" "$tc")"
  say "$i hand ${s^^}: $(ms "$t0" "$t1") ms (rbd clone $(ms "$t0" "$tc") ms)"
  drop_replaced "$s" "$old" hand
}

# --- rbd snap rollback, by hand ----------------------------------------------------------------
rollback() { # VARIANT SIZE ITER IMAGE SNAPSPEC
  local variant=$1 s=$2 i=$3
  post_write "$s" "$4"
  timed rbd_ snap rollback --no-progress "$5"
  row "$variant" "$s" "$i" "$T0" "$T1"
  say "$i $variant ${s^^}: $(ms "$T0" "$T1") ms"
  if [ "$i" = 1 ]; then check "$s" "rbd export of $4 after $variant" "${SNAPSUM[$s]}" "$(content_sum "$POOL/$4")"; fi
}

# --- the runs ----------------------------------------------------------------------------------
say "$N rounds: vmsnapctl restore --no-safety-snapshot, rbd clone + define, rbd snap rollback"
for i in $(seq "$N"); do
  order=("${SIZES[@]}")
  [ $((i % 2)) = 0 ] && order=(64g 1g)
  for s in "${order[@]}"; do
    restore_once nosafety "$s" "$i" --no-safety-snapshot
    if [ "$i" = 1 ]; then
      check "$s" "rbd export of the VM's disk after vmsnapctl restore" "${SNAPSUM[$s]}" \
        "$(content_sum "$POOL/$(disk_of "${VM[$s]}")")"
    fi
    drop_replaced "$s" "$OLD"
    by_hand "$s" "$i"
    rollback rollback "$s" "$i" "${VM[$s]}" "${SNAP[$s]}"
    rollback rollback_nomap "$s" "$i" "${NOMAP[$s]}" "$POOL/${NOMAP[$s]}@base"
  done
done

say "$SAFETY_N rounds: vmsnapctl restore with the safety snapshot"
declare -A SAFETY=() SAFETY_OLD=()
for i in $(seq "$SAFETY_N"); do
  order=("${SIZES[@]}")
  [ $((i % 2)) = 0 ] && order=(64g 1g)
  for s in "${order[@]}"; do
    restore_once safety "$s" "$i"
    SAFETY[$s]=$(json_get 'd["safetySnapshot"]' <<<"$REPLY")
    SAFETY_OLD[$s]=$OLD
    [ -n "${SAFETY[$s]}" ] || die "no safety snapshot in $REPLY"
    if [ "$i" = 1 ]; then
      check "$s" "rbd export of the VM's disk after vmsnapctl restore (safety)" "${SNAPSUM[$s]}" \
        "$(content_sum "$POOL/$(disk_of "${VM[$s]}")")"
    fi
  done
  for s in "${order[@]}"; do
    timed_ctl snapshot delete "${VM[$s]}" "${SAFETY[$s]}"
    row safety_delete "$s" "$i" "$T0" "$T1"
    drop_replaced "$s" "${SAFETY_OLD[$s]}"
  done
done

say "$SNAP_N rounds: snapshot create + delete, vmsnapctl (offline) and rbd by hand"
for i in $(seq "$SNAP_N"); do
  order=("${SIZES[@]}")
  [ $((i % 2)) = 0 ] && order=(64g 1g)
  for s in "${order[@]}"; do
    vm=${VM[$s]}
    cur=$(disk_of "$vm")
    timed_ctl --output json snapshot create "$vm" "s$i"
    [ "$(json_get 'd["phase"]' <<<"$CTL_OUT")" = Succeeded ] || die "snapshot of $vm: $CTL_OUT"
    row snap_create "$s" "$i" "$T0" "$T1"
    timed_ctl snapshot delete "$vm" "s$i"
    row snap_delete "$s" "$i" "$T0" "$T1"
    timed rbd_ snap create --no-progress "$POOL/$cur@hand$i"
    row rbd_snap_create "$s" "$i" "$T0" "$T1"
    timed rbd_ snap rm --no-progress "$POOL/$cur@hand$i"
    row rbd_snap_rm "$s" "$i" "$T0" "$T1"
    say "$i snapshots ${s^^}: done"
  done
done

# --- traced rounds: which rbd commands vmsnapd runs ------------------------------------------------
say "$TRACE_N traced rounds (vmsnapd's rbd behind a logging wrapper)"
stop_vmsnapd
start_vmsnapd "$work/bin:$PATH"
# A restarted vmsnapd reads its records again; should it not know `base` any more, say so.
if ! ctl snapshot show "${VM[1g]}" base >/dev/null 2>&1; then
  note "after a restart vmsnapd no longer knows snapshot base (\`vmsnapctl snapshot show\`: $(ctl snapshot show "${VM[1g]}" base 2>&1 | head -n1)); \`vmsnapctl snapshot list\` shows $(ctl --output json snapshot list "${VM[1g]}" | json_get 'len(d)') snapshots"
fi
# The traced restores clone from a snapshot this vmsnapd took (traced too, as iteration 0).
FROM=tbase
for s in "${SIZES[@]}"; do
  timed_ctl --output json snapshot create "${VM[$s]}" tbase
  [ "$(json_get 'd["phase"]' <<<"$CTL_OUT")" = Succeeded ] || die "snapshot of ${VM[$s]}: $CTL_OUT"
  row trace_snap_create "$s" 0 "$T0" "$T1"
  SNAP[$s]=$(json_get 'd["snapshotVolumes"]["includedVolumes"][0]["image"]' <<<"$CTL_OUT")
  SNAP[$s]=${SNAP[$s]#rbd:}
  KEEP[$s]=$(disk_of "${VM[$s]}")
done
for i in $(seq "$TRACE_N"); do
  for s in "${SIZES[@]}"; do
    restore_once trace_restore "$s" "$i" --no-safety-snapshot
    drop_replaced "$s" "$OLD"
    timed_ctl --output json snapshot create "${VM[$s]}" "t$i"
    row trace_snap_create "$s" "$i" "$T0" "$T1"
    timed_ctl snapshot delete "${VM[$s]}" "t$i"
    row trace_snap_delete "$s" "$i" "$T0" "$T1"
  done
done
note_hwm

# --- what is left ------------------------------------------------------------------------------
# Only the run's own images: the originals with snapshot base, the images holding tbase, the VMs'
# current clones without snapshots, the no-object-map images; nothing in the pool's trash.
for s in "${SIZES[@]}"; do
  snaps=$(rbd_ snap ls --format json "$POOL/${VM[$s]}" | json_get '" ".join(x["name"] for x in d)')
  [[ $snaps == vmsnap-* && $snaps != *" "* ]] || note "${VM[$s]} has snapshots '$snaps', expected only base's"
  cur=$(disk_of "${VM[$s]}")
  snaps=$(rbd_ snap ls --format json "$POOL/$cur" | json_get '" ".join(x["name"] for x in d)')
  [ -z "$snaps" ] || note "$cur (the VM's disk) keeps snapshots '$snaps'"
done
left=$(my_images | wc -l)
[ "$left" = 8 ] || note "$left images of this run in the pool, expected 8: $(my_images | tr '\n' ' ')"
trash=$(rbd_ trash ls "$POOL" | grep -c "vmsnap-bench-rbd.*-$$" || true)
[ "$trash" = 0 ] || note "$trash images of this run in the pool's trash"

# --- report ------------------------------------------------------------------------------------
libvirt_version=$(virsh version | awk '/Using library:/ {print $4}')
qemu_version=$(virsh version | awk '/Running hypervisor:/ {print $4}')
echo "Run of bench/rbd.sh on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores," \
  "libvirt $libvirt_version, QEMU $qemu_version, Ceph $(rbd --version | awk '{print $3}')" \
  "(lab/ceph-up.sh: 1 monitor, 1 bluestore OSD on a sparse file, pool size 1)," \
  "$(virsh list --all --name | grep -c .) domains defined on the host," \
  "load average $load_start at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end."
echo
python3 bench/rbd_report.py report "$results" "$checks" "$work/vmsnapd.log" "$work/rbd-trace.log" \
  "$work/notes.txt" "$hwm_max_kb" "$retries" "$kept"
