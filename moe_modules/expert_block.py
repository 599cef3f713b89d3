"""The expert block of the stacked-parameter modules: the local experts on what a dispatcher received.

    route -> [gather -> grouped_mm(W1) [+ b1]] -> [activation * prob -> grouped_mm(W2) [+ prob * b2] -> combine]

The brackets are the fused ops ``moe.expert_up`` and ``moe.expert_down``: the gather and combine
happen inside their GEMMs (no permuted copies), and only the pre-activation ``h`` between them is
kept for the backward.  The routing probability enters inside the
activation and scales the down bias, as NeMo AutoModel does; the combine is then an unweighted
float32 sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

import moe_ops
from moe_modules.ep.dispatcher import Received


@dataclass(frozen=True)
class Activation:
    kind: str
    alpha: float = 1.702
    limit: Optional[float] = 7.0
    linear_offset: float = 1.0

    def __post_init__(self):
        moe_ops.check_activation(self.kind)

    @property
    def params(self) -> dict:
        """``alpha``, ``limit`` and ``linear_offset`` by name, as the activation ops take them."""
        return dict(alpha=self.alpha, limit=self.limit, linear_offset=self.linear_offset)

    @classmethod
    def clamped_swiglu(cls, limit: float) -> "Activation":
        """NeMo's clamped SwiGLU: ``silu(min(gate, limit)) * clamp(up, -limit, limit)`` is ``swigluoai``'s
        ``gate * sigmoid(alpha * gate) * (up + offset)`` with ``alpha = 1``, ``offset = 0``."""
        return cls("swigluoai", 1.0, float(limit), 0.0)

    @classmethod
    def from_config(cls, config) -> "Activation":
        """``config``'s activation; NeMo's conventions: ``swiglu`` with ``swiglu_limit > 0`` is clamped
        SwiGLU, and ``swigluoai`` clamps only for a positive ``activation_limit``."""
        kind = config.expert_activation
        moe_ops.check_activation(kind, "expert_activation")
        limit = config.activation_limit
        if kind == "swiglu" and config.swiglu_limit > 0:
            return cls.clamped_swiglu(config.swiglu_limit)
        if kind == "swigluoai" and limit is not None and limit <= 0:
            limit = None
        return cls(kind, config.activation_alpha, limit, config.activation_linear_offset)


def permuted_probs(weights: Tensor, pair_of_row: Tensor) -> Tensor:
    """The routing weight of each expert-sorted row, ``[N*K]``."""
    return weights.reshape(-1).gather(0, pair_of_row)


class LowRank(NamedTuple):
    """Per-expert low-rank adapters of the two projections (this rank's experts): the block computes with
    ``W1 + scale * up_A @ up_B`` and ``W2 + scale * down_A @ down_B`` without forming them."""

    up_A: Tensor  # [E, D, r]
    up_B: Tensor  # [E, r, C]
    down_A: Tensor  # [E, I, r]
    down_B: Tensor  # [E, r, D]
    scale: float


def run_experts(received: Received, w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor],
                act: Activation, low_rank: Optional[LowRank] = None) -> Tensor:
    """``partial[n] = sum_k w[n,k] (act(x[n] W1[e] + b1[e]) W2[e] + b2[e])`` over the slots whose local
    expert ``e = indices[n,k]`` is one of the ``w1.shape[0]`` local experts, float32 sum, returned in
    ``received.out_dtype``; exactly ``received.num_pairs`` rows go through the GEMMs when it is known.
    With ``low_rank``, ``W1`` and ``W2`` carry their adapters (see :func:`_run_low_rank`)."""
    x, token_mask, weights, indices, num_pairs, out_dtype, _ = received
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, w1.shape[0])
    probs = permuted_probs(weights, pair_of_row)
    h = moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_pairs)
    if low_rank is not None:
        return _run_low_rank(received, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, act, low_rank)
    return moe_ops.expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, act.kind, act.alpha, act.limit,
                               act.linear_offset, out_dtype)


def _run_low_rank(received: Received, h: Tensor, w2: Tensor, b2: Optional[Tensor], probs: Tensor,
                  pair_of_row: Tensor, row_of_pair: Tensor, offsets: Tensor, act: Activation,
                  lr: LowRank) -> Tensor:
    """The block with adapters, from the base ``h = x W1 + b1`` (NeMo's ``GroupedExpertsLoRA`` math)::

        h += (s * x A1) B1                      x A1: expert_up (gathered in its GEMM), [M, r]
        y  = expert_down(h)                     the base down projection, bias and combine, in float32
           + combine((s * (act(h) p) A2) B2)    act(h) p A2: activation_mm (the activation is not kept)

    Saved for the backward beyond the frozen-base block: the two ``[M, r]`` low-rank rows.  The scale
    multiplies them (``r`` columns), never a ``[M, C]`` or ``[M, D]`` tensor."""
    u = moe_ops.expert_up(received.x, pair_of_row, row_of_pair, offsets, lr.up_A, None, received.num_pairs)
    # the groups of the h rows: cut at their count when only the valid pairs have rows (expert_up's num_rows)
    row_offsets = offsets if received.num_pairs is None else offsets.clamp(max=h.shape[0])
    h = h + moe_ops.grouped_mm(u * lr.scale, lr.up_B, row_offsets)
    acc = torch.float64 if received.out_dtype == torch.float64 else torch.float32  # one rounding of the sum
    y = moe_ops.expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, act.kind, act.alpha, act.limit,
                            act.linear_offset, acc)
    v = moe_ops.activation_mm(h, probs[:h.shape[0]], lr.down_A, row_offsets, act.kind, act.alpha, act.limit,
                              act.linear_offset)
    y_low = moe_ops.combine(moe_ops.grouped_mm(v * lr.scale, lr.down_B, row_offsets), row_of_pair, row_offsets,
                            None)
    return (y + y_low).to(received.out_dtype)
