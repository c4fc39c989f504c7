"""``altgrad.load`` and ``altgrad.Model``: a whole transformer's loss and gradients in Rust.

The model's backward is hand-written in the library (MATH §6), so it is exposed as one call
returning every parameter's gradient, not as autograd; attention heads run exact, polynomial or
ALTGrad by the same policies as ``altgrad grad`` (``--attention``, ``--degree``, ``--tol``), and
the report is the same object as ``altgrad grad --json``.
"""

from __future__ import annotations

import json
import operator
import os
from typing import Dict, List, Tuple, Union

import torch

from . import _core

__all__ = ["Model", "load"]


def _ids(ids) -> List[int]:
    """Token ids as a list of ints: a sequence of ints, or a 1-D integer tensor / array."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"ids: expected integer token ids, got a tensor of {ids.dtype}")
        if ids.dim() != 1:
            raise ValueError(f"ids: expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids: expected token ids (use Model.tokenize for text)")
    try:
        seq = list(ids)
    except TypeError:
        raise TypeError(f"ids: expected a sequence of token ids, got {type(ids).__name__}") from None
    out = []
    for i, x in enumerate(seq):
        if isinstance(x, bool):
            raise TypeError(f"ids: position {i} is a bool, expected an int")
        try:
            out.append(operator.index(x))
        except TypeError:
            raise TypeError(f"ids: position {i} is a {type(x).__name__}, expected an int") from None
    return out


class Model:
    """A loaded model (Llama-family decoder or BERT encoder) and its tokenizer. Made by
    :func:`altgrad.load`.

    Attributes:
        config: the configuration as a dict (the model's fields, with HF names where they exist,
            plus ``architecture`` — ``"llama"`` or ``"bert"`` —, ``dtype``, ``source`` and
            ``has_tokenizer``).
    """

    def __init__(self, core: "_core.Model"):
        self._core = core
        self.config: dict = json.loads(core.config_json())

    def __repr__(self) -> str:
        c = self.config
        return f"altgrad.Model({c['source']!r}, {c['architecture']}, {c['num_layers']} layers, {c['dtype']})"

    @property
    def dtype(self) -> torch.dtype:
        """``torch.float32`` or ``torch.float64``: the dtype of the weights and gradients."""
        return torch.float64 if self.config["dtype"] == "float64" else torch.float32

    def tokenize(self, text: str) -> List[int]:
        """Token ids of ``text`` as the model's own tokenizer produces them (HF ``tokenizer.json``
        with its post-processing, GGUF BPE with ``add_bos_token``; bytes for ``tiny``).

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: the tokenizer fails.
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return list(self._core.tokenize(text))

    def loss_and_grads(
        self,
        ids,
        attention: str = "exact",
        degree: Union[int, None] = None,
        tol: float = 1e-3,
        compare: bool = False,
        *,
        chunk: int = 64,
        center: bool = True,
        max_rank: int = 1 << 16,
        max_slowdown: float = 4.0,
        max_memory: float = 8.0,
        force: bool = False,
    ) -> Tuple[float, Dict[str, torch.Tensor], dict]:
        """One forward + backward pass over ``ids`` (ARCHITECTURE "the main job's data flow").

        Args:
            ids: token ids (a sequence of ints or a 1-D integer tensor), each below the
                vocabulary size; at least 2 for a decoder.
            attention: ``"exact"``, ``"poly"``, ``"altgrad"`` or ``"auto"`` for every head (auto:
                per head, the cheapest degree cheaper than exact that the a-priori bound or the
                error measured on sampled rows admits within ``tol``, else exact).
            degree: even degree for every poly/altgrad head; ``None`` picks per head the smallest
                even degree meeting ``tol`` (MATH §3). Not with ``"auto"``.
            tol: tolerance on a head's relative error: ε_A of the attention matrix (the bound), or
                for ``"auto"`` the measured relative error of its output (95% upper bound).
            compare: also run the exact backward and report per-layer errors and the speed-up.
            chunk: rows per chunk of the polynomial kernels.
            center: the row shift (MATH §3).
            max_rank: the largest feature width ``auto`` may use.
            max_slowdown: refuse a forced poly/altgrad run predicted to cost more than this many
                times exact attention's FLOPs (``ValueError`` naming both costs).
            max_memory: refuse one whose attention working memory is predicted above this many GiB.
            force: run it anyway.

        Returns:
            ``(loss, grads, report)``: the loss (decoders: mean next-token cross-entropy; encoders
            ``0.5·‖mean-pooled final hidden‖²``), a dict of gradients named as in the model file
            (each a tensor of the parameter's shape and the model's dtype) plus
            ``embeddings_grad [n, hidden]``, and the report, the same object as
            ``altgrad grad --json`` (keys ``model, seq_len, n_layers, attention, loss, heads,
            timing_s, compare``).

        Raises:
            TypeError: ids that are not integers.
            ValueError: ids out of range or too few; a bad ``attention``, ``degree``, ``tol`` or
                ``chunk`` (the message names it); a forced method over its budget.
        """
        ids = _ids(ids)
        if not isinstance(attention, str):
            raise TypeError(f"attention: expected a str, got {type(attention).__name__}")
        if degree is not None:
            degree = operator.index(degree)
            if degree < 0:
                raise ValueError(f"degree: must be even and at least 2, got {degree}")
        loss, grads, report = self._core.loss_and_grads(
            ids,
            attention,
            degree,
            float(tol),
            bool(compare),
            int(chunk),
            bool(center),
            int(max_rank),
            float(max_slowdown),
            float(max_memory),
            bool(force),
        )
        tensors = {name: torch.from_numpy(flat).view(*shape) for name, shape, flat in grads}
        return loss, tensors, json.loads(report)

    def inspect(self, ids, tol: float = 1e-3, *, max_rank: int = 1 << 16) -> List[dict]:
        """The census of every head on ``ids`` (exact forward), as ``altgrad inspect --json``'s
        ``heads``: one dict per (layer, head) with ``layer, head, max_abs_score, bound,
        bound_unshifted, degree, rank, method, reason`` (MATH §3: bounds after / without the row
        shift, the smallest even degree meeting ``tol`` or ``None``, its feature width, and what
        ``auto`` would use and why).

        Raises:
            TypeError / ValueError: bad ids, or a ``tol`` that is not a positive number.
        """
        ids = _ids(ids)
        return json.loads(self._core.inspect_json(ids, float(tol), int(max_rank)))["heads"]


def load(path: Union[str, "os.PathLike[str]"], *, dtype: Union[str, torch.dtype] = "float32", seed: int = 0) -> Model:
    """Loads a model: ``"tiny"`` or ``"tiny-bounded"`` (built-in, weights from ``seed``), a
    ``.gguf`` file (Llama), an HF directory (``config.json`` + ``model.safetensors``, Llama or
    BERT, with ``tokenizer.json`` when present), or a checkpoint directory written by
    ``altgrad train --checkpoint``. ``dtype`` (``"float32"``/``"float64"`` or the torch dtype) is
    the compute precision.

    Raises:
        TypeError: ``path`` is not a str or path.
        ValueError: an unknown or malformed model (the message names the file), a bad dtype.
        FileNotFoundError / OSError: a file that cannot be read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    names = {torch.float32: "float32", torch.float64: "float64"}
    dtype = names.get(dtype, dtype)
    if not isinstance(dtype, str):
        raise TypeError(f"dtype: expected 'float32', 'float64' or a torch dtype, got {dtype!r}")
    return Model(_core.Model.load(os.fspath(path), dtype, operator.index(seed)))
