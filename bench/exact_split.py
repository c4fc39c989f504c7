#!/usr/bin/env python3
"""Exact attention's forward and backward timed apart: torch SDPA against altgrad, one process.

Where ``python_bench.py --only exact`` gives one forward + backward time per side, this splits
the two passes (forward: the call; backward: ``out.backward(g)``), so a gap can be placed. Sides
alternate, best of ``--reps``; GFLOP/s counts 4·n²·d per head forward and 10·n²·d backward
(MATH §7), halved under the causal mask. Layout [B, T, H, D], B = 1, float32, scale 1/√d, the same
thread count for both sides; ``OMP_WAIT_POLICY=PASSIVE`` as in python_bench.py.

    .venv/bin/python bench/exact_split.py --n 4096 --dims 64,128 --heads 4 --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import altgrad  # noqa: E402


def sdpa(q, k, v, causal):
    # torch's layout is [B, H, T, D]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dims", default="64,128")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    altgrad.set_num_threads(a.threads)
    sides = {"torch SDPA": sdpa, "altgrad exact": lambda q, k, v, c: altgrad.attention(q, k, v, causal=c)}
    print(f"n = {a.n}, heads = {a.heads}, {a.threads} threads, best of {a.reps}; torch {torch.__version__}")
    print("| d | causal | side | forward ms | forward GFLOP/s | backward ms | backward GFLOP/s |")
    print("|---|---|---|---:|---:|---:|---:|")
    for d in [int(x) for x in a.dims.split(",")]:
        for causal in (False, True):
            gen = torch.Generator().manual_seed(0)
            shape = (1, a.n, a.heads, d)
            q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for _ in range(3))
            g = torch.randn(shape, generator=gen)
            best = {s: [float("inf"), float("inf")] for s in sides}
            for _ in range(a.reps + 1):  # the first round warms up
                for name, f in sides.items():
                    for t in (q, k, v):
                        t.grad = None
                    t0 = time.perf_counter()
                    out = f(q, k, v, causal)
                    t1 = time.perf_counter()
                    out.backward(g)
                    t2 = time.perf_counter()
                    best[name][0] = min(best[name][0], t1 - t0)
                    best[name][1] = min(best[name][1], t2 - t1)
            flop = a.heads * a.n * a.n * d * (0.5 if causal else 1.0)
            for name, (tf, tb) in best.items():
                print(f"| {d} | {'yes' if causal else 'no'} | {name} | {tf * 1e3:.1f} | {4 * flop / tf / 1e9:.0f} "
                      f"| {tb * 1e3:.1f} | {10 * flop / tb / 1e9:.0f} |")


if __name__ == "__main__":
    main()
