"""The one dispatcher protocol: every expert module's forward is dispatch -> its experts -> combine.

    received = module.token_dispatcher.dispatch(x, token_mask, weights, indices)
    partial = module's experts on received          # [N, D] in received.out_dtype
    y = module.token_dispatcher.combine(partial, received)   # [T, D] in x.dtype

A dispatcher decides where tokens go and how their partial outputs come home; an expert module
decides only how its local experts compute.  So any module runs over any transport:
:class:`LocalDispatcher` (one device), all-gather / reduce-scatter, all-to-all, DeepEP's buffers
and GPU peer memory (the sibling modules), built by :func:`moe_modules.apply_ep`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Protocol

import torch
from torch import Tensor


class Received(NamedTuple):
    """What a rank computes on after a dispatch, and what the combine needs to send it home.

    The experts compute ``partial[n] = sum_k weights[n, k] * expert_{indices[n, k]}(x[n])`` over the
    slots whose local expert id is in ``0 .. E_local - 1`` (any other value: not on this rank) for the
    rows kept by ``token_mask``, accumulated in float32 and returned in ``out_dtype``."""

    x: Tensor  # [N, D] the rows this rank computes on
    token_mask: Tensor  # [N] bool
    weights: Tensor  # [N, K] routing weights (their gradient flows back to the sender)
    indices: Tensor  # [N, K] local expert ids
    num_pairs: Optional[int]  # the valid (row, local expert) pairs when the transport knows it; else None
    out_dtype: torch.dtype  # dtype of the partial outputs the combine takes
    state: Any = None  # the transport's own: what its combine needs


class Dispatcher(Protocol):
    ep_mesh: Any  # the 1-D EP DeviceMesh, None on one device

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Received: ...

    def combine(self, partial: Tensor, received: Received) -> Tensor: ...


class LocalDispatcher:
    """One device: every expert is local, the tokens stay where they are."""

    ep_mesh = None

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Received:
        return Received(x, token_mask, weights, indices, None, x.dtype)

    def combine(self, partial: Tensor, received: Received) -> Tensor:
        return partial


def experts_per_rank(ep_mesh, n_routed_experts: int) -> int:
    """``E / ep_size``; a clear error when the experts do not divide over the EP group."""
    ep_size = ep_mesh.size()
    if n_routed_experts % ep_size:
        raise ValueError(
            f"ep_mesh: n_routed_experts={n_routed_experts} must be divisible by the EP size, got ep_size={ep_size}"
        )
    return n_routed_experts // ep_size


def local_ids(indices: Tensor, first_expert: int, num_local: int) -> Tensor:
    """Global expert ids -> this rank's ids ``0 .. num_local - 1``; -1 for every other value."""
    local = indices.long() - first_expert
    return torch.where((local >= 0) & (local < num_local), local, -1)
