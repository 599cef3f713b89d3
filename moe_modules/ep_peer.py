"""GroupedExpertsDeepEP over GPU peer memory: a dispatch and combine with no host sync.

``apply_ep(module, ep_mesh, max_tokens_per_rank=C)`` selects it.  Every buffer has a static shape
fixed by the capacity ``C`` (at least the tokens of any rank), so nothing is read on the host: the
host runs ahead of the GPU, the step compiles with static shapes, and the forward replays from a
CUDA graph (``benchmarks/gpu_ep_parity.py`` checks it; capturing the backward is untested).
It is DeepEP's low-latency layout in spirit: a receiver holds ``C`` rows per source rank.

How tokens move (one host, up to 8 GPUs).  Each rank owns a buffer of ``torch.distributed``'s
symmetric memory (``_symmetric_memory.empty`` + ``rendezvous`` over the EP process group), which
the other GPUs of the group map; one kernel on this GPU then loads from, or stores to, the others'
buffers over NVLink (``moe.gather_from`` / ``moe.put_to``), between two barriers of the
symmetric memory handle.  Only the rows a rank needs cross the link, and the copy into receive
order *is* the transfer: no send buffer is packed first.

* dispatch (``moe_ep::dispatch``, a pull): rank ``r`` publishes its tokens, its K routing weights and
  expert ids, and for every destination the list of its tokens going there (``index [ep, C]``,
  ``counts [ep]``); rank ``d`` loads, from each source ``s``, rows ``s*C .. s*C + counts_s[d]`` of its
  ``[ep*C, D]`` receive buffer (zero rows after).
* combine (``moe_ep::combine``, a push): each rank stores block ``s`` of its ``[ep*C, D]`` partial
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

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

import moe_ops
from moe_modules import _ep_comm as comm
from moe_modules.ep_all_to_all import metadata_dtype, experts_per_rank, route_to_ranks, slot_on_rank
from moe_modules.expert_block import Activation, run_local_experts
from moe_ops import _checks
from moe_ops.ops.peer import MAX_SOURCES

MAX_EP = MAX_SOURCES
_ALIGN = 256  # bytes between published tensors in the symmetric buffer


class PeerLayout(NamedTuple):
    """Where this rank's tokens go: ``pos [T, ep]`` row of token ``t`` in its block on rank ``r``
    (-1: not sent there), ``index [ep, C]`` the tokens sent to each rank in order, ``counts [ep]``."""

    pos: Tensor
    index: Tensor
    counts: Tensor


# ---- the mailboxes: publish tensors, read the other ranks' ---------------------------------


def _regions(nbytes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of consecutive regions of these sizes, each aligned to ``_ALIGN``, and the total."""
    offsets, end = [], 0
    for n in nbytes:
        offsets.append(end)
        end += -(-n // _ALIGN) * _ALIGN
    return offsets, end


class _SymmetricMailbox:
    """One symmetric-memory buffer per EP group and device, grown (collectively) when a call needs more.

    Every rank publishes tensors of the same shapes in the same order, so the regions line up."""

    def __init__(self, group, device: torch.device):
        self.group_name, self.device = group.group_name, device
        self.rank, self.world_size = dist.get_rank(group), group.size()  # known before the first rendezvous
        self.handle, self.nbytes, self.retired = None, 0, []
        self.views: dict = {}

    def _reserve(self, nbytes: int) -> None:
        if nbytes <= self.nbytes:
            return
        import torch.distributed._symmetric_memory as symm_mem

        nbytes = max(nbytes, 2 * self.nbytes)
        buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=self.device)
        if self.handle is not None:  # kernels queued on the old buffer may still read it: keep it
            self.retired.append(self.buffer)
        self.buffer, self.handle, self.nbytes = buffer, symm_mem.rendezvous(buffer, self.group_name), nbytes
        self.views.clear()

    def _view(self, rank: int, shape, dtype, offset: int) -> Tensor:
        key = (rank, tuple(shape), dtype, offset)
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = self.handle.get_buffer(rank, tuple(shape), dtype, offset // dtype.itemsize)
        return view

    def publish(self, tensors: list[Tensor], shapes: list[tuple]) -> list[list[Tensor]]:
        """Copy each tensor into the first rows of a region of ``shapes[i]``; after a barrier, return
        every rank's regions (``views[i][rank]``)."""
        offsets, end = _regions([t.element_size() * math.prod(shape) for t, shape in zip(tensors, shapes)])
        self._reserve(end)
        for t, shape, offset in zip(tensors, shapes, offsets):
            if t.numel():
                self._view(self.rank, shape, t.dtype, offset)[:t.shape[0]].copy_(t)
        self.handle.barrier(channel=0)
        return [[self._view(r, shape, t.dtype, offset) for r in range(self.world_size)]
                for t, shape, offset in zip(tensors, shapes, offsets)]

    def push(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        """Each tensor is ``[ep*C, W]``: write block ``s`` into rank ``s``'s buffer (the stores cross the
        link); after a barrier, return this rank's buffer as blocks, block ``r`` written by rank ``r``."""
        ep, me = self.world_size, self.rank
        offsets, end = _regions([t.element_size() * t.numel() for t in tensors])
        self._reserve(end)
        for t, offset in zip(tensors, offsets):
            C = t.shape[0] // ep
            moe_ops.put_to(t, [self._view(s, t.shape, t.dtype, offset)[me * C:(me + 1) * C] for s in range(ep)])
        self.handle.barrier(channel=0)
        return [list(self._view(me, t.shape, t.dtype, offset).chunk(ep)) for t, offset in zip(tensors, offsets)]

    def release(self) -> None:
        """Every rank has finished reading: the buffers may be written again."""
        self.handle.barrier(channel=0)


class _AllGatherMailbox:
    """The same contract over any process group (gloo on CPU): ``publish`` all-gathers every region,
    ``push`` is an all-to-all of equal blocks."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), group.size()

    def publish(self, tensors: list[Tensor], shapes: list[tuple]) -> list[list[Tensor]]:
        views = []
        for t, shape in zip(tensors, shapes):
            region = t.new_zeros(shape)
            region[:t.shape[0]] = t
            parts = [torch.empty_like(region) for _ in range(self.world_size)]
            dist.all_gather(parts, region, group=self.group)
            views.append(parts)
        return views

    def push(self, tensors: list[Tensor]) -> list[list[Tensor]]:
        ep = self.world_size
        blocks = []
        for t in tensors:
            received = torch.empty_like(t)
            dist.all_to_all_single(received, t.contiguous(), group=self.group)
            blocks.append(list(received.chunk(ep)))
        return blocks

    def release(self) -> None:
        pass


_MAILBOXES: dict = {}


def _mailbox(group_name: str, device: torch.device):
    key = (group_name, device)
    box = _MAILBOXES.get(key)
    if box is None:
        group = dist.distributed_c10d._resolve_process_group(group_name)
        box = _SymmetricMailbox(group, device) if device.type == "cuda" else _AllGatherMailbox(group)
        _MAILBOXES[key] = box
    return box


# ---- moe_ep::dispatch ---------------------------------------------------------------------------


def _check_layout(rows_name: str, rows: Tensor, meta: Tensor, pos: Tensor, index: Tensor, counts: Tensor,
                  rows_expected: int) -> None:
    """The layout tensors agree with each other and with ``rows`` (``rows_expected`` rows)."""
    _checks.tensor("index", index, dim=2, dtypes=(torch.int64,))
    ep, C = index.shape
    _checks.tensor("counts", counts, dim=1, dtypes=(torch.int64,))
    _checks.size("counts", counts.shape[0], ep, "one count per rank (dim 0 of index)")
    _checks.tensor("pos", pos, dim=2, dtypes=(torch.int64,))
    _checks.size("pos", pos.shape[1], ep, "one column per rank (dim 0 of index)")
    _checks.between("pos", pos.shape[0], 0, C, "a token count at most the capacity (dim 1 of index)")
    _checks.tensor(rows_name, rows, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.size(rows_name, rows.shape[0], rows_expected, "rows")
    _checks.tensor("meta", meta, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.size("meta", meta.shape[0], rows_expected, "rows")


@torch.library.custom_op("moe_ep::dispatch", mutates_args=())
def _dispatch(x: Tensor, meta: Tensor, pos: Tensor, index: Tensor, counts: Tensor,
              group_name: str) -> tuple[Tensor, Tensor]:
    _check_layout("x", x, meta, pos, index, counts, pos.shape[0])
    ep, C = index.shape
    box = _mailbox(group_name, x.device)
    me = box.rank
    wide = [index, counts, x] + ([meta] if meta.shape[1] else [])
    shapes = [(ep, C), (ep,), (C, x.shape[1])] + ([(C, meta.shape[1])] if meta.shape[1] else [])
    views = box.publish(wide, shapes)
    # Each source's list of its tokens for this rank, and their number, read where they live.
    my_index, my_counts = [v[me] for v in views[0]], [v[me:me + 1] for v in views[1]]
    rows = moe_ops.gather_from(views[2], my_index, my_counts)
    meta_rows = moe_ops.gather_from(views[3], my_index, my_counts) if meta.shape[1] else meta.new_zeros(ep * C, 0)
    box.release()
    return rows, meta_rows


@_dispatch.register_fake
def _(x, meta, pos, index, counts, group_name):
    _check_layout("x", x, meta, pos, index, counts, pos.shape[0])
    ep, C = index.shape
    return x.new_empty(ep * C, x.shape[1]), meta.new_empty(ep * C, meta.shape[1])


def _dispatch_setup(ctx, inputs, output):
    x, meta, pos, index, counts, group_name = inputs
    ctx.save_for_backward(pos, index, counts)
    ctx.group_name, ctx.dtypes = group_name, (x.dtype, meta.dtype)


def _dispatch_backward(ctx, grad_rows, grad_meta_rows):
    pos, index, counts = ctx.saved_tensors
    grad_x, grad_meta = combine(grad_rows, grad_meta_rows, PeerLayout(pos, index, counts), ctx.group_name,
                                ctx.dtypes[0])
    return grad_x, grad_meta.to(ctx.dtypes[1]), None, None, None, None


_dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


def dispatch(x: Tensor, meta: Tensor, layout: PeerLayout, group_name: str) -> tuple[Tensor, Tensor]:
    """Dispatch: every rank receives, from each source rank ``s``, the rows ``x_s[index_s[me, j]]``
    (``j < counts_s[me]``) at rows ``s*C + j`` of ``[ep*C, D]`` (zero rows after), and the same rows
    of ``meta [T, M]``."""
    return torch.ops.moe_ep.dispatch(x, meta, layout.pos, layout.index, layout.counts, group_name)


# ---- moe_ep::combine ---------------------------------------------------------------------------


@torch.library.custom_op("moe_ep::combine", mutates_args=())
def _combine(rows: Tensor, meta_rows: Tensor, pos: Tensor, index: Tensor, counts: Tensor, group_name: str,
             out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    _check_layout("rows", rows, meta_rows, pos, index, counts, index.shape[0] * index.shape[1])
    box = _mailbox(group_name, rows.device)
    blocks = box.push([rows] + ([meta_rows] if meta_rows.shape[1] else []))
    y = moe_ops.sum_from(blocks[0], pos, out_dtype)
    y_meta = moe_ops.sum_from(blocks[1], pos) if meta_rows.shape[1] else meta_rows.new_zeros(pos.shape[0], 0)
    box.release()
    return y, y_meta


@_combine.register_fake
def _(rows, meta_rows, pos, index, counts, group_name, out_dtype=None):
    _check_layout("rows", rows, meta_rows, pos, index, counts, index.shape[0] * index.shape[1])
    T = pos.shape[0]
    return rows.new_empty(T, rows.shape[1], dtype=out_dtype or rows.dtype), meta_rows.new_empty(T, meta_rows.shape[1])


def _combine_setup(ctx, inputs, output):
    rows, meta_rows, pos, index, counts, group_name, _ = inputs
    ctx.save_for_backward(pos, index, counts)
    ctx.group_name, ctx.dtypes = group_name, (rows.dtype, meta_rows.dtype)


def _combine_backward(ctx, grad_y, grad_y_meta):
    pos, index, counts = ctx.saved_tensors
    grad_rows, grad_meta = dispatch(grad_y.to(ctx.dtypes[0]), grad_y_meta.to(ctx.dtypes[1]),
                                    PeerLayout(pos, index, counts), ctx.group_name)
    return grad_rows, grad_meta, None, None, None, None, None


_combine.register_autograd(_combine_backward, setup_context=_combine_setup)


def combine(rows: Tensor, meta_rows: Tensor, layout: PeerLayout, group_name: str,
            out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Combine: each rank writes block ``s`` of its ``rows [ep*C, D]`` (the rows it received from rank
    ``s``, processed) into rank ``s``'s buffer; then ``y[t] = sum_r block_r[pos[t, r]]`` over the ranks
    ``r`` token ``t`` went to, float32, rank order, in ``out_dtype`` (default ``rows.dtype``); the same
    for ``meta_rows``."""
    return torch.ops.moe_ep.combine(rows, meta_rows, layout.pos, layout.index, layout.counts, group_name, out_dtype)


# ---- the dispatcher ----------------------------------------------------------------------------


class Received(NamedTuple):
    """What a rank received: ``rows [ep*C, D]``, ``probs [ep*C, K]``, ``local_indices [ep*C, K]``
    (-1: another rank's expert, an unrouted slot, or a padding row), and the sender's layout."""

    rows: Tensor
    probs: Tensor
    local_indices: Tensor
    layout: PeerLayout


class PeerDispatcher:
    """Token dispatch and combine of :class:`~moe_modules.GroupedExpertsDeepEP` through peer memory,
    with static shapes: ``capacity`` rows per source rank."""

    def __init__(self, ep_mesh, n_routed_experts: int, capacity: int):
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
        layout = self.layout(token_mask, indices)
        idx = indices.long()
        routed = (idx >= 0) & (idx < self.num_experts)
        meta_dtype = metadata_dtype(weights)
        # Expert ids travel as id + 1 so that the zero padding rows read as "no expert".
        meta = torch.cat([weights.to(meta_dtype), torch.where(routed, idx + 1, 0).to(meta_dtype)], 1)
        rows, meta_rows = dispatch(x, meta, layout, self.group_name)
        probs = meta_rows[:, :K].to(weights.dtype)
        local = meta_rows[:, K:].long() - 1 - self.rank * self.experts_per_rank
        local = torch.where((local >= 0) & (local < self.experts_per_rank), local, -1)
        return Received(rows, probs, local, layout)

    def combine(self, partial_rows: Tensor, received: Received, out_dtype: torch.dtype) -> Tensor:
        """Sum each token's partial rows from the ranks it went to (float32, rank order) -> ``[T, D]``."""
        y, _ = combine(partial_rows, partial_rows.new_zeros(partial_rows.shape[0], 0), received.layout,
                       self.group_name, out_dtype)
        return y

    def run(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
            b1: Optional[Tensor], b2: Optional[Tensor], act: Activation,
            reduce_dtype: Optional[torch.dtype] = torch.float32) -> Tensor:
        got = self.dispatch(x, token_mask, weights, indices)
        everyone = torch.ones(got.rows.shape[0], dtype=torch.bool, device=x.device)
        partial = run_local_experts(got.rows, everyone, got.probs, got.local_indices, w1, w2, b1, b2, act,
                                    out_dtype=comm.partial_dtype(x.dtype, reduce_dtype))
        return self.combine(partial, got, x.dtype)
