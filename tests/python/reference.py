"""Naive torch references for the tests, written from MATH.md (§1–5), not from the Rust code.

Layout [B, T, H, D] (flash-attn, MATH §1); GQA by repeating each key/value head over its group of
H // H_kv query heads (torch.repeat_interleave). Every reference is plain differentiable torch, so
torch autograd supplies its gradient (except ALTGrad's, which is not the gradient of a function
and is written out from MATH §5).
"""

import math

import torch


def expand(x, heads):
    """[B, T, H_kv, D] → [B, H, T, D]: each key/value head repeated over its GQA group."""
    return x.repeat_interleave(heads // x.shape[2], dim=2).transpose(1, 2)


def heads_first(q, k, v):
    """[B, T, H, D] → [B, H, T, D], with k, v repeated to H heads (GQA)."""
    h = q.shape[2]
    return q.transpose(1, 2), expand(k, h), expand(v, h)


def causal_mask(t, device=None):
    """[T, T] bool, True where key j may be seen by query i (j ≤ i, MATH §1)."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def scores(q, k, scale):
    """s_ij = τ q_i·k_j, [B, H, T, T]."""
    return scale * q @ k.transpose(-1, -2)


def exact_attention(q, k, v, causal=False, scale=None):
    """Softmax attention with an explicit T×T matrix (MATH §1–2); returns o [B, T, H, D_v]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = heads_first(q, k, v)
    s = scores(qh, kh, scale)
    if causal:
        s = s.masked_fill(~causal_mask(s.shape[-1]), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vh).transpose(1, 2)


def taylor(x, degree):
    """T_g(x) = Σ_{t ≤ g} xᵗ / t! (MATH §3)."""
    out = torch.ones_like(x)
    term = torch.ones_like(x)
    for t in range(1, degree + 1):
        term = term * x / t
        out = out + term
    return out


def row_shift(qh, kh, scale, causal):
    """m_i = τ q_i·k̄_i with k̄_i the mean of the keys row i may see: the global mean, or the
    prefix mean mean_{j ≤ i} k_j under the causal mask (MATH §3). [B, H, T, 1]."""
    t = kh.shape[-2]
    if causal:
        counts = torch.arange(1, t + 1, dtype=kh.dtype).view(1, 1, t, 1)
        kbar = kh.cumsum(dim=-2) / counts
    else:
        kbar = kh.mean(dim=-2, keepdim=True)
    return scale * (qh * kbar).sum(dim=-1, keepdim=True)


def poly_weights(q, k, causal, scale, degree, center):
    """The polynomial attention matrix a_ij = T_g(s_ij − m_i), masked (MATH §3–4), [B, H, T, T],
    and the head-first q, k."""
    qh, kh = q.transpose(1, 2), expand(k, q.shape[2])
    s = scores(qh, kh, scale)
    if center:
        s = s - row_shift(qh, kh, scale, causal)
    a = taylor(s, degree)
    if causal:
        a = a * causal_mask(a.shape[-1]).to(a.dtype)
    return a


def poly_attention(q, k, v, causal=False, scale=None, degree=2, center=True):
    """Polynomial attention O_i = Σ_j a_ij v_j / Σ_j a_ij with a_ij = T_g(s_ij − m_i) (MATH §3–4),
    differentiable by autograd through the row shift; returns o [B, T, H, D_v]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    a = poly_weights(q, k, causal, scale, degree, center)
    _, _, vh = heads_first(q, k, v)
    return ((a @ vh) / a.sum(dim=-1, keepdim=True)).transpose(1, 2)


def sum_groups(x, num_kv_heads):
    """[B, H, T, D] gradients of repeated heads → [B, T, H_kv, D] (sum over each GQA group)."""
    b, h, t, d = x.shape
    return x.view(b, num_kv_heads, h // num_kv_heads, t, d).sum(dim=2).transpose(1, 2)


def altgrad_gradients(q, k, v, grad_o, causal=False, scale=None, degree=2, center=True):
    """ALTGrad's (dq, dk, dv) for upstream gradient G = grad_o (MATH §5; LSSSZ Algorithm 1):
    f̃ = D̃⁻¹ (T_g(S − m) masked) in place of softmax in the softmax-gradient formula,
    p = f̃ ∘ (G Vᵀ) − diag(δ) f̃ with δ_i = G_i·õ_i — which is exactly torch's softmax backward
    primitive applied to f̃ —, dq = τ p K, dk = τ pᵀ Q, dv = f̃ᵀ G; no chain rule through m."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    with torch.no_grad():
        a = poly_weights(q, k, causal, scale, degree, center)
        f = a / a.sum(dim=-1, keepdim=True)
        qh, kh, vh = heads_first(q, k, v)
        g = grad_o.transpose(1, 2)
        d_f = g @ vh.transpose(-1, -2)
        p = torch.ops.aten._softmax_backward_data(d_f, f, -1, f.dtype)
        dq = (scale * p @ kh).transpose(1, 2)
        dk = sum_groups(scale * p.transpose(-1, -2) @ qh, k.shape[2])
        dv = sum_groups(f.transpose(-1, -2) @ g, k.shape[2])
    return dq, dk, dv


def rel_err(x, y):
    """‖x − y‖ / ‖y‖ (MATH §1)."""
    return ((x - y).norm() / y.norm()).item()


def hybrid_attention(q, k, v, window, sinks, scale=None, degree=2, center=True):
    """Hybrid attention written out from MATH §4.1, causal, as plain torch (autograd gives its
    gradient): key j ≤ i is near when i − j < window or j < sinks, with log-weight s_ij; else far,
    with log-weight ln T_g(s_ij − μ_i) + μ_i, μ_i = τ q_i·k̄_i and k̄_i the mean of row i's far keys
    (0 without center or without far keys); o_i = softmax over the log-weights of row i, times V.
    Returns o [B, T, H, D_v]."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qh, kh, vh = heads_first(q, k, v)
    t = q.shape[1]
    s = scores(qh, kh, scale)
    i = torch.arange(t).view(t, 1)
    j = torch.arange(t).view(1, t)
    seen = j <= i
    near = seen & ((i - j < window) | (j < sinks))
    far = seen & ~near
    if center:
        f = far.to(q.dtype)  # [T, T]
        counts = f.sum(dim=-1, keepdim=True).clamp(min=1)  # [T, 1]
        kbar = (f @ kh) / counts  # [B, H, T, D]
        mu = scale * (qh * kbar).sum(dim=-1, keepdim=True)  # [B, H, T, 1]
    else:
        mu = torch.zeros_like(s[..., :1])
    # the far log-weights, computed where far (T_g > 0 for even g) and masked elsewhere
    far_logw = torch.log(taylor(torch.where(far, s - mu, torch.zeros_like(s)), degree)) + mu
    logw = torch.where(near, s, torch.where(far, far_logw, torch.full_like(s, float("-inf"))))
    return (torch.softmax(logw, dim=-1) @ vh).transpose(1, 2)
