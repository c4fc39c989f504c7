#!/usr/bin/env python3
"""Forward + backward through altgrad.attention from Python, against torch, in one process.

Per configuration (n, d, causal), interleaved repetitions of one forward + backward each of:

- ``altgrad exact``    altgrad.attention(method="exact") (Rust FlashAttention-2, MATH §2)
- ``torch SDPA``       torch.nn.functional.scaled_dot_product_attention (torch's CPU flash kernel)
- ``altgrad poly``     altgrad.attention(method="poly", degree=2) (MATH §3–4, row shift on)
- ``torch Taylor T×T`` the same degree-2 Taylor attention in plain torch with the T×T matrix
                       (tests/python/reference.py's formulation; skipped when it would not fit)
- ``torch Taylor φ``   the same function in plain torch through explicit degree-2 features on the
                       symmetric basis (width C(d+2, 2), as bench/torch_compare.py's taylor2): the
                       non-causal state φ_Kᵀ[V 1], or causal chunks of 64 rows (chunk states by an
                       exclusive prefix sum, the intra-chunk block directly), vectorized

``--only exact`` times the first two alone (the exact-attention comparison of issue 13: every
head width in ``--dims``, causal and not, every ``--ns``).

Times are medians (ms). For the altgrad rows the Rust kernels' own time is read from
``altgrad._core.kernel_seconds_total()`` and the Python-call overhead is
``(wall − kernel) / wall``: argument checks, numpy views, autograd bookkeeping and the copies of
the saved tensors into the library's structs. Layout [B, T, H, D] with B = 1, H = 2 heads (no
GQA; ``--heads``, default 4), float32, scale 1/√d; torch and altgrad use the same number of
threads. ``OMP_WAIT_POLICY=PASSIVE`` is set before torch loads (unless the environment sets it):
torch's idle OpenMP workers then sleep instead of spinning on the cores altgrad's threads need
(see ``altgrad/__init__.py``); the value in effect is printed.

    .venv/bin/python bench/python_bench.py --quick        # n ∈ {256, 1024}, ~1 minute
    .venv/bin/python bench/python_bench.py                 # n up to 16384, several minutes
    .venv/bin/python bench/python_bench.py --only exact --dims 16,32,64,128 --ns 512,2048,8192,16384
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see the docstring

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import altgrad  # noqa: E402
from altgrad import _core  # noqa: E402


def cpu_info() -> tuple[str, str]:
    """CPU model name and the SIMD ISA from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [x for x in ("avx512f", "avx512_bf16", "avx2", "fma", "avx") if x in flags]
    return model, ", ".join(isa) or "unknown"


# ---------------------------------------------------------------- plain-torch Taylor attention


def _shift(qh, kh, scale, causal):
    """m_i = τ q_i·k̄_i, k̄_i the (prefix) key mean (MATH §3); [B, H, T, 1]."""
    if causal:
        t = kh.shape[-2]
        kbar = kh.cumsum(-2) / torch.arange(1, t + 1, dtype=kh.dtype).view(1, 1, t, 1)
    else:
        kbar = kh.mean(-2, keepdim=True)
    return scale * (qh * kbar).sum(-1, keepdim=True)


def taylor_quadratic(q, k, v, causal):
    """T_2(s − m) normalized, with the T×T matrix; [B, T, H, D] in and out."""
    scale = 1 / math.sqrt(q.shape[-1])
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    s = scale * qh @ kh.transpose(-1, -2) - _shift(qh, kh, scale, causal)
    a = 1 + s + 0.5 * s * s
    if causal:
        a = a.tril()
    return ((a @ vh) / a.sum(-1, keepdim=True)).transpose(1, 2)


def _features(x, iu):
    """φ(x) of degree 2 on the symmetric basis [1, x, x_a x_b (a < b), x_a²/√2] (width C(d+2, 2),
    as altgrad's feature map and bench/torch_compare.py's taylor2)."""
    ones = torch.ones_like(x[..., :1])
    cross = torch.index_select(x, -1, iu[0]) * torch.index_select(x, -1, iu[1])
    return torch.cat([ones, x, cross, x * x / math.sqrt(2)], -1)


CHUNK = 64


def taylor_features(q, k, v, causal):
    """The same function as taylor_quadratic through explicit features (MATH §3–4):
    T_2(s − m) = T_2(−m)·φ₀ + T_1(−m)·φ₁ + φ₂ blockwise, the state φ_Kᵀ[V 1] without a mask, or
    chunks of 64 rows under it (inter-chunk by an exclusive prefix sum of chunk states, intra-chunk
    T_2(s − m) directly), vectorized (no Python loop); n must be a multiple of 64 when causal."""
    b, t, h, d = q.shape
    scale = 1 / math.sqrt(d)
    iu = torch.triu_indices(d, d, offset=1)
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    m = _shift(qh, kh, scale, causal)
    phiq = _features(math.sqrt(scale) * qh, iu)
    psi = torch.cat([phiq[..., :1] * (1 - m + 0.5 * m * m), phiq[..., 1 : d + 1] * (1 - m), phiq[..., d + 1 :]], -1)
    phik = _features(math.sqrt(scale) * kh, iu)
    ve = torch.cat([vh, torch.ones_like(vh[..., :1])], -1)
    if not causal:
        y = psi @ (phik.transpose(-1, -2) @ ve)
    else:
        nc, r, e = t // CHUNK, phik.shape[-1], ve.shape[-1]
        ve_c = ve.reshape(b, h, nc, CHUNK, e)
        states = phik.reshape(b, h, nc, CHUNK, r).transpose(-1, -2) @ ve_c
        prefix = states.cumsum(2) - states
        y_inter = psi.reshape(b, h, nc, CHUNK, r) @ prefix
        s = scale * qh.reshape(b, h, nc, CHUNK, d) @ kh.reshape(b, h, nc, CHUNK, d).transpose(-1, -2)
        s = s - m.reshape(b, h, nc, CHUNK, 1)
        a = (1 + s + 0.5 * s * s).tril()
        y = (y_inter + a @ ve_c).reshape(b, h, t, e)
    return (y[..., :-1] / y[..., -1:]).transpose(1, 2)


# ---------------------------------------------------------------------------- the benchmark


def impls(causal, only):
    if only == "exact":
        return {
            "altgrad exact": lambda q, k, v: altgrad.attention(q, k, v, causal=causal),
            "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
            ).transpose(1, 2),
        }
    return {
        "altgrad exact": lambda q, k, v: altgrad.attention(q, k, v, causal=causal),
        "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        ).transpose(1, 2),
        "altgrad poly": lambda q, k, v: altgrad.attention(q, k, v, method="poly", causal=causal, degree=2),
        "torch Taylor T×T": lambda q, k, v: taylor_quadratic(q, k, v, causal),
        "torch Taylor φ": lambda q, k, v: taylor_features(q, k, v, causal),
    }


def quadratic_fits(n, h, budget_bytes):
    return 6 * n * n * h * 4 <= budget_bytes  # a, s and their gradients, float32


def one(fn, q, k, v, g):
    """Wall and kernel seconds of one forward + backward."""
    for x in (q, k, v):
        x.grad = None
    k0 = _core.kernel_seconds_total()
    t0 = time.perf_counter()
    o = fn(q, k, v)
    torch.autograd.backward(o, g)
    wall = time.perf_counter() - t0
    return wall, _core.kernel_seconds_total() - k0


def gemm_gflops() -> float:
    """Best of 5 torch float32 1024³ products, GFLOP/s: how busy the (shared) machine is."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best / 1e9


def run(args):
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    altgrad.set_num_threads(threads)
    ns = [256, 1024] if args.quick else [1024, 2048, 4096, 8192, 16384]
    if args.ns:
        ns = [int(x) for x in args.ns.split(",")]
    ns = [n for n in ns if n <= args.max_n]
    h, rows = args.heads, []
    for d in (int(x) for x in args.dims.split(",")):
        for causal in (False, True):
            for n in ns:
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, n, h, d, requires_grad=True) for _ in range(3))
                g = torch.randn(1, n, h, d)
                fns = impls(causal, args.only)
                if "torch Taylor T×T" in fns and not quadratic_fits(n, h, args.quadratic_budget_gb * 2**30):
                    del fns["torch Taylor T×T"]
                if n <= 1024 and args.only != "exact":  # the torch Taylor forms compute poly's function
                    want = altgrad.attention(q, k, v, method="poly", causal=causal).detach()
                    for name in ("torch Taylor T×T", "torch Taylor φ"):
                        if name in fns:
                            err = (fns[name](q, k, v).detach() - want).norm() / want.norm()
                            assert err < 1e-4, (name, n, d, causal, float(err))
                for fn in fns.values():  # warm-up
                    one(fn, q, k, v, g)
                reps = args.reps if n < 8192 else max(2, args.reps - 2)
                wall = {name: [] for name in fns}
                kern = {name: [] for name in fns}
                for _ in range(reps):  # interleaved
                    for name, fn in fns.items():
                        w, kt = one(fn, q, k, v, g)
                        wall[name].append(w)
                        kern[name].append(kt)
                med = {name: statistics.median(ts) for name, ts in wall.items()}
                over = {}
                for name in ("altgrad exact", "altgrad poly"):
                    if name not in wall:
                        continue
                    over[name] = statistics.median((w - kt) / w for w, kt in zip(wall[name], kern[name]))
                rows.append((n, d, causal, med, over))
                print(f"  n={n:>5} d={d:>2} causal={causal!s:<5} " + " ".join(f"{k}={1e3 * t:.1f}ms" for k, t in med.items()),
                      file=sys.stderr, flush=True)
    return threads, rows


def table_exact(rows):
    out = [
        "| n | d | causal | altgrad exact (ms) | torch SDPA (ms) | SDPA / altgrad exact | overhead exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for n, d, causal, med, over in rows:
        out.append(
            f"| {n} | {d} | {'yes' if causal else 'no'} | {1e3 * med['altgrad exact']:.1f} | "
            f"{1e3 * med['torch SDPA']:.1f} | {med['torch SDPA'] / med['altgrad exact']:.2f}× | "
            f"{100 * over['altgrad exact']:.1f}% |"
        )
    worst = min(rows, key=lambda r: r[3]["torch SDPA"] / r[3]["altgrad exact"])
    best = max(rows, key=lambda r: r[3]["torch SDPA"] / r[3]["altgrad exact"])
    ratio = lambda r: r[3]["torch SDPA"] / r[3]["altgrad exact"]  # noqa: E731
    out.append("")
    out.append(f"SDPA / altgrad exact: from {ratio(worst):.2f}× (n={worst[0]}, d={worst[1]}, causal={worst[2]}) "
               f"to {ratio(best):.2f}× (n={best[0]}, d={best[1]}, causal={best[2]}) over {len(rows)} points")
    return "\n".join(out)


def table(rows):
    cols = ["altgrad exact", "torch SDPA", "altgrad poly", "torch Taylor T×T", "torch Taylor φ"]
    out = [
        "| n | d | causal | " + " | ".join(f"{c} (ms)" for c in cols)
        + " | SDPA / altgrad exact | best torch Taylor / altgrad poly | overhead exact | overhead poly |",
        "|" + "---|" * (3 + len(cols) + 4),
    ]
    for n, d, causal, med, over in rows:
        cells = [f"{1e3 * med[c]:.1f}" if c in med else "—" for c in cols]
        taylor = min(med[c] for c in ("torch Taylor T×T", "torch Taylor φ") if c in med)
        out.append(
            f"| {n} | {d} | {'yes' if causal else 'no'} | " + " | ".join(cells)
            + f" | {med['torch SDPA'] / med['altgrad exact']:.2f}× | {taylor / med['altgrad poly']:.2f}×"
            + f" | {100 * over['altgrad exact']:.1f}% | {100 * over['altgrad poly']:.1f}% |"
        )
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small n only (256, 1024)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per implementation (interleaved)")
    p.add_argument("--max-n", type=int, default=16384)
    p.add_argument("--threads", type=int, default=0, help="threads of torch and of altgrad (default: all cores)")
    p.add_argument("--quadratic-budget-gb", type=float, default=4.0, help="memory for the T×T torch Taylor form")
    p.add_argument("--only", choices=["all", "exact"], default="all", help="exact: altgrad exact and SDPA only")
    p.add_argument("--dims", default="16,64", help="head widths, comma-separated (default 16,64)")
    p.add_argument("--ns", default=None, help="sequence lengths, comma-separated (default per --quick)")
    p.add_argument("--heads", type=int, default=4, help="heads H (default 4)")
    args = p.parse_args()
    model, isa = cpu_info()
    load0 = os.getloadavg()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    peak0 = gemm_gflops()
    t0 = time.time()
    threads, rows = run(args)
    peak1, load1 = gemm_gflops(), os.getloadavg()
    print(f"CPU: {model} ({isa}); {threads} threads for torch and for altgrad; torch {torch.__version__}, "
          f"altgrad {altgrad.__version__}; B=1, H={args.heads}, float32, forward + backward, medians of "
          f"{args.reps} interleaved repetitions (fewer at n ≥ 8192); {time.time() - t0:.0f} s")
    print(f"Machine state: torch f32 GEMM {peak0:.0f} → {peak1:.0f} GFLOP/s (start → end), "
          f"load average {load0[0]:.1f} → {load1[0]:.1f} on {os.cpu_count()} cores; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"command: {' '.join(sys.argv)}")
    print()
    print(table_exact(rows) if args.only == "exact" else table(rows))


if __name__ == "__main__":
    main()
