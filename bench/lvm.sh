#!/usr/bin/env bash
# LVM benchmark: snapshot, restore and delete of thin LVs of 64 MiB and 4 GiB and of a thick LV
# of 256 MiB (with 8 MiB and with 32 MiB changed), timed by vmsnap-lvm itself, in one run inside
# a scratch LVM guest.
#   bash bench/lvm.sh           (as root, on the lab; a few minutes plus the build)
# Environment: BENCH_N rounds (default 5), BENCH_KEEP=DIR keeps the guest's raw output in DIR.
#
# What it does (BENCHMARKS.md, section "LVM", explains the method and shows a run):
#  - builds vmsnap-lvm-selftest (cargo build --release -p vmsnap-lvm) and checks the lab guest
#    kernel and initramfs exist (lab/up.sh or lab/build-guest.sh makes them);
#  - makes a data disk holding the binary (lab/make-data-disk.sh) and defines a scratch TCG VM
#    vmsnap-bench-lvm-<pid> the way tests/tests/guests/lvm_selftest.rs does (1 vCPU, 192 MiB,
#    the lab's kernel and initramfs, a guest agent channel) plus a raw, sparse 2 GiB disk vdb;
#  - starts it, waits for the agent and /mnt/data, and runs
#    `vmsnap-lvm-selftest --bench N /dev/vdb` in the guest through lab/guest-exec.sh;
#  - prints the guest's output (ROUND/INFO lines, the markdown table, RATIO) on stdout;
#  - on exit, whatever happened, destroys and undefines the VM and removes its directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
N=${BENCH_N:-5}
URI=qemu:///system
LAB_DIR=${VMSNAP_LAB_DIR:-/var/lib/vmsnap-lab}
VM=vmsnap-bench-lvm-$$
BIN=vmsnap-lvm-selftest
export LIBVIRT_DEFAULT_URI=$URI

say() { echo "bench: $*" >&2; }
die() { echo "bench: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"
[[ $N =~ ^[1-9][0-9]*$ ]] || die "BENCH_N must be a positive number"
[ -s "$LAB_DIR/guest/vmlinuz" ] && [ -s "$LAB_DIR/guest/initrd.gz" ] ||
  die "no lab guest in $LAB_DIR/guest: run lab/up.sh first"

work=""
defined=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  if [ -n "$defined" ]; then
    virsh destroy "$VM" >/dev/null 2>&1
    virsh undefine "$VM" >/dev/null 2>&1
  fi
  if [ -n "$work" ] && [ -d "$work" ]; then
    if [ -n "${BENCH_KEEP:-}" ]; then
      mkdir -p "$BENCH_KEEP" && cp -a "$work/out.txt" "$work/console.log" "$BENCH_KEEP/" 2>/dev/null
    fi
    rm -rf -- "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say "building $BIN"
cargo build --release -p vmsnap-lvm >&2
binary=$ROOT/target/release/$BIN
[ -x "$binary" ] || die "no $binary after the build"

work=$(mktemp -d "$LAB_DIR/$VM-XXXXXX")
mkdir "$work/seed"
cp "$binary" "$work/seed/$BIN"
bash lab/make-data-disk.sh "$work/vda.qcow2" 64M "$work/seed"
truncate -s 2G "$work/vdb.raw"

cat >"$work/domain.xml" <<EOF
<domain type='qemu'><name>$VM</name><memory unit='MiB'>192</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type><kernel>$LAB_DIR/guest/vmlinuz</kernel>
<initrd>$LAB_DIR/guest/initrd.gz</initrd><cmdline>console=ttyS0 quiet</cmdline></os>
<features><acpi/></features><cpu mode='custom' match='exact'><model>qemu64</model></cpu>
<on_poweroff>destroy</on_poweroff><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$work/vda.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw' cache='unsafe'/>
<source file='$work/vdb.raw'/><target dev='vdb' bus='virtio'/></disk>
<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
<serial type='file'><source path='$work/console.log'/><target port='0'/></serial>
<video><model type='none'/></video><memballoon model='none'/></devices></domain>
EOF
virsh define "$work/domain.xml" >/dev/null
defined=1
say "starting $VM"
virsh start "$VM" >/dev/null

deadline=$((SECONDS + 180))
until virsh qemu-agent-command --timeout 5 "$VM" '{"execute":"guest-ping"}' >/dev/null 2>&1; do
  [ $SECONDS -lt $deadline ] || die "the guest agent of $VM did not answer in 180 s"
  sleep 1
done
until GUEST_EXEC_TIMEOUT=20 bash lab/guest-exec.sh "$VM" "grep -q ' /mnt/data ' /proc/mounts" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || die "/mnt/data is not mounted in $VM"
  sleep 1
done
say "guest ready ($(bash lab/guest-exec.sh "$VM" 'uname -r'), load $(cut -d' ' -f1-3 /proc/loadavg)); running $N rounds"

set +e
GUEST_EXEC_TIMEOUT=1800 bash lab/guest-exec.sh "$VM" \
  "chmod 755 /mnt/data/$BIN && /mnt/data/$BIN --bench $N /dev/vdb 2>&1" >"$work/out.txt"
code=$?
set -e
say "done (exit $code, load $(cut -d' ' -f1-3 /proc/loadavg))"
cat "$work/out.txt"
grep -qx 'BENCH PASS' "$work/out.txt" && [ "$code" = 0 ] || die "the bench failed in the guest (exit $code)"
