"""altgrad.attention against naive torch references (reference.py) and torch SDPA; gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import altgrad
import reference as ref
from conftest import randn

CASES = [  # (B, T, H, H_kv, D, D_v)
    (2, 7, 4, 2, 4, 3),
    (1, 1, 2, 1, 3, 2),
    (3, 5, 2, 2, 2, 4),
]


def small_inputs(b, t, h, hkv, d, dv, dtype=torch.float64):
    return randn(b, t, h, d, dtype=dtype), randn(b, t, hkv, d, dtype=dtype), randn(b, t, hkv, dv, dtype=dtype)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_exact(case, causal):
    q, k, v = small_inputs(*case)
    fn = lambda q, k, v: altgrad.attention(q, k, v, method="exact", causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_poly(case, causal, center):
    q, k, v = small_inputs(*case)
    for degree, chunk in [(2, 3), (4, None)]:
        fn = lambda q, k, v: altgrad.attention(  # noqa: E731
            q, k, v, method="poly", causal=causal, degree=degree, center=center, chunk=chunk
        )
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def grads_of(fn, q, k, v, g):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(g)
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES + [(2, 70, 4, 1, 8, 8)])
def test_exact_matches_naive_reference(case, causal):
    q, k, v = small_inputs(*case)
    g = torch.randn(case[0], case[1], case[2], case[5], dtype=torch.float64)
    mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, causal=causal, scale=0.3), q, k, v, g)
    want = grads_of(lambda q, k, v: ref.exact_attention(q, k, v, causal=causal, scale=0.3), q, k, v, g)
    for a, b in zip(mine, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES + [(2, 70, 4, 1, 8, 8)])
def test_poly_matches_naive_reference(case, causal, center):
    q, k, v = small_inputs(*case)
    g = torch.randn(case[0], case[1], case[2], case[5], dtype=torch.float64)
    for degree in (2, 4):
        kw = dict(causal=causal, degree=degree, center=center)
        mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="poly", chunk=16, **kw), q, k, v, g)
        want = grads_of(lambda q, k, v: ref.poly_attention(q, k, v, **kw), q, k, v, g)
        for a, b in zip(mine, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("center", [True, False])
def test_poly_causal_backward_over_scan_blocks(center):
    """Chunk 4 makes scan blocks of 64 rows: T = 150 is three blocks, whose states the forward
    saves (``block_states``) and the backward scans from; the gradients are the naive reference's,
    and those of ``_core.attention_backward`` without the block states (whole-sequence scans)."""
    b, t, h, hkv, d = 2, 150, 4, 2, 8
    q, k, v = small_inputs(b, t, h, hkv, d, d)
    g = torch.randn(b, t, h, d, dtype=torch.float64)
    kw = dict(causal=True, degree=2, center=center)
    mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="poly", chunk=4, **kw), q, k, v, g)
    want = grads_of(lambda q, k, v: ref.poly_attention(q, k, v, **kw), q, k, v, g)
    for a, w in zip(mine, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-11)
    core = dict(causal=True, scale=d**-0.5, degree=2, center=center, chunk=4)
    qn, kn, vn, gn = (x.detach().numpy() for x in (q, k, v, g))
    out = altgrad._core.attention_forward("poly", qn, kn, vn, **core)
    r = (d + 1) * (d + 2) // 2
    assert out["block_states"].shape == (b, hkv, 2 * r * (d + 1))
    saved = {name: out[name] for name in ("o", "den", "kv_state", "reference", "block_states")}
    blocked = altgrad._core.attention_backward("poly", qn, kn, vn, saved, gn, **core)
    del saved["block_states"]
    whole = altgrad._core.attention_backward("poly", qn, kn, vn, saved, gn, **core)
    saved["block_states"] = out["block_states"][:, :, :0].copy()  # empty: the same as left out
    empty = altgrad._core.attention_backward("poly", qn, kn, vn, saved, gn, **core)
    for a, w, e in zip(blocked[:3], whole[:3], empty[:3]):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(w), rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(torch.from_numpy(e), torch.from_numpy(w), rtol=0, atol=0)
    saved["block_states"] = out["block_states"][:, :, 1:].copy()
    with pytest.raises(ValueError, match="block_states: expected"):
        altgrad._core.attention_backward("poly", qn, kn, vn, saved, gn, **core)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES + [(2, 70, 4, 1, 8, 8)])
def test_altgrad_matches_the_papers_formula(case, causal, center):
    q, k, v = small_inputs(*case)
    g = torch.randn(case[0], case[1], case[2], case[5], dtype=torch.float64)
    for degree in (2, 4):
        kw = dict(causal=causal, degree=degree, center=center)
        o, dq, dk, dv = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="altgrad", chunk=16, **kw), q, k, v, g)
        torch.testing.assert_close(o, ref.poly_attention(q, k, v, **kw).detach(), rtol=1e-9, atol=1e-11)
        for a, b in zip((dq, dk, dv), ref.altgrad_gradients(q, k, v, g, **kw)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_altgrad_is_not_the_gradient_of_its_forward():
    # The paper's formula: close to poly's true gradient for small scores, but not equal.
    q, k, v = small_inputs(*CASES[0])
    g = torch.randn(2, 7, 4, 3, dtype=torch.float64)
    _, *alt = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="altgrad"), q, k, v, g)
    _, *pol = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="poly"), q, k, v, g)
    assert ref.rel_err(alt[0], pol[0]) > 1e-4
    fn = lambda q, k, v: altgrad.attention(q, k, v, method="altgrad")  # noqa: E731
    assert not torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)


def test_altgrad_tends_to_the_exact_gradient_with_the_degree():
    q, k, v = (0.5 * x.detach() for x in small_inputs(2, 33, 2, 1, 8, 8))
    g = torch.randn(2, 33, 2, 8, dtype=torch.float64)
    _, *exact = grads_of(lambda q, k, v: ref.exact_attention(q, k, v, causal=True), q, k, v, g)
    errs = []
    for degree in (2, 4, 6):
        _, *alt = grads_of(
            lambda q, k, v: altgrad.attention(q, k, v, method="altgrad", causal=True, degree=degree), q, k, v, g
        )
        errs.append(max(ref.rel_err(a, b) for a, b in zip(alt, exact)))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs


def sdpa(q, k, v, causal):
    """torch SDPA in [B, T, H, D] with GQA through repeat_interleave."""
    qh, kh, vh = ref.heads_first(q, k, v)
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=causal).transpose(1, 2)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 130, 4, 2, 16, 16), (1, 257, 8, 1, 64, 64), (2, 65, 6, 3, 32, 32)])
def test_exact_equals_torch_sdpa(shape, causal, dtype, tol):
    b, t, h, hkv, d, dv = shape
    q, k, v = small_inputs(b, t, h, hkv, d, dv, dtype)
    g = torch.randn(b, t, h, dv, dtype=dtype)
    mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, causal=causal), q, k, v, g)
    want = grads_of(lambda q, k, v: sdpa(q, k, v, causal), q, k, v, g)
    for a, b_ in zip(mine, want):
        assert a.dtype == dtype
        assert ref.rel_err(a, b_) < tol


@pytest.mark.parametrize("window,sinks", [(1, 0), (16, 0), (16, 4), (100, 2), (300, 0)])
def test_sliding_window_equals_torch_sdpa_with_mask(window, sinks):
    # Row i sees keys j <= i with i - j < window, or j < sinks: written out as a boolean mask for
    # torch SDPA (the reference); values and gradients.
    b, t, h, hkv, d, dv = 2, 130, 4, 2, 16, 16
    q, k, v = small_inputs(b, t, h, hkv, d, dv)
    g = torch.randn(b, t, h, dv, dtype=torch.float64)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) | (j < sinks))

    def masked(q, k, v):
        qh, kh, vh = ref.heads_first(q, k, v)
        return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed).transpose(1, 2)

    mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, causal=True, window=window, sinks=sinks), q, k, v, g)
    want = grads_of(masked, q, k, v, g)
    for a, b_ in zip(mine, want):
        # window 1: every row sees only itself, so dq and the attention part of dk are 0
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "poly", "altgrad"])
def test_float32_close_to_float64(method):
    q, k, v = small_inputs(2, 100, 4, 2, 16, 16)
    g = torch.randn(2, 100, 4, 16, dtype=torch.float64)
    kw = dict(method=method, causal=True)
    hi = grads_of(lambda q, k, v: altgrad.attention(q, k, v, **kw), q, k, v, g)
    lo = grads_of(lambda q, k, v: altgrad.attention(q, k, v, **kw), q.float(), k.float(), v.float(), g.float())
    for a, b in zip(lo, hi):
        assert a.dtype == torch.float32
        assert ref.rel_err(a.double(), b) < 1e-4


def test_non_contiguous_inputs_are_made_contiguous():
    # [B, H, T, D] tensors viewed as [B, T, H, D]: strided views, gradients flow back to them.
    qh, kh, vh = (torch.randn(2, 4, 9, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    q, k, v = (x.transpose(1, 2) for x in (qh, kh, vh))
    assert not q.is_contiguous()
    o = altgrad.attention(q, k, v, method="poly", causal=True)
    o.sum().backward()
    want = ref.poly_attention(*(x.detach().transpose(1, 2).contiguous() for x in (qh, kh, vh)), causal=True)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-12)
    assert qh.grad is not None and qh.grad.shape == qh.shape


def test_lazily_negated_inputs_are_read_as_their_values():
    # torch._neg_view(x) is -x held as x with a negative bit, which numpy cannot read directly
    q, k, v = small_inputs(1, 9, 2, 1, 4, 4)
    nq = torch._neg_view(q)
    assert nq.is_neg()
    o = altgrad.attention(nq, k, v, method="poly", causal=True)
    want = ref.poly_attention(-q, k, v, causal=True)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-12)


def test_gradient_only_where_required():
    q = torch.randn(1, 5, 2, 4, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(1, 5, 2, 4, dtype=torch.float64), torch.randn(1, 5, 2, 4, dtype=torch.float64)
    altgrad.attention(q, k, v).sum().backward()
    assert q.grad is not None and k.grad is None and v.grad is None


def test_no_grad_and_inference_mode():
    q, k, v = small_inputs(1, 6, 2, 1, 4, 4)
    with torch.no_grad():
        o = altgrad.attention(q, k, v, method="poly")
    assert not o.requires_grad
    with torch.inference_mode():
        o2 = altgrad.attention(q, k, v, method="poly")
    torch.testing.assert_close(o, o2)


def test_output_is_zero_copy_from_rust():
    q, k, v = small_inputs(1, 6, 2, 1, 4, 4, dtype=torch.float32)
    o = altgrad.attention(q, k, v)
    assert o.is_contiguous() and o.shape == (1, 6, 2, 4) and o.dtype == torch.float32
    assert o.grad_fn is not None and "ExactAttention" in type(o.grad_fn).__name__


def test_scale_and_default_scale():
    q, k, v = small_inputs(2, 9, 2, 2, 5, 5)
    torch.testing.assert_close(altgrad.attention(q, k, v), altgrad.attention(q, k, v, scale=5 ** -0.5))
    torch.testing.assert_close(
        altgrad.attention(q, k, v, scale=0.7, method="poly"), ref.poly_attention(q, k, v, scale=0.7)
    )


HYBRID_CASES = [  # (B, T, H, H_kv, D, D_v, window, sinks, chunk)
    (2, 23, 4, 2, 4, 3, 5, 2, 4),
    (1, 40, 2, 1, 8, 8, 16, 0, 7),
    (3, 9, 2, 2, 3, 2, 0, 3, 2),
    (1, 12, 2, 1, 4, 4, 0, 0, 5),
    (1, 10, 3, 1, 4, 2, 10, 1, 3),
]


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("case", HYBRID_CASES)
def test_hybrid_matches_naive_reference(case, center):
    b, t, h, hkv, d, dv, window, sinks, chunk = case
    q, k, v = small_inputs(b, t, h, hkv, d, dv)
    g = torch.randn(b, t, h, dv, dtype=torch.float64)
    for degree in (2, 4):
        kw = dict(window=window, sinks=sinks, degree=degree, center=center)
        mine = grads_of(
            lambda q, k, v: altgrad.attention(q, k, v, method="hybrid", causal=True, chunk=chunk, **kw), q, k, v, g
        )
        want = grads_of(lambda q, k, v: ref.hybrid_attention(q, k, v, **kw), q, k, v, g)
        for a, w in zip(mine, want):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-11)


def test_gradcheck_hybrid():
    q, k, v = small_inputs(2, 11, 4, 2, 3, 2)
    fn = lambda q, k, v: altgrad.attention(  # noqa: E731
        q, k, v, method="hybrid", causal=True, window=3, sinks=1, chunk=4
    )
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_hybrid_float32_and_its_limits():
    q, k, v = small_inputs(2, 150, 4, 2, 16, 16)
    g = torch.randn(2, 150, 4, 16, dtype=torch.float64)
    want = grads_of(lambda q, k, v: ref.hybrid_attention(q, k, v, window=32, sinks=1), q, k, v, g)
    f32 = [x.float() for x in (q, k, v, g)]
    mine = grads_of(lambda q, k, v: altgrad.attention(q, k, v, method="hybrid", causal=True, window=32, sinks=1), *f32)
    for a, w in zip(mine, want):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), w, rtol=2e-4, atol=2e-5)
    # a window of the whole sequence is exact causal attention; no window and no sinks is poly
    full = altgrad.attention(q, k, v, method="hybrid", causal=True, window=150)
    torch.testing.assert_close(full, ref.exact_attention(q, k, v, causal=True), rtol=1e-10, atol=1e-12)
    none = altgrad.attention(q, k, v, method="hybrid", causal=True, window=0)
    torch.testing.assert_close(none, ref.poly_attention(q, k, v, causal=True), rtol=1e-10, atol=1e-12)
