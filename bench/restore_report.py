#!/usr/bin/env python3
"""Markdown tables for bench/restore.sh.

    python3 bench/restore_report.py RESULTS_TSV AUX_TSV VMSNAPD_LOG HWM_KB

RESULTS_TSV rows: variant, size (1g/64g), iter, ms, t0_us, t1_us (host EPOCHREALTIME around the
command), extra. Variants:
  nosafety       vmsnapctl restore VM base --no-safety-snapshot --output json
  safety         vmsnapctl restore VM base --output json (takes the safety snapshot first)
  overlay        by hand: qemu-img create -b SNAPSHOT_IMAGE, virsh define, rm of the old top
  convert        by hand: qemu-img convert SNAPSHOT_IMAGE into a standalone image, define, rm
  snapshot       vmsnapctl snapshot create VM base (offline), once
  safety_delete  vmsnapctl snapshot delete VM pre-restore-... after each safety restore
vmsnapd's restores are split into steps from its log (tracing's RFC 3339 UTC timestamps, the same
clock as the host stamps): the log lines inside each command's [t0, t1] window.
"""

import csv
import re
import statistics
import sys
from datetime import datetime, timezone

SIZES = ["1g", "64g"]
TARGET = 1.2

LABELS = {
    "nosafety": "vmsnapctl restore --no-safety-snapshot",
    "safety": "vmsnapctl restore (with the safety snapshot)",
    "overlay": "by hand: qemu-img create (overlay) + virsh define + rm",
    "convert": "by hand: qemu-img convert (full copy) + virsh define + rm",
    "snapshot": "vmsnapctl snapshot create, offline (setup, once)",
    "safety_delete": "vmsnapctl snapshot delete of the safety snapshot (after each)",
}

LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\S+Z)\s+\w+\s+(.+?)(?:\s+[a-z_]+=.*)?$")


def stamp_us(text):
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


def read_log(path):
    events = []
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            m = LINE.match(line.rstrip("\n"))
            if not m:
                continue
            try:
                events.append((stamp_us(m.group(1)), m.group(2)))
            except ValueError:
                continue
    return events


def fmt(v):
    return "" if v is None else f"{v:.1f}"


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None, None
    return statistics.median(values), min(values), max(values)


def main():
    results_path, aux_path, log_path, hwm_kb = sys.argv[1:5]
    with open(results_path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    for r in rows:
        r["ms"] = float(r["ms"])
        r["t0"], r["t1"] = int(r["t0_us"]), int(r["t1_us"])
        r["extra_d"] = dict(
            kv.split("=", 1) for kv in (r.get("extra") or "").split(";") if "=" in kv
        )
    aux = {}
    with open(aux_path, encoding="utf-8") as f:
        for r in csv.DictReader(f, delimiter="\t"):
            aux.setdefault(r["what"], []).append(float(r["ms"]))
    events = read_log(log_path)

    def times(variant, size):
        return [r["ms"] for r in rows if r["variant"] == variant and r["size"] == size]

    # --- main table
    print("### Restore of a shut-off VM with one qcow2 disk, 256 MiB written (ms)")
    print()
    print("| variant | disk | N | median | min | max | runs over 500 ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for variant in ["nosafety", "safety", "overlay", "convert", "snapshot", "safety_delete"]:
        for size in SIZES:
            t = times(variant, size)
            if not t:
                continue
            med, lo, hi = stats(t)
            slow = sum(1 for x in t if x > 500)
            print(f"| {LABELS[variant]} | {size.upper()} | {len(t)} | {fmt(med)} | {fmt(lo)} | {fmt(hi)} | {slow} |")
    print()

    # --- against the target
    print("### Against the target: 64G within 1.2x of 1G (medians)")
    print()
    print("| variant | 1G | 64G | ratio 64G/1G | limit | met |")
    print("|---|---:|---:|---:|---:|---|")
    for variant in ["nosafety", "safety", "overlay", "convert"]:
        a, b = stats(times(variant, "1g"))[0], stats(times(variant, "64g"))[0]
        if a is None or b is None:
            continue
        ratio = b / a
        met = "yes" if ratio <= TARGET else "no"
        print(f"| {LABELS[variant]} | {a:.1f} ms | {b:.1f} ms | {ratio:.2f} | {TARGET} | {met} |")
    print()
    for variant in ["nosafety", "safety", "overlay"]:
        by_iter = {}
        for r in rows:
            if r["variant"] == variant:
                by_iter.setdefault(r["iter"], {})[r["size"]] = r["ms"]
        ratios = [v["64g"] / v["1g"] for v in by_iter.values() if "1g" in v and "64g" in v]
        if ratios:
            med, lo, hi = stats(ratios)
            print(
                f"- {LABELS[variant]}: 64G/1G in the same round, median {med:.2f} "
                f"(min {lo:.2f}, max {hi:.2f}); 64G slower in "
                f"{sum(1 for x in ratios if x > 1)} of {len(ratios)} rounds."
            )
    print()

    # --- vmsnapd's steps
    steps = [
        ("client_to_engine", "vmsnapctl start, bus, Restore call, libvirt is-running check -> `restoring`"),
        ("prepare", "operation thread, own libvirt connection, lookup, 2 XML dumps, record -> `creating the new disk overlays`"),
        ("of_which_safety", "of which the safety snapshot (`taking the safety snapshot` -> overlays)"),
        ("overlays", "qemu-img create of the overlay -> `defining the VM`"),
        ("define_scan_rm", "define, image scan (qemu-img info of every domain's disks), rm of the old top -> `restored`"),
        ("finish", "record write, signals, vmsnapctl reads, prints and exits"),
    ]
    per = {}  # (variant, size) -> step -> [ms]
    removed_counts = {}
    for r in rows:
        if r["variant"] not in ("nosafety", "safety"):
            continue
        window = [(t, m) for t, m in events if r["t0"] <= t <= r["t1"]]
        first = {}
        for t, m in window:
            key = "taking the safety snapshot" if m.startswith("taking the safety snapshot") else m
            first.setdefault(key, t)
        removed = sum(1 for _, m in window if m == "removed an image nothing uses any more")
        removed_counts.setdefault((r["variant"], r["size"]), []).append(removed)

        def span(a, b):
            if a is None or b is None:
                return None
            return (b - a) / 1000

        restoring = first.get("restoring")
        overlays = first.get("creating the new disk overlays")
        defining = first.get("defining the VM")
        restored = first.get("restored")
        safety = first.get("taking the safety snapshot")
        d = per.setdefault((r["variant"], r["size"]), {k: [] for k, _ in steps})
        d["client_to_engine"].append(span(r["t0"], restoring))
        d["prepare"].append(span(restoring, overlays))
        d["of_which_safety"].append(span(safety, overlays) if safety else None)
        d["overlays"].append(span(overlays, defining))
        d["define_scan_rm"].append(span(defining, restored))
        d["finish"].append(span(restored, r["t1"]))
    if per:
        cols = [(v, s) for v in ("nosafety", "safety") for s in SIZES if (v, s) in per]
        print("### Where vmsnapctl restore's time goes (from vmsnapd's log, medians, ms)")
        print()
        print("| step | " + " | ".join(f"{'no safety' if v == 'nosafety' else 'safety'} {s.upper()}" for v, s in cols) + " |")
        print("|---|" + "---:|" * len(cols))
        for key, label in steps:
            cells = [fmt(stats(per[c][key])[0]) for c in cols]
            if all(c == "" for c in cells):
                continue
            print(f"| {label} | " + " | ".join(cells) + " |")
        cells = [f"{statistics.median(removed_counts[c]):.0f}" for c in cols]
        print("| images removed per restore (count) | " + " | ".join(cells) + " |")
        print()

    # --- by hand, split
    print("### The by-hand restores, split (medians, ms)")
    print()
    print("| variant | disk | new image (qemu-img) | define + rm | new image allocated |")
    print("|---|---|---:|---:|---:|")
    for variant in ["overlay", "convert"]:
        for size in SIZES:
            sel = [r for r in rows if r["variant"] == variant and r["size"] == size]
            if not sel:
                continue
            img = stats([float(r["extra_d"]["image_ms"]) for r in sel])[0]
            rest = stats([r["ms"] - float(r["extra_d"]["image_ms"]) for r in sel])[0]
            alloc = sel[0]["extra_d"].get("allocated_mib")
            alloc = f"{alloc} MiB" if alloc else "(overlay, ~0.2 MiB)"
            print(f"| {LABELS[variant]} | {size.upper()} | {img:.1f} | {rest:.1f} | {alloc} |")
    print()

    # --- auxiliary
    print("### Auxiliary")
    print()
    if "qemu_img_info" in aux:
        med, lo, hi = stats(aux["qemu_img_info"])
        print(f"- `qemu-img info -U --backing-chain --output json` of one image: median {med:.1f} ms "
              f"(min {lo:.1f}, max {hi:.1f}, {len(aux['qemu_img_info'])} runs).")
    if "scan" in aux:
        med, lo, hi = stats(aux["scan"])
        print(f"- vmsnapd's image scan redone by hand, one such call for each of the "
              f"{aux['tops'][0]:.0f} disks of the {aux['domains'][0]:.0f} domains on the host: "
              f"median {med:.1f} ms (min {lo:.1f}, max {hi:.1f}, {len(aux['scan'])} runs).")
    restarts = int(aux.get("restarts", [0])[0])
    print(f"- vmsnapd's peak RSS (VmHWM): {int(hwm_kb) / 1024:.1f} MiB"
          + (f" (the largest of its {restarts + 1} processes: it was restarted {restarts} times "
             "so that its safety snapshots showed on D-Bus and could be deleted)." if restarts else "."))
    print()

    # --- every run
    print("### Every run (ms)")
    print()
    print("| # | disk | vmsnapctl --no-safety-snapshot | by hand (overlay) | vmsnapctl with safety snapshot | safety snapshot delete |")
    print("|---:|---|---:|---:|---:|---:|")
    iters = sorted({int(r["iter"]) for r in rows if r["variant"] == "nosafety"})
    for i in iters:
        for size in SIZES:
            def cell(variant):
                v = [r["ms"] for r in rows if r["variant"] == variant and r["size"] == size and int(r["iter"]) == i]
                return fmt(v[0]) if v else ""
            print(f"| {i} | {size.upper()} | {cell('nosafety')} | {cell('overlay')} | {cell('safety')} | {cell('safety_delete')} |")


if __name__ == "__main__":
    main()
