#!/usr/bin/env python3
"""Estimate-vs-truth table (docs/RESULTS.md §6) from `altgrad grad --attention auto --compare --json`
reports: per report, over the heads that carry an estimate, the measured estimate of the output
error and of the query-gradient error (point and 95% upper bound) against the true errors of the
same heads and degrees (`true_rel_err_o`, `true_rel_err_dq`), and how often the upper bound covers
the truth.

    python3 bench/estimate_table.py REPORT.json [REPORT.json ...]
"""
import json
import statistics
import sys


def row(path):
    r = json.load(open(path))
    hs = [h for h in r["heads"] if h.get("estimate") and h.get("true_rel_err_o") is not None]
    if not hs:
        return f"| {r['model']} | {r['seq_len']} | 0 heads with an estimate | | | | | |"
    methods = {}
    for h in r["heads"]:
        key = h["method"] + (f" g={h['degree']}" if h["degree"] else "")
        methods[key] = methods.get(key, 0) + 1
    deg = sorted({h["estimate"]["degree"] for h in hs})
    ratio_o = [h["estimate"]["rel_err_o"] / h["true_rel_err_o"] for h in hs if h["true_rel_err_o"] > 0]
    ratio_q = [h["estimate"]["rel_err_dq"] / h["true_rel_err_dq"] for h in hs if h["true_rel_err_dq"] > 0]
    cov_o = sum(h["estimate"]["upper"] >= h["true_rel_err_o"] for h in hs)
    cov_q = sum(h["estimate"]["upper_dq"] >= h["true_rel_err_dq"] for h in hs)
    rng = lambda xs: f"{min(xs):.2e}–{max(xs):.2e}"
    total = r["compare"]["rel_err_total"] if r.get("compare") else float("nan")
    by = {}
    for h in r["heads"]:
        by[h["decided_by"]] = by.get(h["decided_by"], 0) + 1
    return (
        f"| {r['model'].split('/')[-1]} | {r['seq_len']} | "
        + ", ".join(f"{c} {k}" for k, c in sorted(methods.items()))
        + f" ({', '.join(f'{c} by {k}' for k, c in sorted(by.items()))}) | g = {','.join(map(str, deg))} | "
        f"{rng([h['true_rel_err_o'] for h in hs])} | {statistics.median(ratio_o):.2f} "
        f"({min(ratio_o):.2f}–{max(ratio_o):.2f}) | {cov_o}/{len(hs)} | "
        f"{rng([h['true_rel_err_dq'] for h in hs])} | {statistics.median(ratio_q):.2f} "
        f"({min(ratio_q):.2f}–{max(ratio_q):.2f}) | {cov_q}/{len(hs)} | {total:.2e} |"
    )


print("| model | n | heads (decided by) | degree measured | true o error | est./true o, median (range) "
      "| upper ≥ true o | true dq error | est./true dq, median (range) | upper ≥ true dq | total grad. rel. err |")
print("|---|---:|---|---|---|---|---|---|---|---|---:|")
for p in sys.argv[1:]:
    print(row(p))
