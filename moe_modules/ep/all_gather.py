"""Expert parallelism by all-gather / reduce-scatter: every rank sees every token of the EP group.

Each rank all-gathers the group's tokens, computes its own ``E / ep_size`` experts on them (the
other ranks' pairs contribute 0), and a reduce-scatter sums the partial outputs across ranks — in
float32 by default — after which each rank keeps its own tokens and rounds once to ``x.dtype``.  A
parameter shard's gradient then sums every rank's tokens without any extra reduction.

Uneven token counts: ranks pad to the group's largest ``T`` (one all-gather of every rank's count and
call signature, read on the host; under torch.compile an all-reduce MAX of the counts) with tokens
whose indices are -1, which every op treats as not routed.  A rank with ``T = 0`` still
takes part in every collective, forward and backward.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_modules.ep import _comm as comm
from moe_modules.ep.dispatcher import Received, experts_per_rank, local_ids
from moe_modules.ep.signature import CallSignature, all_gather_checked


def max_tokens(num_tokens: int, device: torch.device, group) -> int:
    """The largest token count of the group (one tiny all-reduce and one host read)."""
    count = torch.full((1,), num_tokens, dtype=torch.int64, device=device)
    (largest,) = comm.host_ints(comm.all_reduce(count, "max", group))
    torch._check(largest >= num_tokens)
    return largest


class AllGatherDispatcher:
    """All-gather the group's tokens in, reduce-scatter the partial outputs home."""

    def __init__(self, ep_mesh, n_routed_experts: int, reduce_dtype: Optional[torch.dtype] = torch.float32,
                 activation: Optional[str] = None):
        self.experts_per_rank = experts_per_rank(ep_mesh, n_routed_experts)
        self.ep_mesh = ep_mesh
        self.reduce_dtype = reduce_dtype
        self.signature = CallSignature(n_routed_experts, activation)

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Received:
        group = self.ep_mesh.get_group()
        T = x.shape[0]
        if torch.compiler.is_compiling():
            largest = max_tokens(T, x.device, group)
        else:
            rows = all_gather_checked(self.signature, self.signature.next(x, weights, indices), x.device, group,
                                      extra=(T,))
            largest = max(row[0] for row in rows)
        pad = largest - T
        # The mask travels inside the indices (-1: not routed); padding rows are not routed either.
        routed_TK = torch.where(token_mask.unsqueeze(1), indices, -1)
        x_all = comm.all_gather_autograd(F.pad(x, (0, 0, 0, pad)), 0, group)
        weights_all = comm.all_gather_autograd(F.pad(weights, (0, 0, 0, pad)), 0, group)
        routed_all = comm.all_gather(F.pad(routed_TK, (0, 0, 0, pad), value=-1), 0, group)
        first = self.ep_mesh.get_local_rank() * self.experts_per_rank
        everyone = torch.ones(routed_all.shape[0], dtype=torch.bool, device=x.device)
        return Received(x_all, everyone, weights_all, local_ids(routed_all, first, self.experts_per_rank), None,
                        comm.partial_dtype(x.dtype, self.reduce_dtype), (T, x.dtype))

    def combine(self, partial: Tensor, received: Received) -> Tensor:
        T, x_dtype = received.state
        try:
            y_pad = comm.reduce_scatter_autograd(partial, "sum", 0, self.ep_mesh.get_group())  # waited eagerly
            return y_pad[:T].to(x_dtype)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self.signature.failed(e) from e
