#!/usr/bin/env bash
# Scale benchmark (issue 13): what vmsnapd costs as the host holds more domains (N) and more
# snapshot records (M), each measured against the smallest case, in one run.
#   flock /tmp/vmsnap-lab.lock bash bench/scale.sh 9>&-   (as root, on the lab; ~12 min + build)
# Environment:
#   BENCH_N_SIZES   plain domains (default "10 100 500"; ascending, each >= 5; the first one is
#                   the reference, measured without the chain VMs);
#   BENCH_M_SIZES   snapshot records (default "100 1000 10000"; ascending);
#   BENCH_ROUNDS    create/restore/delete rounds per domain case (default 5);
#   BENCH_RUNS      runs of each list timing (default 5);
#   BENCH_PASSES    passes of the restore/delete comparison (default 1): each pass after the
#                   first measures the first N alone and then the last N with the chain VMs,
#                   back to back, BENCH_ROUNDS rounds each, and gives a ratio of its own;
#   BENCH_IDLE_S    length of each idle CPU window (default 30);
#   BENCH_CHAIN_VMS, BENCH_CHAIN_DEPTH   VMs holding chains of real snapshots, and their depth
#                   (default 10 and 50);
#   BENCH_KEEP=DIR  keeps the raw samples, the strace files and vmsnapd's logs in DIR;
#   BENCH_BIN_DIR=DIR takes vmsnapd and vmsnapctl from DIR instead of building this tree
#                   (CARGO_TARGET_DIR is honoured); the report then names DIR, not this tree's
#                   commit; BENCH_LOG vmsnapd's log filter (info).
#
# What it does (BENCHMARKS.md, section "Scale", explains the method and shows a run):
#  - builds the workspace and makes sure the lab is up (lab/up.sh, idempotent);
#  - defines shut-off TCG domains that never boot, vmsnap-scale-<pid>-*, each with its own
#    64 MiB qcow2 disk in one folder (as /var/lib/libvirt/images would hold them): the target
#    `t` whose snapshots are measured, and fillers `fNNN` up to the first N;
#  - starts its own dbus-daemon (private, permissive, system type) and its own vmsnapd
#    (qemu:///system, state in the scratch folder), takes one real snapshot of `t` (its record
#    is the template of the fake ones) and stops vmsnapd;
#  - for each M: writes M records (phase Succeeded, no volumes, each VM's real definition) spread
#    over four fillers straight into the state folder, as bench/list.sh does, starts vmsnapd
#    with NOTIFY_SOCKET pointing at a listener: start to READY=1 (sent once the name is owned,
#    after every object is exported), then GetManagedObjects (busctl) right after; RSS; then
#    `vmsnapctl snapshot list` of everything and of one of the four VMs (BENCH_RUNS times each);
#  - keeps the smallest M for the domain cases, which are, in order: the first N alone; then
#    BENCH_CHAIN_VMS more VMs `cNN` each given BENCH_CHAIN_DEPTH real offline snapshots with
#    vmsnapctl, one after the other (so a chain that deep, and records naming each image); then
#    every N with them.
#    For each case: libvirtd's CPU over BENCH_IDLE_S without vmsnapd, start of vmsnapd (as
#    above), vmsnapd's and libvirtd's CPU over BENCH_IDLE_S with vmsnapd idle, `vmsnapctl vm
#    list` against `virsh list --all` (BENCH_RUNS each), BENCH_ROUNDS rounds of create, restore
#    --no-safety-snapshot and delete of one snapshot of `t` (each timed on the host), and one
#    more untimed round under `strace -f -e trace=execve,openat` attached to vmsnapd, counting
#    the processes it starts and the files it opens per operation;
#  - with BENCH_PASSES > 1, passes 2.. each hide the chain VMs (undefined, their images and
#    records moved aside) and the fillers above the first N (undefined, images removed), time
#    the rounds with the first N, then bring everything back and time them with the last N:
#    the machine's drift between runs (the reference's median moved from 20 to 29 ms between
#    runs of a few minutes) is then shared by the two sides of each ratio;
#  - splits the timed restores and deletes into steps from vmsnapd's log (its info lines), with
#    vmsnapctl's start and exit before the first and after the last;
#  - prints markdown tables (bench/scale_report.py) on stdout, progress on stderr;
#  - on exit, whatever happened, stops what it started (strace, listener, vmsnapd, bus),
#    undefines every vmsnap-scale-<pid>-* domain and removes the scratch folder.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
read -ra N_SIZES <<<"${BENCH_N_SIZES:-10 100 500}"
read -ra M_SIZES <<<"${BENCH_M_SIZES:-100 1000 10000}"
ROUNDS=${BENCH_ROUNDS:-5}
RUNS=${BENCH_RUNS:-5}
PASSES=${BENCH_PASSES:-1}
IDLE_S=${BENCH_IDLE_S:-30}
CHAIN_VMS=${BENCH_CHAIN_VMS:-10}
CHAIN_DEPTH=${BENCH_CHAIN_DEPTH:-50}
RECORD_VMS=4 # the fillers f001..f004 hold the fake records
URI=qemu:///system
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
PREFIX=vmsnap-scale-$$
TARGET=$PREFIX-t
export LIBVIRT_DEFAULT_URI=$URI

say() { echo "bench: $(date -u +%T) $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive number, not '$2'"; }
posint BENCH_ROUNDS "$ROUNDS"; posint BENCH_RUNS "$RUNS"; posint BENCH_PASSES "$PASSES"; posint BENCH_IDLE_S "$IDLE_S"
posint BENCH_CHAIN_VMS "$CHAIN_VMS"; posint BENCH_CHAIN_DEPTH "$CHAIN_DEPTH"
[ ${#N_SIZES[@]} -gt 0 ] && [ ${#M_SIZES[@]} -gt 0 ] || die "BENCH_N_SIZES and BENCH_M_SIZES need a size"
prev=0
for n in "${N_SIZES[@]}"; do
  posint BENCH_N_SIZES "$n"
  [ "$n" -gt $RECORD_VMS ] && [ "$n" -gt "$prev" ] || die "BENCH_N_SIZES must ascend, each above $RECORD_VMS"
  prev=$n
done
prev=0
for m in "${M_SIZES[@]}"; do
  posint BENCH_M_SIZES "$m"; [ "$m" -gt "$prev" ] || die "BENCH_M_SIZES must ascend"; prev=$m
done
for tool in busctl dbus-daemon strace qemu-img virsh python3; do
  command -v $tool >/dev/null || die "$tool is needed"
done

# --- cleanup ---------------------------------------------------------------------------------
work=""
vmsnapd_pid=""
dbus_pid=""
strace_pid=""
listener_pid=""
undefine_ours() { # every domain of this run, in one virsh session
  virsh list --all --name | grep "^$PREFIX-" | sed 's/.*/undefine & --snapshots-metadata/' |
    virsh >/dev/null 2>&1
}
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ -z "$strace_pid" ] || { kill -INT "$strace_pid" 2>/dev/null; wait "$strace_pid" 2>/dev/null; }
  [ -z "$listener_pid" ] || { kill "$listener_pid" 2>/dev/null; wait "$listener_pid" 2>/dev/null; }
  if [ -n "$vmsnapd_pid" ] && kill -0 "$vmsnapd_pid" 2>/dev/null; then
    kill -TERM "$vmsnapd_pid"
    for _ in $(seq 100); do kill -0 "$vmsnapd_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$vmsnapd_pid" 2>/dev/null
    wait "$vmsnapd_pid" 2>/dev/null
  fi
  [ -z "$dbus_pid" ] || kill -TERM "$dbus_pid" 2>/dev/null
  undefine_ours
  left=$(virsh list --all --name | grep -c "^$PREFIX-")
  [ "$left" = 0 ] || say "warning: $left domains $PREFIX-* are still defined"
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP"
      cp -f "$work"/data.tsv "$work"/*.log "$work"/strace.* "$BENCH_KEEP/" 2>/dev/null
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
# put SECTION CASE METRIC VALUE: one raw sample for the report.
put() { printf '%s\t%s\t%s\t%s\n' "$@" >>"$work/data.tsv"; }
json_get() { # EXPR < JSON: a Python expression on the document `d` (empty if not JSON)
  python3 -c 'import json, sys
try:
    v = eval(sys.argv[1], {"d": json.load(sys.stdin)})
except Exception:
    v = ""
print("" if v is None else v)' "$1"
}

# --- build and lab ---------------------------------------------------------------------------
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  BIN=$BENCH_BIN_DIR
else
  say "building (cargo build --release --workspace --locked)"
  cargo build --release --workspace --locked --quiet
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
fi
CTL=$BIN/vmsnapctl
VMSNAPD=$BIN/vmsnapd
[ -x "$CTL" ] && [ -x "$VMSNAPD" ] || die "no vmsnapctl and vmsnapd in $BIN"
say "checking the lab (lab/up.sh)"
bash lab/up.sh >/dev/null
GUEST=$LAB_DIR/guest
[ -s "$GUEST/vmlinuz" ] && [ -s "$GUEST/initrd.gz" ] || die "no guest kernel in $GUEST"
LIBVIRTD_PID=$(cat /run/libvirtd.pid 2>/dev/null) || die "no /run/libvirtd.pid"
[ -r "/proc/$LIBVIRTD_PID/stat" ] || die "libvirtd ($LIBVIRTD_PID) is not running"
CLK_TCK=$(getconf CLK_TCK)

work=$(mktemp -d "$LAB_DIR/vmsnap-bench-scale.XXXXXX")
chmod 755 "$work"
IMAGES=$work/images
mkdir -p "$IMAGES" "$work/xml" "$work/state" "$work/locks"
: >"$work/data.tsv"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
# What is measured, for the report. Binaries from BENCH_BIN_DIR may be built from any commit,
# and `vmsnapd --version` names none (only the package version): the report names their folder.
# Otherwise the tree's HEAD, and the last commit that changed what is built.
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  measured="binaries from $(cd -- "$BIN" && pwd)"
else
  commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
  code_commit=$(git -C "$ROOT" log -1 --format=%h -- daemon ctl api Cargo.toml Cargo.lock 2>/dev/null || echo unknown)
  [ -z "$(git -C "$ROOT" status --porcelain -- daemon ctl api 2>/dev/null)" ] || commit+="+changes"
  measured="commit $commit (code as of $code_commit)"
fi

# --- domains ---------------------------------------------------------------------------------
# One 64 MiB qcow2 image, copied: a fork of cp is cheaper than one of qemu-img per domain.
qemu-img create -q -f qcow2 "$work/template.qcow2" 64M
# define_domains NAME...: each with its own copy of the template, all in one virsh session.
define_domains() {
  local name cmds=$work/define.cmds
  : >"$cmds"
  for name in "$@"; do
    cp "$work/template.qcow2" "$IMAGES/$name-vda.qcow2"
    cat >"$work/xml/$name.xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
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
      <source file='$IMAGES/$name-vda.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
    echo "define $work/xml/$name.xml" >>"$cmds"
  done
  virsh <"$cmds" >/dev/null 2>"$work/define.err" || true
  for name in "$@"; do
    virsh domuuid "$name" >/dev/null 2>&1 || die "cannot define $name: $(head -c 300 "$work/define.err")"
  done
}
fillers=0 # fillers defined so far: f001..fNNN
filler() { printf '%s-f%03d' "$PREFIX" "$1"; }
# grow_to N: the target and fillers up to N plain domains.
grow_to() {
  local want=$(($1 - 1)) names=() i
  [ "$want" -gt "$fillers" ] || return 0
  for i in $(seq $((fillers + 1)) "$want"); do names+=("$(filler "$i")"); done
  define_domains "${names[@]}"
  fillers=$want
}
# shrink_to N: fillers above N plain domains undefined, their images removed.
shrink_to() {
  local keep=$(($1 - 1)) i
  [ "$keep" -lt "$fillers" ] || return 0
  for i in $(seq $((keep + 1)) "$fillers"); do echo "undefine $(filler "$i")"; done | virsh >/dev/null
  for i in $(seq $((keep + 1)) "$fillers"); do rm -f "$IMAGES/$(filler "$i")-vda.qcow2"; done
  fillers=$keep
}
host_domains() { virsh list --all --name | grep -c . || true; }

# --- private bus and vmsnapd -----------------------------------------------------------------
say "starting a private dbus-daemon"
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
printf 'libvirt_uri = "%s"\nstate_dir = "%s"\nvm_lock_dir = "%s"\n' \
  "$URI" "$work/state" "$work/locks" >"$work/vmsnapd.toml"
ctl() { "$CTL" --bus-address "$ADDR" "$@"; }
gmo() {
  busctl --address="$ADDR" --quiet call org.vmsnap.VmSnap1 /org/vmsnap/VmSnap1 \
    org.freedesktop.DBus.ObjectManager GetManagedObjects
}
rss_kb() { awk -v k="$1:" '$1 == k {print $2}' "/proc/$vmsnapd_pid/status"; }

# start_vmsnapd SECTION CASE: starts vmsnapd with a readiness listener; records the time from
# the spawn to READY=1 and to the end of a GetManagedObjects made right after, and the RSS.
starts=0
start_vmsnapd() {
  local section=$1 case=$2 sock=$work/notify.sock t0 t_ready t1 deadline
  starts=$((starts + 1))
  rm -f "$sock" "$work/ready"
  python3 bench/scale_report.py notify "$sock" "$work/ready" &
  listener_pid=$!
  until [ -S "$sock" ]; do kill -0 "$listener_pid" 2>/dev/null || die "the readiness listener died"; sleep 0.01; done
  now_us; t0=$REPLY
  NOTIFY_SOCKET=$sock VMSNAP_LOG=${BENCH_LOG:-info} "$VMSNAPD" --config "$work/vmsnapd.toml" \
    --bus-address "$ADDR" </dev/null >/dev/null 2>>"$work/vmsnapd-$starts-$case.log" &
  vmsnapd_pid=$!
  wait "$listener_pid" || die "vmsnapd sent no READY=1: $(tail -c 400 "$work/vmsnapd-$starts-$case.log")"
  listener_pid=""
  gmo || die "GetManagedObjects failed after READY=1 ($section $case)"
  now_us; t1=$REPLY
  t_ready=$(cat "$work/ready")
  put "$section" "$case" start_ready_ms "$(ms "$t0" "$t_ready")"
  put "$section" "$case" start_gmo_ms "$(ms "$t0" "$t1")"
  put "$section" "$case" rss_start_kb "$(rss_kb VmRSS)"
  # READY comes after the first inventory: every domain of ours is there already.
  local ours want
  want=$(virsh list --all --name | grep -c "^$PREFIX-")
  ours=$(ctl --output json vm list | json_get "len([v for v in d if v['name'].startswith('$PREFIX-')])")
  [ "$ours" = "$want" ] || die "vmsnapd lists $ours of our $want domains after READY=1"
}
stop_vmsnapd() {
  kill -TERM "$vmsnapd_pid"
  wait "$vmsnapd_pid" || die "vmsnapd did not stop cleanly"
  vmsnapd_pid=""
}

# timed_ctl ARGS...: runs vmsnapctl, output in CTL_OUT, host stamps in T0/T1. vmsnapctl returns
# as soon as the phase is final, a moment before vmsnapd marks the VM idle again: a command
# refused as busy (or while libvirt is unavailable) is run, and timed, again after 200 ms.
timed_ctl() {
  local err=$work/ctl.last.$BASHPID # one per subshell: the chains are made in parallel
  for _ in $(seq 100); do
    now_us; T0=$REPLY
    if CTL_OUT=$(ctl "$@" 2>"$err"); then
      now_us; T1=$REPLY
      return 0
    fi
    grep -q 'is busy:\|libvirt is unavailable' "$err" || break
    sleep 0.2
  done
  die "vmsnapctl $* failed: $(head -c 300 "$err")"
}

# --- the template record and the fake ones ---------------------------------------------------
grow_to "${N_SIZES[0]}"
define_domains "$TARGET"
say "taking the template snapshot (vmsnapd with ${N_SIZES[0]} domains)"
start_vmsnapd setup setup
timed_ctl --output json snapshot create "$TARGET" base
[ "$(json_get 'd["phase"]' <<<"$CTL_OUT")" = Succeeded ] || die "snapshot base of $TARGET: $CTL_OUT"
stop_vmsnapd
TEMPLATE=$(grep -l '"name": *"base"' "$work"/state/snapshots/*/*.json | head -n1)
[ -s "$TEMPLATE" ] || die "no record of snapshot base in $work/state"
for i in $(seq $RECORD_VMS); do
  virsh dumpxml --inactive --security-info "$(filler "$i")" >"$work/xml/$(filler "$i").recorded"
done

# write_records M: replaces the fake records with M of them, spread over f001..f004.
write_records() {
  python3 - "$work/state" "$1" "$TEMPLATE" "$work/xml" "$PREFIX" $RECORD_VMS <<'PY'
import copy, datetime, glob, json, os, subprocess, sys, uuid
state, m, template, xmls, prefix, vms = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])
for old in glob.glob(os.path.join(state, "snapshots", "*", "5ca1e000-*.json")):
    os.remove(old)
base = json.load(open(template))
owners = []
for k in range(1, vms + 1):
    name = f"{prefix}-f{k:03d}"
    vm_uuid = subprocess.run(["virsh", "domuuid", name], capture_output=True, text=True, check=True).stdout.strip()
    owners.append((name, vm_uuid, open(os.path.join(xmls, name + ".recorded")).read()))
start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
for i in range(m):
    name, vm_uuid, xml = owners[i % vms]
    r = copy.deepcopy(base)
    u = f"5ca1e000-0000-4000-8000-{i:012d}"  # recognisable, so that the next size replaces them
    r.update(uuid=u, name=f"fake-{i:05d}", vmName=name, vmUuid=vm_uuid, domainXml=xml,
             volumes=[], excluded=[], phase="Succeeded", readyToUse=True, error="",
             creationTime=(start + datetime.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ"))
    folder = os.path.join(state, "snapshots", vm_uuid)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = os.path.join(folder, u + ".json")
    with open(path, "w") as f:
        json.dump(r, f)
    os.chmod(path, 0o600)
PY
}

# time_runs SECTION CASE METRIC CMD...: RUNS timed runs of CMD, output discarded.
time_runs() {
  local section=$1 case=$2 metric=$3 t0; shift 3
  for _ in $(seq "$RUNS"); do
    now_us; t0=$REPLY
    "$@" >/dev/null || die "failed: $*"
    now_us; put "$section" "$case" "$metric" "$(ms "$t0" "$REPLY")"
  done
}

# --- snapshot records: M ---------------------------------------------------------------------
for m in "${M_SIZES[@]}"; do
  say "M=$m: writing the records, starting vmsnapd"
  write_records "$m"
  start_vmsnapd m "$m"
  total=$(ctl snapshot list | tail -n +2 | grep -c . || true)
  put m "$m" records "$total"
  put m "$m" domains "$(host_domains)"
  time_runs m "$m" list_all_ms ctl snapshot list
  time_runs m "$m" list_one_ms ctl snapshot list "$(filler 1)"
  put m "$m" rss_list_kb "$(rss_kb VmRSS)"
  put m "$m" hwm_kb "$(rss_kb VmHWM)"
  say "M=$m ($total listed): ready $(awk -v c="$m" '$1 == "m" && $2 == c && $3 == "start_ready_ms" {print $4}' "$work/data.tsv") ms"
  stop_vmsnapd
done
write_records "${M_SIZES[0]}"

# --- domains: N ------------------------------------------------------------------------------
# cpu_ticks PID: user + system clock ticks of the process, all its threads.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# idle_cpu CASE WHO: CPU % over IDLE_S s of libvirtd (and vmsnapd when WHO is both).
idle_cpu() {
  local case=$1 who=$2 l0 v0 t0 l1 v1
  now_us; t0=$REPLY
  l0=$(cpu_ticks "$LIBVIRTD_PID")
  [ "$who" = libvirtd ] || v0=$(cpu_ticks "$vmsnapd_pid")
  sleep "$IDLE_S"
  l1=$(cpu_ticks "$LIBVIRTD_PID")
  [ "$who" = libvirtd ] || v1=$(cpu_ticks "$vmsnapd_pid")
  now_us
  local pct='BEGIN { printf "%.3f", (b - a) / tck * 100 / s }' secs
  secs=$(awk -v a="$t0" -v b="$REPLY" 'BEGIN { print (b - a) / 1e6 }')
  if [ "$who" = libvirtd ]; then
    put n "$case" libvirtd_alone_pct "$(awk -v a="$l0" -v b="$l1" -v tck="$CLK_TCK" -v s="$secs" "$pct")"
  else
    put n "$case" libvirtd_with_pct "$(awk -v a="$l0" -v b="$l1" -v tck="$CLK_TCK" -v s="$secs" "$pct")"
    put n "$case" vmsnapd_idle_pct "$(awk -v a="$v0" -v b="$v1" -v tck="$CLK_TCK" -v s="$secs" "$pct")"
  fi
}

# op_round CASE NAME [strace]: create, restore --no-safety-snapshot and delete of snapshot NAME
# of the target; timed, or counting vmsnapd's processes under strace (then not timed).
op_round() {
  local case=$1 name=$2 mode=${3:-}
  op create "$case" "$mode" --output json snapshot create "$TARGET" "$name"
  [ "$(json_get 'd["phase"]' <<<"$CTL_OUT")" = Succeeded ] || die "snapshot $name: $CTL_OUT"
  op restore "$case" "$mode" --output json restore "$TARGET" "$name" --no-safety-snapshot
  [ "$(json_get 'd["phase"]' <<<"$CTL_OUT")" = Succeeded ] || die "restore to $name: $CTL_OUT"
  op delete "$case" "$mode" snapshot delete "$TARGET" "$name"
}
op() {
  local what=$1 case=$2 mode=$3; shift 3
  if [ "$mode" != strace ]; then
    timed_ctl "$@"
    put n "$case" "${what}_ms" "$(ms "$T0" "$T1")"
    put n "$case" "${what}_ms_pass$PASS" "$(ms "$T0" "$T1")"
    # When vmsnapctl started and returned, against vmsnapd's log lines (the report's steps).
    put n "$case" "${what}_t0" "$T0"
    put n "$case" "${what}_t1" "$T1"
    return
  fi
  local trace=$work/strace.$case.$what
  strace -f -qq -e trace=execve,openat -o "$trace" -p "$vmsnapd_pid" 2>>"$work/strace.log" &
  strace_pid=$!
  # Attached once every thread of vmsnapd has a tracer.
  local deadline=$((SECONDS + 10))
  while grep -qs '^TracerPid:[[:space:]]*0$' /proc/"$vmsnapd_pid"/task/*/status; do
    [ $SECONDS -lt $deadline ] || die "strace did not attach to vmsnapd"
    sleep 0.05
  done
  timed_ctl "$@"
  sleep 0.3 # the operation's last steps after vmsnapctl returns
  kill -INT "$strace_pid"; wait "$strace_pid" || true
  strace_pid=""
  read -r count programs opens < <(python3 bench/scale_report.py execs "$trace")
  put n "$case" "${what}_execs" "$count"
  put n "$case" "${what}_programs" "$programs"
  put n "$case" "${what}_opens" "$opens"
}

PASS=1 # the pass the timed rounds belong to

# domain_case CASE N CHAINS: everything measured against the number of domains.
domain_case() {
  local case=$1 n=$2 chains=$3 i
  put n "$case" n "$n"
  put n "$case" chains "$chains"
  put n "$case" domains "$(host_domains)"
  say "$case: libvirtd alone, ${IDLE_S}s"
  idle_cpu "$case" libvirtd
  start_vmsnapd n "$case"
  sleep 2 # past the first inventory's aftermath
  say "$case: vmsnapd idle, ${IDLE_S}s"
  idle_cpu "$case" both
  time_runs n "$case" vm_list_ms ctl vm list
  time_runs n "$case" virsh_list_ms virsh list --all
  say "$case: $ROUNDS rounds of create, restore, delete"
  for i in $(seq "$ROUNDS"); do op_round "$case" "s-$case-$i"; done
  op_round "$case" "s-$case-traced" strace
  put n "$case" rss_end_kb "$(rss_kb VmRSS)"
  local chain
  chain=$(qemu-img info -U --backing-chain --output json "$(virsh domblklist "$TARGET" | awk '$1 == "vda" {print $2}')" |
    json_get 'len(d)')
  put n "$case" target_chain "$chain"
}

grow_to "${N_SIZES[0]}"
domain_case "n${N_SIZES[0]}" "${N_SIZES[0]}" 0

say "making $CHAIN_VMS VMs with $CHAIN_DEPTH real snapshots each (offline, vmsnapctl)"
chain_names=()
for i in $(seq "$CHAIN_VMS"); do chain_names+=("$(printf '%s-c%02d' "$PREFIX" "$i")"); done
define_domains "${chain_names[@]}"
until [ "$(ctl --output json vm list | json_get "len([v for v in d if '-c' in v['name'] and v['name'].startswith('$PREFIX-')])")" = "$CHAIN_VMS" ]; do
  sleep 0.2
done
# One after the other: with ten vmsnapctl creates at once, some ended with "was removed before it
# finished" although vmsnapd made the snapshot (the reply's object not yet on the bus, it seems).
# Such a create is accepted when `snapshot show` finds it succeeded, and counted.
chain_snapshot() { # VM NAME
  local err=$work/ctl.chain
  for _ in $(seq 100); do
    ctl snapshot create "$1" "$2" >/dev/null 2>"$err" && return 0
    grep -q 'is busy:' "$err" || break # the VM's previous operation is still being closed
    sleep 0.2
  done
  grep -q 'removed before it finished' "$err" &&
    [ "$(ctl --output json snapshot show "$1" "$2" | json_get 'd["phase"]')" = Succeeded ] ||
    die "snapshot $2 of $1 failed: $(head -c 300 "$err")"
  unseen=$((unseen + 1))
}
now_us; c0=$REPLY
unseen=0
for vm in "${chain_names[@]}"; do
  for k in $(seq "$CHAIN_DEPTH"); do chain_snapshot "$vm" "chain-$k"; done
done
put chains all unseen "$unseen"
now_us
say "chains made in $(ms "$c0" "$REPLY") ms"
put chains all create_each_ms "$(awk -v a="$c0" -v b="$REPLY" -v n=$((CHAIN_VMS * CHAIN_DEPTH)) 'BEGIN { printf "%.1f", (b - a) / 1000 / n }')"
depth=$(qemu-img info -U --backing-chain --output json "$(virsh domblklist "${chain_names[0]}" | awk '$1 == "vda" {print $2}')" | json_get 'len(d)')
[ "$depth" = $((CHAIN_DEPTH + 1)) ] || die "${chain_names[0]} has a chain of $depth images, expected $((CHAIN_DEPTH + 1))"
stop_vmsnapd

for n in "${N_SIZES[@]}"; do
  grow_to "$n"
  domain_case "n${n}c" "$n" "$CHAIN_VMS"
  stop_vmsnapd
done

# --- passes: the first N alone and the last N with the chain VMs, back to back ----------------
# The chain VMs' definitions (as vmsnapd left them), images (base and overlays, named after the
# VM) and records move to $stash and back; the VMs keep their UUIDs.
stash=$work/stash
hide_chains() {
  local vm uuid
  mkdir -p "$stash/images" "$stash/records" "$stash/xml"
  for vm in "${chain_names[@]}"; do
    uuid=$(virsh domuuid "$vm")
    virsh dumpxml --inactive --security-info "$vm" >"$stash/xml/$vm.xml"
    virsh undefine "$vm" >/dev/null
    mv "$work/state/snapshots/$uuid" "$stash/records/"
    mv "$IMAGES/$vm"-* "$stash/images/"
  done
}
show_chains() {
  local vm
  mv "$stash/images/"* "$IMAGES/"
  mv "$stash/records/"* "$work/state/snapshots/"
  for vm in "${chain_names[@]}"; do
    virsh define "$stash/xml/$vm.xml" >/dev/null
  done
}
pass_rounds() { # CASE
  local i
  for i in $(seq "$ROUNDS"); do op_round "$1" "s-$1-p$PASS-$i"; done
}
last_n=${N_SIZES[-1]}
for PASS in $(seq 2 "$PASSES"); do
  say "pass $PASS of $PASSES: ${N_SIZES[0]} domains alone, then $last_n with the chain VMs"
  hide_chains
  shrink_to "${N_SIZES[0]}"
  ref_domains=$(awk -v c="n${N_SIZES[0]}" '$1 == "n" && $2 == c && $3 == "domains" {print $4; exit}' "$work/data.tsv")
  [ "$(host_domains)" = "$ref_domains" ] ||
    die "pass $PASS: $(host_domains) domains on the host with the chain VMs hidden, $ref_domains in the first pass"
  start_vmsnapd n "n${N_SIZES[0]}"
  pass_rounds "n${N_SIZES[0]}"
  stop_vmsnapd
  show_chains
  grow_to "$last_n"
  start_vmsnapd n "n${last_n}c"
  pass_rounds "n${last_n}c"
  stop_vmsnapd
done

# --- report ----------------------------------------------------------------------------------
libvirt_version=$(virsh version | awk '/Using library:/ {print $4}')
echo "Run of bench/scale.sh on $(date -u '+%Y-%m-%d %H:%M UTC'), $measured:" \
  "$(nproc) cores, libvirt $libvirt_version, load average $load_start at the start," \
  "$(cut -d' ' -f1-3 /proc/loadavg) at the end; chains: $CHAIN_VMS VMs x $CHAIN_DEPTH snapshots;" \
  "$ROUNDS rounds, $RUNS runs per list timing, idle windows of ${IDLE_S} s, $PASSES passes."
echo
python3 bench/scale_report.py report "$work" "${M_SIZES[0]}" "$CHAIN_VMS" "$CHAIN_DEPTH"
