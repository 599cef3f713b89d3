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
from typing import Optional

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

    @classmethod
    def from_config(cls, config) -> "Activation":
        return cls(config.expert_activation, config.activation_alpha, config.activation_limit,
                   config.activation_linear_offset)


def permuted_probs(weights: Tensor, pair_of_row: Tensor) -> Tensor:
    """The routing weight of each expert-sorted row, ``[N*K]``."""
    return weights.reshape(-1).gather(0, pair_of_row)


def run_experts(received: Received, w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor],
                act: Activation) -> Tensor:
    """``partial[n] = sum_k w[n,k] (act(x[n] W1[e] + b1[e]) W2[e] + b2[e])`` over the slots whose local
    expert ``e = indices[n,k]`` is one of the ``w1.shape[0]`` local experts, float32 sum, returned in
    ``received.out_dtype``; exactly ``received.num_pairs`` rows go through the GEMMs when it is known."""
    x, token_mask, weights, indices, num_pairs, out_dtype, _ = received
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, w1.shape[0])
    probs = permuted_probs(weights, pair_of_row)
    h = moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_pairs)
    return moe_ops.expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, act.kind, act.alpha, act.limit,
                               act.linear_offset, out_dtype)
