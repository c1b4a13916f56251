#!/usr/bin/env bash
# Runs a shell command inside a lab guest through the QEMU guest agent:
#   lab/guest-exec.sh VM COMMAND...
# The words of COMMAND are joined with spaces and run with /bin/sh -c in the guest. Prints the
# guest's stdout on stdout and its stderr on stderr; exits with the guest command's exit code
# (128+N if it died of signal N). Waits at most $GUEST_EXEC_TIMEOUT seconds (default 60; exit
# 124 on timeout). Uses virsh qemu-agent-command (URI: $LIBVIRT_DEFAULT_URI or qemu:///system).
set -euo pipefail

if [ $# -lt 2 ]; then
  echo "usage: $0 VM COMMAND..." >&2
  exit 2
fi
vm=$1; shift
cmd="$*"
uri=${LIBVIRT_DEFAULT_URI:-qemu:///system}
limit=${GUEST_EXEC_TIMEOUT:-60}
py=python3
[ -x /usr/bin/python3 ] && py=/usr/bin/python3

agent() { virsh -c "$uri" qemu-agent-command --timeout 10 "$vm" "$1"; }

request=$("$py" -c 'import json, sys
print(json.dumps({"execute": "guest-exec", "arguments": {
    "path": "/bin/sh", "arg": ["-c", sys.argv[1]], "capture-output": True}}))' "$cmd")
reply=$(agent "$request") || { echo "guest-exec.sh: guest-exec failed on $vm" >&2; exit 125; }
pid=$("$py" -c 'import json, sys; print(json.load(sys.stdin)["return"]["pid"])' <<<"$reply")

deadline=$((SECONDS + limit))
delay=0.05
while :; do
  status=$(agent "{\"execute\":\"guest-exec-status\",\"arguments\":{\"pid\":$pid}}") ||
    { echo "guest-exec.sh: guest-exec-status failed on $vm" >&2; exit 125; }
  # Line 1: exited (true/false); line 2: exit code; line 3: stdout base64; line 4: stderr base64.
  parsed=$("$py" -c 'import json, sys
r = json.load(sys.stdin)["return"]
code = r.get("exitcode", 0)
if "signal" in r:
    code = 128 + r["signal"]
print("true" if r.get("exited") else "false")
print(code)
print(r.get("out-data", ""))
print(r.get("err-data", ""))
if r.get("out-truncated") or r.get("err-truncated"):
    print("guest-exec.sh: the guest output was truncated", file=sys.stderr)' <<<"$status")
  mapfile -t f <<<"$parsed"
  exited=${f[0]:-} code=${f[1]:-1} out=${f[2]:-} err=${f[3]:-}
  if [ "$exited" = true ]; then
    [ -n "$out" ] && base64 -d <<<"$out"
    [ -n "$err" ] && base64 -d <<<"$err" >&2
    exit "$code"
  fi
  if [ $SECONDS -ge $deadline ]; then
    echo "guest-exec.sh: '$cmd' still running on $vm after ${limit}s (guest pid $pid)" >&2
    exit 124
  fi
  sleep "$delay"
  delay=0.2
done
