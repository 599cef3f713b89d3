"""A plain-PyTorch float64 oracle of the expert block, independent of the ``moe`` ops.

Used by ``moe-ops check`` and the tests.  Slow and obvious on purpose: one
expert at a time, only the tokens routed to it, the math of SPEC §4 written out.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def activation(h: Tensor, kind: str, alpha: float = 1.702, limit: Optional[float] = 7.0,
               linear_offset: float = 1.0) -> Tensor:
    if kind == "relu2":
        return torch.relu(h) ** 2
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    if kind in ("quick_geglu", "swigluoai"):  # interleaved / concatenated gate and up
        gate, up = (h[..., 0::2], h[..., 1::2]) if kind == "quick_geglu" else h.chunk(2, dim=-1)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + linear_offset)
    raise ValueError(f"activation: unknown {kind!r}")


def expert_block(x, token_mask, weights, indices, w1, w2, b1=None, b2=None, kind="swiglu", alpha=1.702,
                 limit=7.0, linear_offset=1.0, expert_start: int = 0) -> Tensor:
    """``y[t] = sum_k w[t,k] (act(x[t] W1[e] + b1[e]) W2[e] + b2[e])`` in float64 over valid local pairs."""
    f64 = torch.float64
    x, weights = x.to(f64), weights.to(f64)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        hit = (indices == e + expert_start) & token_mask.unsqueeze(1)
        tokens = hit.any(1).nonzero().flatten()
        if tokens.numel() == 0:
            continue
        coef = (weights * hit).sum(1)[tokens]
        h = x[tokens] @ w1[e].to(f64)
        if b1 is not None:
            h = h + b1[e].to(f64)
        out = activation(h, kind, alpha, limit, linear_offset) @ w2[e].to(f64)
        if b2 is not None:
            out = out + b2[e].to(f64)
        y = y.index_add(0, tokens, coef.unsqueeze(1) * out)
    return y
