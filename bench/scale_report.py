#!/usr/bin/env python3
"""Helpers of bench/scale.sh.

  scale_report.py notify SOCKET OUT     waits for READY=1 on a systemd notify socket, writes the
                                        wall-clock time it came (microseconds) to OUT
  scale_report.py execs STRACE_FILE     prints "COUNT PROGRAMS OPENS": the successful execve
                                        calls in an `strace -f -e trace=execve,openat` log, which
                                        programs, and the files vmsnapd itself (not the children)
                                        opened
  scale_report.py report DIR M0 CHAIN_VMS CHAIN_DEPTH
                                        markdown tables of the samples scale.sh wrote in
                                        DIR/data.tsv, with steps from DIR/vmsnapd-*-CASE.log
"""
import datetime
import glob
import os
import re
import socket
import statistics
import sys
import time
from collections import Counter, OrderedDict


def notify(path, out, timeout=300):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if b"READY=1" in data.split(b"\n"):
                stamp = time.time_ns() // 1000  # the same clock as bash's EPOCHREALTIME
                break
    except socket.timeout:
        sys.exit("no READY=1 within %d s" % timeout)
    with open(out, "w") as f:
        f.write("%d\n" % stamp)


def execs(path):
    # With -f, a call can be split: `PID execve("/x", ... <unfinished ...>` then
    # `PID <... execve resumed>) = 0`. The program is the path of the pid's last execve.
    last = {}
    programs = Counter()
    opens = []  # (pid, succeeded)
    for line in open(path, errors="replace"):
        m = re.match(r"(\d+)\s+(.*)$", line.rstrip("\n"))
        if not m:
            continue
        pid, rest = m.groups()
        start = re.match(r'execve\("([^"]*)"', rest)
        if start:
            last[pid] = os.path.basename(start.group(1))
        if "execve" in rest and re.search(r"\) = 0$|resumed>.*= 0$", rest):
            programs[last.get(pid, "?")] += 1
        if rest.startswith("openat(") and not re.search(r"<unfinished \.\.\.>$| = -1 ", rest):
            opens.append(pid)
        elif "openat resumed>" in rest and " = -1 " not in rest:
            opens.append(pid)
    total = sum(programs.values())
    listed = ",".join("%s*%d" % (p, c) for p, c in sorted(programs.items())) or "-"
    own = sum(1 for pid in opens if pid not in last)  # a child's opens come after its execve
    print(total, listed, own)


# The info lines vmsnapd logs during a restore and a delete, in order: each step is the time from
# one to the next.
STEPS = {
    "restore": ["restoring", "creating the new disk overlays", "defining the VM", "restored"],
    "delete": ["deleting snapshot", "releasing disk vda", "merging disk vda", "snapshot deleted"],
}


def steps(folder, case, samples=None):
    """Median ms of each step of the timed rounds (snapshots s-CASE-<n>) in vmsnapd's log, with
    the time from vmsnapctl's start to vmsnapd's first line and from its last line to
    vmsnapctl's exit when `samples` has the rounds' start and end (OP_t0, OP_t1, in order)."""
    seen = {}  # (snapshot, message) -> seconds
    pattern = re.compile(r"^(\S+)Z\s+INFO (.*?) vm=\S+ snapshot=(s-%s-\d+)\b" % re.escape(case))
    for log in glob.glob(os.path.join(folder, "vmsnapd-*-%s.log" % case)):
        for line in open(log, errors="replace"):
            m = pattern.match(line)
            if m:
                stamp = datetime.datetime.fromisoformat(m.group(1)).timestamp()
                seen.setdefault((m.group(3), m.group(2)), stamp)
    out = {}
    for op, messages in STEPS.items():
        for a, b in zip(messages, messages[1:]):
            spans = [(seen[(n, b)] - seen[(n, a)]) * 1000 for (n, msg) in list(seen) if msg == a and (n, b) in seen]
            out[(op, a, b)] = statistics.median(spans) if spans else None
        # Round i is snapshot s-CASE-i; its vmsnapctl start and exit as bash saw them.
        starts = (samples or {}).get(op + "_t0", [])
        ends = (samples or {}).get(op + "_t1", [])
        before, after = [], []
        for i, (t0, t1) in enumerate(zip(starts, ends), 1):
            name = "s-%s-%d" % (case, i)
            first, last = seen.get((name, messages[0])), seen.get((name, messages[-1]))
            if first is not None and last is not None:
                before.append(first * 1000 - float(t0) / 1000)
                after.append(float(t1) / 1000 - last * 1000)
        out[(op, "vmsnapctl started", messages[0])] = statistics.median(before) if before else None
        out[(op, messages[-1], "vmsnapctl returned")] = statistics.median(after) if after else None
    return out


# --- report ----------------------------------------------------------------------------------


def load(path):
    data = OrderedDict()  # (section, case) -> metric -> [values]
    for line in open(os.path.join(path, "data.tsv")):
        section, case, metric, value = line.rstrip("\n").split("\t")
        data.setdefault((section, case), {}).setdefault(metric, []).append(value)
    return data


def num(values):
    return [float(v) for v in values]


def med(d, metric):
    v = d.get(metric)
    return statistics.median(num(v)) if v else None


def fmt(x, digits=0):
    return "-" if x is None else ("%.*f" % (digits, x))


def spread(d, metric, digits=0):
    v = d.get(metric)
    if not v:
        return "-"
    v = num(v)
    if len(v) == 1:
        return fmt(v[0], digits)
    return "%s (%s-%s)" % (fmt(statistics.median(v), digits), fmt(min(v), digits), fmt(max(v), digits))


def mib(kb):
    return None if kb is None else kb / 1024


def ratio(a, b):
    return None if a is None or not b else a / b


def passes(ref, last):
    """The passes both cases have timed rounds of."""
    def of(d):
        return {int(k.rsplit("_pass", 1)[1]) for k in d if "_ms_pass" in k}
    return sorted(of(ref) & of(last))


def pass_ratios(ref, last, op):
    """Each pass's ratio of the last case's median to the reference's, for `op`."""
    out = []
    for k in passes(ref, last):
        key = "%s_ms_pass%d" % (op, k)
        r = ratio(med(last, key), med(ref, key))
        if r is not None:
            out.append(r)
    return out


def slope(x0, y0, x1, y1, scale=1.0):
    if None in (x0, y0, x1, y1) or x1 == x0:
        return None
    return (y1 - y0) / (x1 - x0) * scale


def report(path, m0, chain_vms, chain_depth):
    data = load(path)
    ms_ = [(c, d) for (s, c), d in data.items() if s == "m"]
    ns = [(c, d) for (s, c), d in data.items() if s == "n"]
    chains = data.get(("chains", "all"), {})
    out = []
    p = out.append

    # --- M ------------------------------------------------------------------------------------
    if ms_:
        p("### Snapshot records (M), with the first N's domains (ms: median (min-max); MiB)")
        p("")
        p("| records M | listed | domains on host | start to READY=1 | start to GetManagedObjects done "
          "| `snapshot list` (all) | `snapshot list VM` (M/4) | RSS after start | RSS after the lists | peak RSS |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c, d in ms_:
            p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                c, fmt(med(d, "records")), fmt(med(d, "domains")), spread(d, "start_ready_ms"),
                spread(d, "start_gmo_ms"), spread(d, "list_all_ms"), spread(d, "list_one_ms"),
                fmt(mib(med(d, "rss_start_kb")), 1), fmt(mib(med(d, "rss_list_kb")), 1),
                fmt(mib(med(d, "hwm_kb")), 1)))
        p("")
        if len(ms_) > 1:
            p("Slope between sizes (cost per 1,000 snapshot records; RSS in KiB per record):")
            p("")
            p("| from M to M | start to READY | start to GetManagedObjects done | `snapshot list` (all) "
              "| `snapshot list VM` (M/4) | RSS after start | RSS after the lists |")
            p("|---|---:|---:|---:|---:|---:|---:|")
            for (c0, d0), (c1, d1) in zip(ms_, ms_[1:]):
                x0, x1 = float(c0), float(c1)
                row = [slope(x0, med(d0, k), x1, med(d1, k), 1000) for k in
                       ("start_ready_ms", "start_gmo_ms", "list_all_ms")]
                row.append(slope(x0 / 4, med(d0, "list_one_ms"), x1 / 4, med(d1, "list_one_ms"), 1000))
                row += [slope(x0, med(d0, k), x1, med(d1, k)) for k in ("rss_start_kb", "rss_list_kb")]
                p("| %s to %s | %s ms | %s ms | %s ms | %s ms | %s | %s |" % (
                    c0, c1, *(fmt(v, 1) for v in row[:4]), *(fmt(v, 2) for v in row[4:])))
            p("")

    # --- N ------------------------------------------------------------------------------------
    if not ns:
        print("\n".join(out))
        return
    ref_case, ref = ns[0]

    def label(c, d):
        n = fmt(med(d, "n"))
        return "%s plain" % n if not med(d, "chains") else "%s plain + %s chain VMs" % (n, fmt(med(d, "chains")))

    p("### Domains (N): one VM's snapshot, offline (ms: median (min-max) of the rounds)")
    p("")
    p("The reference is the first row; every other row also has %d VMs holding %d-deep chains of "
      "real snapshots (and their %d records), and %s fake records throughout. Processes: the execve "
      "calls of vmsnapd and its children during one more round under strace." % (
          chain_vms, chain_depth, chain_vms * chain_depth, m0))
    p("")
    p("| domains | on host | create | restore --no-safety-snapshot | restore / ref | delete | delete / ref "
      "| processes per create / restore / delete | files vmsnapd opens per create / restore / delete "
      "| target's chain after |")
    p("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for c, d in ns:
        procs = " / ".join("%s (%s)" % (d.get(k + "_execs", ["-"])[0], d.get(k + "_programs", ["-"])[0])
                           for k in ("create", "restore", "delete"))
        opens = " / ".join(d.get(k + "_opens", ["-"])[0] for k in ("create", "restore", "delete"))
        p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label(c, d), fmt(med(d, "domains")), spread(d, "create_ms"), spread(d, "restore_ms"),
            fmt(ratio(med(d, "restore_ms"), med(ref, "restore_ms")), 2), spread(d, "delete_ms"),
            fmt(ratio(med(d, "delete_ms"), med(ref, "delete_ms")), 2), procs, opens,
            fmt(med(d, "target_chain"))))
    p("")
    split = [(c, d, steps(path, c, d)) for c, d in ns]
    keys = [
        key
        for op, messages in STEPS.items()
        for key in [(op, "vmsnapctl started", messages[0])]
        + [(op, a, b) for a, b in zip(messages, messages[1:])]
        + [(op, messages[-1], "vmsnapctl returned")]
    ]
    if any(v is not None for _, _, st in split for v in st.values()):
        p("Where the restore's and the delete's time goes, from vmsnapd's log lines and vmsnapctl's "
          "start and exit as the script saw them (medians of the rounds, ms; the step is named by "
          "the line it starts at):")
        p("")
        p("| step | %s |" % " | ".join(fmt(med(d, "domains")) + " on host" for c, d, _ in split))
        p("|---|%s|" % "|".join("---:" for _ in split))
        for key in keys:
            p("| %s: %s -> %s | %s |" % (key[0], key[1], key[2], " | ".join(fmt(st.get(key)) for _, _, st in split)))
        p("")
    p("### Domains (N): listing, idle CPU, start")
    p("")
    p("| domains | on host | `vmsnapctl vm list` | `virsh list --all` | ratio | vmsnapd idle CPU % "
      "| libvirtd CPU % without vmsnapd | with vmsnapd idle | libvirtd's extra | start to READY=1 "
      "| start to GetManagedObjects done | RSS after start | RSS at the end |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, d in ns:
        extra = None
        if med(d, "libvirtd_with_pct") is not None and med(d, "libvirtd_alone_pct") is not None:
            extra = med(d, "libvirtd_with_pct") - med(d, "libvirtd_alone_pct")
        p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            label(c, d), fmt(med(d, "domains")), spread(d, "vm_list_ms"), spread(d, "virsh_list_ms"),
            fmt(ratio(med(d, "vm_list_ms"), med(d, "virsh_list_ms")), 2), fmt(med(d, "vmsnapd_idle_pct"), 2),
            fmt(med(d, "libvirtd_alone_pct"), 2), fmt(med(d, "libvirtd_with_pct"), 2), fmt(extra, 2),
            spread(d, "start_ready_ms"), spread(d, "start_gmo_ms"), fmt(mib(med(d, "rss_start_kb")), 1),
            fmt(mib(med(d, "rss_end_kb")), 1)))
    p("")
    if chains:
        p("Making the chains: %s ms per offline snapshot (%d, one after the other, at %s domains on "
          "the host); creates that vmsnapctl reported as removed although they succeeded: %s." % (
            fmt(med(chains, "create_each_ms"), 1), chain_vms * chain_depth,
            fmt(med(ns[0][1], "domains") + chain_vms) if ns and med(ns[0][1], "domains") is not None else "-",
            fmt(med(chains, "unseen"))))
        p("")

    # Slopes: the chain VMs' effect (reference to the first row with them), then per domain.
    metrics = [("create", "create_ms", 1), ("restore", "restore_ms", 1), ("delete", "delete_ms", 1),
               ("vm list", "vm_list_ms", 1), ("virsh list --all", "virsh_list_ms", 1),
               ("vmsnapd idle CPU (% points)", "vmsnapd_idle_pct", 1),
               ("libvirtd CPU with vmsnapd (% points)", "libvirtd_with_pct", 1),
               ("start to READY=1", "start_ready_ms", 1),
               ("RSS after start (KiB)", "rss_start_kb", 1)]
    pairs = list(zip(ns, ns[1:]))
    if pairs:
        p("Slope between sizes: cost per domain on the host (ms per domain unless said; the first "
          "column is the step that adds the chain VMs, per chain VM):")
        p("")
        p("| metric | %s |" % " | ".join("%s to %s" % (fmt(med(d0, "domains")), fmt(med(d1, "domains")))
                                        for (c0, d0), (c1, d1) in pairs))
        p("|---|%s|" % "|".join("---:" for _ in pairs))
        for name, key, scale in metrics:
            cells = []
            for (c0, d0), (c1, d1) in pairs:
                cells.append(fmt(slope(med(d0, "domains"), med(d0, key), med(d1, "domains"), med(d1, key), scale), 3))
            p("| %s | %s |" % (name, " | ".join(cells)))
        p("")

    # --- passes --------------------------------------------------------------------------------
    last_c, last = ns[-1]
    if len(pass_ratios(ref, last, "restore")) > 1:
        p("### Passes: %s against %s, back to back (ms: median (min-max) of the rounds)" % (
            label(last_c, last), label(ref_case, ref)))
        p("")
        p("Pass 1 is the run above (the reference measured first, the last case minutes later); each "
          "further pass measured the reference and then the last case right after it.")
        p("")
        p("| pass | restore, ref | restore | ratio | delete, ref | delete | ratio |")
        p("|---:|---:|---:|---:|---:|---:|---:|")
        for k in passes(ref, last):
            cells = []
            for op in ("restore", "delete"):
                key = "%s_ms_pass%d" % (op, k)
                cells += [spread(ref, key), spread(last, key), fmt(ratio(med(last, key), med(ref, key)), 2)]
            p("| %d | %s |" % (k, " | ".join(cells)))
        p("")

    # --- targets ------------------------------------------------------------------------------
    p("### Against the targets")
    p("")
    p("| target | measured | limit | met |")
    p("|---|---:|---:|---|")

    def line(what, value, limit, ok, unit=""):
        p("| %s | %s%s | %s | %s |" % (what, value, unit, limit, "-" if ok is None else ("yes" if ok else "no")))

    for op in ("restore", "delete"):
        per_pass = pass_ratios(ref, last, op)
        if len(per_pass) > 1:
            # Each pass's two sides measured back to back: the median of the passes' ratios.
            r = statistics.median(per_pass)
            value = "%sx (median of %d passes' ratios: %s)" % (
                fmt(r, 2), len(per_pass), ", ".join(fmt(x, 2) for x in per_pass))
        else:
            r = ratio(med(last, op + "_ms"), med(ref, op + "_ms"))
            value = "%sx (%s / %s ms)" % (fmt(r, 2), fmt(med(last, op + "_ms")), fmt(med(ref, op + "_ms")))
        line("%s at %s domains on the host (%s) within 1.2x of %s (%s)" % (
            op, fmt(med(last, "domains")), label(last_c, last), fmt(med(ref, "domains")), label(ref_case, ref)),
            value, "1.2x", None if r is None else r <= 1.2)
    if ms_:
        mc, md = ms_[-1]
        v = med(md, "list_all_ms")
        line("`snapshot list` of %s records under 200 ms" % fmt(med(md, "records")), fmt(v), "200 ms",
             None if v is None else v < 200, " ms")
    for c, d in ns:
        r = ratio(med(d, "vm_list_ms"), med(d, "virsh_list_ms"))
        line("`vm list` within 1.2x of `virsh list --all` at %s domains" % fmt(med(d, "domains")),
             "%sx" % fmt(r, 2), "1.2x", None if r is None else r <= 1.2)
    v = med(last, "vmsnapd_idle_pct")
    line("vmsnapd idle CPU at %s domains under 0.5 %%" % fmt(med(last, "domains")), fmt(v, 2), "0.5 %",
         None if v is None else v < 0.5, " %")
    if ms_:
        v = med(md, "start_gmo_ms")
        line("start to everything exported (READY=1, then GetManagedObjects) at %s records under 1 s" %
             fmt(med(md, "records")), fmt(v), "1000 ms", None if v is None else v < 1000, " ms")
        for key, what in (("rss_start_kb", "after start"), ("hwm_kb", "peak, after the lists")):
            v = mib(med(md, key))
            line("vmsnapd RSS %s at %s records under 30 MiB" % (what, fmt(med(md, "records"))), fmt(v, 1),
                 "30 MiB", None if v is None else v < 30, " MiB")
    print("\n".join(out))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "notify" and len(sys.argv) == 4:
        notify(sys.argv[2], sys.argv[3])
    elif cmd == "execs" and len(sys.argv) == 3:
        execs(sys.argv[2])
    elif cmd == "report" and len(sys.argv) == 6:
        report(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
