"""moe::route — the expert-sorted order of the T*K (token, slot) pairs.

Static shapes: all T*K pairs get a row.  Valid pairs (token kept by
``token_mask`` and expert in ``[expert_start, expert_start + num_experts)``)
are sorted by local expert, token-major within an expert (stable); every other
pair (masked token, index -1, expert owned by another rank, out-of-range index)
is sorted past the last group.  Counts and offsets stay on the device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define


def _validate(indices: Tensor, token_mask: Tensor, expert_start: int, num_experts: int) -> None:
    _checks.tensor("indices", indices, dim=2, dtypes=_checks.INDEX_DTYPES)
    _checks.tensor("token_mask", token_mask, dim=1, dtypes=(torch.bool,))
    _checks.size("token_mask", token_mask.shape[0], indices.shape[0], "number of tokens (dim 0 of indices)")
    _checks.same_device(indices=indices, token_mask=token_mask)
    _checks.positive("num_experts", num_experts)
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"expert_start: expected a non-negative int, got {expert_start!r}")


def _fake(indices, token_mask, expert_start, num_experts):
    T, K = indices.shape
    pair_of_row = indices.new_empty(T * K, dtype=torch.int64)
    row_of_pair = indices.new_empty(T, K, dtype=torch.int64)
    tokens_per_expert = indices.new_empty(num_experts, dtype=torch.int64)
    offsets = indices.new_empty(num_experts, dtype=torch.int32)
    return pair_of_row, row_of_pair, tokens_per_expert, offsets


_route = define("route(Tensor indices, Tensor token_mask, SymInt expert_start, SymInt num_experts)"
                " -> (Tensor, Tensor, Tensor, Tensor)", validate=_validate, fake=_fake)


def route(
    indices: Tensor, token_mask: Tensor, expert_start: int, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort the (token, slot) pairs by expert.

    Args:
        indices: ``[T, K]`` int32/int64 expert id per token and slot (-1: not routed).
        token_mask: ``[T]`` bool, False drops the token.
        expert_start, num_experts: the local experts are ``expert_start ... expert_start + num_experts - 1``.

    Returns:
        ``pair_of_row [T*K]`` int64: the pair id ``t*K + k`` at each sorted row;
        ``row_of_pair [T, K]`` int64: the sorted row of each pair (its inverse);
        ``tokens_per_expert [E]`` int64; ``offsets [E]`` int32 cumulative end rows.
        A pair is valid exactly when ``row_of_pair < offsets[-1]``.
    """
    return _route(indices, token_mask, expert_start, num_experts)
