"""``altgrad.attention``: exact, polynomial, ALTGrad or hybrid attention as a ``torch.autograd.Function``.

Layout (flash-attn, MATH §1): ``q [B, T, H, D]``, ``k [B, T, H_kv, D]``, ``v [B, T, H_kv, D_v]``,
``o [B, T, H, D_v]``; query head ``h`` reads key/value head ``h // (H // H_kv)`` (GQA). CPU tensors
of one dtype, float32 or float64. Forward and backward run in Rust (``altgrad._core``) with the GIL
released; contiguous inputs are read in place, outputs are handed over without a copy.

Every call builds one frozen ``_Options``; ``_AttentionFunction.forward(ctx, opts, q, k, v, s0,
key_sum0, reference0, count0)`` returns ``o`` or ``(o, *final_state)`` and ``backward`` returns
``(None, dq, dk, dv, ds0, dkey_sum0, None, None)``: the causal polynomial scan's state goes in and
out as the four tensors of a :class:`PolyState` (fla's ``initial_state`` / ``output_final_state``),
and gradients flow through it.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import _core

__all__ = [
    "attention",
    "METHODS",
    "PolyState",
    "ExactAttention",
    "PolyAttention",
    "AltGradAttention",
    "HybridAttention",
]

#: The methods ``attention`` accepts.
METHODS = ("exact", "poly", "altgrad", "hybrid")

#: The forward tensors each method saves for its backward, besides ``q, k, v`` (names of the dict
#: ``_core.attention_forward`` returns): ``o [B, T, H, D_v]``, and ``lse [B, H, T]`` (exact) or the
#: denominators ``den [B, H, T]``, the non-causal state ``kv_state [B, H_kv, r, D_v + 1]`` and the
#: reference points ``reference [B, H_kv, D]`` (poly, altgrad), and for causal poly the scan's
#: state at every block start after the first, ``block_states [B, H_kv, (blocks − 1)·r·(D_v + 1)]``
#: (blocks of 16 chunks: the backward then scans block by block; empty for one block); hybrid:
#: ``lse`` and the far keys' output ``far_o [B, T, H, D_v]`` and log-sum-exps ``far_lse [B, H, T]``.
_SAVED = {
    "exact": ("o", "lse"),
    "hybrid": ("o", "lse", "far_o", "far_lse"),
    "poly": ("o", "den", "kv_state", "reference", "block_states"),
    "altgrad": ("o", "den", "kv_state", "reference"),
}


class PolyState(NamedTuple):
    """The causal polynomial scan's state after the keys of one piece of a sequence (MATH §4
    "Causal"; fla's ``final_state`` / ``initial_state``), with ``r = C(D + g, g)``:

    - ``s [B, H_kv, r, D_v + 1]``: ``S' = Σ_j φ(√τ (k_j − c)) [v_j, 1]ᵀ`` over every key so far
      (numerator and denominator state, relative to the reference point ``c``);
    - ``key_sum [B, H_kv, D]``: ``Σ_j k_j`` (the prefix means of the row shift);
    - ``reference [B, H_kv, D]``: ``c``, the mean of the sequence's first ``min(chunk, T)`` keys
      (zeros without ``center``); a constant: it has no gradient, and a loss on ``s`` itself treats
      it as fixed;
    - ``count``: an int64 scalar tensor, the keys so far (the next piece's row ``i`` is position
      ``count + i``).

    Gradients flow through ``s`` and ``key_sum``. A state belongs to one degree, scale, value width
    and centering: continue it with the same options."""

    s: torch.Tensor
    key_sum: torch.Tensor
    reference: torch.Tensor
    count: torch.Tensor


@dataclass(frozen=True)
class _Options:
    """Everything but the tensors that fixes one attention call (kept on ``ctx``)."""

    method: str
    causal: bool
    scale: Optional[float]
    degree: int
    center: bool
    chunk: int
    window: Optional[int] = None
    sinks: int = 0
    output_final_state: bool = False

    def core_kwargs(self) -> dict:
        """Keyword arguments of ``_core.attention_forward`` / ``attention_backward``."""
        return dict(
            causal=self.causal,
            scale=self.scale,
            degree=self.degree,
            center=self.center,
            chunk=self.chunk,
            window=self.window,
            sinks=self.sinks,
        )


def _np(x: torch.Tensor):
    """A numpy view of a contiguous CPU tensor (no copy; a lazily negated view, such as
    ``torch._neg_view``'s, is materialized first: numpy cannot read its negative bit)."""
    return x.detach().resolve_neg().numpy()


def _state_np(s0, key_sum0, reference0, count0):
    """The core's ``initial_state`` tuple from the state tensors (``None`` without a state)."""
    if s0 is None:
        return None
    return (_np(s0.contiguous()), _np(key_sum0.contiguous()), _np(reference0.contiguous()), int(count0))


class _AttentionFunction(torch.autograd.Function):
    """Shared forward/backward of the three methods (the subclasses below differ in docs only)."""

    @staticmethod
    def forward(ctx, opts: _Options, q, k, v, s0=None, key_sum0=None, reference0=None, count0=None):
        init = _state_np(s0, key_sum0, reference0, count0)
        out = _core.attention_forward(
            opts.method,
            _np(q),
            _np(k),
            _np(v),
            initial_state=init,
            output_final_state=opts.output_final_state,
            **opts.core_kwargs(),
        )
        saved = [torch.from_numpy(out[name]) for name in _SAVED[opts.method]]
        state = [] if s0 is None else [s0, key_sum0, reference0]
        ctx.save_for_backward(q, k, v, *saved, *state)
        ctx.opts = opts
        ctx.count0 = None if s0 is None else int(count0)
        ctx.set_materialize_grads(False)
        o = saved[0]
        if not opts.output_final_state:
            return o
        final = [torch.from_numpy(out[f"final_{name}"]) for name in ("s", "key_sum", "reference")]
        count = torch.tensor(out["final_count"], dtype=torch.int64)
        ctx.mark_non_differentiable(final[2], count)
        return (o, *final, count)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o, grad_s=None, grad_key_sum=None, *_):
        opts: _Options = ctx.opts
        q, k, v, *rest = ctx.saved_tensors
        n = len(_SAVED[opts.method])
        saved = {name: _np(t) for name, t in zip(_SAVED[opts.method], rest[:n])}
        init = None
        if ctx.count0 is not None:
            init = _state_np(*rest[n:], ctx.count0)
        if grad_o is None:
            grad_o = torch.zeros_like(rest[0])
        g = grad_o.to(q.dtype).contiguous()
        grad_final = None
        if grad_s is not None or grad_key_sum is not None:
            grad_final = tuple(None if x is None else _np(x.to(q.dtype).contiguous()) for x in (grad_s, grad_key_sum))
        dq, dk, dv, ds0, dks0 = _core.attention_backward(
            opts.method,
            _np(q),
            _np(k),
            _np(v),
            saved,
            _np(g),
            initial_state=init,
            grad_final_state=grad_final,
            **opts.core_kwargs(),
        )
        need = ctx.needs_input_grad
        t = lambda x, i: torch.from_numpy(x) if (x is not None and need[i]) else None  # noqa: E731
        return (None, t(dq, 1), t(dk, 2), t(dv, 3), t(ds0, 4), t(dks0, 5), None, None)


class ExactAttention(_AttentionFunction):
    """Exact softmax attention (MATH §2; FlashAttention-2 forward and backward, tiled, O(T) extra
    memory). Saves ``q, k, v, o, lse``; the backward recomputes the attention matrix block by
    block. Gradients are those of softmax attention."""


class PolyAttention(_AttentionFunction):
    """Polynomial attention (MATH §3–4): ``exp(s_ij)`` replaced by its degree-g Taylor polynomial
    ``T_g(s_ij − m_i)`` (row shift ``m_i = τ q_i·k̄_i`` when ``center``; ``k̄_i`` the key mean,
    prefix mean under the causal mask), normalized per row. Saves ``q, k, v, o, lse, den`` and the
    non-causal state ``Φ_Kᵀ [V 1]``. The backward is the exact gradient of this function, through
    the row shift."""


class AltGradAttention(_AttentionFunction):
    """ALTGrad (LSSSZ arXiv 2408.13233, Algorithm 1; MATH §5). The forward is the polynomial
    forward; the **backward is the paper's formula, not the gradient of any function**: the exact
    softmax-gradient formula with the low-rank ``f̃ = D̃⁻¹ Φ_Q Φ_Kᵀ`` in place of softmax,
    ``p = f̃ ∘ (G Vᵀ) − diag(δ) f̃`` (``δ_i = G_i·o_i``), ``dq = τ p k``, ``dk = τ pᵀ q``,
    ``dv = f̃ᵀ G``, with no chain rule through the row shift. ``torch.autograd.gradcheck`` fails on
    it by design; it tends to the exact gradient as the degree rises."""


class HybridAttention(_AttentionFunction):
    """Hybrid attention (MATH §4.1; Based, LoLCATs), causal: row ``i`` weighs the keys near it —
    the ``window`` latest (``i − window < j ≤ i``) and the ``sinks`` first — by ``exp(s_ij)``, and
    every other key ``j ≤ i`` by ``T_g(s_ij − μ_i)·exp(μ_i)`` (``μ_i = scale · q_i·k̄_i``, ``k̄_i``
    the mean of row ``i``'s far keys if ``center``, else 0), one normalization over both. Exact
    window attention plus causal polynomial attention merged by log-sum-exp:
    O(T·(window + sinks + r)·D) per head. ``window = sinks = 0`` is causal ``"poly"``; a window of
    at least ``T`` is exact causal attention. Saves ``q, k, v, o, lse`` and the far part's output
    and log-sum-exps; the backward is the exact gradient of this function."""


_FUNCTIONS = {"exact": ExactAttention, "poly": PolyAttention, "altgrad": AltGradAttention, "hybrid": HybridAttention}


def _check_tensor(name: str, x, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """``x`` if it is a dense 4-D CPU tensor of float32/float64 (and of ``dtype`` when given), else
    ``TypeError`` (type, layout, dtype) or ``ValueError`` (device, rank) naming ``name``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {x.layout}")
    if x.device.type != "cpu":
        raise ValueError(f"{name}: altgrad runs on the CPU; got a tensor on {x.device} (move it with .cpu())")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: dtype must be torch.float32 or torch.float64, got {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name}: dtype {x.dtype} differs from q's {dtype}; pass q, k, v of one dtype")
    if x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D tensor [B, T, heads, dim], got shape {tuple(x.shape)}")
    return x


def _check_bool(name: str, x) -> bool:
    """``x`` if it is a bool, else ``TypeError`` naming ``name``."""
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")
    return x


def _check_int(name: str, x) -> int:
    """``x`` as an int (anything with ``__index__`` but bool), else ``TypeError`` naming ``name``."""
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None


def _options(method, causal, scale, degree, center, chunk, window, sinks, output_final_state: bool) -> _Options:
    """The checked options of one call (MATH §3: even degree ≥ 2; positive finite scale and chunk);
    ``TypeError`` / ``ValueError`` naming the argument otherwise."""
    if not isinstance(method, str):
        raise TypeError(f"method: expected a str, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(map(repr, METHODS))}, got {method!r}")
    causal = _check_bool("causal", causal)
    center = _check_bool("center", center)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: must be finite and positive, got {scale}")
    degree = _check_int("degree", degree)
    if method != "exact" and (degree < 2 or degree % 2 == 1):
        raise ValueError(
            f"degree: must be even and at least 2 (T_g has a real root for odd g, so denominators can vanish), "
            f"got {degree}"
        )
    if method == "exact":
        degree = 2  # unused by exact attention
    chunk = _core.DEFAULT_CHUNK if chunk is None else _check_int("chunk", chunk)
    if chunk < 1:
        raise ValueError(f"chunk: must be at least 1, got {chunk}")
    sinks = _check_int("sinks", sinks)
    if sinks < 0:
        raise ValueError(f"sinks: must be non-negative, got {sinks}")
    if method == "hybrid":
        if window is None:
            raise ValueError("window: hybrid attention needs a window (keys per row seen exactly, e.g. 64)")
        window = _check_int("window", window)
        if window < 0:
            raise ValueError(f"window: must be non-negative, got {window}")
        if not causal:
            raise ValueError("causal: hybrid attention is causal: pass causal=True")
    elif window is not None:
        window = _check_int("window", window)
        if window < 1:
            raise ValueError(f"window: must be at least 1 (keys per row, diagonal included), got {window}")
        if method != "exact":
            raise ValueError('window: a sliding window is an exact-attention mask (method="exact") or hybrid\'s')
        if not causal:
            raise ValueError("window: a sliding window is causal: pass causal=True")
    if sinks > 0 and window is None:
        raise ValueError("sinks: attention sinks belong to a sliding window: pass window too")
    output_final_state = _check_bool("output_final_state", output_final_state)
    return _Options(method, causal, scale, degree, center, chunk, window, sinks, output_final_state)


def _check_stateful(opts: _Options, what: str) -> None:
    """``ValueError`` naming ``what`` unless the call is causal polynomial attention."""
    if opts.method == "altgrad":
        raise ValueError(
            f"{what}: ALTGrad's backward (the paper's Algorithm 1) does not continue a state; use "
            'method="poly" (the same forward, with its exact gradient) or run the sequence in one call'
        )
    if opts.method != "poly":
        raise ValueError(f'{what}: only the causal polynomial method (method="poly", causal=True) carries a state')
    if not opts.causal:
        raise ValueError(f"{what}: the polynomial scan's state continues a causal sequence: pass causal=True")


def _check_state(state, dtype: torch.dtype):
    """``state`` as the four tensors ``(s, key_sum, reference, count)`` of a :class:`PolyState`
    (a PolyState or any 4-sequence; ``count`` an int or an integer scalar tensor), else
    ``TypeError`` / ``ValueError`` naming ``initial_state``; the shapes are checked in Rust."""
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise TypeError(
            "initial_state: expected a PolyState (s, key_sum, reference, count), as output_final_state=True "
            f"returns, got {type(state).__name__}"
        )
    out = []
    for name, x in zip(("s", "key_sum", "reference"), state[:3]):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"initial_state.{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.device.type != "cpu":
            raise ValueError(f"initial_state.{name}: altgrad runs on the CPU; got a tensor on {x.device}")
        if x.dtype != dtype:
            raise TypeError(f"initial_state.{name}: dtype {x.dtype} differs from q's {dtype}")
        out.append(x)
    count = state[3]
    if isinstance(count, torch.Tensor):
        if count.numel() != 1 or count.is_floating_point() or count.is_complex():
            raise TypeError("initial_state.count: expected an integer scalar tensor or an int")
        count = int(count.item())
    else:
        count = _check_int("initial_state.count", count)
    if count < 0:
        raise ValueError(f"initial_state.count: must be non-negative, got {count}")
    out.append(torch.tensor(count, dtype=torch.int64))
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "exact",
    causal: bool = False,
    scale: Optional[float] = None,
    degree: int = 2,
    center: bool = True,
    chunk: Optional[int] = None,
    window: Optional[int] = None,
    sinks: int = 0,
    initial_state: Optional[PolyState] = None,
    output_final_state: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, object]]:
    """Attention of ``q`` over ``k``, ``v``, differentiable by torch autograd (backward in Rust).

    Shapes (flash-attn layout, MATH §1): ``q [B, T, H, D]``, ``k [B, T, H_kv, D]``,
    ``v [B, T, H_kv, D_v]`` → ``o [B, T, H, D_v]``; ``H`` a multiple of ``H_kv`` (GQA: query head
    ``h`` reads key/value head ``h // (H // H_kv)``). CPU tensors of one dtype, ``torch.float32``
    or ``torch.float64``; non-contiguous inputs are made contiguous (contiguous ones are read in
    place, no copy). Scores are ``scale · q_i·k_j`` with ``scale`` defaulting to ``1/√D``; the
    causal mask keeps ``j ≤ i``.

    Methods:

    - ``"exact"``: softmax attention, FlashAttention-2 forward and backward (MATH §2).
    - ``"poly"``: ``exp`` replaced by its degree-``degree`` Taylor polynomial of the row-shifted
      score ``T_g(s_ij − m_i)`` (``m_i = scale · q_i·k̄_i``, ``k̄_i`` the key mean — the prefix mean
      ``mean_{j≤i} k_j`` when causal — if ``center``, else 0), normalized per row (MATH §3–4);
      O(T·r·D_v) per head with ``r = C(D+g, g)``. Its backward is the exact gradient of that
      function (through ``m_i``).
    - ``"altgrad"``: the same forward as ``"poly"``; its backward is the paper's Algorithm 1
      (LSSSZ arXiv 2408.13233; MATH §5): the exact softmax-gradient formula with the low-rank
      ``f̃ = D̃⁻¹ Φ_Q Φ_Kᵀ`` in place of softmax — **the paper's formula, not the gradient of any
      function** (so ``gradcheck`` fails on it by design); no chain rule through ``m_i``.
    - ``"hybrid"`` (causal): exact softmax weights for the ``window`` latest keys and the ``sinks``
      first, ``T_g(s_ij − μ_i)·exp(μ_i)`` for every other key (``μ_i`` the row shift over the far
      keys), one normalization (MATH §4.1; Based, LoLCATs); its backward is the exact gradient.

    Args:
        q, k, v: the inputs above.
        method: ``"exact"``, ``"poly"``, ``"altgrad"`` or ``"hybrid"``.
        causal: causal mask ``j ≤ i`` (diagonal included).
        scale: score scale τ (> 0); ``None`` for ``1/√D``.
        degree: even degree g ≥ 2 of ``T_g`` (poly, altgrad, hybrid).
        center: the row shift ``m_i`` (poly, altgrad, hybrid; MATH §3).
        chunk: rows per chunk of the polynomial kernels (``None``: 64).
        window: exact causal attention: a sliding window of ``window`` keys per row (diagonal
            included: row ``i`` sees ``i − window < j ≤ i``); ``None`` for none. Hybrid
            (required, ≥ 0): the keys each row weighs by ``exp`` instead of the polynomial.
        sinks: with ``window``: the first ``sinks`` keys, which every row also sees (attention
            sinks, StreamingLLM).
        initial_state: causal ``"poly"`` only: the :class:`PolyState` a previous call returned
            for the preceding piece of the same sequences; this call's row ``i`` is then position
            ``count + i``. Gradients flow into it.
        output_final_state: causal ``"poly"`` only: also return the scan's final
            :class:`PolyState`, as ``(o, final_state)``; pass it as the next piece's
            ``initial_state``. Pieces chained this way give the output and gradients of one call
            over the whole sequence (to rounding; the state's reference point is the mean of the
            first ``min(chunk, T)`` keys of the first piece).

    Returns:
        ``o [B, T, H, D_v]`` of the input dtype, or ``(o, final_state)`` when
        ``output_final_state``.

    Raises:
        TypeError: an input that is not a torch tensor, not float32/float64, or not all of one
            dtype; an option of the wrong type (each message names the argument).
        ValueError: a tensor not on the CPU, a wrong shape (not 4-D, mismatched ``B``, ``T``, ``D``
            or ``H_kv``, ``H`` not a multiple of ``H_kv``, an empty dimension), a NaN or infinity
            in an input (or, in backward, in the incoming gradient), an unknown method, an odd or
            too small degree, a degree whose feature width is too large, a non-positive scale or
            chunk, a window on a poly/altgrad or non-causal call, sinks without a window, hybrid
            without a window or without ``causal=True``; a state on
            another method than causal poly, or one of the wrong shape or degree.
        MemoryError: when the call would need more memory than the machine has free.
        RuntimeError: an internal error of altgrad (a bug; never a crash of the interpreter).
    """
    q = _check_tensor("q", q, None)
    k = _check_tensor("k", k, q.dtype)
    v = _check_tensor("v", v, q.dtype)
    opts = _options(method, causal, scale, degree, center, chunk, window, sinks, output_final_state)
    state = [None] * 4
    if output_final_state:
        _check_stateful(opts, "output_final_state")
    if initial_state is not None:
        _check_stateful(opts, "initial_state")
        state = _check_state(initial_state, q.dtype)
    out = _FUNCTIONS[opts.method].apply(opts, q.contiguous(), k.contiguous(), v.contiguous(), *state)
    if not output_final_state:
        return out
    return out[0], PolyState(*out[1:])
