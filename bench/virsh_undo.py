#!/usr/bin/env python3
"""Undoes a virsh disk-only snapshot without `virsh blockcommit --wait`'s 500 ms poll.

    python3 bench/virsh_undo.py URI VM DISK OVERLAY

`virsh blockcommit VM DISK --active --pivot --wait` checks the job, and if it is not ready yet
sleeps 500 ms before it checks again: a merge that is ready after 5 ms costs about 540 ms, one
that is ready at the first check about 40 ms (BENCHMARKS.md). That measures virsh's sleep, not
libvirt. This does the same libvirt work with virsh, but as fast as a client can: ONE virsh
process (its shell on stdin, so one start and one libvirt connection, as vmsnapctl has one
process and one bus connection) runs `blockcommit VM DISK --active` (starts the job), then
`blockjob VM DISK --pivot` again and again, with no pause, until libvirt accepts it (it refuses
with "not ready for pivot yet" until the job is ready; accepted, it returns once the disk has
pivoted), then `quit`; then the overlay is removed, as in the --wait variant.

Prints "<start us> <end us> <pivot attempts>", wall-clock microseconds (the same clock as bash's
EPOCHREALTIME), taken just before virsh is started and just after the overlay is removed, so
virsh's start, connection and exit are inside, as they are for `virsh blockcommit --wait`.
"""

import os
import re
import subprocess
import sys
import time


def now_us():
    return time.time_ns() // 1000


class Shell:
    """virsh's interactive shell on pipes; each command is followed by `echo TOKEN`, whose
    output (not its echoed command line) marks the end of the command's output."""

    def __init__(self, uri):
        self.proc = subprocess.Popen(
            ["virsh", "-q", "-c", uri],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            bufsize=0,
        )
        self.n = 0

    def run(self, command):
        self.n += 1
        token = f"__bench_done_{self.n}__"
        self.proc.stdin.write(f"{command}\necho {token}\n".encode())
        self.proc.stdin.flush()
        done = re.compile(r"(?<!echo )" + re.escape(token))
        buf = ""
        while not done.search(buf):
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise SystemExit(f"virsh exited during {command!r}: {buf!r}")
            buf += chunk.decode(errors="replace")
        out = buf[: done.search(buf).start()]
        errors = [l for l in out.splitlines() if "error:" in l]
        return "\n".join(errors)

    def quit(self):
        self.proc.stdin.write(b"quit\n")
        self.proc.stdin.close()
        self.proc.stdout.read()
        return self.proc.wait(timeout=30)


def main():
    uri, vm, disk, overlay = sys.argv[1:5]
    t0 = now_us()
    shell = Shell(uri)
    error = shell.run(f"blockcommit {vm} {disk} --active")
    if error:
        raise SystemExit(f"blockcommit: {error}")
    attempts = 0
    deadline = time.monotonic() + 60
    while True:
        attempts += 1
        error = shell.run(f"blockjob {vm} {disk} --pivot")
        if not error:
            break
        if "not ready for pivot" not in error or time.monotonic() > deadline:
            raise SystemExit(f"pivot: {error}")
    if shell.quit() != 0:
        raise SystemExit("virsh did not exit 0")
    os.remove(overlay)
    t1 = now_us()
    print(t0, t1, attempts)


if __name__ == "__main__":
    main()
