#!/usr/bin/env python3
"""Softmax vs polynomial vs hybrid attention language models trained with the same wall-clock
budget (issue 17), with `altgrad train` (the tiny decoder: 4 layers, hidden 128, 4 heads of 32,
2 key/value heads; byte-level tokens):

- `softmax`: exact attention, q/k heads of 32;
- `poly`: every layer causal polynomial attention of degree 2 over q/k projected to d_f = 16;
- `hybrid`: every layer hybrid attention, window 64 + 1 sink exact, the far keys by degree 2 over
  q/k of d_f = 16 (Based / LoLCATs-style).

For each sequence length n in --ns each kind first runs 2 updates to measure its step time, then
`budget / step time` updates (at least 5) with `--tokens-per-update` tokens per update (batch =
tokens / n), held-out loss every tenth of the run. Text: every file in --text (default the licences
in /usr/share/common-licenses), each split 90/10 into training and held-out bytes. With --mqar,
also multi-query associative recall at the sequence lengths and pair counts given, same budget.

Writes DIR/<task>-n<n>-<kind>.jsonl (the train logs), DIR/<task>-n<n>-<kind>-ckpt (the trained
model: `altgrad grad --model` loads it) and DIR/summary.json, and prints markdown
tables: final held-out loss (or MQAR accuracy), updates done, seconds per update. Plots with
`altgrad train-plot --x time`. Optional, not part of CI.

Usage:
    python bench/hybrid_train.py --ns 1024,4096 --budget 150 --out /tmp/hybrid-train
"""

import argparse
import glob
import json
import os
import subprocess
import sys

KINDS = {
    "softmax": ["--attention", "exact"],
    "poly": ["--attention", "poly", "--feature-dim", "16"],
    "hybrid": ["--attention", "hybrid", "--window", "64", "--sinks", "1", "--feature-dim", "16"],
}


def train(binary, args, log):
    cmd = [binary, "train", *args, "--json", log]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    return [json.loads(line) for line in open(log)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", default="target/release/altgrad")
    ap.add_argument("--ns", default="1024,4096")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds of training per run")
    ap.add_argument("--tokens-per-update", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--text", nargs="*", default=sorted(glob.glob("/usr/share/common-licenses/*")))
    ap.add_argument("--mqar", default="", help="MQAR runs as LEN:PAIRS,... (e.g. 128:8,512:8,512:16)")
    ap.add_argument("--vocab", type=int, default=64, help="MQAR token range (keys and values)")
    ap.add_argument("--model-flags", default="", help="more train flags for every run, e.g. '--layers 2 --hidden 64'")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    texts = sorted({os.path.realpath(t) for t in a.text if os.path.isfile(t)})  # symlinks once
    jobs = [("text", int(n), None) for n in a.ns.split(",") if n]
    jobs += [("mqar", int(s.split(":")[0]), int(s.split(":")[1])) for s in a.mqar.split(",") if s]
    summary = []
    for task, n, pairs in jobs:
        batch = max(1, a.tokens_per_update // n)
        if task == "mqar":
            data = ["--task", "mqar", "--mqar-pairs", str(pairs), "--vocab", str(a.vocab)]
        else:
            data = sum((["--text", t] for t in texts), [])
        for kind, flags in KINDS.items():
            base = [*flags, *data, "--seq-len", str(n), "--batch-size", str(batch), "--lr", str(a.lr), "--seed", "1"]
            base += a.model_flags.split()
            tag = f"{task}-n{n}" + (f"-p{pairs}" if pairs else "") + f"-{kind}"
            probe = train(a.binary, [*base, "--steps", "2", "--eval-seqs", "1"], os.path.join(a.out, f"{tag}-probe.jsonl"))
            step_s = probe[-1]["step_s"]
            steps = max(5, int(a.budget / step_s))
            recs = train(
                a.binary,
                [*base, "--steps", str(steps), "--eval-every", str(max(1, steps // 10)), "--eval-seqs", "4",
                 "--checkpoint", os.path.join(a.out, f"{tag}-ckpt")],
                os.path.join(a.out, f"{tag}.jsonl"),
            )
            last = [r for r in recs if r.get("val_loss") is not None][-1]
            row = {
                "task": task,
                "n": n,
                "pairs": pairs,
                "kind": kind,
                "batch": batch,
                "steps": steps,
                "s_per_update": sum(r["step_s"] for r in recs) / len(recs),
                "wall_s": sum(r["step_s"] for r in recs),
                "val_loss": last["val_loss"],
                "accuracy": last.get("accuracy"),
            }
            summary.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print()
    print("| task | n | pairs | kind | batch | updates | s/update | train s | held-out loss | accuracy |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in summary:
        acc = f"{r['accuracy']:.3f}" if r["accuracy"] is not None else "—"
        print(
            f"| {r['task']} | {r['n']} | {r['pairs'] or '—'} | {r['kind']} | {r['batch']} | {r['steps']} | "
            f"{r['s_per_update']:.3f} | {r['wall_s']:.0f} | {r['val_loss']:.4f} | {acc} |"
        )


if __name__ == "__main__":
    main()
