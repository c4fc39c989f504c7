#!/usr/bin/env python3
"""PyTorch CPU reference timings for `altgrad bench`, and the ratios of both in one run.

Optional, not part of CI. Requirements: Python 3.9+ and PyTorch (`pip install torch`; the CPU
wheel is enough: `pip install torch --index-url https://download.pytorch.org/whl/cpu`). This
script installs nothing.

What it times, forward + backward (autograd), f32, batch 1, 4 heads, head_dim = d_v, on the same
shapes as the altgrad sweep (d in {16, 64}, causal and not, n = 512 ... 8192 with --quick):

- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` (the framework's exact attention;
  on CPU PyTorch dispatches to its fused flash-attention kernel), scale 1/sqrt(d).
- `taylor2`: plain-PyTorch polynomial (Taylor) linear attention of degree 2, the same function as
  altgrad's `poly` method with g = 2 **including the same row shift** (MATH §3): weights
  `T_2(s_ij - m_i)` with `m_i = tau q_i . kbar_i`, kbar the global key mean (non-causal; then the
  shift equals centering the keys) or the prefix mean (causal). Feature map on the symmetric basis
  `[1, x, x_i x_j (i<j), x_i^2/sqrt 2]` (width r = C(d+2, 2)), so phi(x).phi(y) = T_2(x.y).
  Non-causal: `H = Phi_K^T [V 1]`, `[num den] = Psi_Q H`. Causal: chunks of C = 64 rows; inside a
  chunk the polynomial of the scores directly (masked), across chunks the exclusive prefix sum of
  the chunk states `Phi_K^T [V 1]` (all chunk states are materialized: n/C x r x (d+1) per head),
  like altgrad's chunked kernel. Backward by autograd (through the shift too, as `poly` does).

Then the altgrad side of the same run: by default it runs `target/release/altgrad bench --quick
--ns ... --poly 16:2,64:2 --exact 16,64 --altgrad none --no-claims --no-roofline --out DIR/altgrad`
right after the PyTorch timings (same machine state, same thread count: RAYON_NUM_THREADS = the
--threads value, torch.set_num_threads the same). When the binary has no `bench` subcommand it
falls back to the crate's test driver (`cargo test --release --test bench_cli -- --ignored
bench_driver` with ALTGRAD_BENCH_* variables). `--altgrad-json PATH` reuses an existing
`bench.json` instead.

Output: DIR/torch_compare.json (versions, threads, every timing, the ratios) and a markdown table
on stdout. Ratios are PyTorch time / altgrad time (> 1: altgrad faster).

Usage:
    python bench/torch_compare.py --quick --out /tmp/cmp            # both, in one run
    python bench/torch_compare.py --quick --out /tmp/cmp --altgrad-json /tmp/b/bench.json
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

HEADS = 4
CHUNK = 64


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="n up to 8192 (default: up to 32768)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--threads", type=int, default=2, help="threads for PyTorch and altgrad (default 2)")
    p.add_argument("--ns", default=None, help="comma-separated lengths (default 512..8192 or ..32768)")
    p.add_argument("--dims", default="16,64", help="head widths (default 16,64)")
    p.add_argument("--limit", type=float, default=None, help="skip a point predicted above S seconds (default 4 quick, 60 full)")
    p.add_argument("--repo", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."), help="altgrad crate root")
    p.add_argument("--altgrad-json", default=None, help="use this bench.json instead of running altgrad")
    p.add_argument("--no-altgrad", action="store_true", help="PyTorch timings only")
    return p.parse_args()


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return []


# ---------------------------------------------------------------------------------------------
# PyTorch implementations


def sdpa_step(torch, q, k, v, g, causal):
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    o.backward(g)
    return o


def quad_index(torch, d, device):
    iu = torch.triu_indices(d, d, offset=1, device=device)
    return iu[0], iu[1]


def features2(torch, x, iu):
    """phi(x) for degree 2 on the symmetric basis: [1, x, x_i x_j (i<j), x_i^2 / sqrt 2]."""
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)
    # index_select (backward: index_add) is faster on CPU than advanced indexing (index_put)
    cross = torch.index_select(x, -1, iu[0]) * torch.index_select(x, -1, iu[1])
    sq = x * x * (1.0 / math.sqrt(2.0))
    return torch.cat([ones, x, cross, sq], dim=-1)


def taylor2_step(torch, q, k, v, g, causal, iu):
    """Degree-2 Taylor attention with the row shift (MATH §3), forward + autograd backward.
    q, k, v, g: [B, H, n, d]. Returns o."""
    B, H, n, d = q.shape
    tau = 1.0 / math.sqrt(d)
    st = math.sqrt(tau)
    ones = torch.ones(B, H, n, 1, dtype=q.dtype, device=q.device)
    ve = torch.cat([v, ones], dim=-1)  # [B,H,n,d+1]
    nq = 1 + d  # degree-0 and degree-1 block sizes: 1, d; degree-2 block: the rest
    if not causal:
        kc = k - k.mean(dim=2, keepdim=True)  # shift = centering the keys without a mask
        phik = features2(torch, kc * st, iu)  # [B,H,n,r]
        phiq = features2(torch, q * st, iu)
        h = phik.transpose(-1, -2) @ ve  # [B,H,r,d+1]
        y = phiq @ h
    else:
        nc = n // CHUNK
        kbar = torch.cumsum(k, dim=2) / torch.arange(1, n + 1, dtype=q.dtype, device=q.device).view(1, 1, n, 1)
        m = tau * (q * kbar).sum(-1, keepdim=True)  # [B,H,n,1]
        # Psi_i = w(i) o phi(q'_i) blockwise: w_0 = T_2(-m), w_1 = T_1(-m), w_2 = 1
        phiq = features2(torch, q * st, iu)
        w0 = 1.0 - m + 0.5 * m * m
        w1 = 1.0 - m
        psi = torch.cat([phiq[..., :1] * w0, phiq[..., 1:nq] * w1, phiq[..., nq:]], dim=-1)
        phik = features2(torch, k * st, iu)
        r = phik.shape[-1]
        # chunk states and their exclusive prefix sums
        phik_c = phik.view(B, H, nc, CHUNK, r)
        ve_c = ve.view(B, H, nc, CHUNK, d + 1)
        states = phik_c.transpose(-1, -2) @ ve_c  # [B,H,nc,r,d+1]
        prefix = torch.cumsum(states, dim=2) - states
        y_inter = psi.view(B, H, nc, CHUNK, r) @ prefix  # [B,H,nc,C,d+1]
        # inside the chunk: a_ij = T_2(s_ij - m_i), j <= i
        qc = q.view(B, H, nc, CHUNK, d)
        kc = k.view(B, H, nc, CHUNK, d)
        s = tau * (qc @ kc.transpose(-1, -2)) - m.view(B, H, nc, CHUNK, 1)
        a = 1.0 + s + 0.5 * s * s
        mask = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).tril()
        a = a * mask
        y = (y_inter + a @ ve_c).reshape(B, H, n, d + 1)
    o = y[..., :d] / y[..., d:]
    o.backward(g)
    return o


def time_point(torch, step, n, d, causal, reps_target, predicted, limit, seed=0):
    gen = torch.Generator().manual_seed(seed + n * 131 + d * 7 + int(causal))
    shape = (1, HEADS, n, d)
    q = (torch.randn(shape, generator=gen) * 0.3).requires_grad_(True)
    k = torch.randn(shape, generator=gen).requires_grad_(True)
    v = torch.randn(shape, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)

    def run():
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        step(q, k, v, g, causal)
        return time.perf_counter() - t0

    warm = predicted < 1.0
    first = run() if warm else None
    # at least 3 timed runs unless one run takes over 2 s; at most 7
    if first is None:
        reps = 1
    elif first > 2.0:
        reps = 1
    else:
        reps = max(3, min(7, int(reps_target / max(first, 1e-9))))
    ts = [run() for _ in range(reps)]
    return {"median_s": statistics.median(ts), "reps": reps, "warmup": warm}


def torch_sweep(torch, ns, dims, limit):
    rows = []
    iu_cache = {}
    for d in dims:
        iu_cache[d] = quad_index(torch, d, "cpu")
        for causal in (False, True):
            last = {}
            for n in ns:
                for name, power in (("sdpa", 2), ("taylor2", 1)):
                    key = name
                    predicted = 0.0
                    if key in last:
                        m, t = last[key]
                        predicted = t * (n / m) ** power
                    if predicted > limit:
                        rows.append({"impl": name, "n": n, "head_dim": d, "causal": causal, "skipped": f"predicted {predicted:.1f} s > limit {limit} s"})
                        continue
                    if name == "sdpa":
                        step = lambda q, k, v, g, c: sdpa_step(torch, q, k, v, g, c)
                    else:
                        iu = iu_cache[d]
                        step = lambda q, k, v, g, c: taylor2_step(torch, q, k, v, g, c, iu)
                    try:
                        res = time_point(torch, step, n, d, causal, 0.5, predicted, limit)
                    except RuntimeError as e:  # out of memory and the like
                        rows.append({"impl": name, "n": n, "head_dim": d, "causal": causal, "skipped": str(e)[:200]})
                        continue
                    last[key] = (n, res["median_s"])
                    rows.append({"impl": name, "n": n, "head_dim": d, "causal": causal, **res})
                    print(f"  torch {name:8s} d={d:3d} causal={causal!s:5s} n={n:6d}: {res['median_s']:.4f} s", file=sys.stderr)
    return rows


def sanity_check(torch):
    """taylor2 must approach sdpa for small scores (R small): guards the implementation."""
    gen = torch.Generator().manual_seed(1)
    out = {}
    for causal in (False, True):
        q = torch.randn(1, 2, 128, 16, generator=gen) * 0.05
        k = torch.randn(1, 2, 128, 16, generator=gen)
        v = torch.randn(1, 2, 128, 16, generator=gen)
        g = torch.zeros_like(v)
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o1 = taylor2_step(torch, qq, kk, vv, g, causal, quad_index(torch, 16, "cpu"))
        o2 = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        out["causal" if causal else "noncausal"] = float((o1 - o2).norm() / o2.norm())
    return out


# ---------------------------------------------------------------------------------------------
# altgrad side


def run_altgrad(args, ns, dims, out_dir, limit):
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    repo = os.path.abspath(args.repo)
    binary = os.path.join(repo, "target", "release", "altgrad")
    poly = ",".join(f"{d}:2" for d in dims)
    exact = ",".join(str(d) for d in dims)
    ns_s = ",".join(str(n) for n in ns)
    have_cli = False
    if os.path.exists(binary):
        r = subprocess.run([binary, "bench", "--help"], capture_output=True, text=True)
        have_cli = r.returncode == 0 and "--ns" in r.stdout
    if have_cli:
        cmd = [binary, "bench", "--ns", ns_s, "--poly", poly, "--exact", exact, "--altgrad", "none",
               "--no-claims", "--no-roofline", "--limit", str(limit), "--out", out_dir]
        if args.quick:
            cmd.insert(2, "--quick")
        how = " ".join(cmd)
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    else:
        env.update(ALTGRAD_BENCH_OUT=out_dir, ALTGRAD_BENCH_NS=ns_s, ALTGRAD_BENCH_POLY=poly,
                   ALTGRAD_BENCH_EXACT=exact, ALTGRAD_BENCH_ALTGRAD="", ALTGRAD_BENCH_NO_CLAIMS="1",
                   ALTGRAD_BENCH_NO_ROOFLINE="1", ALTGRAD_BENCH_LIMIT=str(limit),
                   ALTGRAD_BENCH_QUICK="1" if args.quick else "0")
        cmd = ["cargo", "test", "--release", "--test", "bench_cli", "--", "--ignored", "--exact", "bench_driver"]
        how = "ALTGRAD_BENCH_* " + " ".join(cmd)
        subprocess.run(cmd, check=True, env=env, cwd=repo, stdout=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "bench.json")) as f:
        return json.load(f), how


def main():
    args = parse_args()
    import torch  # documented requirement; imported late so --help works without it

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    ns = [int(x) for x in args.ns.split(",")] if args.ns else ([512, 1024, 2048, 4096, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384, 32768])
    dims = [int(x) for x in args.dims.split(",")]
    limit = args.limit if args.limit is not None else (4.0 if args.quick else 60.0)

    info = {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "loadavg_start": loadavg(),
    }
    sanity = sanity_check(torch)
    print(f"torch {info['torch_version']}, {info['torch_threads']} threads; taylor2 vs sdpa rel. err at small scores: {sanity}", file=sys.stderr)
    t0 = time.time()
    torch_rows = torch_sweep(torch, ns, dims, limit)
    info["torch_seconds"] = time.time() - t0

    ag, how = None, None
    if args.altgrad_json:
        with open(args.altgrad_json) as f:
            ag = json.load(f)
        how = f"read {args.altgrad_json}"
    elif not args.no_altgrad:
        ag_dir = os.path.join(os.path.abspath(args.out), "altgrad")
        ag, how = run_altgrad(args, ns, dims, ag_dir, limit)
    info["loadavg_end"] = loadavg()

    ratios = []
    if ag is not None:
        def ag_time(method, n, d, causal):
            for r in ag["runs"]:
                if r["method"] == method and r["n"] == n and r["head_dim"] == d and r["causal"] == causal and (method == "exact" or r["degree"] == 2):
                    return r["median_s"]
            return None

        def th_time(impl, n, d, causal):
            for r in torch_rows:
                if r["impl"] == impl and r["n"] == n and r["head_dim"] == d and r["causal"] == causal and "median_s" in r:
                    return r["median_s"]
            return None

        for d in dims:
            for causal in (False, True):
                for n in ns:
                    ts, tt = th_time("sdpa", n, d, causal), th_time("taylor2", n, d, causal)
                    ae, ap = ag_time("exact", n, d, causal), ag_time("poly", n, d, causal)
                    div = lambda a, b: (a / b) if (a is not None and b) else None
                    ratios.append({
                        "n": n, "head_dim": d, "causal": causal,
                        "torch_sdpa_s": ts, "altgrad_exact_s": ae, "torch_taylor2_s": tt, "altgrad_poly2_s": ap,
                        "sdpa_over_exact": div(ts, ae),
                        "taylor2_over_poly2": div(tt, ap),
                        "sdpa_over_poly2": div(ts, ap),
                    })

    result = {
        "info": info,
        "sanity_taylor2_vs_sdpa_small_scores": sanity,
        "shapes": {"batch": 1, "heads": HEADS, "dims": dims, "ns": ns, "dtype": "float32", "causal_chunk": CHUNK},
        "torch": torch_rows,
        "altgrad_source": how,
        "altgrad_threads": None if ag is None else ag.get("threads"),
        "altgrad_gemm_peak_gflops": None if ag is None else ag.get("gemm_peak_gflops"),
        "ratios": ratios,
        "notes": "ratios are PyTorch time / altgrad time (fwd+bwd medians); > 1 means altgrad is faster. "
                 "taylor2 uses the same row shift as altgrad poly (global key mean, prefix mean when causal).",
    }
    path = os.path.join(args.out, "torch_compare.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)

    fmt = lambda x, p=4: "—" if x is None else f"{x:.{p}f}"
    print(f"torch {info['torch_version']} ({info['torch_threads']} threads) vs altgrad ({result['altgrad_threads']} threads); altgrad: {how}")
    print()
    print("| d | causal | n | torch sdpa s | altgrad exact s | sdpa/exact | torch taylor2 s | altgrad poly g=2 s | taylor2/poly | sdpa/poly |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ratios:
        print(f"| {r['head_dim']} | {r['causal']} | {r['n']} | {fmt(r['torch_sdpa_s'])} | {fmt(r['altgrad_exact_s'])} | {fmt(r['sdpa_over_exact'], 2)} | "
              f"{fmt(r['torch_taylor2_s'])} | {fmt(r['altgrad_poly2_s'])} | {fmt(r['taylor2_over_poly2'], 2)} | {fmt(r['sdpa_over_poly2'], 2)} |")
    print(f"\nwritten: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
