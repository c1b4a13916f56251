#!/usr/bin/env bash
# The demo, from a fresh Debian 12 machine (as root): brings the lab up, builds vmsnap, starts
# vmsnapd against the lab's libvirtd on the lab's private bus, and shows what it sees.
# vmsnapd keeps running afterwards (pid in $VMSNAP_LAB_DIR/vmsnapd.pid, log in vmsnapd.log);
# lab/down.sh stops it with the rest of the lab.
set -euo pipefail
cd "$(dirname "$0")/.."

bash lab/up.sh
cargo build --workspace --release --locked --quiet
# shellcheck source=lab/env.sh
source lab/env.sh

pid_file=$VMSNAP_LAB_DIR/vmsnapd.pid
if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
  kill "$(cat "$pid_file")"
  for _ in $(seq 100); do kill -0 "$(cat "$pid_file")" 2>/dev/null || break; sleep 0.1; done
fi
target/release/vmsnapd --bus-address "$VMSNAP_BUS_ADDRESS" >"$VMSNAP_LAB_DIR/vmsnapd.log" 2>&1 &
echo $! >"$pid_file"
for _ in $(seq 100); do
  target/release/vmsnapctl vm list >/dev/null 2>&1 && break
  sleep 0.1
done

echo "vmsnapd is running (pid $(cat "$pid_file")), serving on $VMSNAP_BUS_ADDRESS"
echo
echo "\$ vmsnapctl vm list"
target/release/vmsnapctl vm list
echo
echo "\$ vmsnapctl vm show vmsnap-lab-mixed"
target/release/vmsnapctl vm show vmsnap-lab-mixed
echo
echo "Try more with: source lab/env.sh; target/release/vmsnapctl --help"
