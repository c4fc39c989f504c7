"""Every bad input raises TypeError / ValueError naming the argument; a Rust
panic arrives as RuntimeError; nothing crashes the interpreter."""

import math

import pytest
import torch

import altgrad
from altgrad import _core


def qkv(b=1, t=5, h=2, hkv=1, d=4, dv=4, dtype=torch.float64):
    return torch.randn(b, t, h, d, dtype=dtype), torch.randn(b, t, hkv, d, dtype=dtype), torch.randn(b, t, hkv, dv, dtype=dtype)


def raises(exc, match, **kw):
    q, k, v = kw.pop("tensors", qkv())
    with pytest.raises(exc, match=match):
        altgrad.attention(q, k, v, **kw)


@pytest.mark.parametrize(
    "which,value,exc,match",
    [
        ("q", [[1.0]], TypeError, "^q: expected a torch.Tensor"),
        ("k", None, TypeError, "^k: expected a torch.Tensor"),
        ("v", torch.zeros(1, 5, 1, 4, dtype=torch.int64), TypeError, "^v: dtype must be"),
        ("q", torch.zeros(1, 5, 2, 4, dtype=torch.float16), TypeError, "^q: dtype must be"),
        ("k", torch.zeros(1, 5, 1, 4, dtype=torch.float32), TypeError, "^k: dtype .* differs from q"),
        ("q", torch.zeros(1, 5, 2, 4, dtype=torch.float64, device="meta"), ValueError, "^q: altgrad runs on the CPU"),
        ("q", torch.zeros(5, 2, 4, dtype=torch.float64), ValueError, "^q: expected a 4-D tensor"),
        ("k", torch.zeros(1, 6, 1, 4, dtype=torch.float64), ValueError, "^k: shape"),
        ("k", torch.zeros(1, 5, 1, 3, dtype=torch.float64), ValueError, "^k: shape"),
        ("k", torch.zeros(2, 5, 1, 4, dtype=torch.float64), ValueError, "^k: shape"),
        ("v", torch.zeros(1, 5, 2, 4, dtype=torch.float64), ValueError, "^v: shape"),
        ("v", torch.zeros(1, 4, 1, 4, dtype=torch.float64), ValueError, "^v: shape"),
        ("q", torch.zeros(1, 5, 3, 4, dtype=torch.float64), ValueError, "not a multiple"),
        ("q", torch.zeros(1, 0, 2, 4, dtype=torch.float64), ValueError, "^q: every dimension"),
        ("q", torch.zeros(1, 5, 2, 4, dtype=torch.float64).to_sparse(), TypeError, "^q: expected a dense"),
    ],
)
def test_bad_tensors(which, value, exc, match):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args[which] = value
    if which == "q" and isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[2] == 3:
        args["k"], args["v"] = torch.zeros(1, 5, 2, 4, dtype=torch.float64), torch.zeros(1, 5, 2, 4, dtype=torch.float64)
    if which == "q" and isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] == 0:
        args["k"], args["v"] = torch.zeros(1, 0, 1, 4, dtype=torch.float64), torch.zeros(1, 0, 1, 4, dtype=torch.float64)
    with pytest.raises(exc, match=match):
        altgrad.attention(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", ["exact", "poly", "altgrad"])
def test_non_finite_inputs(which, bad, method):
    t = dict(zip("qkv", qkv()))
    t[which].view(-1)[7] = bad
    with pytest.raises(ValueError, match=f"^{which}: has a non-finite value .* at flat index 7"):
        altgrad.attention(t["q"], t["k"], t["v"], method=method)


def test_non_finite_grad_output():
    q, k, v = (x.requires_grad_(True) for x in qkv())
    o = altgrad.attention(q, k, v, method="poly")
    g = torch.ones_like(o)
    g[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="^grad_output: has a non-finite value"):
        o.backward(g)


@pytest.mark.parametrize("causal", [False, True])
def test_overflow_is_an_error_not_a_silent_nan(causal):
    # Finite float32 inputs whose scores reach ~1e20: T_2(s) ~ s²/2 overflows float32 (3.4e38), so
    # the polynomial output would be NaN; float64 holds it, and exact attention's softmax never
    # forms exp of a large score.
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 1, 16, generator=g) for _ in range(3))
    q, k = q * 1e10, k * 1e10
    for method in ["poly", "altgrad"]:
        with pytest.raises(ValueError, match=r"^attention output o \(" + method + r" attention, F32\): \d+ of 128 values"):
            altgrad.attention(q, k, v, method=method, causal=causal)
        o = altgrad.attention(q.double(), k.double(), v.double(), method=method, causal=causal)
        assert torch.isfinite(o).all()
    assert torch.isfinite(altgrad.attention(q, k, v, method="exact", causal=causal)).all()


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(method="softmax"), ValueError, "^method: expected one of"),
        (dict(method=1), TypeError, "^method: expected a str"),
        (dict(method="poly", degree=3), ValueError, "^degree: must be even"),
        (dict(method="altgrad", degree=0), ValueError, "^degree: must be even"),
        (dict(method="poly", degree=-2), ValueError, "^degree: must be even"),
        (dict(method="poly", degree=2.0), TypeError, "^degree: expected an int"),
        (dict(method="poly", degree=True), TypeError, "^degree: expected an int"),
        (dict(scale=0.0), ValueError, "^scale: must be finite and positive"),
        (dict(scale=-1.0), ValueError, "^scale: must be finite and positive"),
        (dict(scale=math.nan), ValueError, "^scale: must be finite and positive"),
        (dict(scale=math.inf), ValueError, "^scale: must be finite and positive"),
        (dict(scale="1"), TypeError, "^scale: expected a float"),
        (dict(causal=1), TypeError, "^causal: expected a bool"),
        (dict(center=None), TypeError, "^center: expected a bool"),
        (dict(method="poly", chunk=0), ValueError, "^chunk: must be at least 1"),
        (dict(method="poly", chunk=1.5), TypeError, "^chunk: expected an int"),
        (dict(initial_state=torch.zeros(1)), ValueError, "^initial_state: only the causal polynomial"),
        (dict(method="poly", output_final_state=True), ValueError, "^output_final_state: .* pass causal=True"),
        (dict(method="altgrad", causal=True, output_final_state=True), ValueError, "^output_final_state: ALTGrad"),
        (dict(method="poly", causal=True, initial_state=torch.zeros(1)), TypeError, "^initial_state: expected a PolyState"),
        (dict(method="poly", causal=True, initial_state=(torch.zeros(1, dtype=torch.float64),) * 3 + (-1,)), ValueError,
         "^initial_state.count: must be non-negative"),
        (dict(method="poly", causal=True, initial_state=(torch.zeros(1, dtype=torch.float64),) * 3 + (0,)), ValueError,
         r"^initial_state.s: shape \[1\], expected \[1, 1, 15, 5\]"),
        (dict(method="poly", causal=True, initial_state=(torch.zeros(1, dtype=torch.float32),) * 3 + (0,)), TypeError,
         "^initial_state.s: dtype"),
        (dict(window=4), ValueError, "^window: a sliding window is causal"),
        (dict(window=0, causal=True), ValueError, "^window: must be at least 1"),
        (dict(window=4, causal=True, method="poly"), ValueError, "^window: a sliding window is an exact"),
        (dict(sinks=2, causal=True), ValueError, "^sinks: attention sinks belong"),
        (dict(sinks=-1), ValueError, "^sinks: must be non-negative"),
        (dict(method="hybrid", causal=True), ValueError, "^window: hybrid attention needs a window"),
        (dict(method="hybrid", window=4), ValueError, "^causal: hybrid attention is causal"),
        (dict(method="hybrid", causal=True, window=-1), ValueError, "^window: must be non-negative"),
        (dict(method="hybrid", causal=True, window=4, degree=3), ValueError, "^degree: must be even"),
        (dict(method="hybrid", causal=True, window=4, output_final_state=True), ValueError,
         "^output_final_state: only the causal polynomial"),
    ],
)
def test_bad_options(kw, exc, match):
    raises(exc, match, **kw)


def test_altgrad_kron_state_too_large():
    # d = 16, g = 6: r = C(22, 6) = 74613; the backward's Kronecker state r·(d_v+1)·d = 77.6e6
    # values is above its cap (MAX_KRON_STATE = 2^25); the forward alone is fine.
    # The forward refuses already, before any work.
    q, k, v = (x.requires_grad_(True) for x in qkv(t=3, d=16, dv=64, dtype=torch.float32))
    with pytest.raises(ValueError, match="^degree: altgrad's Kronecker state"):
        altgrad.attention(q, k, v, method="altgrad", degree=6)


@pytest.mark.parametrize("method", ["poly", "altgrad"])
def test_feature_width_too_large(method):
    # d = 16, g = 16: r = C(32, 16) ≈ 6e8 features, above MAX_FEATURE_DIM.
    q, k, v = qkv(t=3, d=16, dv=4)
    with pytest.raises(ValueError, match="^degree: (feature dimension r = C|altgrad.s Kronecker state)"):
        altgrad.attention(q, k, v, method=method, degree=16)


def test_core_checks_stand_on_their_own():
    import numpy as np

    q = np.zeros((1, 4, 2, 3))
    kw = dict(causal=False, scale=None, degree=2, center=True, chunk=64)
    with pytest.raises(TypeError, match="^q: expected a numpy array"):
        _core.attention_forward("exact", [1.0], q, q, **kw)
    with pytest.raises(TypeError, match="^k: expected a float64 array"):
        _core.attention_forward("exact", q, q.astype(np.float32), q, **kw)
    with pytest.raises(TypeError, match="^q: expected a float32 or float64 array"):
        _core.attention_forward("exact", q.astype(np.int32), q, q, **kw)
    with pytest.raises(ValueError, match="^q: must be C-contiguous"):
        _core.attention_forward("exact", np.zeros((1, 2, 4, 3)).transpose(0, 2, 1, 3), q, q, **kw)
    out = _core.attention_forward("poly", q, q, q, **kw)
    with pytest.raises(ValueError, match="^saved: missing `den`"):
        _core.attention_backward("poly", q, q, q, {"o": out["o"], "lse": out["lse"]}, out["o"], **kw)
    with pytest.raises(ValueError, match="^grad_output: shape"):
        _core.attention_backward("poly", q, q, q, out, out["o"][:, :2], **kw)
    with pytest.raises(ValueError, match="^kv_state: expected"):
        bad = dict(out, kv_state=np.ascontiguousarray(out["kv_state"][:, :, :3]))
        _core.attention_backward("poly", q, q, q, bad, out["o"], **kw)


def test_panic_is_a_runtime_error_not_a_crash():
    with pytest.raises(RuntimeError, match="a Rust panic"):
        _core._panic_for_tests()
    # the pool survives: later calls work
    q, k, v = qkv()
    assert altgrad.attention(q, k, v).shape == (1, 5, 2, 4)


def test_set_num_threads_checks():
    with pytest.raises(ValueError, match="^n: the number of threads"):
        altgrad.set_num_threads(0)
    with pytest.raises(ValueError, match="^n: the number of threads"):
        altgrad.set_num_threads(10**6)
    with pytest.raises(TypeError, match="^n: expected an int"):
        altgrad.set_num_threads("2")


def test_memory_error_instead_of_an_abort():
    # d = 32, g = 6: r = C(38, 6) ≈ 2.76e6 features; the non-causal states of 4096 batches need
    # ~1.5 TB. A failed allocation would abort the process; altgrad refuses beforehand.
    q = torch.randn(4096, 1, 1, 32)
    with pytest.raises(MemoryError, match="needs about .* GiB of working memory"):
        altgrad.attention(q, q, q, method="poly", degree=6)


def test_overflow_in_the_split_kernels_is_an_error_not_a_silent_nan():
    # altgrad.distributed's non-causal parts (_core.poly_split): finite float32 inputs whose
    # features overflow; the queries' output and the keys' gradients are checked where they are
    # made, the all-reduced key state where every rank reads it (its gradient: as the `grad` input)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g).numpy() for _ in range(3))
    kw = dict(scale=None, degree=2, center=False, chunk=64)
    (state,) = _core.poly_split("key_state", q, k, v, **kw)
    kbar = torch.zeros(1, 2, 16).numpy()
    _core.poly_split("queries", q, k, v, state=state, kbar=kbar, **kw)  # finite
    with pytest.raises(ValueError, match=r"^attention output o \(poly attention, F32\): \d+ of 256 values"):
        _core.poly_split("queries", q * 1e20, k, v, state=state, kbar=kbar, **kw)
    with pytest.raises(ValueError, match=r"^gradient dk \(poly attention, F32\): \d+ of 256 values"):
        _core.poly_split("key_state_backward", q, k * 1e15, v, grad=state * 1e30, **kw)
    with pytest.raises(ValueError, match=r"^key state H' \(the sum over the ranks\) \(poly attention, F32\): 5202 of "
                       r"5202 values are not finite .* float64 inputs"):
        _core.poly_split("queries", q, k, v, state=state * math.inf, kbar=kbar, **kw)
