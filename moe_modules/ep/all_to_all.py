"""Expert parallelism by all-to-all: dispatch, local experts, combine (DeepEP's pattern over torch.distributed).

Each token travels once to each rank that owns at least one of its K experts (DeepEP's layout),
not once per expert: with DeepSeek-V3 routing (K=8 of 256 experts) that is about 2 rows per token
on 2 ranks and 3.6 on 4, against 8.  On each rank of the EP group (``E_local = E / ep_size``
experts per rank; rank ``r`` owns experts ``r*E_local ... (r+1)*E_local - 1``):

1. The (token, destination rank) pairs are laid out by rank, tokens in order within a rank;
   masked tokens and ranks a token has no expert on go past the end and are never sent.
2. Counts first: an all-to-all of ``[ep_size, 2]`` counts (rows, and (token, expert) pairs, per
   destination), eagerly with the call's signature (:mod:`moe_modules.ep.signature`) beside them.  The split sizes and the number of received pairs are read on the host: the one
   device->host sync of the forward (``all_to_all_single`` needs host split sizes).
3. Dispatch: ``moe.gather`` writes the rows in send order (exactly the rows sent, no padding), and
   two all-to-alls carry them and, per row, the token's K routing weights with its K expert ids
   made local (-1 where the expert lives on another rank) — the metadata travel as one float tensor.
4. The receiver's experts run on the received rows (:class:`~moe_modules.ep.dispatcher.Received`):
   one route of their (row, local expert) pairs and one block whose fused ops read the rows in place
   and run exactly the ``num_pairs`` valid pairs (no padding rows), summing each row's local pairs
   (float32, slot order) into one partial row, kept in float32 by default
   (``apply_ep(reduce_dtype=None)``: rounded to ``x.dtype``, as DeepEP sends it: half the bytes back).
5. Combine: the inverse all-to-all brings the partial rows home, where ``moe.combine`` sums a token's
   per-rank partials in float32, in rank order (deterministic), rounded once to ``x.dtype``.

Backward is the mirror image (all-to-all with the split sizes swapped).  Under ``torch.compile`` the
all-to-alls are the autograd functional collectives, so ``fullgraph=True`` traces the whole path; in
eager mode they are ``dist.all_to_all_single`` (``moe_modules.ep._comm``: far less host time).  Every rank calls
every collective, also with zero tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

import moe_ops
from moe_modules.ep import _comm as comm
from moe_modules.ep.dispatcher import Received, experts_per_rank, local_ids
from moe_modules.ep.signature import SIZE, CallSignature, check


class _Sent(NamedTuple):
    """What the combine needs of the dispatch: where the sender's rows went."""

    row_of_pair: Tensor  # [T, ep_size] the sender's row of (token, destination rank)
    offsets: Tensor  # [ep_size] int32 cumulative rows per destination (offsets[-1] = rows sent)
    send_splits: list  # rows sent to each rank (host ints)
    recv_splits: list  # rows received from each rank (host ints)
    x_dtype: torch.dtype


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
    """Each routed token goes once to every rank that owns one of its experts; partial rows come home."""

    def __init__(self, ep_mesh, n_routed_experts: int, reduce_dtype: Optional[torch.dtype] = torch.float32,
                 activation: Optional[str] = None):
        self.experts_per_rank = experts_per_rank(ep_mesh, n_routed_experts)
        self.ep_mesh = ep_mesh
        self.ep_size = ep_mesh.size()
        self.num_experts = n_routed_experts
        self.reduce_dtype = reduce_dtype
        self.signature = CallSignature(n_routed_experts, activation)

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

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor,
                 signed: bool = True) -> Received:
        """Send each routed token once to every rank that owns one of its experts, with its weights
        and its expert ids local to that rank.  ``signed=False``: the caller exchanged this call's
        signature already (the DeepEP dispatcher, before choosing its path)."""
        group = self.ep_mesh.get_group()
        T, K = indices.shape
        ep = self.ep_size
        row_of_pair, offsets, pair_of_row, rows_per_rank, pairs_per_rank = self._send_layout(token_mask, indices)

        # Each candidate row's metadata, built before the host read below so that only the gather
        # and the all-to-alls are left after it.
        token_of_row, dest_of_row = pair_of_row // ep, pair_of_row % ep
        local = local_ids(indices.index_select(0, token_of_row), (dest_of_row * self.experts_per_rank).unsqueeze(1),
                          self.experts_per_rank)
        meta_dtype = metadata_dtype(weights)
        meta_all = torch.cat([weights.index_select(0, token_of_row).to(meta_dtype), local.to(meta_dtype)], 1)

        # Counts first: [rows, pairs] per destination, and eagerly this call's signature; every rank learns
        # what it will receive (and every rank's signature, checked before any row moves).
        counts_send = torch.stack([rows_per_rank, pairs_per_rank], 1)
        values = None if torch.compiler.is_compiling() or not signed else self.signature.next(x, weights, indices)
        if values is not None:
            mine = torch.tensor(values, dtype=torch.int64, device=x.device)
            counts_send = torch.cat([counts_send, mine.expand(ep, SIZE)], 1)
        try:
            recv_counts = comm.all_to_all(counts_send, None, None, group)
            counts = comm.host_ints(torch.cat([rows_per_rank, recv_counts[:, 0], recv_counts[:, 1].sum(0, True),
                                               recv_counts[:, 2:].reshape(-1)]))
        except RuntimeError as e:
            if values is None:
                raise
            raise self.signature.failed(e) from e
        if values is not None:
            received = counts[2 * ep + 1:]
            check([received[r * SIZE:(r + 1) * SIZE] for r in range(ep)])
        send_splits, recv_splits, num_local_pairs = counts[:ep], counts[ep:2 * ep], counts[2 * ep]
        n_send = sum(send_splits)
        torch._check(n_send <= T * ep)
        torch._check(num_local_pairs <= sum(recv_splits) * K)

        rows_send = moe_ops.gather(x, row_of_pair, offsets, None, n_send)  # exactly the rows sent
        rows = comm.all_to_all_autograd(rows_send, recv_splits, send_splits, group)
        meta = comm.all_to_all_autograd(meta_all[:n_send], recv_splits, send_splits, group)
        everyone = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        return Received(rows, everyone, meta[:, :K].to(weights.dtype), meta[:, K:].long(), num_local_pairs,
                        comm.partial_dtype(x.dtype, self.reduce_dtype),
                        _Sent(row_of_pair, offsets, send_splits, recv_splits, x.dtype))

    def combine(self, partial: Tensor, received: Received) -> Tensor:
        """Bring each received row's partial output home and sum a token's per-rank partials (float32,
        rank order) -> ``[T, D]`` in ``x.dtype``."""
        sent = received.state
        try:
            home = comm.all_to_all_autograd(partial, sent.send_splits, sent.recv_splits, self.ep_mesh.get_group())
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:
            raise self.signature.failed(e) from e
        return moe_ops.combine(home, sent.row_of_pair, sent.offsets).to(sent.x_dtype)
