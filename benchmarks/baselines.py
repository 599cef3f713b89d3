"""The baselines our expert block is measured against, in plain PyTorch with plain autograd.

* :func:`torch_reference_path` — the design NeMo AutoModel (``GroupedExperts`` with the
  ``torch_mm`` backend) and torchtitan use: argsort of the flattened expert indices,
  ``index_select`` gather of token rows, ``torch._grouped_mm`` (bf16, int32 offsets) for both
  GEMMs, per-expert biases added over ``split(counts.tolist())`` as NeMo's ``_apply_bias``
  does, the probability-weighted activation in eager PyTorch (float32 math, rounded once),
  and a float32 ``scatter_add_`` combine.  It syncs with the host where NeMo does (boolean
  filtering of local pairs, ``.tolist()`` for the biases).
* :func:`grouped_gemms_only` — the two ``torch._grouped_mm`` GEMMs and the activation on
  rows that are already sorted by expert: no routing, gather, bias, probability or combine.
  The cheapest thing an expert block could cost with these GEMMs.
* :func:`per_expert_loop` — a Python loop over experts (counts from ``.tolist()``), each
  ``x_e @ W1[e]``, activation, ``@ W2[e]``, ``index_add_`` into a float32 output.

Every function follows the expert block of SPEC.md section 4 (weights ``x @ W`` layout,
gate/up concatenated for swiglu and interleaved for quick_geglu, probability applied inside
the activation and to the down bias).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def _gate_up(h: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    if kind == "quick_geglu":
        return h[..., 0::2], h[..., 1::2]
    half = h.shape[-1] // 2
    return h[..., :half], h[..., half:]


def activation_fp32(h: Tensor, probs: Optional[Tensor], kind: str, alpha: float = 1.702,
                    limit: Optional[float] = 7.0, linear_offset: float = 1.0) -> Tensor:
    """``act(h) * probs`` computed in float32 with eager ops, rounded once to ``h.dtype``."""
    hf = h.float()
    if kind == "relu2":
        out = F.relu(hf).square()
    else:
        gate, up = _gate_up(hf, kind)
        if kind == "swiglu":
            out = F.silu(gate) * up
        elif kind == "quick_geglu":
            if limit is not None:
                gate = gate.clamp(max=limit)
                up = up.clamp(min=-limit, max=limit)
            out = gate * torch.sigmoid(alpha * gate) * (up + linear_offset)
        else:
            raise ValueError(f"activation: expected swiglu, quick_geglu or relu2, got {kind!r}")
    if probs is not None:
        out = out * probs.reshape(-1, 1)
    return out.to(h.dtype)


def activation_plain(h: Tensor, kind: str, alpha: float = 1.702, limit: Optional[float] = 7.0,
                     linear_offset: float = 1.0) -> Tensor:
    """``act(h)`` in ``h.dtype`` with the fewest eager ops (for the bare-GEMM baseline)."""
    if kind == "relu2":
        return F.relu(h).square()
    gate, up = _gate_up(h, kind)
    if kind == "swiglu":
        return F.silu(gate) * up
    if limit is not None:
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + linear_offset)


def sort_by_expert(indices: Tensor, token_mask: Tensor, weights: Tensor, num_experts: int):
    """NeMo AutoModel's ``_permute_tokens_for_grouped_mm``: token ids and float32 probabilities
    of the valid (token, expert) pairs, stably sorted by expert, with counts and int32 offsets."""
    T, K = indices.shape
    flat_indices = indices.masked_fill(~token_mask.unsqueeze(-1), -1).reshape(-1)
    flat_weights = weights.float().reshape(-1)
    token_ids = torch.arange(T, device=indices.device).unsqueeze(1).expand(-1, K).reshape(-1)
    local = (flat_indices >= 0) & (flat_indices < num_experts)
    expert_ids = flat_indices[local]  # boolean indexing: a host sync, as in NeMo
    order = expert_ids.argsort(stable=True)
    sorted_token_ids = token_ids[local][order]
    sorted_probs = flat_weights[local][order]
    counts = torch.bincount(expert_ids, minlength=num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    return sorted_token_ids, sorted_probs, counts, offsets


def _apply_bias(value: Tensor, bias: Optional[Tensor], counts: list[int], probs: Optional[Tensor] = None) -> Tensor:
    """NeMo AutoModel's ``_apply_bias``: per-expert slices plus their bias row (times probs for the down bias)."""
    if bias is None:
        return value
    pieces = torch.split(value, counts)
    if probs is None:
        out = [piece + b for piece, b in zip(pieces, bias)]
    else:
        out = [piece + b * p for piece, b, p in zip(pieces, bias, torch.split(probs.reshape(-1, 1), counts))]
    return torch.cat(out).to(value.dtype)


def torch_reference_path(x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                         b1: Optional[Tensor], b2: Optional[Tensor], kind: str, alpha: float = 1.702,
                         limit: Optional[float] = 7.0, linear_offset: float = 1.0) -> Tensor:
    """The expert block as NeMo AutoModel's ``torch_mm`` path / torchtitan compute it; ``[T, D]`` in ``x.dtype``."""
    token_ids, probs, counts, offsets = sort_by_expert(indices, token_mask, weights, w1.shape[0])
    counts_list = counts.tolist() if (b1 is not None or b2 is not None) else None
    rows = x.index_select(0, token_ids)
    h = torch._grouped_mm(rows, w1, offs=offsets)
    h = _apply_bias(h, b1, counts_list)
    a = activation_fp32(h, probs, kind, alpha, limit, linear_offset)
    out = torch._grouped_mm(a, w2, offs=offsets)
    out = _apply_bias(out, b2, counts_list, probs)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    y.scatter_add_(0, token_ids.unsqueeze(1).expand_as(out), out.float())
    return y.to(x.dtype)


def grouped_gemms_only(rows: Tensor, w1: Tensor, w2: Tensor, offsets: Tensor, kind: str) -> Tensor:
    """``act(rows @ W1[g]) @ W2[g]`` per expert group on pre-sorted rows; ``[R, D]``."""
    h = torch._grouped_mm(rows, w1, offs=offsets)
    return torch._grouped_mm(activation_plain(h, kind), w2, offs=offsets)


def per_expert_loop(x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                    b1: Optional[Tensor], b2: Optional[Tensor], kind: str, alpha: float = 1.702,
                    limit: Optional[float] = 7.0, linear_offset: float = 1.0) -> Tensor:
    """The expert block as a Python loop over experts; ``[T, D]`` in ``x.dtype``."""
    token_ids, probs, counts, _ = sort_by_expert(indices, token_mask, weights, w1.shape[0])
    counts_list = counts.tolist()
    # unbind/split keep the backward to one stack/cat instead of one full-size zero tensor per expert.
    w1s, w2s = w1.unbind(0), w2.unbind(0)
    b1s = b1.unbind(0) if b1 is not None else None
    b2s = b2.unbind(0) if b2 is not None else None
    rows = x.index_select(0, token_ids).split(counts_list)
    probs_e = probs.split(counts_list)
    ids_e = token_ids.split(counts_list)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, n in enumerate(counts_list):
        if n == 0:
            continue
        h = rows[e] @ w1s[e]
        if b1s is not None:
            h = h + b1s[e]
        out = activation_fp32(h, probs_e[e], kind, alpha, limit, linear_offset) @ w2s[e]
        if b2s is not None:
            out = (out + b2s[e] * probs_e[e].unsqueeze(1)).to(x.dtype)
        y.index_add_(0, ids_e[e], out.float())
    return y.to(x.dtype)
