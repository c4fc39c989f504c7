"""State chaining of the causal polynomial scan (fla's ``initial_state`` / ``output_final_state``):
pieces of a sequence, each started from the previous piece's final state, must give the output,
the final state and the gradients of one call over the whole sequence — including a loss on the
final state, whose gradient must reach every piece's inputs through the states. References: the
single call (itself checked against the naive O(n²) forms and finite differences in
``test_attention.py``), ``torch.autograd.gradcheck`` through the initial state, and a naive
polynomial attention written here in torch with the state's keys prepended."""

import math

import pytest
import torch

import altgrad

CUTS = {2: [0, 11, 24], 3: [0, 5, 13, 24]}


def chained(q, k, v, cuts, **kw):
    outs, state = [], None
    for a, b in zip(cuts, cuts[1:]):
        o, state = altgrad.attention(
            q[:, a:b], k[:, a:b], v[:, a:b], causal=True, initial_state=state, output_final_state=True, **kw
        )
        outs.append(o)
    return torch.cat(outs, dim=1), state


def inputs(b=2, t=24, h=4, hkv=2, d=8, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    return mk(b, t, h, d), mk(b, t, hkv, d), mk(b, t, hkv, dv)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("pieces", [2, 3])
def test_pieces_equal_the_whole(pieces, center):
    q, k, v = inputs()
    g = torch.randn(2, 24, 4, 6, dtype=torch.float64)
    # chunk ≤ the first piece: the reference point (mean of the first min(chunk, T) keys) is the
    # same in both runs, so the states agree too.
    kw = dict(method="poly", degree=2, center=center, chunk=4)

    whole, whole_state = altgrad.attention(q, k, v, causal=True, output_final_state=True, **kw)
    assert isinstance(whole_state, altgrad.PolyState)
    assert whole_state.s.shape == (2, 2, 45, 7)  # r = C(8 + 2, 2) = 45, D_v + 1 = 7
    assert whole_state.key_sum.shape == whole_state.reference.shape == (2, 2, 8)
    assert int(whole_state.count) == 24
    (whole * g).sum().backward()
    want = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None

    parts, state = chained(q, k, v, CUTS[pieces], **kw)
    torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-12)
    for a, b in zip(state, whole_state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (parts * g).sum().backward()
    for x, w in zip((q, k, v), want):
        torch.testing.assert_close(x.grad, w, rtol=1e-9, atol=1e-11)


def test_first_piece_shorter_than_chunk():
    # Another reference point (the first piece's 3 keys, not the whole sequence's first 24):
    # the function does not depend on it, so outputs and gradients agree to rounding.
    q, k, v = inputs(b=1, t=24, h=2, hkv=1, d=4, dv=4, seed=3)
    kw = dict(method="poly", degree=4)
    whole = altgrad.attention(q, k, v, causal=True, **kw)
    want = torch.autograd.grad(whole.square().sum(), (q, k, v))
    parts, _ = chained(q, k, v, [0, 3, 24], **kw)
    torch.testing.assert_close(parts, whole, rtol=1e-9, atol=1e-11)
    got = torch.autograd.grad(parts.square().sum(), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("pieces", [2, 3])
def test_gradient_through_the_final_state(pieces):
    # A loss on the final state too: its gradient must reach the earlier pieces' inputs.
    q, k, v = inputs(b=1, h=2, hkv=1, d=4, dv=4, seed=1)
    kw = dict(method="poly", degree=2, chunk=4)

    def loss(o, state):
        return o.square().sum() + state.s.square().sum() + 0.1 * state.key_sum.square().sum()

    whole = loss(*altgrad.attention(q, k, v, causal=True, output_final_state=True, **kw))
    want = torch.autograd.grad(whole, (q, k, v))
    got = torch.autograd.grad(loss(*chained(q, k, v, CUTS[pieces], **kw)), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_gradcheck_through_the_initial_state():
    # Finite differences (torch.autograd.gradcheck) of the second piece in its inputs and in the
    # state's s and key_sum (the reference point is a constant; count is an integer).
    q, k, v = inputs(b=1, t=6, h=2, hkv=1, d=3, dv=3, seed=2)
    kw = dict(method="poly", causal=True, chunk=2)
    _, st = altgrad.attention(q[:, :3], k[:, :3], v[:, :3], output_final_state=True, **kw)
    s0, ks0 = st.s.detach().requires_grad_(), st.key_sum.detach().requires_grad_()
    ref, count = st.reference.detach(), st.count

    def fn(q, k, v, s0, ks0):
        o, fin = altgrad.attention(
            q, k, v, initial_state=altgrad.PolyState(s0, ks0, ref, count), output_final_state=True, **kw
        )
        return o, fin.s, fin.key_sum

    args = [x[:, 3:].detach().requires_grad_() for x in (q, k, v)] + [s0, ks0]
    assert torch.autograd.gradcheck(fn, args)


def naive_poly(q, k, v, scale, degree, pos0):
    """Causal polynomial attention straight from MATH §3 in torch, one head group at a time:
    ``A_ij = T_g(s_ij − m_i)`` for ``j ≤ pos0 + i``, ``m_i = scale·q_i·k̄_i`` with ``k̄_i`` the mean of
    the keys row ``i`` sees; keys ``k [B, pos0 + T, H_kv, D]`` include the earlier pieces'."""
    b, t, h, d = q.shape
    hkv = k.shape[2]
    kk = k.repeat_interleave(h // hkv, dim=2).transpose(1, 2)  # [B, H, N, D]
    vv = v.repeat_interleave(h // hkv, dim=2).transpose(1, 2)
    qq = q.transpose(1, 2)
    n = kk.shape[2]
    pos = pos0 + torch.arange(t)
    mask = torch.arange(n)[None, :] <= pos[:, None]  # [T, N]
    kbar = torch.cumsum(kk, dim=2)[:, :, pos] / (pos + 1)[None, None, :, None].to(q.dtype)
    s = scale * (qq @ kk.transpose(-1, -2)) - scale * (qq * kbar).sum(-1, keepdim=True)
    a = sum(s**i / math.factorial(i) for i in range(degree + 1)) * mask
    return ((a / a.sum(-1, keepdim=True)) @ vv).transpose(1, 2)


def test_continued_piece_matches_naive_reference():
    q, k, v = inputs(b=2, t=20, h=2, hkv=1, d=4, dv=3, seed=4)
    _, st = altgrad.attention(q[:, :7], k[:, :7], v[:, :7], method="poly", causal=True, output_final_state=True,
                              degree=4, chunk=3)
    o = altgrad.attention(q[:, 7:], k[:, 7:], v[:, 7:], method="poly", causal=True, degree=4, chunk=3,
                          initial_state=st)
    want = naive_poly(q[:, 7:], k, v, 0.5, 4, 7)
    torch.testing.assert_close(o, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(o)
    got = torch.autograd.grad((o * g).sum(), (q, k, v))
    ref = torch.autograd.grad((want * g).sum(), (q, k, v))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_state_is_checked():
    q, k, v = inputs(b=1, t=8, h=2, hkv=1, d=4, dv=4)
    _, st = altgrad.attention(q, k, v, method="poly", causal=True, output_final_state=True)
    with pytest.raises(ValueError, match=r"^initial_state.s: shape \[1, 1, 15, 5\], expected \[1, 1, 70, 5\]"):
        altgrad.attention(q, k, v, method="poly", causal=True, degree=4, initial_state=st)
    with pytest.raises(ValueError, match="^initial_state.key_sum: has a non-finite value"):
        bad = altgrad.PolyState(st.s, st.key_sum.detach().clone().fill_(math.nan), st.reference, st.count)
        altgrad.attention(q, k, v, method="poly", causal=True, initial_state=bad)
    with pytest.raises(ValueError, match="^initial_state: ALTGrad"):
        altgrad.attention(q, k, v, method="altgrad", causal=True, initial_state=st)
    with pytest.raises(ValueError, match="^initial_state: the polynomial scan's state continues a causal"):
        altgrad.attention(q, k, v, method="poly", initial_state=st)
