"""altgrad.load / Model: configs, tokenizers, losses and gradients against HF (fixture) and the
CLI (`altgrad grad --json` is the same report), the census against `altgrad inspect`, checkpoints."""

import json
import subprocess

import numpy as np
import pytest
import torch

import altgrad
import safetensors_io
from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "llama_tiny"
MINILM = ROOT / "models" / "minilm"
SMOLLM = ROOT / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "The polynomial method replaces exp by its Taylor polynomial."


def run_cli(cli, *args):
    r = subprocess.run([cli, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_tiny_config_tokenize_and_grads():
    m = altgrad.load("tiny")
    c = m.config
    assert (c["architecture"], c["num_layers"], c["num_heads"], c["num_kv_heads"], c["head_dim"]) == ("llama", 4, 4, 2, 32)
    assert c["dtype"] == "float32" and c["source"] == "tiny" and not c["has_tokenizer"]
    assert m.tokenize("hé") == list("hé".encode())
    ids = m.tokenize(TEXT)
    loss, grads, report = m.loss_and_grads(ids)
    assert 4 < loss < 8  # random weights: about ln(256) = 5.5
    assert grads["model.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    assert grads["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)
    assert grads["embeddings_grad"].shape == (len(ids), 128)
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert set(report) == {"model", "seq_len", "n_layers", "attention", "loss", "heads", "timing_s", "compare"}
    assert report["loss"] == loss and report["seq_len"] == len(ids) and report["compare"] is None
    assert len(report["heads"]) == 16 and all(h["method"] == "exact" for h in report["heads"])


def test_hf_fixture_matches_hf_transformers_float64():
    # tests/fixtures/llama_tiny: HF LlamaForCausalLM's float64 loss and gradients (make_llama_fixture.py).
    exp = safetensors_io.read(FIXTURE / "expected.safetensors")
    ids = [int(x) for x in (FIXTURE / "tokens.txt").read_text().split()]
    m = altgrad.load(FIXTURE, dtype=torch.float64)
    assert m.dtype == torch.float64
    loss, grads, _ = m.loss_and_grads(torch.tensor(ids))
    assert abs(loss - float(exp["loss"][0])) < 1e-12
    names = [k[len("grad.") :] for k in exp if k.startswith("grad.")]
    assert names and set(names) | {"embeddings_grad"} == set(grads)
    for name in names:
        np.testing.assert_allclose(grads[name].numpy(), exp["grad." + name], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(grads["embeddings_grad"].numpy(), exp["embeddings_grad"], rtol=1e-9, atol=1e-12)


def test_report_and_grads_are_those_of_the_cli(cli, tmp_path):
    m = altgrad.load("tiny")
    ids = m.tokenize(TEXT)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    loss, grads, report = m.loss_and_grads(ids, attention="poly", degree=2, compare=True, force=True)
    out = run_cli(cli, "grad", "--model", "tiny", "--tokens", tmp_path / "ids.txt", "--attention", "poly",
                  "--degree", "2", "--force", "--compare", "--json", "-", "--out", tmp_path / "g.safetensors")
    want = json.loads(out)
    assert set(report) == set(want)
    for key in ("model", "seq_len", "n_layers", "attention", "heads"):
        assert report[key] == want[key], key
    assert report["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert set(report["timing_s"]) == set(want["timing_s"]) and report["timing_s"]["exact_backward"] > 0
    c, wc = report["compare"], want["compare"]
    assert c["loss_exact"] == pytest.approx(wc["loss_exact"], rel=1e-6)
    assert c["rel_err_total"] == pytest.approx(wc["rel_err_total"], rel=1e-4)
    assert [l["layer"] for l in c["layers"]] == [l["layer"] for l in wc["layers"]]
    cli_grads = safetensors_io.read(tmp_path / "g.safetensors")
    assert set(cli_grads) == set(grads)
    for name, g in grads.items():
        np.testing.assert_allclose(g.numpy(), cli_grads[name], rtol=1e-4, atol=1e-6)


def test_policies_by_name():
    m = altgrad.load("tiny-bounded")
    ids = m.tokenize(TEXT)
    _, _, rep = m.loss_and_grads(ids, attention="altgrad", degree=2, force=True)
    assert all(h["method"] == "altgrad" and h["degree"] == 2 for h in rep["heads"])
    # per-head degrees (a loose tolerance keeps them at 2–4: d = 32, degree 6 would be r = 2.8e6)
    _, _, rep = m.loss_and_grads(ids[:16], attention="poly", tol=0.5, force=True)
    assert rep["attention"] == "poly" and {h["degree"] for h in rep["heads"]} <= {2, 4}
    _, _, rep = m.loss_and_grads(ids, attention="auto")
    assert rep["attention"] == "auto" and {h["method"] for h in rep["heads"]} <= {"exact", "poly"}


def test_inspect_is_the_cli_census(cli, tmp_path):
    m = altgrad.load("tiny")
    ids = m.tokenize(TEXT)
    heads = m.inspect(ids, tol=1e-2)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    out = run_cli(cli, "inspect", "--model", "tiny", "--tokens", tmp_path / "ids.txt", "--tol", "1e-2",
                  "--json", "-", "--plot", tmp_path / "heat")
    want = json.loads(out)
    assert want["tol"] == 1e-2 and want["seq_len"] == len(ids)
    assert len(heads) == len(want["heads"]) == 16
    for a, b in zip(heads, want["heads"]):
        assert set(a) == set(b)
        for key in ("layer", "head", "degree", "rank", "method"):
            assert a[key] == b[key]
        for key in ("max_abs_score", "bound", "bound_unshifted"):
            assert a[key] == pytest.approx(b[key], rel=1e-6)


def test_training_checkpoint_loads(cli, tmp_path):
    ck = tmp_path / "ckpt"
    (tmp_path / "train.txt").write_text(TEXT * 40)
    run_cli(cli, "train", "--text", tmp_path / "train.txt", "--model", "tiny", "--layers", "2", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
            "--steps", "2", "--batch-size", "1", "--seq-len", "32", "--checkpoint", ck, "--json", tmp_path / "log.jsonl")
    m = altgrad.load(ck)
    assert (m.config["num_layers"], m.config["hidden_size"], m.config["num_kv_heads"]) == (2, 32, 1)
    ids = m.tokenize(TEXT)
    loss, grads, report = m.loss_and_grads(ids)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    want = json.loads(run_cli(cli, "grad", "--model", ck, "--tokens", tmp_path / "ids.txt", "--json", "-"))
    assert report["model"] == want["model"] == str(ck)
    assert loss == pytest.approx(want["loss"], rel=1e-6)
    # the saved weights, not a fresh tiny model
    w = safetensors_io.read(ck / "weights.safetensors")
    fresh = altgrad.load("tiny")
    assert w["model.norm.weight"].shape == (32,) and fresh.config["hidden_size"] == 128
    m64 = altgrad.load(ck, dtype="float64")
    assert m64.loss_and_grads(ids)[0] == pytest.approx(loss, rel=1e-5)


@pytest.mark.skipif(not MINILM.is_dir(), reason="models/minilm not fetched (scripts/fetch-models.sh)")
def test_bert_hf_directory_with_tokenizer():
    m = altgrad.load(MINILM)
    assert m.config["architecture"] == "bert" and m.config["has_tokenizer"]
    ids = m.tokenize("Hello world")
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] … [SEP]
    loss, grads, report = m.loss_and_grads(ids, attention="poly", degree=2, force=True)
    assert loss > 0 and report["n_layers"] == 6 and "embeddings_grad" in grads
    assert len(m.inspect(ids)) == 6 * 12


@pytest.mark.skipif(not SMOLLM.is_file(), reason="models/smollm2 not fetched (scripts/fetch-models.sh)")
def test_gguf_file():
    m = altgrad.load(SMOLLM)
    assert m.config["architecture"] == "llama" and m.config["num_layers"] == 30
    ids = m.tokenize("The capital of France is Paris.")[:8]
    loss, grads, report = m.loss_and_grads(ids)
    assert 0 < loss < 10 and report["seq_len"] == len(ids)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: altgrad.load("no/such/model"), ValueError, "no/such/model: no such model"),
        (lambda: altgrad.load(3), TypeError, "^path: expected a str"),
        (lambda: altgrad.load("tiny", dtype="float16"), ValueError, "^dtype: expected"),
        (lambda: altgrad.load(__file__), ValueError, "not a GGUF file"),
    ],
)
def test_load_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(ids=[1, 2, 300]), ValueError, "^ids: .*300"),
        (dict(ids=[1, -2]), ValueError, "^ids: token id -2"),
        (dict(ids=[1]), ValueError, "^ids: the next-token loss needs at least 2"),
        (dict(ids=[]), ValueError, "^ids: no tokens"),
        (dict(ids=[1.0, 2.0]), TypeError, "^ids: position 0 is a float"),
        (dict(ids="hello"), TypeError, "^ids: expected token ids"),
        (dict(ids=torch.tensor([[1, 2]])), ValueError, "^ids: expected a 1-D"),
        (dict(ids=[1, 2], attention="fast"), ValueError, "^attention: expected exact, poly, altgrad or auto"),
        (dict(ids=[1, 2], attention="poly", degree=3), ValueError, "^degree: degree must be even"),
        (dict(ids=[1, 2], attention="auto", degree=2), ValueError, "^degree: auto chooses"),
        (dict(ids=[1, 2], attention="poly", tol=-1), ValueError, "^tol: must be a positive number"),
        (dict(ids=[1, 2], attention="poly", chunk=0), ValueError, "^chunk: must be at least 1"),
        (dict(ids=[1, 2], attention="poly", degree=6), ValueError, "^attention: poly with degree 6 .* FLOP per layer"),
        (dict(ids=[1, 2], attention="poly", max_slowdown=0), ValueError, "^max-slowdown: must be a positive"),
    ],
)
def test_loss_and_grads_errors(kw, exc, match):
    m = altgrad.load("tiny")
    with pytest.raises(exc, match=match):
        m.loss_and_grads(**kw)


def test_inspect_and_tokenize_errors():
    m = altgrad.load("tiny")
    with pytest.raises(ValueError, match="^tol: must be a positive number"):
        m.inspect([1, 2, 3], tol=0)
    with pytest.raises(TypeError, match="^text: expected a str"):
        m.tokenize(b"bytes")
