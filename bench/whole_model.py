#!/usr/bin/env python3
"""Whole-model loss + all parameter gradients: PyTorch (HF transformers, SDPA) vs altgrad, one run.

Both sides see the same token ids (altgrad's own tokenizer: `altgrad tokenize`), the same GGUF
weights (transformers dequantizes them to float32 with gguf-py), float32, the same number of
threads, and the mean next-token cross-entropy over the n−1 predictions. Repeats are interleaved
(torch, altgrad, torch, altgrad, …) and each side reports its median. FLOPs are counted from the
config (MATH §7): forward + backward of every matmul = 6 · (matmul parameters) per token, plus
exact causal attention 2·n²·(4d + 3d_v)/2 per head and layer; GFLOP/s = FLOPs / median seconds.
Both GEMM rates are measured in the same run, after each length's timings: PyTorch's
(torch.matmul, 2048³, f32, best of 5) and the one altgrad's ratios use (`altgrad bench`'s GEMM
peak, 2048³, best of the measurements before and after a short run: the faster of altgrad's own
product — the packed GEMM its projections run on — and faer's; until 2026-12-08 the column said
"faer" but held altgrad's product alone). The ratio of the two is the ceiling of PyTorch/altgrad
for a model that is mostly GEMMs: on a CPU where PyTorch's GEMM (MKL) is as fast as the best of
altgrad's and faer's, no GEMM-bound model can be 1.5× faster than PyTorch's.

Timing: one child process loads both models (torch imported first, so its OpenMP settings are
its defaults), runs one warm-up pass of each, then `--reps` passes of each **alternating**
(torch, altgrad, torch, …): a shared machine whose speed drifts over minutes then slows both
sides alike, and the medians compare like with like. PyTorch's pass is `model(...)` +
`loss.backward()`; altgrad's is the Python API's `Model.loss_and_grads`, timed inside the library
as forward + backward. Memory: each side once more in its own child process (load, one pass),
peak RSS = that child's ru_maxrss.

Usage (from the repository root, after `cargo build --release` and scripts/test-python.sh, which
builds and installs the Python package into .venv):

    .venv/bin/python bench/whole_model.py --seq-lens 1024 2048 --reps 3 --threads 2

Needs transformers, gguf, accelerate in the venv (scripts/setup-venv.sh installs them).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = "/usr/share/common-licenses/GPL-3"


def cpu_info():
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown":
                    model = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "SSE")
    return model, isa


TORCH_LOAD = r"""
import json, os, sys, time, resource
import torch
from transformers import AutoModelForCausalLM


def torch_model(gguf):
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                             torch_dtype=torch.float32, attn_implementation="sdpa")
    m.train(False)
    return m


def torch_pass(m, x):
    m.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    return time.perf_counter() - t0, float(out.loss)


def altgrad_pass(m, ids):
    loss, grads, rep = m.loss_and_grads(ids, attention="exact")
    del grads
    return rep["timing_s"]["forward"] + rep["timing_s"]["backward"], loss
"""

TIMING_CHILD = TORCH_LOAD + r"""
import altgrad
threads, n, reps, gguf, ids_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
altgrad.set_num_threads(threads)
ids = [int(x) for x in open(ids_path).read().split()][:n]
tm, am, x = torch_model(gguf), altgrad.load(gguf), torch.tensor([ids])
torch_pass(tm, x), altgrad_pass(am, ids)  # warm-up
tt, at = [], []
for r in range(reps):
    tt.append(torch_pass(tm, x)[0])
    at.append(altgrad_pass(am, ids)[0])
    print(f"  n={n} rep {r}: torch {tt[-1]:.2f} s, altgrad {at[-1]:.2f} s", file=sys.stderr, flush=True)
a = torch.randn(2048, 2048); b = torch.randn(2048, 2048)
torch.matmul(a, b)
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    torch.matmul(a, b)
    best = min(best, time.perf_counter() - t0)
print(json.dumps({"torch": tt, "altgrad": at, "gemm_gflops": 2 * 2048**3 / best / 1e9, "version": torch.__version__}))
"""

MEMORY_CHILD = TORCH_LOAD + r"""
side, threads, n, gguf, ids_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ids = [int(x) for x in open(ids_path).read().split()][:n]
if side == "torch":
    torch.set_num_threads(threads)
    _, loss = torch_pass(torch_model(gguf), torch.tensor([ids]))
else:
    import altgrad
    altgrad.set_num_threads(threads)
    _, loss = altgrad_pass(altgrad.load(gguf), ids)
print(json.dumps({"loss": loss, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(args, script, *argv):
    out = subprocess.run([args.python, "-c", script, *map(str, argv)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"child failed:\n{out.stderr}")
    sys.stderr.write(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def gemm_peak(args):
    """altgrad's GEMM peak (GFLOP/s): a short `altgrad bench` run's `gemm_peak_gflops` (the faster
    of altgrad's product and faer's, 2048³, best of the runs before and after)."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([args.altgrad, "bench", "--ns", "256", "--exact", "16", "--poly", "none", "--altgrad", "none",
                        "--no-claims", "--no-roofline", "--no-progress", "--threads", str(args.threads), "--out", tmp],
                       capture_output=True, text=True, check=True)
        with open(os.path.join(tmp, "bench.json")) as f:
            return json.load(f)["gemm_peak_gflops"]


def flops(cfg, n):
    h, inter, L, heads, kv, d, vocab = (cfg[k] for k in ("hidden", "inter", "layers", "heads", "kv", "d", "vocab"))
    per_layer = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * inter
    matmul = 6 * (L * per_layer + h * vocab) * n
    attn = L * heads * 2 * n * n * (4 * d + 3 * d) / 2
    return matmul + attn


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--model", default=GGUF)
    p.add_argument("--text", default=TEXT)
    p.add_argument("--altgrad", default=os.path.join(ROOT, "target/release/altgrad"),
                   help="the CLI (tokenizer and GEMM peak); the timed passes use the installed Python package")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args()
    if not os.path.exists(args.model):
        sys.exit(f"{args.model}: missing; run scripts/fetch-models.sh")
    # SmolLM2-135M's shape (from its GGUF metadata; asserted against altgrad's summary below)
    cfg = dict(hidden=576, inter=1536, layers=30, heads=9, kv=3, d=64, vocab=49152)
    ids = subprocess.run([args.altgrad, "tokenize", "--model", args.model, "--text", args.text],
                         capture_output=True, text=True, check=True).stdout
    model, isa = cpu_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ids_path = os.path.join(tmp, "ids.txt")
        with open(ids_path, "w") as f:
            f.write(ids)
        for n in args.seq_lens:
            t = child(args, TIMING_CHILD, args.threads, n, args.reps, args.model, ids_path)
            mt = child(args, MEMORY_CHILD, "torch", args.threads, n, args.model, ids_path)
            ma = child(args, MEMORY_CHILD, "altgrad", args.threads, n, args.model, ids_path)
            peak = gemm_peak(args)
            f = flops(cfg, n)
            tmed, amed = statistics.median(t["torch"]), statistics.median(t["altgrad"])
            rows.append(dict(n=n, torch_s=tmed, altgrad_s=amed, ratio=tmed / amed,
                             ratios=sorted(a / b for a, b in zip(t["torch"], t["altgrad"])),
                             torch_gflops=f / tmed / 1e9, altgrad_gflops=f / amed / 1e9, tflop=f / 1e12,
                             torch_loss=mt["loss"], altgrad_loss=ma["loss"], torch_gemm=t["gemm_gflops"],
                             gemm_peak=peak, torch_rss=mt["peak_rss"], altgrad_rss=ma["peak_rss"],
                             torch_version=t["version"]))
    print(f"CPU: {model} ({isa}), {args.threads} threads, torch {rows[0]['torch_version']}, "
          f"python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| n | TFLOP | PyTorch s | altgrad s | PyTorch/altgrad | PyTorch GFLOP/s | altgrad GFLOP/s | "
          "torch GEMM GFLOP/s | altgrad/faer GEMM peak GFLOP/s | altgrad % of that peak | loss torch / altgrad | "
          "peak RSS torch / altgrad (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = lambda x: f"{x / 1e9:.2f}" if x else "?"  # noqa: E731
        print(f"| {r['n']} | {r['tflop']:.2f} | {r['torch_s']:.2f} | {r['altgrad_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['torch_gflops']:.0f} | {r['altgrad_gflops']:.0f} | {r['torch_gemm']:.0f} | {r['gemm_peak']:.0f} | "
              f"{100 * r['altgrad_gflops'] / r['gemm_peak']:.0f}% | "
              f"{r['torch_loss']:.5f} / {r['altgrad_loss']:.5f} | {rss(r['torch_rss'])} / {rss(r['altgrad_rss'])} |")
    print("\nMedians of alternating passes in one process after a warm-up pass of each; altgrad s = forward + "
          "backward as timed inside the library, PyTorch s = model(...) + loss.backward() (loading excluded).")
    for r in rows:
        print(f"n = {r['n']}: PyTorch/altgrad of each alternating pair, sorted: "
              + ", ".join(f"{x:.2f}" for x in r["ratios"]))


if __name__ == "__main__":
    main()
