#!/usr/bin/env python3
"""Prints bench/snapshot.sh's results as markdown tables.

    python3 bench/report.py RESULTS_TSV GUARD_TSV STEPS_TSV BASELINE_TSV HWM_KB RSS_KB CLOCK N
"""

import csv
import math
import statistics
import sys


# "virsh" undoes with blockcommit --wait (which sleeps 500 ms between its checks of the job);
# "virsh-shell" runs the same create, and undoes with one virsh shell process that retries the
# pivot without pausing (bench/virsh_undo.py). Both virsh variants create the same way.
TOOLS = ("vmsnapctl", "virsh", "virsh-shell")
VIRSH = ("virsh", "virsh-shell")


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def values(rows, column, tool=None):
    tools = (tool,) if isinstance(tool, str) else tool
    out = []
    for row in rows:
        if tools is not None and row["tool"] not in tools:
            continue
        try:
            v = float(row[column])
        except (KeyError, ValueError):
            continue
        if not math.isnan(v):
            out.append(v)
    return out


def stats(vs):
    if not vs:
        return "n/a", "n/a", "n/a"
    return f"{statistics.median(vs):.1f}", f"{min(vs):.1f}", f"{max(vs):.1f}"


def median(vs):
    return statistics.median(vs) if vs else float("nan")


def main():
    results_path, guard_path, steps_path, baseline_path, hwm_kb, rss_kb, clock, n = sys.argv[1:9]
    rows = read_tsv(results_path)
    guard = read_tsv(guard_path)
    steps = read_tsv(steps_path)
    baseline = read_tsv(baseline_path)

    print(f"### Snapshot of one running VM with a connected guest agent (N={n} each, ms)")
    print()
    print("| measurement | tool | median | min | max |")
    print("|---|---|---:|---:|---:|")
    metrics = [
        ("create, wall time", "create_ms"),
        ("delete / undo (merge back), wall time", "undo_ms"),
        ("freeze window reported by vmsnapd (freezeDurationMs)", "reported_freeze_ms"),
        ("freeze window seen by the guest (longest blocked write)", "guest_blocked_ms"),
        ("largest gap between guest ticks (cross-check)", "guest_gap_ms"),
    ]
    for label, column in metrics:
        for tool in TOOLS:
            vs = values(rows, column, tool)
            if column == "reported_freeze_ms" and tool != "vmsnapctl":
                continue
            med, lo, hi = stats(vs)
            print(f"| {label} | {tool} | {med} | {lo} | {hi} |")
    hwm_mib = int(hwm_kb) / 1024
    rss_mib = int(rss_kb) / 1024
    print(f"| vmsnapd peak RSS (VmHWM) after the run | vmsnapd | {hwm_mib:.1f} MiB | | |")
    print(f"| vmsnapd RSS (VmRSS) after the run | vmsnapd | {rss_mib:.1f} MiB | | |")
    print()

    ticks = values(rows, "ticks")
    span = values(rows, "span_ms")
    if ticks and span and sum(span) > 0:
        per_tick = sum(span) / max(1, sum(ticks) - len(ticks))
        print(
            f"Guest clock: {clock}; the guest wrote a tick every {per_tick:.2f} ms on average "
            f"({int(sum(ticks))} ticks in all)."
        )
        print()

    print("### Against the targets (medians)")
    print()
    print("| target | vmsnapctl | virsh | ratio vmsnapctl/virsh | limit | met |")
    print("|---|---:|---:|---:|---:|---|")
    for label, column, other, limit, strict in [
        ("create <= 1.1x virsh's (both virsh variants' creates)", "create_ms", VIRSH, 1.1, False),
        ("guest-observed freeze shorter than virsh's (both virsh variants)", "guest_blocked_ms", VIRSH, 1.0, True),
        ("delete of the fresh snapshot <= 1.0x virsh's, without --wait's poll (virsh-shell)", "undo_ms", "virsh-shell", 1.0, False),
        ("delete of the fresh snapshot <= 1.0x virsh's blockcommit --wait (for reference)", "undo_ms", "virsh", 1.0, False),
    ]:
        a = median(values(rows, column, "vmsnapctl"))
        b = median(values(rows, column, other))
        ratio = a / b if b else float("nan")
        met = "yes" if (ratio < limit if strict else ratio <= limit) else "no"
        bound = f"< {limit:.1f}" if strict else f"{limit:.1f}"
        print(f"| {label} | {a:.1f} ms | {b:.1f} ms | {ratio:.2f} | {bound} | {met} |")
    print()
    pairs = {}
    for row in rows:
        pairs.setdefault(row["iter"], {})[row["tool"]] = row
    for column, what, other in [
        ("guest_blocked_ms", "Guest-observed freeze", VIRSH),
        ("create_ms", "Create", VIRSH),
        ("undo_ms", "Delete", ("virsh-shell",)),
    ]:
        diffs = []
        for p in pairs.values():
            theirs = [float(p[t][column]) for t in other if t in p]
            if "vmsnapctl" in p and theirs:
                diffs.append(float(p["vmsnapctl"][column]) - statistics.median(theirs))
        if diffs:
            longer = sum(1 for d in diffs if d > 0)
            print(
                f"- {what}, vmsnapctl minus {'/'.join(other)} (their median) in the same round: "
                f"median {statistics.median(diffs):+.1f} ms (min {min(diffs):+.1f}, max "
                f"{max(diffs):+.1f}); vmsnapctl's was longer in {longer} of {len(diffs)} rounds."
            )
    print()

    print("### Where vmsnapctl's create and delete time goes (from vmsnapd's log, medians, ms)")
    print()
    print("| step | median | min | max |")
    print("|---|---:|---:|---:|")
    step_labels = [
        ("client_to_engine", "create: vmsnapctl start, bus connect, CreateSnapshot call"),
        ("op_start", "create: operation thread start, its own libvirt connection"),
        ("prepare", "create: domain info/XML, block info, 2 record writes, overlay, thaw guard arm"),
        ("plan_prepare", "create: of which reading the VM, the plan and its record, the overlay"),
        ("read_vm", "create: of which reading the VM (state, 2 definitions, parse; guard started)"),
        ("plan_volumes", "create: of which planning each disk's volume (block info, checks)"),
        ("journal_plan", "create: of which the plan's record write (Freezing)"),
        ("overlays", "create: of which the overlays (qemu-img, or written by vmsnapd)"),
        ("arm_wait", "create: of which then waiting for the thaw guard to be armed"),
        ("journal_freezing", "create: of which then the Freezing record (before: a write of its own)"),
        ("frozen_and_disarm", "create: freeze, snapshot, thaw, thaw guard disarm"),
        ("freeze_reported", "create: of which freeze to thaw (freezeDurationMs)"),
        ("disarm_etc", "create: of which after the thaw (guard disarm)"),
        ("finish_to_client", "create: final record write, signals, vmsnapctl prints and exits"),
        ("del_client_to_engine", "delete: vmsnapctl start to vmsnapd starting the delete"),
        ("del_merge", "delete: merge (block commit with pivot), record removal"),
        ("del_check", "delete: of which its session, the check before it, the Deleting record"),
        ("del_scan", "delete: of which the image forest scan before the merge"),
        ("del_job", "delete: of which the block job, until seen ready"),
        ("del_after", "delete: of which the pivot, definitions, rescan, claims, record removal"),
        ("del_finish_to_client", "delete: vmsnapctl notices and exits"),
    ]
    for column, label in step_labels:
        med, lo, hi = stats(values(steps, column))
        print(f"| {label} | {med} | {lo} | {hi} |")
    print()

    print(f"### The thaw guard alone ({len(guard)} runs, ms)")
    print()
    print("| step | median | min | max |")
    print("|---|---:|---:|---:|")
    med, lo, hi = stats(values(guard, "arm_ms"))
    print(f"| arm: spawn vmsnapd --thaw-guard, libvirt connect, lookup, until `ready` | {med} | {lo} | {hi} |")
    med, lo, hi = stats(values(guard, "disarm_ms"))
    print(f"| disarm: write `disarm`, until the guard exited | {med} | {lo} | {hi} |")
    med, lo, hi = stats(values(guard, "disarm_answer_ms"))
    print(f"| disarm: write `disarm`, until its answer `disarmed` (end of file before issue 13) | {med} | {lo} | {hi} |")
    print()

    print(f"### Baselines (ms)")
    print()
    print("| what | median | min | max |")
    print("|---|---:|---:|---:|")
    for what, label in [
        ("virsh", "`virsh domstate VM`: virsh start, libvirt connect, one call"),
        ("vmsnapctl", "`vmsnapctl vm show VM`: vmsnapctl start, bus connect, one read"),
        ("record", "a durable 4 KiB record write as vmsnapd's store does it (write, fsync, rename, fsync dir)"),
    ]:
        vs = [float(r["ms"]) for r in baseline if r["what"] == what]
        med, lo, hi = stats(vs)
        print(f"| {label} | {med} | {lo} | {hi} |")
    print()

    print("### Every run (ms)")
    print()
    print("| # | tool | create | delete/undo | reported freeze | guest blocked write | guest tick gap |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        reported = row["reported_freeze_ms"] if row["reported_freeze_ms"] != "nan" else ""
        print(
            f"| {row['iter']} | {row['tool']} | {row['create_ms']} | {row['undo_ms']} | {reported} "
            f"| {float(row['guest_blocked_ms']):.1f} | {float(row['guest_gap_ms']):.1f} |"
        )


if __name__ == "__main__":
    main()
