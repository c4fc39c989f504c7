#!/usr/bin/env python3
"""Time of `altgrad grad` (loss and every gradient of a whole model) against the sequence length,
and its fitted exponent (least squares of log time on log n over n >= --fit-from). Issue 17: on a
model built with hybrid attention the cost grows linearly past the window.

Each n runs `altgrad grad --model M --text F --seq-len n --json -` --reps times (the process's own
forward and backward timings, `timing_s`), medians reported. The text must hold at least max(n)
tokens (byte-level models: bytes; `cat /usr/share/common-licenses/* > /tmp/licenses.txt` gives
~260k). Optional, not part of CI.

Usage:
    python bench/grad_scale.py --model CKPT_DIR --text /tmp/licenses.txt --ns 4096,8192,16384,32768,65536
"""

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="target/release/altgrad")
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--ns", default="4096,8192,16384,32768,65536")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--fit-from", type=int, default=4096)
    ap.add_argument("--extra", default="", help="more grad flags, e.g. '--attention exact'")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    print(f"CPU {cpu}; model {a.model}; text {a.text}; medians of {a.reps}")
    rows = []
    for n in (int(x) for x in a.ns.split(",")):
        fw, bw, loss = [], [], None
        for _ in range(a.reps):
            cmd = [a.binary, "grad", "--model", a.model, "--text", a.text, "--seq-len", str(n), "--json", "-", *a.extra.split()]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
            r = json.loads(p.stdout)
            if r["seq_len"] != n:
                sys.exit(f"the text gave {r['seq_len']} tokens, not {n}: give a longer --text")
            fw.append(r["timing_s"]["forward"])
            bw.append(r["timing_s"]["backward"])
            loss = r["loss"]
        rows.append((n, statistics.median(fw), statistics.median(bw), loss))
        print(f"n = {n}: forward {rows[-1][1]:.3f} s, backward {rows[-1][2]:.3f} s, loss {loss:.4f}", flush=True)
    print()
    print("| n | forward (s) | backward (s) | total (s) | tokens/s | loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, f, b, l in rows:
        print(f"| {n} | {f:.3f} | {b:.3f} | {f + b:.3f} | {n / (f + b):.0f} | {l:.4f} |")
    pts = [(n, f + b) for n, f, b, _ in rows if n >= a.fit_from]
    if len(pts) >= 2:
        xs, ys = [math.log(n) for n, _ in pts], [math.log(t) for _, t in pts]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        print(f"\nfitted exponent of forward + backward time, n from {pts[0][0]} to {pts[-1][0]}: {slope:.3f}")


if __name__ == "__main__":
    main()
