#!/usr/bin/env python3
"""Cost of hybrid attention against n (issue 17, MATH §4.1): forward + backward of
`altgrad.attention(method=...)` for `hybrid` (window W, sinks S, degree 2), `poly` (degree 2) and
`exact`, causal, f32, batch 1, H heads of width D (the feature dimension d_f of a Based-style
layer: 16) and values of width DV, in one process, repeats interleaved, medians reported.

It prints the CPU model and ISA, torch and thread counts, a markdown table of seconds per call,
the fitted exponent of each method's time over the n it ran (least squares of log t on log n,
over n >= --fit-from), and the n where hybrid and poly get cheaper than exact. Exact stops at
--exact-max (its O(n²) time). JSON of every timing with --json.

Optional, not part of CI. Needs the altgrad package (pip install .) and torch.

Usage:
    python bench/hybrid_scale.py --ns 1024,2048,4096,8192,16384,32768,65536 --json /tmp/hybrid.json
"""

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

import altgrad


def cpu_info():
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "other")
    return model, isa


def run_once(method, q, k, v, g, window, sinks):
    kw = dict(method=method, causal=True)
    if method != "exact":
        kw["degree"] = 2
    if method == "hybrid":
        kw.update(window=window, sinks=sinks)
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    t0 = time.perf_counter()
    o = altgrad.attention(q, k, v, **kw)
    t1 = time.perf_counter()
    o.backward(g)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def fit(points):
    """Least-squares slope of log t against log n."""
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ns", default="1024,2048,4096,8192,16384,32768,65536")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=16, help="query/key width (the feature dimension d_f)")
    ap.add_argument("--dim-v", type=int, default=64, help="value width")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--exact-max", type=int, default=32768)
    ap.add_argument("--fit-from", type=int, default=4096)
    ap.add_argument("--json")
    a = ap.parse_args()
    ns = [int(x) for x in a.ns.split(",")]
    model, isa = cpu_info()
    print(f"CPU {model} ({isa}), {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(
        f"causal, f32, batch 1, {a.heads} heads, d = {a.dim}, d_v = {a.dim_v}; hybrid window {a.window}, "
        f"sinks {a.sinks}, degree 2; poly degree 2; medians of {a.reps} interleaved repeats"
    )
    torch.manual_seed(0)
    rows = []
    for n in ns:
        q = torch.randn(1, n, a.heads, a.dim) * 0.5
        k = torch.randn(1, n, a.heads, a.dim) * 0.5
        v = torch.randn(1, n, a.heads, a.dim_v)
        g = torch.randn(1, n, a.heads, a.dim_v)
        methods = ["hybrid", "poly"] + (["exact"] if n <= a.exact_max else [])
        times = {m: [] for m in methods}
        for _ in range(a.reps):
            for m in methods:
                times[m].append(run_once(m, q, k, v, g, a.window, a.sinks))
        row = {"n": n}
        for m in methods:
            row[m] = {
                "forward_s": statistics.median(t[0] for t in times[m]),
                "backward_s": statistics.median(t[1] for t in times[m]),
            }
            row[m]["total_s"] = row[m]["forward_s"] + row[m]["backward_s"]
        rows.append(row)
        print(f"n = {n}: " + ", ".join(f"{m} {row[m]['total_s']:.4f} s" for m in methods), flush=True)
    print()
    print("| n | hybrid fwd+bwd (s) | poly fwd+bwd (s) | exact fwd+bwd (s) | exact / hybrid | exact / poly |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        e = r.get("exact", {}).get("total_s")
        h, p = r["hybrid"]["total_s"], r["poly"]["total_s"]
        es = f"{e:.4f}" if e else "—"
        rh = f"{e / h:.2f}" if e else "—"
        rp = f"{e / p:.2f}" if e else "—"
        print(f"| {r['n']} | {h:.4f} | {p:.4f} | {es} | {rh} | {rp} |")
    print()
    fits = {}
    for m in ("hybrid", "poly", "exact"):
        pts = [(r["n"], r[m]["total_s"]) for r in rows if m in r and r["n"] >= a.fit_from]
        if len(pts) >= 2:
            fits[m] = fit(pts)
            print(f"fitted exponent of {m} time, n from {pts[0][0]} to {pts[-1][0]}: {fits[m]:.3f}")
    for m in ("hybrid", "poly"):
        cross = next((r["n"] for r in rows if "exact" in r and r[m]["total_s"] < r["exact"]["total_s"]), None)
        print(f"{m} cheaper than exact from n = {cross}" if cross else f"{m} never cheaper than exact up to {a.exact_max}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"cpu": model, "isa": isa, "torch": torch.__version__, "args": vars(a), "rows": rows, "fits": fits}, f, indent=1)


if __name__ == "__main__":
    main()
