"""The activation names, their gate/up column layout and constants, shared by the ops and every backend.

* concatenated gate|up (``swiglu``, ``swigluoai``, ``geglu``): ``gate, up = h[:, :I], h[:, I:]``;
* interleaved (``quick_geglu``, GPT-OSS): ``gate, up = h[:, 0::2], h[:, 1::2]``;
* ungated (``relu2``): ``h`` is ``[N, I]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

# name -> whether the first GEMM carries gate and up (width 2I) or up alone (width I)
GATED = {"swiglu": True, "quick_geglu": True, "swigluoai": True, "geglu": True, "relu2": False}

# tanh-approximated GELU: gelu(z) = z * sigmoid(2 k(z)), k(z) = GELU_C * (z + GELU_B * z**3)
GELU_C, GELU_B = 0.7978845608028654, 0.044715  # sqrt(2 / pi) and the cubic coefficient


def check_activation(name, argument: str = "activation") -> None:
    """Refuse anything but a known activation name: ``TypeError`` for a non-str, else ``ValueError``."""
    if type(name) is not str:
        raise TypeError(f"{argument}: expected a str, one of {sorted(GATED)}, got {type(name).__name__} {name!r}")
    if name not in GATED:
        raise ValueError(f"{argument}: expected one of {sorted(GATED)}, got {name!r}")


def out_width(h: Tensor, kind: str):
    """The width of ``act(h)``: half of ``h``'s for a gated activation, all of it for ``relu2``."""
    return h.shape[1] // 2 if GATED[kind] else h.shape[1]


def tanh_gelu(x: Tensor, second: bool = False) -> tuple:
    """``q(x) = x sigmoid(2 k(x))`` (tanh-approximated GELU, ``k = GELU_C (x + GELU_B x^3)``) and ``q'(x)``; with
    ``second``, ``q''(x)`` too.  The sigmoid form has no cancellation where ``1 + tanh k`` would round to 0."""
    k1 = GELU_C * (1 + 3 * GELU_B * x * x)
    s = torch.sigmoid(2 * GELU_C * (x + GELU_B * x * x * x))
    ds = s * (1 - s)
    q, q1 = x * s, s + 2 * x * k1 * ds
    if not second:
        return q, q1
    return q, q1, 2 * ds * (2 * k1 + x * (6 * GELU_C * GELU_B * x + 2 * k1 * k1 * (1 - 2 * s)))


def split_gate_up(h: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """``(gate, up)`` columns of a gated activation's ``h [N, 2I]``."""
    if kind == "quick_geglu":
        return h[:, 0::2], h[:, 1::2]
    return h.chunk(2, dim=1)


def merge_gate_up(d_gate: Tensor, d_up: Tensor, kind: str) -> Tensor:
    """The inverse of :func:`split_gate_up` (e.g. for ``grad_h``)."""
    if kind == "quick_geglu":
        return torch.stack([d_gate, d_up], dim=2).flatten(1)
    return torch.cat([d_gate, d_up], dim=1)
