"""GroupedExpertsDeepEP under expert parallelism: all-to-all dispatch, local experts, all-to-all combine.

Forward, on each rank of the EP group (``E_local = E / ep_size`` experts per rank, rank ``r`` owns
experts ``r*E_local ... (r+1)*E_local - 1``):

1. ``moe.route`` over all ``E`` experts sorts the ``T*K`` (token, slot) pairs by expert, hence by
   destination rank; masked / -1 pairs go past the end and are never sent.
2. Counts first: an all-to-all of the per-expert counts ``[E]`` gives every rank the
   ``[ep_size, E_local]`` counts it will receive.  The per-rank split sizes are read on the host
   (the one device->host sync of the forward; ``all_to_all_single`` needs host split sizes).
3. Dispatch: the sorted token rows and their routing probabilities go by ``all_to_all_single``
   to the ranks owning their experts.
4. The received rows (source-major, expert-sorted within each source) run through the local
   experts, routed by their local expert id with ``K = 1``.
5. Combine: the inverse all-to-all brings each row's expert output home, where ``moe.combine``
   sums a token's K contributions in float32 in slot order (deterministic).

The collectives are the autograd variants of the functional collectives, so backward is the
mirror image (all-to-all with the split sizes swapped) and ``torch.compile(fullgraph=True)`` traces
the whole path.  Every rank calls every collective, also with zero tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import moe_ops
from moe_modules import _ep_comm as comm
from moe_modules.expert_block import Activation, permuted_probs, run_local_experts


def local_expert_of_rows(recv_counts: Tensor, num_rows: int, experts_per_rank: int) -> Tensor:
    """Local expert id of each received row, ``[num_rows]`` int64.

    ``recv_counts [ep_size * E_local]``: rows received from source ``s`` for local expert ``e`` at
    ``s * E_local + e``, laid out in that order in the receive buffer."""
    ends = torch.cumsum(recv_counts, 0)
    rows = torch.arange(num_rows, device=recv_counts.device, dtype=ends.dtype)
    return torch.searchsorted(ends, rows, right=True) % experts_per_rank


class AllToAllDispatcher:
    """Token dispatch and combine of :class:`~moe_modules.GroupedExpertsDeepEP` over a 1-D EP mesh."""

    def __init__(self, ep_mesh, n_routed_experts: int):
        ep_size = ep_mesh.size()
        if n_routed_experts % ep_size:
            raise ValueError(
                f"ep_mesh: n_routed_experts={n_routed_experts} must be divisible by the EP size, got ep_size={ep_size}"
            )
        self.ep_mesh = ep_mesh
        self.ep_size = ep_size
        self.num_experts = n_routed_experts
        self.experts_per_rank = n_routed_experts // ep_size

    def split_sizes(self, tokens_per_expert: Tensor, group) -> tuple[list[int], list[int], Tensor]:
        """``(send_splits, recv_splits, recv_counts)``: rows sent to / received from each rank
        (host ints, one sync) and the received per-(source, local expert) counts on the device."""
        ep, E_local = self.ep_size, self.experts_per_rank
        recv_counts = comm.all_to_all(tokens_per_expert, None, None, group)
        send_per_rank = tokens_per_expert.view(ep, E_local).sum(1)
        recv_per_rank = recv_counts.view(ep, E_local).sum(1)
        splits = comm.host_ints(torch.cat([send_per_rank, recv_per_rank]))
        return splits[:ep], splits[ep:], recv_counts

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> "Dispatched":
        """Send each valid (token, slot) pair's row and probability to the rank owning its expert."""
        group = self.ep_mesh.get_group()
        T, K = indices.shape
        pair_of_row, row_of_pair, tokens_per_expert, offsets = moe_ops.route(indices, token_mask, 0,
                                                                             self.num_experts)
        send_splits, recv_splits, recv_counts = self.split_sizes(tokens_per_expert, group)
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        torch._check(n_send <= T * K)
        # Rows sorted by expert are already grouped by destination rank; unsent pairs come last.
        rows_send = moe_ops.gather(x, row_of_pair, offsets)[:n_send]
        probs_send = permuted_probs(weights, pair_of_row)[:n_send]
        rows = comm.all_to_all_autograd(rows_send, recv_splits, send_splits, group)
        probs = comm.all_to_all_autograd(probs_send, recv_splits, send_splits, group)
        local_expert = local_expert_of_rows(recv_counts, n_recv, self.experts_per_rank)
        return Dispatched(rows, probs, local_expert, row_of_pair, offsets, send_splits, recv_splits)

    def combine(self, out_rows: Tensor, dispatched: "Dispatched") -> Tensor:
        """Bring each received row's expert output home and sum a token's K contributions (float32,
        slot order); ``out_rows`` is in the order of ``dispatched.rows``.  Returns ``[T, D]``."""
        group = self.ep_mesh.get_group()
        T, K = dispatched.row_of_pair.shape
        out_home = comm.all_to_all_autograd(out_rows, dispatched.send_splits, dispatched.recv_splits, group)
        rows_home = F.pad(out_home, (0, 0, 0, T * K - out_home.shape[0]))
        return moe_ops.combine(rows_home, dispatched.row_of_pair, dispatched.offsets)

    def run(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
            b1: Optional[Tensor], b2: Optional[Tensor], act: Activation) -> Tensor:
        d = self.dispatch(x, token_mask, weights, indices)
        # The received rows are source-major; routing them with K = 1 by local expert groups them.
        everyone = torch.ones(d.rows.shape[0], dtype=torch.bool, device=x.device)
        out_rows = run_local_experts(d.rows, everyone, d.probs.unsqueeze(1), d.local_expert.unsqueeze(1),
                                     w1, w2, b1, b2, act)
        return self.combine(out_rows, d)


class Dispatched(NamedTuple):
    """What :meth:`AllToAllDispatcher.dispatch` received, and what the combine needs to send it back."""

    rows: Tensor  # [N_recv, D] token rows for this rank's experts
    probs: Tensor  # [N_recv] their routing probabilities
    local_expert: Tensor  # [N_recv] int64 local expert id of each row
    row_of_pair: Tensor  # [T, K] from the sender's route over all E experts
    offsets: Tensor  # [E] int32 (offsets[-1] = number of rows sent)
    send_splits: list  # rows sent to each rank (host ints)
    recv_splits: list  # rows received from each rank (host ints)
