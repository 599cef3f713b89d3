"""Expert parallelism over GPU peer memory: a dispatch and combine with no host sync.

``apply_ep(module, ep_mesh, max_tokens_per_rank=C)`` selects it.  Every buffer has a static shape
fixed by the capacity ``C`` (at least the tokens of any rank), so nothing is read on the host: the
host runs ahead of the GPU, the step compiles with static shapes, and the forward replays from a
CUDA graph (``benchmarks/gpu_ep_parity.py`` checks it; capturing the backward is untested).
It is DeepEP's low-latency layout in spirit: a receiver holds ``C`` rows per source rank.

How tokens move (one host, up to 8 GPUs): through the ops ``moe::peer_dispatch`` and
``moe::peer_combine`` (``moe_ops/ops/exchange.py``).  Each rank owns a buffer of
``torch.distributed``'s symmetric memory, which the other GPUs of the group map; one kernel on
this GPU then loads from, or stores to, the others' buffers over NVLink (``moe.gather_from`` /
``moe.put_to``), between two barriers.  Only the rows a rank needs cross the link, and the copy into receive
order *is* the transfer: no send buffer is packed first.

* dispatch (``moe::peer_dispatch``, a pull): rank ``r`` publishes its tokens, its K routing weights and
  expert ids, and for every destination the list of its tokens going there (``index [ep, C]``,
  ``counts [ep]``); rank ``d`` loads, from each source ``s``, rows ``s*C .. s*C + counts_s[d]`` of its
  ``[ep*C, D]`` receive buffer (zero rows after).
* combine (``moe::peer_combine``, a push): each rank stores block ``s`` of its ``[ep*C, D]`` partial
  outputs into rank ``s``'s buffer; the home rank sums, per token, the rows of the ranks it was
  sent to, in rank order, in float32 (``moe.sum_from``, local loads).

Each is the other's adjoint, which is the whole autograd formula.  Off CUDA (gloo, tests) the same
ops run with an all-gather (the published tensors) and an all-to-all (the pushed blocks) standing
in for the peer loads and stores, so the CPU tests exercise the same layout, kernels and gradients.
The push writes all ``C`` rows of a block, padding included (zeros): about 10% more bytes than
the rows sent at EP4 with DeepSeek-V3 routing, none at EP2 (every token goes to both ranks).

Memory is the price of static shapes: the receiver's expert block runs on ``ep*C`` rows with K
slots each (its own tokens' pairs sit among padding), as DeepEP's low-latency buffers do.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

import moe_ops
from moe_modules.ep import _comm as comm
from moe_modules.ep.all_to_all import metadata_dtype, route_to_ranks, slot_on_rank
from moe_modules.ep.dispatcher import Received, experts_per_rank, local_ids
from moe_modules.ep.signature import CallSignature, all_gather_checked

MAX_EP = moe_ops.MAX_SOURCES


class PeerLayout(NamedTuple):
    """Where this rank's tokens go: ``pos [T, ep]`` row of token ``t`` in its block on rank ``r``
    (-1: not sent there), ``index [ep, C]`` the tokens sent to each rank in order, ``counts [ep]``."""

    pos: Tensor
    index: Tensor
    counts: Tensor


class PeerDispatcher:
    """Token dispatch and combine through peer memory, with static shapes: ``capacity`` rows per source rank."""

    def __init__(self, ep_mesh, n_routed_experts: int, capacity: int,
                 reduce_dtype: Optional[torch.dtype] = torch.float32, activation: Optional[str] = None):
        self.experts_per_rank = experts_per_rank(ep_mesh, n_routed_experts)
        ep_size = ep_mesh.size()
        if ep_size > MAX_EP:
            raise ValueError(f"max_tokens_per_rank: the peer-memory dispatch runs on one host of at most {MAX_EP} "
                             f"GPUs, got an EP group of {ep_size}; leave max_tokens_per_rank=None")
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_tokens_per_rank: expected a positive int, got {capacity!r}")
        self.ep_mesh = ep_mesh
        self.group_name = ep_mesh.get_group().group_name
        self.rank = ep_mesh.get_local_rank()
        self.ep_size = ep_size
        self.num_experts = n_routed_experts
        self.capacity = capacity
        self.reduce_dtype = reduce_dtype
        self.signature = CallSignature(n_routed_experts, activation)
        self._checked: set = set()  # the shape signatures every rank agreed on

    def layout(self, token_mask: Tensor, indices: Tensor) -> PeerLayout:
        """The send layout, on the device: tokens in order within each destination rank."""
        T, K = indices.shape
        ep, C = self.ep_size, self.capacity
        device = indices.device
        if T == 0:
            return PeerLayout(torch.full((0, ep), -1, dtype=torch.int64, device=device),
                              torch.zeros(ep, C, dtype=torch.int64, device=device),
                              torch.zeros(ep, dtype=torch.int64, device=device))
        on_rank_TKR = slot_on_rank(token_mask, indices, self.num_experts, self.experts_per_rank, ep)
        hits_TR, (pair_of_row, row_of_pair, counts, ends) = route_to_ranks(on_rank_TKR, token_mask)
        starts = ends.long() - counts
        pos = torch.where(hits_TR, row_of_pair - starts, -1)
        j = torch.arange(C, device=device)
        sorted_row = (starts.unsqueeze(1) + j).clamp(max=T * ep - 1)
        index = torch.where(j < counts.unsqueeze(1), pair_of_row[sorted_row] // ep, 0)
        return PeerLayout(pos, index, counts)

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Received:
        T, K = indices.shape
        if T > self.capacity:
            raise ValueError(f"x: expected at most max_tokens_per_rank={self.capacity} tokens, got {T}")
        if not (torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())):
            values = self.signature.of_shapes(x, weights, indices)
            if tuple(values) not in self._checked:  # once per shape: no host read on the steady path
                all_gather_checked(self.signature, values, x.device, self.ep_mesh.get_group())
                self._checked.add(tuple(values))
        layout = self.layout(token_mask, indices)
        idx = indices.long()
        routed = (idx >= 0) & (idx < self.num_experts)
        meta_dtype = metadata_dtype(weights)
        # Expert ids travel as id + 1 so that the zero padding rows read as "no expert".
        meta = torch.cat([weights.to(meta_dtype), torch.where(routed, idx + 1, 0).to(meta_dtype)], 1)
        rows, meta_rows = moe_ops.peer_dispatch(x, meta, *layout, self.group_name)
        local = local_ids(meta_rows[:, K:].long() - 1, self.rank * self.experts_per_rank, self.experts_per_rank)
        everyone = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        return Received(rows, everyone, meta_rows[:, :K].to(weights.dtype), local, None,
                        comm.partial_dtype(x.dtype, self.reduce_dtype), (layout, x.dtype))

    def combine(self, partial: Tensor, received: Received) -> Tensor:
        """Sum each token's partial rows from the ranks it went to (float32, rank order) -> ``[T, D]``."""
        layout, x_dtype = received.state
        y, _ = moe_ops.peer_combine(partial, partial.new_zeros(partial.shape[0], 0), *layout, self.group_name,
                                    x_dtype)
        return y
