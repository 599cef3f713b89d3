"""Mailboxes: how one rank publishes tensors to, or pushes rows into, the other ranks of a group.

:mod:`moe_ops.ops.exchange` (``moe::peer_dispatch`` / ``moe::peer_combine``) moves tokens through
them.  On CUDA a mailbox is one buffer of ``torch.distributed``'s symmetric memory per group and
device (``_symmetric_memory.empty`` + ``rendezvous``), which the other GPUs of the group map: a
kernel on this GPU then loads from, or stores to, the others' buffers over NVLink, between two
barriers.  Off CUDA (gloo, tests) an all-gather (published tensors) and an all-to-all (pushed
blocks) stand in for the peer loads and stores, so the CPU tests run the same layout and kernels.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from moe_ops import registry

ALIGN = 256  # bytes between published tensors in the symmetric buffer


def regions(nbytes: list[int]) -> tuple[list[int], int]:
    """Byte offsets of consecutive regions of these sizes, each aligned to ``ALIGN``, and the total."""
    offsets, end = [], 0
    for n in nbytes:
        offsets.append(end)
        end += -(-n // ALIGN) * ALIGN
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
        offsets, end = regions([t.element_size() * math.prod(shape) for t, shape in zip(tensors, shapes)])
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
        offsets, end = regions([t.element_size() * t.numel() for t in tensors])
        self._reserve(end)
        for t, offset in zip(tensors, offsets):
            C = t.shape[0] // ep
            dests = [self._view(s, t.shape, t.dtype, offset)[me * C:(me + 1) * C] for s in range(ep)]
            registry.call("put_to", t, dests)  # a kernel, not the op: we are inside moe::peer_combine
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


def mailbox(group_name: str, device: torch.device):
    key = (group_name, device)
    box = _MAILBOXES.get(key)
    if box is None:
        group = dist.distributed_c10d._resolve_process_group(group_name)
        box = _SymmetricMailbox(group, device) if device.type == "cuda" else _AllGatherMailbox(group)
        _MAILBOXES[key] = box
    return box
