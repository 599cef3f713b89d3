"""GroupedExpertsDeepEP under expert parallelism: all-to-all dispatch, local experts, all-to-all combine.

Each token travels once to each rank that owns at least one of its K experts (DeepEP's layout),
not once per expert: with DeepSeek-V3 routing (K=8 of 256 experts) that is about 2 rows per token
on 2 ranks and 3.6 on 4, against 8.  On each rank of the EP group (``E_local = E / ep_size``
experts per rank; rank ``r`` owns experts ``r*E_local ... (r+1)*E_local - 1``):

1. The (token, destination rank) pairs are laid out by rank, tokens in order within a rank;
   masked tokens and ranks a token has no expert on go past the end and are never sent.
2. Counts first: an all-to-all of ``[ep_size, 2]`` counts (rows, and (token, expert) pairs, per
   destination).  The split sizes and the number of received pairs are read on the host: the one
   device->host sync of the forward (``all_to_all_single`` needs host split sizes).
3. Dispatch: ``moe.gather`` writes the rows in send order (exactly the rows sent, no padding), and
   two all-to-alls carry them and, per row, the token's K routing weights with its K expert ids
   made local (-1 where the expert lives on another rank) — the metadata travel as one float tensor.
4. The receiver runs its experts on the received tokens: the (token, local expert) pairs are
   gathered into expert order, the local experts run on them, and ``moe.combine`` sums each token's
   local pairs (float32, slot order) into one partial row, kept in float32 by default
   (``apply_ep(reduce_dtype=None)``: rounded to ``x.dtype``, as DeepEP sends it: half the bytes back).
5. Combine: the inverse all-to-all brings the partial rows home, where ``moe.combine`` sums a token's
   per-rank partials in float32, in rank order (deterministic), rounded once to ``x.dtype``.

Backward is the mirror image (all-to-all with the split sizes swapped).  Under ``torch.compile`` the
all-to-alls are the autograd functional collectives, so ``fullgraph=True`` traces the whole path; in
eager mode they are ``dist.all_to_all_single`` (``_ep_comm``: far less host time).  Every rank calls
every collective, also with zero tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

import moe_ops
from moe_modules import _ep_comm as comm
from moe_modules.expert_block import Activation, permuted_probs, run_local_experts


class Dispatched(NamedTuple):
    """What :meth:`AllToAllDispatcher.dispatch` received, and what the combine needs to send it back."""

    rows: Tensor  # [N, D] tokens received, each once per rank that owns one of its experts
    probs: Tensor  # [N, K] their routing weights (the gradient flows back to the sender)
    local_indices: Tensor  # [N, K] int64 local expert id of each slot; -1: expert on another rank
    num_local_pairs: int  # valid (token, local expert) pairs in local_indices (host int)
    row_of_pair: Tensor  # [T, ep_size] the sender's row of (token, destination rank)
    offsets: Tensor  # [ep_size] int32 cumulative rows per destination (offsets[-1] = rows sent)
    send_splits: list  # rows sent to each rank (host ints)
    recv_splits: list  # rows received from each rank (host ints)


def experts_per_rank(ep_mesh, n_routed_experts: int) -> int:
    """``E / ep_size``; a clear error when the experts do not divide over the EP group."""
    ep_size = ep_mesh.size()
    if n_routed_experts % ep_size:
        raise ValueError(
            f"ep_mesh: n_routed_experts={n_routed_experts} must be divisible by the EP size, got ep_size={ep_size}"
        )
    return n_routed_experts // ep_size


def slot_on_rank(token_mask: Tensor, indices: Tensor, num_experts: int, experts_per_rank: int, ep: int) -> Tensor:
    """``[T, K, ep]`` bool: slot ``k`` of token ``t`` is routed (unmasked, in range) to an expert of rank ``r``."""
    idx = indices.long()
    valid = token_mask.unsqueeze(1) & (idx >= 0) & (idx < num_experts)
    owner_TK = torch.where(valid, idx // experts_per_rank, ep)
    return owner_TK.unsqueeze(-1) == torch.arange(ep, device=indices.device)


def route_to_ranks(on_rank_TKR: Tensor, token_mask: Tensor):
    """``moe.route`` with the ranks as experts: a stable sort of the (token, rank) pairs by rank, one
    pair per rank that owns at least one of the token's experts.  ``on_rank_TKR`` is
    :func:`slot_on_rank`'s.  Returns ``hits_TR [T, ep]`` bool and route's ``(pair_of_row,
    row_of_pair, rows per rank, offsets)``.  One op, eager and compiled: a prefix sum over ``[T, ep]``
    took about twenty aten ops (more host time, and a dim-0 scan that cost 0.65 ms of device time at
    T=4096, ep=4 on H200), and torch 2.11's Inductor could not generate CUDA code for it."""
    ep = on_rank_TKR.shape[-1]
    hits_TR = on_rank_TKR.any(1)
    dest_TR = torch.where(hits_TR, torch.arange(ep, device=hits_TR.device), -1)
    return hits_TR, moe_ops.route(dest_TR, token_mask, 0, ep)


def metadata_dtype(weights: Tensor) -> torch.dtype:
    # Local expert ids (< 2^24) are exact in float32, and so is a bfloat16 / float16 weight.
    return torch.float64 if weights.dtype == torch.float64 else torch.float32


class AllToAllDispatcher:
    """Token dispatch and combine of :class:`~moe_modules.GroupedExpertsDeepEP` over a 1-D EP mesh."""

    def __init__(self, ep_mesh, n_routed_experts: int):
        self.experts_per_rank = experts_per_rank(ep_mesh, n_routed_experts)
        self.ep_mesh = ep_mesh
        self.ep_size = ep_mesh.size()
        self.num_experts = n_routed_experts

    def _send_layout(self, token_mask: Tensor, indices: Tensor):
        """Where each (token, destination rank) pair goes in the send buffer: by rank, tokens in order
        within a rank.

        Returns ``row_of_pair [T, ep]`` (past every row where token ``t`` has no expert on rank ``r``),
        ``offsets [ep]`` int32 cumulative rows per rank, ``pair_of_row [T*ep]`` (``t*ep + r`` of each
        row sent; rows past them hold any in-range pair), and the rows and (token, expert) pairs per
        rank (:func:`route_to_ranks`)."""
        on_rank_TKR = slot_on_rank(token_mask, indices, self.num_experts, self.experts_per_rank, self.ep_size)
        _, (pair_of_row, row_of_pair, rows_per_rank, offsets) = route_to_ranks(on_rank_TKR, token_mask)
        return row_of_pair, offsets, pair_of_row, rows_per_rank, on_rank_TKR.sum((0, 1))

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Dispatched:
        """Send each routed token once to every rank that owns one of its experts, with its weights
        and its expert ids local to that rank."""
        group = self.ep_mesh.get_group()
        T, K = indices.shape
        ep = self.ep_size
        row_of_pair, offsets, pair_of_row, rows_per_rank, pairs_per_rank = self._send_layout(token_mask, indices)

        # Each candidate row's metadata, built before the host read below so that only the gather
        # and the all-to-alls are left after it.
        token_of_row, dest_of_row = pair_of_row // ep, pair_of_row % ep
        local = indices.long().index_select(0, token_of_row) - (dest_of_row * self.experts_per_rank).unsqueeze(1)
        local = torch.where((local >= 0) & (local < self.experts_per_rank), local, -1)
        meta_dtype = metadata_dtype(weights)
        meta_all = torch.cat([weights.index_select(0, token_of_row).to(meta_dtype), local.to(meta_dtype)], 1)

        # Counts first: [rows, pairs] per destination; every rank learns what it will receive.
        recv_counts = comm.all_to_all(torch.stack([rows_per_rank, pairs_per_rank], 1), None, None, group)
        counts = comm.host_ints(torch.cat([rows_per_rank, recv_counts[:, 0], recv_counts[:, 1].sum(0, True)]))
        send_splits, recv_splits, num_local_pairs = counts[:ep], counts[ep:2 * ep], counts[-1]
        n_send = sum(send_splits)
        torch._check(n_send <= T * ep)
        torch._check(num_local_pairs <= sum(recv_splits) * K)

        rows_send = moe_ops.gather(x, row_of_pair, offsets, None, n_send)  # exactly the rows sent
        rows = comm.all_to_all_autograd(rows_send, recv_splits, send_splits, group)
        meta = comm.all_to_all_autograd(meta_all[:n_send], recv_splits, send_splits, group)
        probs, local_indices = meta[:, :K].to(weights.dtype), meta[:, K:].long()
        return Dispatched(rows, probs, local_indices, num_local_pairs, row_of_pair, offsets, send_splits,
                          recv_splits)

    def combine(self, partial_rows: Tensor, dispatched: Dispatched) -> Tensor:
        """Bring each received token's partial output home and sum a token's per-rank partials (float32,
        rank order); ``partial_rows [N, D]`` is in the order of ``dispatched.rows``.  Returns ``[T, D]``."""
        group = self.ep_mesh.get_group()
        home = comm.all_to_all_autograd(partial_rows, dispatched.send_splits, dispatched.recv_splits, group)
        return moe_ops.combine(home, dispatched.row_of_pair, dispatched.offsets)

    def run(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
            b1: Optional[Tensor], b2: Optional[Tensor], act: Activation,
            reduce_dtype: Optional[torch.dtype] = torch.float32) -> Tensor:
        """The expert block over the EP group.  Each rank's partial rows travel home in
        ``reduce_dtype`` (float32 by default, so a token's output is accumulated in float32 as on one
        device; ``None``: in ``x.dtype``, half the combine bytes, as DeepEP sends them)."""
        d = self.dispatch(x, token_mask, weights, indices)
        partial = experts_on_received_tokens(d.rows, d.probs, d.local_indices, d.num_local_pairs, w1, w2, b1, b2,
                                             act, comm.partial_dtype(x.dtype, reduce_dtype))
        return self.combine(partial, d).to(x.dtype)


def experts_on_received_tokens(rows: Tensor, probs: Tensor, local_indices: Tensor, num_local_pairs: int,
                               w1: Tensor, w2: Tensor, b1: Optional[Tensor], b2: Optional[Tensor],
                               act: Activation, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """The local experts on the received tokens ``rows [N, D]`` (their K weights ``probs`` and local
    expert ids ``local_indices``, -1 elsewhere; ``num_local_pairs`` of them valid): ``[N, D]`` partial
    outputs (each token's local pairs summed in float32, returned in ``out_dtype``, default the rows'
    dtype).  Shared by the all-to-all transports (ours and DeepEP's).

    The (token, local expert) pairs are gathered into expert order first — exactly the valid pairs,
    so the grouped GEMMs run on no padding rows — then the experts run on them one pair per row."""
    N, K = local_indices.shape
    everyone = torch.ones(N, dtype=torch.bool, device=rows.device)
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(local_indices, everyone, 0, w1.shape[0])
    P = num_local_pairs
    x_pairs = moe_ops.gather(rows, row_of_pair, offsets, None, P)
    pairs = pair_of_row[:P]
    pair_probs = permuted_probs(probs, pairs).unsqueeze(1)
    expert = local_indices.reshape(-1).index_select(0, pairs).unsqueeze(1)
    out_pairs = run_local_experts(x_pairs, torch.ones(P, dtype=torch.bool, device=rows.device), pair_probs, expert,
                                  w1, w2, b1, b2, act, out_dtype=out_dtype)
    return moe_ops.combine(out_pairs, row_of_pair, offsets)
