"""GroupedExperts under expert parallelism: all-gather the tokens, compute the local experts,
reduce-scatter the outputs.

Every rank sees every token of the EP group and runs only its own ``E / ep_size`` experts on them
(the other pairs contribute 0), so a parameter shard's gradient sums every rank's tokens without
any extra reduction.  The partial outputs are summed across ranks by a reduce-scatter in float32
by default, then each rank keeps its own tokens and rounds once to ``x.dtype``.

Uneven token counts: ranks pad to the group's largest ``T`` (one all-reduce MAX, read on the host)
with tokens whose indices are -1, which every op treats as not routed.  A rank with ``T = 0`` still
takes part in every collective, forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_modules import _ep_comm as comm
from moe_modules.expert_block import run_local_experts


def max_tokens(num_tokens: int, device: torch.device, group) -> int:
    """The largest token count of the group (one tiny all-reduce and one host read)."""
    count = torch.full((1,), num_tokens, dtype=torch.int64, device=device)
    (largest,) = comm.host_ints(comm.all_reduce(count, "max", group))
    torch._check(largest >= num_tokens)
    return largest


def all_gather_experts(module, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor,
                       w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor]) -> Tensor:
    """``module``'s expert block over the EP group ``module.ep_mesh``; ``w1 .. b2`` are the local shards."""
    mesh = module.ep_mesh
    group = mesh.get_group()
    expert_start = mesh.get_local_rank() * w1.shape[0]
    T = x.shape[0]
    T_max = max_tokens(T, x.device, group)
    pad = T_max - T

    # The mask travels inside the indices (-1: not routed), padding rows are not routed either.
    routed_TK = torch.where(token_mask.unsqueeze(1), indices, -1)
    x_all = comm.all_gather_autograd(F.pad(x, (0, 0, 0, pad)), 0, group)
    weights_all = comm.all_gather_autograd(F.pad(weights, (0, 0, 0, pad)), 0, group)
    routed_all = comm.all_gather(F.pad(routed_TK, (0, 0, 0, pad), value=-1), 0, group)
    everyone = torch.ones(routed_all.shape[0], dtype=torch.bool, device=x.device)

    reduce_dtype = comm.partial_dtype(x.dtype, getattr(module, "ep_reduce_dtype", torch.float32))
    partial = run_local_experts(x_all, everyone, weights_all, routed_all, w1, w2, b1, b2, module.activation,
                                expert_start, out_dtype=reduce_dtype)
    y_pad = comm.reduce_scatter_autograd(partial, "sum", 0, group)
    return y_pad[:T].to(x.dtype)
