#!/usr/bin/env python3
"""Helpers for bench/rbd.sh.

    python3 bench/rbd_report.py sum FILE
        Prints "BLOCKS SHA256": the number of non-zero 1 MiB blocks of FILE and a SHA-256 of its
        size and of each non-zero block with its offset. Only the data extents are read
        (SEEK_DATA), so a sparse 64 GiB export takes as long as its data; two files with the same
        content give the same sum whatever their allocation.

    python3 bench/rbd_report.py report RESULTS CHECKS VMSNAPD_LOG RBD_TRACE NOTES HWM_KB RETRIES KEPT
        Markdown tables on stdout.

RESULTS rows: variant, size (1g/64g), iter, ms, t0_us, t1_us (host EPOCHREALTIME around the
command), extra. Variants:
  nosafety            vmsnapctl restore VM base --no-safety-snapshot --output json
  safety              vmsnapctl restore VM base --output json (takes the safety snapshot first)
  hand                by hand: rbd clone SNAP NEW + virsh define (extra: clone_ms)
  rollback            rbd snap rollback SNAP of the VM's original image (object map)
  rollback_nomap      the same on an image without object map
  snapshot_setup      vmsnapctl snapshot create VM base (offline), once
  safety_delete       vmsnapctl snapshot delete VM pre-restore-... after each safety restore
  snap_create/delete  vmsnapctl snapshot create/delete (offline)
  rbd_snap_create/rm  rbd snap create/rm by hand
  trace_*             the same vmsnapctl commands with vmsnapd's rbd behind a logging wrapper
CHECKS rows: size, what, expected, got, ok. RBD_TRACE rows: t0_us, t1_us, exit status, arguments.
NOTES: what the script found odd, one a line.
vmsnapd's restores are split into steps from its log (RFC 3339 UTC stamps, the same clock as the
host stamps): the log lines inside each command's [t0, t1] window.
"""

import csv
import hashlib
import os
import re
import statistics
import sys
from collections import Counter
from datetime import datetime, timezone

SIZES = ["1g", "64g"]
TARGET = 1.2
BLOCK = 1 << 20

LABELS = {
    "nosafety": "vmsnapctl restore --no-safety-snapshot",
    "safety": "vmsnapctl restore (with the safety snapshot)",
    "hand": "by hand: rbd clone + virsh define (the floor)",
    "rollback": "by hand: rbd snap rollback (image with object map)",
    "rollback_nomap": "by hand: rbd snap rollback (image without object map)",
    "snap_create": "vmsnapctl snapshot create (offline)",
    "rbd_snap_create": "by hand: rbd snap create",
    "snap_delete": "vmsnapctl snapshot delete",
    "rbd_snap_rm": "by hand: rbd snap rm",
    "safety_delete": "vmsnapctl snapshot delete of the safety snapshot (after each safety restore)",
    "snapshot_setup": "vmsnapctl snapshot create `base` (offline, setup, once)",
    "trace_restore": "vmsnapctl restore --no-safety-snapshot",
    "trace_snap_create": "vmsnapctl snapshot create (offline)",
    "trace_snap_delete": "vmsnapctl snapshot delete",
}


def content_sum(path):
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    blocks = 0
    zero = bytes(BLOCK)
    with open(path, "rb") as f:
        fd = f.fileno()
        pos = 0
        done = -1  # last block hashed: extents may share a block
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break  # only a hole is left
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for b in range(start // BLOCK, (end + BLOCK - 1) // BLOCK):
                if b <= done:
                    continue
                data = os.pread(fd, BLOCK, b * BLOCK)
                done = b
                if data == zero[: len(data)]:
                    continue
                h.update(b.to_bytes(8, "little"))
                h.update(data)
                blocks += 1
            pos = end
    return f"{blocks} {h.hexdigest()}"


LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\S+Z)\s+(\w+)\s+(.+?)(?:\s+[a-z_]+=.*)?$")


def stamp_us(text):
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def read_log(path):
    events, problems = [], Counter()
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            line = line.rstrip("\n")
            m = LINE.match(line)
            if not m:
                continue
            if m.group(2) in ("WARN", "ERROR"):
                problems[f"{m.group(2)} {line.split(m.group(2), 1)[1].strip()[:300]}"] += 1
            try:
                events.append((stamp_us(m.group(1)), m.group(3)))
            except ValueError:
                continue
    return events, problems


def fmt(v):
    return "" if v is None else f"{v:.1f}"


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


# The rbd subcommand of a traced call: its arguments without the options vmsnapd always passes.
VALUED = {"--conf", "-c", "--mon-host", "-m", "--id", "--keyfile", "--format"}


def subcommand(args):
    words, skip = [], False
    for w in args.split():
        if skip:
            skip = False
            continue
        if w in VALUED:
            skip = True
            continue
        if w.startswith("-"):
            continue
        words.append(w)
    if not words:
        return "?"
    return " ".join(words[:2]) if words[0] == "snap" else words[0]


def report(argv):
    results_path, checks_path, log_path, trace_path, notes_path, hwm_kb, retries, kept = argv
    with open(results_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        r["ms"] = float(r["ms"])
        r["t0"], r["t1"] = int(r["t0_us"]), int(r["t1_us"])
        r["extra_d"] = dict(kv.split("=", 1) for kv in (r.get("extra") or "").split(";") if "=" in kv)
    with open(checks_path, encoding="utf-8") as f:
        checks = list(csv.DictReader(f, delimiter="\t"))
    events, problems = read_log(log_path)
    trace = []
    with open(trace_path, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t", 3)
            if len(parts) == 4:
                trace.append((int(parts[0]), int(parts[1]), parts[2], subcommand(parts[3])))

    def times(variant, size):
        return [r["ms"] for r in rows if r["variant"] == variant and r["size"] == size]

    def table(title, variants):
        print(f"### {title}")
        print()
        print("| variant | disk | N | median | min | max |")
        print("|---|---|---:|---:|---:|---:|")
        for variant in variants:
            for size in SIZES:
                t = times(variant, size)
                if t:
                    med, lo, hi = stats(t)
                    print(f"| {LABELS[variant]} | {size.upper()} | {len(t)} | {fmt(med)} | {fmt(lo)} | {fmt(hi)} |")
        print()

    restores = ["nosafety", "safety", "hand", "rollback", "rollback_nomap"]
    table("Restore of a shut-off VM with one RBD disk, 256 MiB written (ms)", restores)

    print("### Against the target: 64G within 1.2x of 1G (medians)")
    print()
    print("| variant | 1G | 64G | ratio 64G/1G | limit | met |")
    print("|---|---:|---:|---:|---:|---|")
    for variant in restores:
        a, b = stats(times(variant, "1g"))[0], stats(times(variant, "64g"))[0]
        if a is None or b is None:
            continue
        ratio = b / a
        print(f"| {LABELS[variant]} | {a:.1f} ms | {b:.1f} ms | {ratio:.2f} | {TARGET} | {'yes' if ratio <= TARGET else 'no'} |")
    print()
    for variant in restores:
        by_iter = {}
        for r in rows:
            if r["variant"] == variant:
                by_iter.setdefault(r["iter"], {})[r["size"]] = r["ms"]
        ratios = [v["64g"] / v["1g"] for v in by_iter.values() if "1g" in v and "64g" in v]
        if ratios:
            med, lo, hi = stats(ratios)
            print(f"- {LABELS[variant]}: 64G/1G in the same round, median {med:.2f} (min {lo:.2f}, "
                  f"max {hi:.2f}); 64G slower in {sum(1 for x in ratios if x > 1)} of {len(ratios)} rounds.")
    print()

    table("Snapshot create and delete (ms)",
          ["snap_create", "rbd_snap_create", "snap_delete", "rbd_snap_rm", "safety_delete", "snapshot_setup"])
    print("| vmsnapctl against by hand (medians, both sizes) | vmsnapctl | by hand | ratio |")
    print("|---|---:|---:|---:|")
    for ours, theirs, label in [
        ("nosafety", "hand", "restore --no-safety-snapshot / rbd clone + virsh define"),
        ("snap_create", "rbd_snap_create", "snapshot create / rbd snap create"),
        ("snap_delete", "rbd_snap_rm", "snapshot delete / rbd snap rm"),
    ]:
        a = stats([r["ms"] for r in rows if r["variant"] == ours])[0]
        b = stats([r["ms"] for r in rows if r["variant"] == theirs])[0]
        if a is not None and b is not None:
            print(f"| {label} | {a:.1f} ms | {b:.1f} ms | {a / b:.2f} |")
    print()

    # --- vmsnapd's steps
    steps = [
        ("client_to_engine", "vmsnapctl start, bus, Restore call, libvirt is-running check -> `restoring`"),
        ("prepare", "operation thread, libvirt connection, checks (the RBD snapshot is there: `rbd snap ls`), record -> `creating the new disk overlays`"),
        ("of_which_safety", "of which the safety snapshot (`taking the safety snapshot` -> `creating the new disk overlays`)"),
        ("stage", "`rbd info` of the clone's name, `rbd clone` -> `defining the VM`"),
        ("define", "define, scan, release of the old disk -> `restored`"),
        ("finish", "record write, signals, vmsnapctl reads, prints and exits"),
    ]
    per = {}
    for r in rows:
        if r["variant"] not in ("nosafety", "safety"):
            continue
        first = {}
        for t, m in events:
            if r["t0"] <= t <= r["t1"]:
                key = "taking the safety snapshot" if m.startswith("taking the safety snapshot") else m
                first.setdefault(key, t)

        def span(a, b):
            return None if a is None or b is None else (b - a) / 1000

        restoring, staging = first.get("restoring"), first.get("creating the new disk overlays")
        defining, restored = first.get("defining the VM"), first.get("restored")
        safety = first.get("taking the safety snapshot")
        d = per.setdefault((r["variant"], r["size"]), {k: [] for k, _ in steps})
        d["client_to_engine"].append(span(r["t0"], restoring))
        d["prepare"].append(span(restoring, staging))
        d["of_which_safety"].append(span(safety, staging) if safety else None)
        d["stage"].append(span(staging, defining))
        d["define"].append(span(defining, restored))
        d["finish"].append(span(restored, r["t1"]))
    if per:
        cols = [(v, s) for v in ("nosafety", "safety") for s in SIZES if (v, s) in per]
        print("### Where vmsnapctl restore's time goes (from vmsnapd's log, medians, ms)")
        print()
        print("| step | " + " | ".join(f"{'no safety' if v == 'nosafety' else 'safety'} {s.upper()}" for v, s in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for key, label in steps:
            cells = [fmt(stats(per[c][key])[0]) for c in cols]
            if any(cells):
                print(f"| {label} | " + " | ".join(cells) + " |")
        print()

    # --- the rbd commands vmsnapd ran (traced rounds)
    traced = [r for r in rows if r["variant"].startswith("trace_")]
    if traced:
        print("### The rbd commands vmsnapd runs (traced rounds, medians, ms)")
        print()
        print("| operation | disk | N | wall time | rbd commands | time in rbd | commands in order (median ms each) |")
        print("|---|---|---:|---:|---:|---:|---|")
        for variant in ["trace_restore", "trace_snap_create", "trace_snap_delete"]:
            for size in SIZES:
                sel = [r for r in traced if r["variant"] == variant and r["size"] == size]
                if not sel:
                    continue
                counts, sums, seqs = [], [], []
                for r in sel:
                    calls = [c for c in trace if r["t0"] <= c[0] and c[1] <= r["t1"]]
                    counts.append(len(calls))
                    sums.append(sum(c[1] - c[0] for c in calls) / 1000)
                    seqs.append([(c[3], (c[1] - c[0]) / 1000, c[2]) for c in calls])
                # The order of the first run, each command's median over the runs that ran it alike.
                order = [name for name, _, _ in seqs[0]]
                cells = []
                for k, name in enumerate(order):
                    vals = [s[k][1] for s in seqs if len(s) > k and s[k][0] == name]
                    failed = sum(1 for s in seqs if len(s) > k and s[k][0] == name and s[k][2] != "0")
                    cells.append(f"{name} {statistics.median(vals):.0f}" + (f" (exit≠0 in {failed})" if failed else ""))
                print(f"| {LABELS[variant]} | {size.upper()} | {len(sel)} | {fmt(stats([r['ms'] for r in sel])[0])} "
                      f"| {statistics.median(counts):.0f} | {fmt(stats(sums)[0])} | {', '.join(cells)} |")
        print()
        # One rbd process on its own, by hand, for comparison: the by-hand rows above.

    # --- checks and the rest
    print("### Checks")
    print()
    for c in checks:
        blocks = c["got"].split()[0]
        print(f"- {c['size'].upper()}: {c['what']}: {'equal to' if c['ok'] == 'yes' else 'DIFFERENT from'} "
              f"the snapshot's export ({blocks} non-zero MiB blocks, sha256 {c['got'].split()[-1][:12]}...).")
    print(f"- Images a vmsnapctl restore replaced and vmsnapd kept in the pool (the script removed them): {kept}.")
    print(f"- vmsnapctl commands run again (busy / libvirt unavailable): {retries}.")
    with open(notes_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                print(f"- Odd: {line.strip()}")
    print(f"- vmsnapd's peak RSS (VmHWM, largest of its processes): {int(hwm_kb) / 1024:.1f} MiB.")
    if problems:
        print("- WARN/ERROR lines in vmsnapd's log:")
        for text, n in problems.most_common():
            print(f"  - {n}x `{text}`")
    else:
        print("- No WARN or ERROR line in vmsnapd's log.")
    print()

    print("### Every run (ms)")
    print()
    cols = ["nosafety", "hand", "rollback", "rollback_nomap", "safety", "safety_delete",
            "snap_create", "rbd_snap_create", "snap_delete", "rbd_snap_rm"]
    print("| # | disk | restore --no-safety | clone + define | rollback | rollback, no object map "
          "| restore with safety | safety delete | snapshot create | rbd snap create | snapshot delete | rbd snap rm |")
    print("|---:|---|" + "---:|" * len(cols))
    iters = sorted({int(r["iter"]) for r in rows if r["variant"] in cols})
    for i in iters:
        for size in SIZES:
            cells = []
            for variant in cols:
                v = [r["ms"] for r in rows if r["variant"] == variant and r["size"] == size and int(r["iter"]) == i]
                cells.append(fmt(v[0]) if v else "")
            print(f"| {i} | {size.upper()} | " + " | ".join(cells) + " |")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "sum":
        print(content_sum(sys.argv[2]))
    elif len(sys.argv) == 10 and sys.argv[1] == "report":
        report(sys.argv[2:])
    else:
        sys.exit("usage: rbd_report.py sum FILE | report RESULTS CHECKS LOG TRACE NOTES HWM_KB RETRIES KEPT")


if __name__ == "__main__":
    main()
