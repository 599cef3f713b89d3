"""The ``reference`` backend: plain PyTorch, any device and dtype — the oracle.

Written for clarity and exactness, not speed: each kernel is a direct
transcription of the op's definition, accumulating in float32 (float64 for
float64 inputs), with no host synchronisation.  Grouped GEMMs loop over the
groups and keep each row's product only for its own group, so a NaN in one
expert's rows or weights never reaches another expert's rows.  Outputs are
contiguous whatever the input strides, as the ops' fakes declare.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from moe_ops.backends._elementwise import (
    acc_dtype,
    activation,
    activation_backward,
    activation_backward_with_output,
    add_expert_bias,
    expert_bias_backward,
    group_of_rows,
)
from moe_ops.ops import fused_composition
from moe_ops.registry import Backend


def _valid_pairs(row_of_pair: Tensor, offsets: Tensor) -> Tensor:
    return row_of_pair < offsets[-1]


def route(indices, token_mask, expert_start, num_experts):
    T, K = indices.shape
    local = indices.long() - expert_start
    valid = (local >= 0) & (local < num_experts) & token_mask.unsqueeze(1)
    key = torch.where(valid, local, num_experts).reshape(-1)
    sorted_key, pair_of_row = torch.sort(key, stable=True)
    experts = torch.arange(num_experts, device=indices.device, dtype=torch.int64)
    ends = torch.searchsorted(sorted_key, experts, right=True)
    tokens_per_expert = torch.diff(ends, prepend=ends.new_zeros(1))
    rows = torch.arange(T * K, device=indices.device, dtype=torch.int64)
    row_of_pair = torch.empty_like(pair_of_row).scatter_(0, pair_of_row, rows).view(T, K)
    return pair_of_row, row_of_pair, tokens_per_expert, ends.to(torch.int32)


def gather(x, row_of_pair, offsets, weights, num_rows=None):
    T, K = row_of_pair.shape
    M = T * K if num_rows is None else num_rows
    vals = x.unsqueeze(1).expand(T, K, x.shape[1])
    if weights is not None:
        vals = (vals.to(acc_dtype(x.dtype)) * weights.to(acc_dtype(x.dtype)).unsqueeze(-1)).to(x.dtype)
    vals = torch.where(_valid_pairs(row_of_pair, offsets).unsqueeze(-1), vals, 0)
    # Row M collects the pairs whose row is past the M kept rows, and is dropped.
    out = x.new_zeros(M + 1, x.shape[1])
    rows = row_of_pair.reshape(-1).clamp(max=M)
    out.index_put_((rows,), vals.reshape(T * K, x.shape[1]))  # T may be 0
    return out[:M].clone()


def _pair_rows(rows, row_of_pair):
    # Pairs whose row is past the given rows read row 0 (they are masked out by _valid_rows).
    T, K = row_of_pair.shape
    if rows.shape[0] == 0:
        return rows.new_zeros(T, K, rows.shape[1], dtype=acc_dtype(rows.dtype))
    safe = torch.where(row_of_pair < rows.shape[0], row_of_pair, 0)
    return rows.index_select(0, safe.reshape(-1)).view(T, K, rows.shape[1]).to(acc_dtype(rows.dtype))


def _valid_rows(row_of_pair, offsets, rows):
    return _valid_pairs(row_of_pair, offsets) & (row_of_pair < rows.shape[0])


def combine(rows, row_of_pair, offsets, weights):
    vals = _pair_rows(rows, row_of_pair)
    if weights is not None:
        vals = vals * weights.to(vals.dtype).unsqueeze(-1)
    vals = torch.where(_valid_rows(row_of_pair, offsets, rows).unsqueeze(-1), vals, 0)
    return vals.sum(1).to(rows.dtype)


def pair_dot(a, rows, row_of_pair, offsets):
    acc = acc_dtype(a.dtype)
    dots = (_pair_rows(rows, row_of_pair).to(acc) * a.to(acc).unsqueeze(1)).sum(-1)
    return torch.where(_valid_rows(row_of_pair, offsets, rows), dots, 0).contiguous()


def grouped_mm(a, b, offsets):
    acc = acc_dtype(a.dtype)
    group = group_of_rows(offsets, a.shape[0]).unsqueeze(1)
    a_acc = a.to(acc)
    out = a.new_zeros(a.shape[0], b.shape[2], dtype=acc)
    for g in range(b.shape[0]):
        out = torch.where(group == g, a_acc @ b[g].to(acc), out)
    return out.to(a.dtype)


def grouped_mm_wgrad(a, grad, offsets):
    acc = acc_dtype(a.dtype)
    group = group_of_rows(offsets, a.shape[0]).unsqueeze(1)
    a_acc, grad_acc = a.to(acc), grad.to(acc)
    per_group = []
    for g in range(offsets.shape[0]):
        mine = group == g
        per_group.append(torch.where(mine, a_acc, 0).t() @ torch.where(mine, grad_acc, 0))
    return torch.stack(per_group).to(a.dtype)


def _rows_or_zeros(src, idx, valid):
    """``src[idx]`` where ``valid`` and ``idx`` is a row of ``src``, zero rows elsewhere."""
    idx = idx.long()
    valid = valid & (idx >= 0) & (idx < src.shape[0])
    if src.shape[0] == 0:
        return src.new_zeros(idx.shape[0], src.shape[1])
    rows = src.index_select(0, torch.where(valid, idx, 0))
    return torch.where(valid.unsqueeze(1), rows, 0)


def clear_tail_(rows, offsets):
    tail = torch.arange(rows.shape[0], device=rows.device) >= offsets[-1]
    rows.masked_fill_(tail.unsqueeze(1), 0)


def gather_from(sources, index, counts):
    j = torch.arange(index[0].shape[0], device=index[0].device)
    blocks = [_rows_or_zeros(src, index[s], j < counts[s]) for s, src in enumerate(sources)]
    return torch.cat(blocks).contiguous()


def put_to(rows, dests):
    for block, dest in zip(rows.split(dests[0].shape[0]), dests):
        dest.copy_(block)


def sum_from(sources, row, out_dtype=None):
    acc = torch.zeros(row.shape[0], sources[0].shape[1], dtype=acc_dtype(sources[0].dtype), device=row.device)
    for s, src in enumerate(sources):
        acc += _rows_or_zeros(src, row[:, s], row[:, s] >= 0).to(acc.dtype)
    return acc.to(out_dtype or sources[0].dtype)


# ---- the fused ops, composed from the kernels above (the oracle for the fused kernels) ----

grouped_mm_any_tail = grouped_mm
_FUSED = fused_composition.kernels(sys.modules[__name__])

KERNELS = {
    "route": route,
    "gather": gather,
    "combine": combine,
    "pair_dot": pair_dot,
    "grouped_mm": grouped_mm,
    "grouped_mm_wgrad": grouped_mm_wgrad,
    "add_expert_bias": add_expert_bias,
    "expert_bias_backward": expert_bias_backward,
    "activation": activation,
    "activation_backward": activation_backward,
    "activation_backward_with_output": activation_backward_with_output,
    "clear_tail_": clear_tail_,
    "gather_from": gather_from,
    "sum_from": sum_from,
    "put_to": put_to,
    **_FUSED,
}

BACKEND = Backend(
    name="reference",
    description="plain PyTorch, any device and dtype; exact and slow (the oracle)",
    kernels=KERNELS,
    unavailable_reasons=lambda: [],
    input_reasons=lambda op, inputs: [],  # takes every input, on any device
)
