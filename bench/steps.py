#!/usr/bin/env python3
"""Splits each vmsnapctl create and delete of bench/snapshot.sh into steps, from vmsnapd's log.

    python3 bench/steps.py VMSNAPD_LOG RESULTS_TSV > steps.tsv

The log lines used (tracing's RFC 3339 timestamps, microseconds, same clock as the host-side
EPOCHREALTIME stamps in RESULTS_TSV; `snapshot=NAME` names the snapshot):
  creating snapshot                  the engine accepted CreateSnapshot
  reading the VM definition          the operation thread has its own libvirt connection
  read the VM (debug)                its state, both definitions, parsed; the guard started
  planned the volumes (debug)        each disk's volume planned (block info, path checks)
  journaled the plan (debug)         the record with the plan is on disk
  prepared the disks (debug)         the overlays are made
  armed the thaw guard (debug)       the guard (started while planning) answered `armed`
  freezing the guest's filesystems   the Freezing record is written; FSFreeze is next
  thawed the guest's filesystems     FSThaw returned and the guard was disarmed
  deleting snapshot / merging disk / snapshot deleted
Prints one row per snapshot: the step durations in ms (see COLUMNS).
"""

import csv
import re
import sys
from datetime import datetime, timezone

COLUMNS = [
    # create
    "client_to_engine",  # vmsnapctl start + bus connect + CreateSnapshot -> "creating snapshot"
    "op_start",  # "creating snapshot" -> "reading the VM definition" (thread, libvirt connect)
    "prepare",  # -> "freezing": domain info/XML, block info, 2 record writes, thaw guard arm
    "plan_prepare",  # "reading" -> "prepared the disks" (nan before these lines existed)
    "read_vm",  # "reading" -> "read the VM"
    "plan_volumes",  # -> "planned the volumes"
    "journal_plan",  # -> "journaled the plan"
    "overlays",  # -> "prepared the disks"
    "arm_wait",  # "prepared the disks" -> "armed the thaw guard"
    "journal_freezing",  # "armed the thaw guard" -> "freezing"
    "frozen_and_disarm",  # -> "thawed": freeze + snapshot + thaw + thaw guard disarm
    "freeze_reported",  # freezeDurationMs (freeze start -> thaw returned)
    "disarm_etc",  # frozen_and_disarm - freeze_reported: mostly the guard's disarm
    "finish_to_client",  # "thawed" -> vmsnapctl exited (record write, signal, client prints)
    # delete
    "del_client_to_engine",  # vmsnapctl start -> "deleting snapshot"
    "del_merge",  # "deleting snapshot" -> "snapshot deleted" (block commit with pivot)
    "del_check",  # "deleting snapshot" -> "releasing disk": session, check_release, record
    "del_scan",  # "releasing disk" -> "merging disk": the image forest scan
    "del_job",  # "merging disk" -> its last progress line: the block job until seen ready
    "del_after",  # -> "snapshot deleted": pivot, definitions, rescan, claims, record removal
    "del_finish_to_client",  # "snapshot deleted" -> vmsnapctl exited
]

LINE = re.compile(r"^(\S+)\s+(\w+)\s+(.*?)\s+vm=\S+\s+snapshot=(\S+)")


def stamp_us(text):
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def main():
    log_path, results_path = sys.argv[1], sys.argv[2]
    events = {}  # snapshot name -> {message: first time (us)}
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            m = LINE.match(line)
            if not m:
                continue
            try:
                t = stamp_us(m.group(1))
            except ValueError:
                continue
            message = m.group(3)
            if message.startswith("merging disk"):
                # The last progress line of the merge: the job was seen ready (or done).
                events.setdefault(m.group(4), {})["merging disk, last"] = t
                message = "merging disk"
            if message.startswith("releasing disk"):
                message = "releasing disk"
            events.setdefault(m.group(4), {}).setdefault(message, t)

    print("\t".join(["iter"] + COLUMNS))
    with open(results_path, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["tool"] != "vmsnapctl":
                continue
            e = events.get(f"bench-{row['iter']}", {})
            c0, c1 = int(row["c0_us"]), int(row["c1_us"])
            d0, d1 = int(row["d0_us"]), int(row["d1_us"])

            def span(a, b):
                if a is None or b is None:
                    return "nan"
                return f"{(b - a) / 1000:.1f}"

            creating = e.get("creating snapshot")
            reading = e.get("reading the VM definition")
            freezing = e.get("freezing the guest's filesystems")
            prepared = e.get("prepared the disks")
            armed = e.get("armed the thaw guard")
            thawed = e.get("thawed the guest's filesystems")
            deleting = e.get("deleting snapshot")
            deleted = e.get("snapshot deleted")
            try:
                reported = float(row["reported_freeze_ms"])
            except ValueError:
                reported = float("nan")
            frozen = span(freezing, thawed)
            disarm = "nan" if frozen == "nan" else f"{float(frozen) - reported:.1f}"
            print(
                "\t".join(
                    [
                        row["iter"],
                        span(c0, creating),
                        span(creating, reading),
                        span(reading, freezing),
                        span(reading, prepared),
                        span(reading, e.get("read the VM")),
                        span(e.get("read the VM"), e.get("planned the volumes")),
                        span(e.get("planned the volumes"), e.get("journaled the plan")),
                        span(e.get("journaled the plan"), prepared),
                        span(prepared, armed),
                        span(armed, freezing),
                        frozen,
                        f"{reported:.1f}",
                        disarm,
                        span(thawed, c1),
                        span(d0, deleting),
                        span(deleting, deleted),
                        span(deleting, e.get("releasing disk")),
                        span(e.get("releasing disk"), e.get("merging disk")),
                        span(e.get("merging disk"), e.get("merging disk, last")),
                        span(e.get("merging disk, last"), deleted),
                        span(deleted, d1),
                    ]
                )
            )


if __name__ == "__main__":
    main()
