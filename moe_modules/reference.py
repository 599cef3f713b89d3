"""A plain-PyTorch float64 oracle of the expert block, independent of the ``moe`` ops.

Used by ``moe-ops check`` and the tests.  Slow and obvious on purpose: one
expert at a time, only the tokens routed to it, the math of SPEC §4 written out.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def activation(h: Tensor, kind: str, alpha: float = 1.702, limit: Optional[float] = 7.0,
               linear_offset: float = 1.0, swiglu_limit: float = 0.0) -> Tensor:
    """``act(h)``; ``swiglu_limit > 0`` clamps swiglu's gate and up first (NeMo's clamped SwiGLU)."""
    if kind == "relu2":
        return torch.relu(h) ** 2
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        if swiglu_limit > 0:
            gate, up = gate.clamp(max=swiglu_limit), up.clamp(-swiglu_limit, swiglu_limit)
        return torch.nn.functional.silu(gate) * up
    if kind == "geglu":
        # F.gelu(gate, approximate="tanh") = 0.5 gate (1 + tanh k) = gate sigmoid(2k): the same function, written
        # without the cancellation of 1 + tanh k (exactly 0 in float64 for gate below about -6)
        gate, up = h.chunk(2, dim=-1)
        k = math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)
        return gate * torch.sigmoid(2 * k) * up
    if kind in ("quick_geglu", "swigluoai"):  # interleaved / concatenated gate and up
        gate, up = (h[..., 0::2], h[..., 1::2]) if kind == "quick_geglu" else h.chunk(2, dim=-1)
        if limit is not None:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return gate * torch.sigmoid(alpha * gate) * (up + linear_offset)
    raise ValueError(f"activation: unknown {kind!r}")


def expert_block(x, token_mask, weights, indices, w1, w2, b1=None, b2=None, kind="swiglu", alpha=1.702,
                 limit=7.0, linear_offset=1.0, expert_start: int = 0, swiglu_limit: float = 0.0) -> Tensor:
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
        out = activation(h, kind, alpha, limit, linear_offset, swiglu_limit) @ w2[e].to(f64)
        if b2 is not None:
            out = out + b2[e].to(f64)
        y = y.index_add(0, tokens, coef.unsqueeze(1) * out)
    return y
