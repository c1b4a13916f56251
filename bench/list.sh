#!/usr/bin/env bash
# Listing benchmark: `vmsnapctl snapshot list` against a real vmsnapd holding N snapshots.
#   bash bench/list.sh      (any user; no lab, no libvirtd: libvirt's test:///default driver)
# Environment: BENCH_SIZES the numbers of snapshots (default "1000 10000"), BENCH_RUNS runs of
# each timing, the median is shown (default 5), BENCH_STARTS starts of vmsnapd on the same
# records, the first one included (default 1; median (min-max) shown), BENCH_BASELINE_CTL another vmsnapctl to time
# beside this tree's (for instance main's build, for a before/after), BENCH_KEEP=DIR keeps
# vmsnapd's log, BENCH_BIN_DIR=DIR takes vmsnapd and vmsnapctl from DIR instead of building this
# tree (CARGO_TARGET_DIR is honoured), BENCH_XML_BYTES=N pads each record's definition to about
# N bytes (a <description>; default: test:///default's own, about 1 KiB).
#
# What it does (BENCHMARKS.md, "Listing", shows a run):
#  - builds the workspace (cargo build --release --workspace --locked), unless BENCH_BIN_DIR;
#  - for each N: writes N snapshot records (format 2, phase Succeeded, no volumes, the domain
#    XML of test:///default's domain `test`) for that domain straight into a fresh state folder,
#    and 10 of an undefined VM `gone`,
#    starts its own dbus-daemon (private, permissive, system type) and its own vmsnapd on it
#    (libvirt_uri = "test:///default", state dir in a temporary directory), and waits until
#    vmsnapd lists all N; notes how long vmsnapd took from its start to owning its bus name (it
#    takes the name once every object is exported), then to a GetManagedObjects answered
#    right after, and its RSS then;
#  - times, BENCH_RUNS times each: ObjectManager.GetManagedObjects alone with busctl (--quiet:
#    the reply is read, not printed), then `vmsnapctl snapshot list test`, `snapshot list gone`
#    (10 of the N + 10), `restore list` (no restores) and `vm list` (one VM), tables to
#    /dev/null, of BENCH_BASELINE_CTL and of this tree;
#  - measures the size of GetManagedObjects' reply as it crosses the bus (dbus-monitor --pcap),
#    and vmsnapd's RSS after all of the above and its peak RSS (VmHWM);
#  - prints a markdown table (milliseconds, median of the runs) on stdout, progress on stderr;
#  - on exit, whatever happened, stops vmsnapd and the bus and removes the temporary directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
SIZES=${BENCH_SIZES:-1000 10000}
RUNS=${BENCH_RUNS:-5}
STARTS=${BENCH_STARTS:-1}
BASELINE=${BENCH_BASELINE_CTL:-}
VM="test"
VM_UUID=6695eb01-f6a4-8304-79aa-97f2502e193f
# A few snapshots of another VM, undefined, next to the N of `test`.
SMALL=10
SMALL_VM="gone"
SMALL_UUID=5eed0000-0000-4000-8000-00000000aaaa

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive number"
[[ $STARTS =~ ^[1-9][0-9]*$ ]] || die "BENCH_STARTS must be a positive number"
for n in $SIZES; do [[ $n =~ ^[1-9][0-9]*$ ]] || die "BENCH_SIZES must be positive numbers"; done
[ -z "$BASELINE" ] || [ -x "$BASELINE" ] || die "BENCH_BASELINE_CTL=$BASELINE is not executable"
command -v busctl >/dev/null || die "busctl is needed (systemd)"
command -v dbus-daemon >/dev/null || die "dbus-daemon is needed"

# --- cleanup ---------------------------------------------------------------------------------
work=""
vmsnapd_pid=""
dbus_pid=""
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
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP"
      cp -f "$work"/vmsnapd-*.log "$BENCH_KEEP/" 2>/dev/null
    fi
    rm -rf -- "$work"
  fi
  [ $rc = 0 ] || say "failed (exit $rc)"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now_us() { local t=$EPOCHREALTIME; REPLY=${t/./}; } # microseconds, no fork
# median_ms US...: the median of microsecond durations, in milliseconds.
median_ms() {
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "%.0f", m / 1000 }'
}
# time_ms CMD...: runs CMD (output discarded) RUNS times; the median in milliseconds.
time_ms() {
  local runs=() t0
  for _ in $(seq "$RUNS"); do
    now_us; t0=$REPLY
    "$@" >/dev/null || die "failed: $*"
    now_us; runs+=($((REPLY - t0)))
  done
  median_ms "${runs[@]}"
}

# --- build -----------------------------------------------------------------------------------
if [ -n "${BENCH_BIN_DIR:-}" ]; then
  BIN=$BENCH_BIN_DIR
else
  say "building (cargo build --release --workspace --locked)"
  cargo build --release --workspace --locked --quiet
  BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
fi
CTL=$BIN/vmsnapctl
VMSNAPD=$BIN/vmsnapd
if [ ! -x "$CTL" ] || [ ! -x "$VMSNAPD" ]; then die "no vmsnapctl and vmsnapd in $BIN"; fi

work=$(mktemp -d "${TMPDIR:-/tmp}/vmsnap-bench-list.XXXXXX")
XML_BYTES=${BENCH_XML_BYTES:-0}
[[ $XML_BYTES =~ ^[0-9]+$ ]] || die "BENCH_XML_BYTES must be a number"
DOMAIN_XML=$(python3 -c '
import json, sys
xml, want = sys.stdin.read(), int(sys.argv[1])
pad = want - len(xml) - len("  <description></description>\n")
if pad > 0:  # a realistic definition is several KiB (devices, CPU model, metadata)
    xml = xml.replace("</name>\n", "</name>\n  <description>" + "x" * pad + "</description>\n", 1)
print(json.dumps(xml))' "$XML_BYTES" <<'EOF'
<domain type='test'>
  <name>test</name>
  <uuid>6695eb01-f6a4-8304-79aa-97f2502e193f</uuid>
  <memory unit='KiB'>8388608</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='i686'>hvm</type>
    <boot dev='hd'/>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <source file='/guest/diskimage1'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </disk>
    <interface type='network'>
      <mac address='aa:bb:cc:dd:ee:ff'/>
      <source network='default'/>
      <target dev='testnet0'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/>
    </interface>
    <memballoon model='virtio'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </memballoon>
  </devices>
</domain>
EOF
)

# write_records DIR N: N format-2 records of the domain `test`, one a minute from 2026-01-01,
# and SMALL records of the VM `gone` (undefined: its snapshots outlive it).
write_records() {
  python3 - "$1" "$2" "$VM_UUID" "$DOMAIN_XML" "$SMALL_VM" "$SMALL_UUID" "$SMALL" <<'PY'
import datetime, json, os, sys, uuid
state, n, vm_uuid, xml = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
small_vm, small_uuid, small = sys.argv[5], sys.argv[6], int(sys.argv[7])
start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
vms = [("test", vm_uuid)] * n + [(small_vm, small_uuid)] * small
for i, (vm_name, vm) in enumerate(vms):
    folder = os.path.join(state, "snapshots", vm)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    u = str(uuid.UUID(int=(0x5EED << 96) + i, version=4))
    record = {
        "version": 2, "uuid": u, "name": f"bench-{i:05d}", "description": "",
        "vmName": vm_name, "vmUuid": vm, "phase": "Succeeded", "readyToUse": True,
        "creationTime": (start + datetime.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "indications": ["Online", "NoGuestAgent"], "error": "", "freezeDurationMs": 0,
        "frozenFilesystems": 0, "step": {"step": "done"}, "domainXml": xml, "volumes": [],
        "excluded": [], "extraState": [], "cowFillPercent": 0.0,
        "sourceIndications": [
            {"indication": "Online", "message": "the VM was running"},
            {"indication": "NoGuestAgent", "message": "no guest agent is configured"},
        ],
    }
    path = os.path.join(folder, u + ".json")
    with open(path, "w") as f:
        json.dump(record, f)
    os.chmod(path, 0o600)
PY
}

rss_mib() { awk '/^VmRSS:/ {print int($2 / 1024)}' "/proc/$vmsnapd_pid/status"; }
peak_mib() { awk '/^VmHWM:/ {print int($2 / 1024)}' "/proc/$vmsnapd_pid/status"; }

# start_daemons N: a private bus and vmsnapd on a state folder of N records.
start_daemons() {
  local n=$1 dir=$work/n$1
  mkdir -p "$dir"
  write_records "$dir/state" "$n"
  cat >"$dir/bus.conf" <<EOF
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path=$dir/bus.sock</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
EOF
  local out
  out=$(dbus-daemon --config-file="$dir/bus.conf" --fork --print-address=1 --print-pid=1 2>/dev/null) ||
    die "dbus-daemon failed to start"
  ADDR=$(sed -n 1p <<<"$out")
  dbus_pid=$(sed -n 2p <<<"$out")
  printf 'libvirt_uri = "test:///default"\nstate_dir = "%s"\nvm_lock_dir = "%s"\n' \
    "$dir/state" "$dir/locks" >"$dir/vmsnapd.toml"
  local starts=() gmos=()
  for _ in $(seq "$STARTS"); do
    [ -z "$vmsnapd_pid" ] || stop_vmsnapd
    start_vmsnapd "$n"
    starts+=("$START_MS") gmos+=("$START_GMO_MS")
  done
  START_STATS=$(stats_ms "${starts[@]}")
  START_GMO_STATS=$(stats_ms "${gmos[@]}")
}

# stop_vmsnapd: stops vmsnapd, leaving the bus.
stop_vmsnapd() {
  kill -TERM "$vmsnapd_pid"
  for _ in $(seq 100); do kill -0 "$vmsnapd_pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$vmsnapd_pid" 2>/dev/null || true
  wait "$vmsnapd_pid" 2>/dev/null || true
  vmsnapd_pid=""
}

# stats_ms MS...: "median (min-max)", or the one value.
stats_ms() {
  printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END {
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    if (NR == 1) printf "%d", m; else printf "%d (%d-%d)", m, v[1], v[NR] }'
}

# start_vmsnapd N: starts vmsnapd on the bus and state folder of N records; sets START_MS (to
# its name owned), START_GMO_MS (to a GetManagedObjects answered after that) and RSS_READY, and
# waits until it lists all N.
start_vmsnapd() {
  local n=$1 dir=$work/n$1
  now_us; local t0=$REPLY
  VMSNAP_LOG=info "$VMSNAPD" --config "$dir/vmsnapd.toml" --bus-address "$ADDR" \
    </dev/null >/dev/null 2>"$work/vmsnapd-$n.log" &
  vmsnapd_pid=$!
  local deadline=$((SECONDS + 120)) listed=0
  # vmsnapd asks for its name only once every object is exported.
  until busctl --address="$ADDR" call org.freedesktop.DBus /org/freedesktop/DBus \
    org.freedesktop.DBus NameHasOwner s org.vmsnap.VmSnap1 2>/dev/null | grep -q true; do
    kill -0 "$vmsnapd_pid" 2>/dev/null || { cat "$work/vmsnapd-$n.log" >&2; die "vmsnapd exited"; }
    [ $SECONDS -lt $deadline ] || die "vmsnapd does not take its name"
    sleep 0.02
  done
  now_us; START_MS=$(((REPLY - t0) / 1000))
  # Everything exported and read back once by a client (issue 13's start target).
  get_managed_objects || die "GetManagedObjects failed"
  now_us; START_GMO_MS=$(((REPLY - t0) / 1000))
  RSS_READY=$(rss_mib)
  until [ "$listed" = "$n" ]; do
    kill -0 "$vmsnapd_pid" 2>/dev/null || { cat "$work/vmsnapd-$n.log" >&2; die "vmsnapd exited"; }
    [ $SECONDS -lt $deadline ] || die "vmsnapd does not list $n snapshots (only $listed)"
    sleep 0.2
    listed=$(busctl --address="$ADDR" --json=short call org.vmsnap.VmSnap1 \
      /org/vmsnap/VmSnap1/Manager org.vmsnap.VmSnap1.Manager ListSnapshots s "$VM" 2>/dev/null |
      python3 -c 'import json, sys; print(len(json.load(sys.stdin)["data"][0]))' 2>/dev/null) || listed=0
  done
}

get_managed_objects() {
  busctl --address="$ADDR" --quiet call org.vmsnap.VmSnap1 /org/vmsnap/VmSnap1 \
    org.freedesktop.DBus.ObjectManager GetManagedObjects
}


# gmo_bytes: the size of GetManagedObjects' reply on the wire (header and body), from a capture
# of the bus during one call: the largest method return in it.
gmo_bytes() {
  local pcap=$work/gmo.pcap mon
  dbus-monitor --address "$ADDR" --pcap >"$pcap" 2>/dev/null &
  mon=$!
  sleep 0.5
  get_managed_objects || die "GetManagedObjects failed"
  sleep 0.5
  kill -TERM "$mon" 2>/dev/null || true
  wait "$mon" 2>/dev/null || true
  python3 - "$pcap" <<'PY'
import struct, sys
data = open(sys.argv[1], "rb").read()
offset, largest = 24, 0  # after the global header; each record is one message
while offset + 16 <= len(data):
    _, _, included, original = struct.unpack_from("<IIII", data, offset)
    message = data[offset + 16 : offset + 16 + included]
    if len(message) > 1 and message[1] == 2:  # METHOD_RETURN
        largest = max(largest, original)
    offset += 16 + included
print(largest)
PY
}

# --- the runs --------------------------------------------------------------------------------
rows=()
sizes=()
for n in $SIZES; do
  say "N=$n: writing the records and starting vmsnapd"
  start_daemons "$n"
  lines=$("$CTL" --bus-address "$ADDR" snapshot list "$VM" | wc -l)
  [ "$lines" = $((n + 1)) ] || die "snapshot list printed $lines lines, expected $((n + 1))"
  if [ -n "$BASELINE" ]; then
    cmp -s <("$CTL" --bus-address "$ADDR" --output json snapshot list "$VM") \
      <("$BASELINE" --bus-address "$ADDR" --output json snapshot list "$VM") ||
      die "the two vmsnapctl print different JSON"
  fi
  rss_ready=$RSS_READY
  say "N=$n: name owned (everything exported) ${START_STATS} ms after start, RSS then ${rss_ready} MiB"
  say "N=$n: timing ($RUNS runs each)"
  gmo=$(time_ms get_managed_objects)
  row="| $n | $gmo |"
  for what in "snapshot list $VM" "snapshot list $SMALL_VM" "restore list" "vm list"; do
    # shellcheck disable=SC2086 # the words of the command
    after=$(time_ms "$CTL" --bus-address "$ADDR" $what)
    before="-"
    # shellcheck disable=SC2086
    [ -z "$BASELINE" ] || before=$(time_ms "$BASELINE" --bus-address "$ADDR" $what)
    row+=" $before | $after |"
    say "N=$n: $what: $after ms (baseline: $before ms)"
  done
  size=$(gmo_bytes)
  rss=$(rss_mib)
  peak=$(peak_mib)
  rows+=("$row $rss |")
  sizes+=("| $n | $START_STATS | $START_GMO_STATS | $rss_ready | $rss | $peak | $size |")
  say "N=$n: GetManagedObjects $gmo ms, $size bytes"
  stop_daemons
done

echo "Run of bench/list.sh on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores," \
  "load average $(cut -d' ' -f1-3 /proc/loadavg) at the end; median of $RUNS runs, in ms."
echo
echo "| snapshots of \`test\` | GetManagedObjects (busctl) | snapshot list test, baseline | snapshot list test | snapshot list $SMALL_VM ($SMALL), baseline | snapshot list $SMALL_VM | restore list (none), baseline | restore list | vm list (1), baseline | vm list | vmsnapd RSS (MiB) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
echo
echo "Definitions of about $(python3 -c 'import json, sys; print(len(json.loads(sys.argv[1])))' "$DOMAIN_XML") bytes."
echo
echo "| snapshots of \`test\` | start to everything exported (ms) | start to GetManagedObjects done (ms) | vmsnapd RSS then (MiB) | vmsnapd RSS after the listings (MiB) | vmsnapd peak RSS (MiB) | GetManagedObjects reply (bytes) |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${sizes[@]}"
