"""altgrad: transformer attention and its gradients, exact or by the polynomial method, in Rust.

- :func:`attention`: exact, polynomial or ALTGrad attention on ``[B, T, H, D]`` CPU tensors, a
  ``torch.autograd.Function`` whose backward runs in Rust (MATH §2–5).
- :func:`load` → :class:`Model`: a whole model's loss and gradients (``Model.loss_and_grads``,
  the same report as ``altgrad grad --json``) and the per-head census (``Model.inspect``).
- :func:`set_num_threads` / :func:`get_num_threads`: altgrad's own worker threads (separate from
  torch's).

Threads: altgrad's kernels run on their own worker threads, beside torch's OpenMP team. After a
parallel torch op, OpenMP workers keep spinning for milliseconds by default (GNU OpenMP's
``OMP_WAIT_POLICY`` unset), taking cores from the next altgrad call: on 2 cores a small attention
call measured 1.7–2× slower. Imported before torch, altgrad therefore sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it (torch reads it when it
loads); imported after torch, set it yourself before starting Python for the same effect.
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import _core  # noqa: E402
from .attention import METHODS, AltGradAttention, ExactAttention, PolyAttention, PolyState, attention  # noqa: E402
from .model import Model, load  # noqa: E402

__version__ = _core.__version__

__all__ = [
    "attention",
    "METHODS",
    "ExactAttention",
    "PolyAttention",
    "AltGradAttention",
    "PolyState",
    "load",
    "Model",
    "set_num_threads",
    "get_num_threads",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Sets the number of worker threads altgrad's Rust kernels use from now on (its own rayon
    pool; torch's threads are unaffected). Default: ``RAYON_NUM_THREADS``, else every core.

    Raises:
        TypeError: ``n`` is not an int.
        ValueError: ``n < 1`` or absurdly many for this machine.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of worker threads altgrad's Rust kernels use."""
    return _core.get_num_threads()
