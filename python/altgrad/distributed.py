"""``altgrad.distributed``: one sequence split across processes (sequence parallelism) on
``torch.distributed``, for polynomial attention, causal (MATH §4 "Causal") or not (MATH §4 "Split
across pieces"); issue 16.

Rank ``r`` of the process group holds the ``r``-th contiguous slice of the sequence, in rank
order (slices may differ in length; ``B``, ``H``, ``H_kv``, ``D``, ``D_v`` and every option equal on
all ranks). Polynomial attention carries its whole past in a state of ``r_f × (D_v + 1)`` numbers
per key/value head (``r_f = C(D + g, g)``), independent of the sequence length, so the ranks
exchange states, not keys:

1. the reference point ``c`` (the mean of the first ``min(chunk, T_0)`` keys of rank 0, zeros
   without ``center``) is broadcast from rank 0, so every state has the same reference;
2. each rank computes its slice's own state contribution at ``c``: its keys' ``s`` (the key side
   alone, ``_core.poly_split("key_state")``, no queries) and ``key_sum``;
3. an exclusive prefix sum across ranks (one ``all_gather`` of the contributions) gives rank
   ``r`` the state of every key before its slice;
4. each rank runs :func:`altgrad.attention` on its slice from that state.

The backward is autograd's: the prefix sum's backward is the reverse exclusive sum of the state
gradients (one more ``all_gather``), so every rank gets its own ``dq, dk, dv``. Per call each rank
sends its state contribution, ``B · H_kv · (r_f · (D_v + 1) + D)`` numbers (:func:`state_numbers`),
to the ``P − 1`` others twice (the prefix sum forward, its gradient backward), plus the reference
point and small metadata — where ring attention would move every key and value,
``O(T · H_kv · (D + D_v))`` per rank.

Non-causal (``causal=False``): every row reads the whole sequence's key/value state
``H' = Σ_j φ(√τ (k_j − c)) [v_j, 1]ᵀ`` and its key mean ``k̄``, both sums over keys. Each rank sums
its keys (an ``all_reduce`` of ``Σ_j k_j`` gives ``k̄``, whose detached value is the shared
reference ``c``), computes its keys' ``H'_p`` (``_core.poly_split``), and an ``all_reduce`` gives
every rank ``H' = Σ_p H'_p``; its queries then run against it. The backward all-reduces the
gradients of ``H'`` and ``Σ_j k_j``: ``B · H_kv · (r_f · (D_v + 1) + D)`` numbers each way, as in
the causal case.

Only collectives that gloo (CPU) and nccl both provide are used (``broadcast``, ``all_gather``,
``all_reduce``). Not provided: ``method="exact"`` (it would need ring attention, which moves every
key and value); it is refused with a ``ValueError``.
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.distributed as dist

from . import _core
from .attention import PolyState
from .attention import attention as _local_attention

__all__ = ["attention", "state_numbers"]


def state_numbers(batch: int, num_kv_heads: int, head_dim: int, head_dim_v: int, degree: int) -> int:
    """Numbers in one rank's state contribution (``s``, ``key_sum``) plus its length:
    ``B · H_kv · (C(D + g, g) · (D_v + 1) + D) + 1``. Each rank sends its ``s`` and ``key_sum`` to the
    ``P − 1`` others in the forward and their gradients in the backward."""
    r = math.comb(head_dim + degree, degree)
    return batch * num_kv_heads * (r * (head_dim_v + 1) + head_dim) + 1


def _group_info(group) -> tuple:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("altgrad.distributed.attention: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return dist.get_rank(group), dist.get_world_size(group)


def _src(group) -> int:
    """The global rank of the group's rank 0 (what ``broadcast`` takes)."""
    if group is None:
        return 0
    return dist.get_global_rank(group, 0)


def _all_gather(x: torch.Tensor, world: int, group) -> List[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


class _ExclusiveScan(torch.autograd.Function):
    """``y_r = Σ_{r' < r} x_{r'}`` across the ranks of ``group`` (zeros on rank 0); its backward is
    the reverse exclusive sum ``dx_r = Σ_{r' > r} dy_{r'}``. One ``all_gather`` each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        rank, world = _group_info(group)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        parts = _all_gather(x.detach(), world, group)
        y = torch.zeros_like(x)
        for p in parts[:rank]:
            y = y + p
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        parts = _all_gather(dy, ctx.world, ctx.group)
        dx = torch.zeros_like(dy)
        for p in parts[ctx.rank + 1:]:
            dx = dx + p
        return dx, None


class _AllReduce(torch.autograd.Function):
    """``y = Σ_r x_r`` on every rank of ``group``; its backward is the same sum of the ranks'
    ``dy`` (every rank's loss reads ``y``). One ``all_reduce`` each way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.detach().clone().contiguous()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g = dy.detach().clone().contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def _np(x: torch.Tensor):
    """A numpy view of ``x`` made contiguous, its negative bit resolved (no copy when it already
    is and has none)."""
    return x.detach().resolve_neg().contiguous().numpy()


def _split_kwargs(opts: dict) -> dict:
    return dict(scale=opts["scale"], degree=int(opts["degree"]), center=bool(opts["center"]), chunk=opts["chunk"])


class _KeyState(torch.autograd.Function):
    """This rank's ``H'_p = Σ_{j∈p} φ(√τ (k_j − c)) [v_j, 1]ᵀ`` at the shared reference ``c`` (a
    constant); backward: ``dk``, ``dv`` from ``dH'`` (``_core.poly_split``)."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, c):
        ctx.opts = opts
        ctx.save_for_backward(q, k, v, c)
        ref = None if c is None else _np(c)
        (st,) = _core.poly_split("key_state", _np(q), _np(k), _np(v), reference=ref, **_split_kwargs(opts))
        return torch.from_numpy(st)

    @staticmethod
    def backward(ctx, ds):
        q, k, v, c = ctx.saved_tensors
        ref = None if c is None else _np(c)
        dk, dv = _core.poly_split("key_state_backward", _np(q), _np(k), _np(v), reference=ref, grad=_np(ds),
                                  **_split_kwargs(ctx.opts))
        return None, None, torch.from_numpy(dk), torch.from_numpy(dv), None


class _Queries(torch.autograd.Function):
    """This rank's queries against the whole sequence's ``H'`` and ``k̄ − c``; backward: ``dq``
    and this rank's shares of ``dH'`` and ``d(k̄ − c)`` (``_core.poly_split``)."""

    @staticmethod
    def forward(ctx, opts: dict, q, k, v, state, kbar):
        ctx.opts = opts
        o, den = _core.poly_split("queries", _np(q), _np(k), _np(v), state=_np(state), kbar=_np(kbar),
                                  **_split_kwargs(opts))
        o, den = torch.from_numpy(o), torch.from_numpy(den)
        ctx.save_for_backward(q, k, v, state, kbar, o, den)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, state, kbar, o, den = ctx.saved_tensors
        dq, ds, dkbar = _core.poly_split("queries_backward", _np(q), _np(k), _np(v), state=_np(state),
                                         kbar=_np(kbar), o=_np(o), den=_np(den), grad=_np(do),
                                         **_split_kwargs(ctx.opts))
        return None, torch.from_numpy(dq), None, None, torch.from_numpy(ds), torch.from_numpy(dkbar)


def _non_causal(q, k, v, opts: dict, group) -> torch.Tensor:
    """Non-causal polynomial attention over the ranks' slices (MATH §4 "Split across pieces")."""
    b, _, hkv, d = k.shape
    count = torch.tensor([float(k.shape[1])], dtype=torch.float64)
    dist.all_reduce(count, group=group)
    kmean = _AllReduce.apply(k.sum(dim=1), group) / count.to(k.dtype)
    if not bool(torch.isfinite(kmean).all()):
        # every rank holds the same all-reduced sum, so every rank raises here, together
        raise ValueError(f"altgrad.distributed.attention: the key mean (the sum of every rank's keys) overflowed "
                         f"{str(k.dtype).replace('torch.', '')} although the keys are finite; use float64 inputs, "
                         "or smaller keys")
    if opts["center"]:
        c = kmean.detach().contiguous()
        kbar = kmean - c  # zero, but the gradient of the key mean flows through it
    else:
        c, kbar = None, torch.zeros(b, hkv, d, dtype=k.dtype)
    state = _AllReduce.apply(_KeyState.apply(opts, q, k, v, c), group)
    return _Queries.apply(opts, q, k, v, state, kbar)


_DTYPES = {torch.float32: 1, torch.float64: 2}
_META = ["batch", "num_heads", "num_kv_heads", "head_dim", "head_dim_v", "degree", "center", "chunk", "dtype",
         "scale", "causal"]


def _local_problem(q, k, v, method, causal, scale, degree, chunk, rank) -> Optional[str]:
    """What is wrong with this rank's own call, before any collective (``None`` when nothing)."""
    if method != "poly":
        return (f"method {method!r} is not provided across ranks: only 'poly' (states cross the wire); exact "
                "attention would need ring attention, and ALTGrad's backward continues no state")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return f"{name} must be a 4-D tensor [B, T, H, D]"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must be all float32 or all float64, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[1] == 0:
        return f"rank {rank} holds an empty slice (T = 0)"
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        return (f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit "
                "[B, T, H, D], [B, T, H_kv, D], [B, T, H_kv, D_v]")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return f"scale must be a positive finite number or None, got {scale!r}"
    if isinstance(degree, bool) or not isinstance(degree, int):
        return f"degree must be an int, got {degree!r}"
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        return f"chunk must be a positive int or None, got {chunk!r}"
    return None


def _check_agreement(problem, q, k, v, degree, scale, center, chunk, causal, group, world, rank) -> None:
    """One ``all_gather`` that every rank joins, even one whose own call is wrong, so that no rank
    is left waiting in a collective: each rank's validity and its batch, heads, widths, dtype and
    options. Every rank raises ``ValueError`` if any rank's call was wrong (that rank with its own
    message) or if the ranks disagree, so that the states they exchange have one shape and meaning."""
    if problem is None:
        vals = [1.0, q.shape[0], q.shape[2], k.shape[2], q.shape[3], v.shape[3], degree, float(center), chunk,
                _DTYPES[q.dtype], -1.0 if scale is None else float(scale), float(causal)]
    else:
        vals = [0.0] + [0.0] * len(_META)
    meta = torch.tensor(vals, dtype=torch.float64)
    metas = _all_gather(meta, world, group)
    if problem is not None:
        raise ValueError(f"altgrad.distributed.attention: {problem}")
    bad_ranks = [r for r, m in enumerate(metas) if m[0].item() == 0.0]
    if bad_ranks:
        raise ValueError(f"altgrad.distributed.attention: the inputs of rank(s) {bad_ranks} were refused "
                         "(see the error on those ranks)")
    for r, m in enumerate(metas):
        if not torch.equal(m, meta):
            bad = [n for n, a, b in zip(_META, m[1:].tolist(), meta[1:].tolist()) if a != b]
            raise ValueError(f"altgrad.distributed.attention: rank {r} differs from rank {rank} in "
                             f"{', '.join(bad)}; every rank must pass the same batch, heads, widths, dtype and options")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "poly",
    causal: bool = True,
    scale: Optional[float] = None,
    degree: int = 2,
    center: bool = True,
    chunk: Optional[int] = None,
    group=None,
) -> torch.Tensor:
    """This rank's slice of polynomial attention (causal or not) over one sequence split across the ranks
    of ``group`` (the default group when ``None``), differentiable by torch autograd.

    Shapes: this rank's slice ``q [B, T_r, H, D]``, ``k [B, T_r, H_kv, D]``, ``v [B, T_r, H_kv, D_v]``
    → ``o [B, T_r, H, D_v]``, the rows of :func:`altgrad.attention` over the concatenation of all
    ranks' slices in rank order (to rounding). ``T_r ≥ 1`` may differ across ranks; everything else
    must agree (checked). Options as :func:`altgrad.attention` (``method="poly"``). With
    ``causal=False`` every row sees every rank's keys: the ranks all-reduce their key/value states.

    Every rank must call it (and, when the loss is differentiated, run the backward: the
    backward's prefix sum or all-reduce is a collective too). A rank whose own call is wrong still joins the
    first collective, so every rank raises instead of waiting.

    Raises:
        ValueError: on every rank, when any rank passes a ``method`` other than ``"poly"`` (exact
            attention across ranks would need ring attention, which altgrad does not provide),
            an empty slice, inconsistent shapes or dtypes, a bad
            ``scale``, ``degree`` or ``chunk``, or when ranks disagree on batch, heads, widths,
            dtype, options or ``causal``; without ``causal``, on every rank, when the keys' sum
            over the ranks or their summed key state overflows the dtype (finite float32 inputs
            can; use float64); and everything :func:`altgrad.attention` raises (an overflow in
            this rank's own output raises on this rank only: its peers then fail in the
            backward's collective when this process exits).
        RuntimeError: ``torch.distributed`` not initialized.
    """
    ch = 64 if chunk is None else chunk
    if not (dist.is_available() and dist.is_initialized()):
        problem = _local_problem(q, k, v, method, causal, scale, degree, ch, 0)
        if problem is not None:
            raise ValueError(f"altgrad.distributed.attention: {problem}")
    rank, world = _group_info(group)
    problem = _local_problem(q, k, v, method, causal, scale, degree, ch, rank)
    _check_agreement(problem, q, k, v, degree, scale, bool(center), ch, bool(causal), group, world, rank)
    b, _, hkv, d = k.shape
    if not causal:
        return _non_causal(q, k, v, dict(scale=scale, degree=degree, center=bool(center), chunk=ch), group)
    opts = dict(method="poly", causal=True, scale=scale, degree=degree, center=center, chunk=chunk)
    # 1. one reference point for every state: rank 0's first min(chunk, T_0) keys
    if center:
        c = k.detach()[:, : min(ch, k.shape[1])].mean(dim=1).contiguous()
    else:
        c = torch.zeros(b, hkv, d, dtype=k.dtype)
    dist.broadcast(c, src=_src(group), group=group)
    # 2. this slice's own contribution at c: its keys' state (the key side alone, O(T·r·D_v), no
    #    queries) and its key sum
    split = dict(scale=scale, degree=degree, center=bool(center), chunk=ch)
    own_s = _KeyState.apply(split, q, k, v, c if center else None)
    own_key_sum = k.sum(dim=1)
    # 3. the state of every key before this slice: exclusive prefix sums across ranks
    lengths = _all_gather(torch.tensor([k.shape[1]], dtype=torch.int64), world, group)
    count = torch.tensor(int(sum(int(t) for t in lengths[:rank])), dtype=torch.int64)
    before = PolyState(_ExclusiveScan.apply(own_s, group), _ExclusiveScan.apply(own_key_sum, group), c, count)
    # 4. this slice from that state
    o, _ = _local_attention(q, k, v, **opts, initial_state=before, output_final_state=True)
    return o
