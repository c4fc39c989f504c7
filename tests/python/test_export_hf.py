"""`altgrad export`: a training checkpoint written as an HF directory that HF transformers loads,
giving the same loss as `altgrad grad --json` on the checkpoint itself (issue 15, item 6).

Runs the built binary: ALTGRAD_BIN, or target/release/altgrad (cargo build --release).
"""

import json
import os
import pathlib
import subprocess

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (scripts/setup-venv.sh installs it)")
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (scripts/setup-venv.sh installs it)"
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("ALTGRAD_BIN", str(ROOT / "target" / "release" / "altgrad"))


def altgrad(*args):
    r = subprocess.run([BIN, *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, f"altgrad {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stderr}"
    return r.stdout


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_exported_checkpoint_loads_in_transformers_with_the_same_loss(tmp_path, kv_heads):
    if not os.path.exists(BIN):
        pytest.skip(f"no altgrad binary at {BIN} (run cargo build --release, or set ALTGRAD_BIN)")
    ck, hf = tmp_path / "ck", tmp_path / "hf"
    altgrad(
        "train", "--task", "mqar", "--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", kv_heads,
        "--vocab", "32", "--seq-len", "32", "--steps", "2", "--batch-size", "2", "--checkpoint", ck,
    )
    out = altgrad("export", ck, "--out", hf)
    assert "model.safetensors" in out
    ids = [(7 * i + 3) % 32 for i in range(24)]
    toks = tmp_path / "tokens.txt"
    toks.write_text(" ".join(map(str, ids)))
    report = json.loads(altgrad("grad", "--model", ck, "--tokens", toks, "--dtype", "f64", "--json", "-"))

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float64, attn_implementation="eager")
    model.eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        loss = model(input_ids=x, labels=x).loss.item()
    # transformers' LlamaRMSNorm computes in float32 even in a float64 model: agreement to f32 rounding.
    assert abs(loss - report["loss"]) < 1e-6 * max(1.0, abs(loss)), (loss, report["loss"])
    # The exported directory is also an altgrad model with that loss.
    again = json.loads(altgrad("grad", "--model", hf, "--tokens", toks, "--dtype", "f64", "--json", "-"))
    assert again["loss"] == report["loss"]
