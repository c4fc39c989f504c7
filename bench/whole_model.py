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
peak: faer, 2048³, best of the measurements before and after a short run). The ratio of the two
is the ceiling of PyTorch/altgrad for a model that is mostly GEMMs: on a CPU where PyTorch's GEMM
(MKL) is as fast as faer's, no GEMM-bound model can be 1.5× faster than PyTorch's.

Each side runs in its own child process, in the same way: load the model, one warm-up pass,
then the timed pass (PyTorch: `model(...)` + `loss.backward()`; altgrad: the Python API's
`Model.loss_and_grads`, timed inside the library as forward + backward), so both are measured
warm (threads started, code paths and allocator in use). Peak memory is the child's ru_maxrss.

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


TORCH_CHILD = r"""
import json, os, sys, time, statistics, resource
import torch
threads, n, reps, gguf, ids_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
from transformers import AutoModelForCausalLM
ids = [int(x) for x in open(ids_path).read().split()][:n]
m = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                         torch_dtype=torch.float32, attn_implementation="sdpa")
m.train(False)
x = torch.tensor([ids])
times, loss = [], None
for r in range(reps + 1):
    m.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = m(input_ids=x, labels=x)
    out.loss.backward()
    dt = time.perf_counter() - t0
    if r > 0:
        times.append(dt)
    loss = float(out.loss)
a = torch.randn(2048, 2048); b = torch.randn(2048, 2048)
torch.matmul(a, b)
best = float("inf")
for _ in range(5):
    t0 = time.perf_counter()
    torch.matmul(a, b)
    best = min(best, time.perf_counter() - t0)
gemm = 2 * 2048**3 / best / 1e9
print(json.dumps({"times": times, "loss": loss, "gemm_gflops": gemm,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "torch": torch.__version__}))
"""


def run_torch(args, n, ids_path, reps):
    out = subprocess.run([args.python, "-c", TORCH_CHILD, str(args.threads), str(n), str(reps), args.model, ids_path],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


ALTGRAD_CHILD = r"""
import json, os, sys, resource
import altgrad
threads, n, gguf, ids_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
altgrad.set_num_threads(threads)
ids = [int(x) for x in open(ids_path).read().split()][:n]
m = altgrad.load(gguf)
for _ in range(2):  # warm-up, then the timed pass
    loss, grads, rep = m.loss_and_grads(ids, attention="exact")
    del grads
print(json.dumps({"time": rep["timing_s"]["forward"] + rep["timing_s"]["backward"], "loss": loss,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_altgrad(args, n, ids_path):
    """One altgrad child: load, warm-up pass, timed pass (through the Python API)."""
    out = subprocess.run([args.python, "-c", ALTGRAD_CHILD, str(args.threads), str(n), args.model, ids_path],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def faer_peak(args):
    """altgrad's GEMM peak (GFLOP/s): a short `altgrad bench` run's `gemm_peak_gflops`."""
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
            tt, at = [], []
            tr = None
            for r in range(args.reps):
                tr = run_torch(args, n, ids_path, 1)  # one warm-up + one timed pass per child
                tt.extend(tr["times"])
                ar = run_altgrad(args, n, ids_path)
                at.append(ar["time"])
                print(f"  n={n} rep {r}: torch {tr['times']} altgrad {ar['time']:.2f}", file=sys.stderr, flush=True)
            peak = faer_peak(args)
            f = flops(cfg, n)
            tmed, amed = statistics.median(tt), statistics.median(at)
            rows.append(dict(n=n, torch_s=tmed, altgrad_s=amed,
                             ratio=tmed / amed, torch_gflops=f / tmed / 1e9, altgrad_gflops=f / amed / 1e9,
                             tflop=f / 1e12, torch_loss=tr["loss"], altgrad_loss=ar["loss"],
                             torch_gemm=tr["gemm_gflops"], faer_gemm=peak, torch_rss=tr["peak_rss"],
                             altgrad_rss=ar["peak_rss"],
                             torch_version=tr["torch"]))
    print(f"CPU: {model} ({isa}), {args.threads} threads, torch {rows[0]['torch_version']}, "
          f"python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| n | TFLOP | PyTorch s | altgrad s | PyTorch/altgrad | PyTorch GFLOP/s | altgrad GFLOP/s | "
          "torch GEMM GFLOP/s | faer GEMM GFLOP/s | altgrad % of faer peak | loss torch / altgrad | "
          "peak RSS torch / altgrad (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = lambda x: f"{x / 1e9:.2f}" if x else "?"  # noqa: E731
        print(f"| {r['n']} | {r['tflop']:.2f} | {r['torch_s']:.2f} | {r['altgrad_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['torch_gflops']:.0f} | {r['altgrad_gflops']:.0f} | {r['torch_gemm']:.0f} | {r['faer_gemm']:.0f} | "
              f"{100 * r['altgrad_gflops'] / r['faer_gemm']:.0f}% | "
              f"{r['torch_loss']:.5f} / {r['altgrad_loss']:.5f} | {rss(r['torch_rss'])} / {rss(r['altgrad_rss'])} |")
    print("\nBoth sides: the second pass in a fresh process (a warm-up pass first); altgrad s = forward + "
          "backward as timed inside the library, PyTorch s = model(...) + loss.backward() (model loading "
          "excluded from both).")


if __name__ == "__main__":
    main()
