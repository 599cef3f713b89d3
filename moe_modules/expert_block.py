"""The expert block as a composition of ``moe`` ops, shared by every expert module.

    route -> gather -> grouped_mm(W1) [+ b1] -> activation * prob -> grouped_mm(W2) [+ prob * b2] -> combine

The routing probability enters inside the activation and scales the down
bias, as NeMo AutoModel does; the combine is then an unweighted float32 sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

import moe_ops
from moe_ops import _checks


@dataclass(frozen=True)
class Activation:
    kind: str
    alpha: float = 1.702
    limit: Optional[float] = 7.0
    linear_offset: float = 1.0

    @classmethod
    def from_config(cls, config) -> "Activation":
        return cls(config.expert_activation, config.activation_alpha, config.activation_limit,
                   config.activation_linear_offset)


def check_forward_inputs(x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, dim: int) -> None:
    """The experts' ``forward(x, token_mask, weights, indices)`` contract."""
    _checks.tensor("x", x, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.size("x", x.shape[1], dim, "model dim (dim 1) equal to config.dim")
    _checks.tensor("token_mask", token_mask, dim=1, dtypes=(torch.bool,))
    _checks.tensor("weights", weights, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("indices", indices, dim=2, dtypes=_checks.INDEX_DTYPES)
    T = x.shape[0]
    _checks.size("token_mask", token_mask.shape[0], T, "number of tokens (dim 0 of x)")
    _checks.size("weights", weights.shape[0], T, "number of tokens (dim 0 of x)")
    _checks.size("indices", indices.shape[0], T, "number of tokens (dim 0 of x)")
    _checks.size("indices", indices.shape[1], weights.shape[1], "experts per token (dim 1 of weights)")
    _checks.same_device(x=x, token_mask=token_mask, weights=weights, indices=indices)


def permuted_probs(weights: Tensor, pair_of_row: Tensor) -> Tensor:
    """The routing weight of each expert-sorted row, ``[T*K]``."""
    return weights.reshape(-1).gather(0, pair_of_row)


def run_local_experts(
    x: Tensor,
    token_mask: Tensor,
    weights: Tensor,
    indices: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor],
    b2: Optional[Tensor],
    act: Activation,
    expert_start: int = 0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``y[t] = sum_k w[t,k] (act(x[t] W1[e] + b1[e]) W2[e] + b2[e])`` over the pairs whose expert
    ``e = indices[t,k]`` is local (``expert_start <= e < expert_start + w1.shape[0]``).

    ``out_dtype`` (default ``x.dtype``): dtype of ``y``; expert parallelism asks for float32 partial
    sums so that the cross-rank reduction does not round each rank's share to bfloat16 first."""
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, expert_start, w1.shape[0])
    probs = permuted_probs(weights, pair_of_row)
    # The fused ops compute exactly gather -> grouped_mm(W1) [+ b1] -> activation * prob and
    # grouped_mm(W2) [+ prob * b2] -> combine, without the permuted copies (moe_ops/ops/fused.py).
    a, _ = moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, probs, act.kind, act.alpha, act.limit,
                             act.linear_offset)
    return moe_ops.expert_down(a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype)
