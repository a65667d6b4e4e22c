"""Turns pytest-benchmark JSON into bench/results/summary.md (one row per case and baseline) and summary.png.

Each benchmark carries extra_info {case, impl, bytes, flops, peak_mem} (see bench/conftest.py): rows pair the
"pyops" entry of a case with each of its baselines. Speed-up = baseline median / pyops median. Achieved rates come
from the case's fewest bytes (GB/s) or its operation count (GFLOP/s, from pyops.count_ops where a layer is
involved); with --peak-bandwidth / --peak-flops (or cases named "peak: ..." in the same run) they are also
given as a fraction of the machine's measured peak (bench/bench_peak.py measures copy bandwidth and the fp32 GEMM
rate in every run). Times are medians, or with --stat min the fastest round: on a VM whose speed drifts 2-5x
over seconds (our 2-core CPU machine) a median depends on when each benchmark happened to run, while the fastest
round of each is what the code can do (timeit's advice); `make bench` uses min on the CPU. Given several result
files (runs at different times), a case measured in more than one keeps each implementation's best time, so every
implementation gets the same chances at the machine's fast phases. summary.png draws each row's speed-up on a log
scale with 1x marked.

usage: python bench/report.py RESULTS.json [MORE.json ...] [--out DIR] [--stat median|min] [--quiet]
"""
import argparse
import datetime
import json
import math
import os
import sys
import textwrap
from collections import OrderedDict


def load(paths, stat="median"):
    """[(case, impl, seconds (the stat), extra_info)], machine_info, datetime of the first file."""
    rows, machine, when = [], {}, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = machine or data.get("machine_info", {})
        when = when or data.get("datetime")
        for b in data.get("benchmarks", []):
            info = b.get("extra_info", {})
            case = info.get("case") or b.get("group") or b["name"]
            rows.append((case, info.get("impl", b["name"]), b["stats"][stat], info))
    return rows, machine, when


def measured_peaks(rows):
    """Peaks measured in the same run by bench cases named 'peak: copy' (bytes) and 'peak: gemm ...' (flops)."""
    bw = max((i["bytes"] / t for c, _, t, i in rows if c.startswith("peak:") and i.get("bytes")), default=None)
    fl = max((i["flops"] / t for c, _, t, i in rows if c.startswith("peak:") and i.get("flops")), default=None)
    return bw, fl


def fmt_time(s):
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.2f} s"


def fmt_si(value, unit):
    """3 significant digits with G or T: 1.23 TFLOP/s, 45.6 GB/s."""
    scale, prefix = (1e12, "T") if value >= 1e12 else (1e9, "G")
    return f"{value / scale:.3g} {prefix}{unit}"


def fmt_rate(info, seconds, peak_bw, peak_flops):
    parts = []
    if info.get("flops"):
        rate = info["flops"] / seconds
        parts.append(f"{rate / 1e9:.1f} GFLOP/s" + (f" ({100 * rate / peak_flops:.0f}% of peak)" if peak_flops else ""))
    if info.get("bytes"):
        rate = info["bytes"] / seconds
        parts.append(f"{rate / 1e9:.1f} GB/s" + (f" ({100 * rate / peak_bw:.0f}% of peak)" if peak_bw else ""))
    return ", ".join(parts) or "-"


def unpaired(rows):
    """Cases (other than 'peak: ...') lacking a 'pyops' or a baseline measurement: they get no row."""
    impls = OrderedDict()
    for case, impl, _, _ in rows:
        if not case.startswith("peak:"):
            impls.setdefault(case, set()).add(impl)
    return [case for case, names in impls.items() if "pyops" not in names or names == {"pyops"}]


def summarize(rows, peak_bw=None, peak_flops=None):
    """[(case, baseline, pyops_s, baseline_s, speedup, rate_text, peak_mem)] in first-seen case order."""
    by_case = OrderedDict()
    for case, impl, t, info in rows:
        if case.startswith("peak:"):
            continue
        entry = by_case.setdefault(case, {})
        if impl not in entry or t < entry[impl][0]:  # several runs of one case: each implementation's best
            entry[impl] = (t, info)
    out = []
    for case, impls in by_case.items():
        if "pyops" not in impls:
            continue
        t_ours, info = impls["pyops"]
        for impl, (t_base, _) in impls.items():
            if impl == "pyops":
                continue
            out.append((case, impl, t_ours, t_base, t_base / t_ours, fmt_rate(info, t_ours, peak_bw, peak_flops),
                        info.get("peak_mem")))
    return out


def geomean(values):
    values = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def markdown(summary, machine, when, peak_bw, peak_flops, missing=(), stat="median"):
    date = (when or datetime.datetime.now().isoformat())[:10]
    where = machine.get("gpu") or machine.get("cpu", {}).get("brand_raw") or machine.get("processor", "?")
    head = [f"Measured {date} on {where} ({machine.get('node', '?')}, {machine.get('cpu_threads', '?')} CPU threads), "
            f"torch {machine.get('torch', '?')}, pytest-benchmark {'medians' if stat == 'median' else 'minima'}."]
    if peak_bw or peak_flops:
        head.append("Peaks measured in the same run: " + ", ".join(
            p for p in [f"copy {fmt_si(peak_bw, 'B/s')}" if peak_bw else "",
                        f"fp32 GEMM {fmt_si(peak_flops, 'FLOP/s')}" if peak_flops else ""] if p) + ".")
    show_mem = any(r[6] for r in summary)
    cols = ["case", "pyops time", "baseline", "baseline time", "speed-up", "pyops rate"]
    cols += ["pyops peak mem"] if show_mem else []
    lines = head + ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for case, impl, t_ours, t_base, speedup, rate, mem in summary:
        cells = [case, fmt_time(t_ours), impl, fmt_time(t_base), f"{speedup:.2f}x", rate]
        if show_mem:
            cells.append(f"{mem / 2**20:.1f} MiB" if mem is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Geometric mean speed-up over all rows: {geomean([r[4] for r in summary]):.2f}x", ""]
    if missing:
        lines += ["Cases without a pyops/baseline pair (no row): " + "; ".join(missing), ""]
    return "\n".join(lines)


def chart(summary, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [f"{case}  [vs {impl}]" for case, impl, *_ in summary]
    speedups = [r[4] for r in summary]
    fig, ax = plt.subplots(figsize=(10, 0.32 * len(summary) + 1.6))
    colors = ["#2a9d8f" if s >= 1 else "#e76f51" for s in speedups]
    # bars grow from the 1x line: right for faster than the baseline, left for slower
    ax.barh(range(len(summary)), [v - 1 for v in speedups], left=1, color=colors)
    ax.set_xscale("log")
    # the axis spans at least 0.5x..2x around the 1x line, so every chart reads the same way
    lo, hi = min(min(speedups), 0.5) / 1.3, max(max(speedups), 2.0) * 1.6
    ax.set_xlim(lo, hi)
    ticks = [2.0**k for k in range(math.floor(math.log2(lo)), math.ceil(math.log2(hi)) + 1) if lo <= 2.0**k <= hi]
    ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(1.0, color="black", linewidth=1)
    ax.text(1.0, -0.6, " 1x (as fast as the baseline)", fontsize=7, va="bottom")
    for y, speedup in enumerate(speedups):
        ax.text(speedup, y, f" {speedup:.2f}x ", va="center", ha="left" if speedup >= 1 else "right", fontsize=7)
    ax.set_yticks(range(len(summary)), labels, fontsize=7)
    ax.set_ylim(len(summary) - 0.5, -1.0)  # top to bottom in table order, with room for the 1x label
    ax.set_xlabel("speed-up of pyops over the baseline (log scale; 1x marked)")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--peak-bandwidth", type=float, help="GB/s to report achieved bandwidth against")
    p.add_argument("--peak-flops", type=float, help="GFLOP/s to report achieved arithmetic rate against")
    p.add_argument("--stat", choices=["median", "min"], default="median", help="the time each row reports")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    args = p.parse_args(argv)
    rows, machine, when = load(args.results, args.stat)
    peak_bw, peak_flops = measured_peaks(rows)
    peak_bw = args.peak_bandwidth * 1e9 if args.peak_bandwidth else peak_bw
    peak_flops = args.peak_flops * 1e9 if args.peak_flops else peak_flops
    summary = summarize(rows, peak_bw, peak_flops)
    if not summary:
        sys.exit("report.py: no case has both a 'pyops' and a baseline measurement")
    os.makedirs(args.out, exist_ok=True)
    text = markdown(summary, machine, when, peak_bw, peak_flops, unpaired(rows), args.stat)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    chart(summary, os.path.join(args.out, "summary.png"), text.splitlines()[0])
    if not args.quiet:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
