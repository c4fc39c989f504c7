"""``altgrad.attention``: exact, polynomial or ALTGrad attention as a ``torch.autograd.Function``.

Layout (flash-attn, MATH §1): ``q [B, T, H, D]``, ``k [B, T, H_kv, D]``, ``v [B, T, H_kv, D_v]``,
``o [B, T, H, D_v]``; query head ``h`` reads key/value head ``h // (H // H_kv)`` (GQA). CPU tensors
of one dtype, float32 or float64. Forward and backward run in Rust (``altgrad._core``) with the GIL
released; contiguous inputs are read in place, outputs are handed over without a copy.

Structure, for the state in/out that is still to come (see ``_STATE_TODO``): every call builds
one frozen ``_Options``; ``_AttentionFunction.forward(ctx, opts, q, k, v, *initial_state)``
returns ``(o, *final_state)`` and ``backward(ctx, do, *d_final_state)`` returns
``(None, dq, dk, dv, *d_initial_state)``. Today ``initial_state`` is empty and only ``o`` is
returned.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch.autograd.function import once_differentiable

from . import _core

__all__ = ["attention", "METHODS", "ExactAttention", "PolyAttention", "AltGradAttention"]

#: The methods ``attention`` accepts.
METHODS = ("exact", "poly", "altgrad")

#: The forward tensors each method saves for its backward, besides ``q, k, v`` (names of the dict
#: ``_core.attention_forward`` returns): ``o [B, T, H, D_v]``, ``lse [B, H, T]``, and for poly the
#: denominators ``den [B, H, T]`` and the non-causal state ``kv_state [B, H_kv, r, D_v + 1]``.
_SAVED = {"exact": ("o", "lse"), "poly": ("o", "lse", "den", "kv_state"), "altgrad": ("o", "lse")}

_STATE_TODO = (
    "initial_state/output_final_state: carrying the polynomial scan's state across calls needs the "
    "library's PolyState (S' [B, H_kv, r, D_v+1], key prefix sum, reference point, count), which is "
    "not in this version of altgrad yet"
)


@dataclass(frozen=True)
class _Options:
    """Everything but the tensors that fixes one attention call (kept on ``ctx``)."""

    method: str
    causal: bool
    scale: Optional[float]
    degree: int
    center: bool
    chunk: int
    output_final_state: bool = False

    def core_kwargs(self) -> dict:
        """Keyword arguments of ``_core.attention_forward`` / ``attention_backward``."""
        return dict(causal=self.causal, scale=self.scale, degree=self.degree, center=self.center, chunk=self.chunk)


def _np(x: torch.Tensor):
    """A numpy view of a contiguous CPU tensor (no copy)."""
    return x.detach().numpy()


class _AttentionFunction(torch.autograd.Function):
    """Shared forward/backward of the three methods (the subclasses below differ in docs only)."""

    @staticmethod
    def forward(ctx, opts: _Options, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # STATE: `*initial_state` tensors follow `v` in the signature; pass them to
        # _core.attention_forward, save them, and return `(o, *final_state)` when
        # opts.output_final_state (mark the state's integer count non-differentiable).
        out = _core.attention_forward(opts.method, _np(q), _np(k), _np(v), **opts.core_kwargs())
        saved = [torch.from_numpy(out[name]) for name in _SAVED[opts.method]]
        ctx.save_for_backward(q, k, v, *saved)
        ctx.opts = opts
        return saved[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_o: torch.Tensor):
        # STATE: `*grad_final_state` follow `grad_o`; hand them to _core.attention_backward and
        # return the initial state's gradients after dv.
        opts: _Options = ctx.opts
        q, k, v, *rest = ctx.saved_tensors
        saved = {name: _np(t) for name, t in zip(_SAVED[opts.method], rest)}
        g = grad_o.to(q.dtype).contiguous()
        dq, dk, dv = _core.attention_backward(
            opts.method, _np(q), _np(k), _np(v), saved, _np(g), **opts.core_kwargs()
        )
        need = ctx.needs_input_grad
        return (
            None,
            torch.from_numpy(dq) if need[1] else None,
            torch.from_numpy(dk) if need[2] else None,
            torch.from_numpy(dv) if need[3] else None,
        )


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


_FUNCTIONS = {"exact": ExactAttention, "poly": PolyAttention, "altgrad": AltGradAttention}


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


def _options(method, causal, scale, degree, center, chunk, output_final_state: bool) -> _Options:
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
    return _Options(method, causal, scale, degree, center, chunk, output_final_state)


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
    initial_state=None,
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

    Args:
        q, k, v: the inputs above.
        method: ``"exact"``, ``"poly"`` or ``"altgrad"``.
        causal: causal mask ``j ≤ i`` (diagonal included).
        scale: score scale τ (> 0); ``None`` for ``1/√D``.
        degree: even degree g ≥ 2 of ``T_g`` (poly and altgrad only).
        center: the row shift ``m_i`` (poly and altgrad only; MATH §3).
        chunk: rows per chunk of the polynomial kernels (``None``: 64).
        initial_state: not supported yet (raises ``NotImplementedError``): the polynomial scan's
            state to start from.
        output_final_state: not supported yet (``True`` raises ``NotImplementedError``): also
            return the scan's final state, as ``(o, final_state)``.

    Returns:
        ``o [B, T, H, D_v]`` of the input dtype (``(o, final_state)`` when
        ``output_final_state``, once supported).

    Raises:
        TypeError: an input that is not a torch tensor, not float32/float64, or not all of one
            dtype; an option of the wrong type (each message names the argument).
        ValueError: a tensor not on the CPU, a wrong shape (not 4-D, mismatched ``B``, ``T``, ``D``
            or ``H_kv``, ``H`` not a multiple of ``H_kv``, an empty dimension), a NaN or infinity
            in an input (or, in backward, in the incoming gradient), an unknown method, an odd or
            too small degree, a degree whose feature width is too large, a non-positive scale or
            chunk.
        NotImplementedError: ``initial_state`` or ``output_final_state``.
        MemoryError: when the call would need more memory than the machine has free.
        RuntimeError: an internal error of altgrad (a bug; never a crash of the interpreter).
    """
    q = _check_tensor("q", q, None)
    k = _check_tensor("k", k, q.dtype)
    v = _check_tensor("v", v, q.dtype)
    opts = _options(method, causal, scale, degree, center, chunk, bool(output_final_state))
    if initial_state is not None or output_final_state:
        # STATE: validate `initial_state` (an altgrad PolyState of tensors) here and pass its
        # tensors to `_FUNCTIONS[...].apply(opts, q, k, v, *state_tensors)`; with
        # output_final_state, wrap the returned state tensors back into a PolyState.
        raise NotImplementedError(_STATE_TODO)
    return _FUNCTIONS[opts.method].apply(opts, q.contiguous(), k.contiguous(), v.contiguous())
