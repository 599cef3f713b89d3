"""The collectives the expert-parallel paths use, with their autograd variants.

Under ``torch.compile`` these are ``torch.distributed._functional_collectives`` ops, which Dynamo
traces (``fullgraph=True``); their ``*_autograd`` variants differentiate to the mirror collective
(all-gather <-> reduce-scatter, all-to-all <-> all-to-all with the split sizes swapped).

In eager mode the all-to-alls call ``torch.distributed.all_to_all_single`` on a preallocated output
inside a small ``autograd.Function`` instead: the functional variants return
``AsyncCollectiveTensor`` subclasses, and every later op on one goes through a Python
``__torch_dispatch__`` (about 60 us of CPU each, measured), which made the host — not the link —
bound an all-to-all dispatch.  The arithmetic is the same either way; on NCCL the op is enqueued
on the communication stream and the current stream waits for it, so nothing blocks the host.
The all-gathers and the reduce-scatter stay functional collectives (their autograd is torch's), waited
for at once in eager mode (:func:`_waited`).  torch 2.13 renamed ``*_tensor_autograd`` to
``*_single_autograd``; take whichever this torch has.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

all_reduce = fc.all_reduce
wait_tensor = fc.wait_tensor
_all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
_all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
_reduce_scatter_autograd = getattr(fc, "reduce_scatter_single_autograd", None) or fc.reduce_scatter_tensor_autograd


def _waited(t: torch.Tensor) -> torch.Tensor:
    """Eagerly, the collective's output waited for at once (differentiable), not an ``AsyncCollectiveTensor``:
    no later op pays its Python ``__torch_dispatch__``, and no buffer a collective still writes into (gloo writes
    from its own thread) can be freed first because an output was never used.  Traced: as it is (Inductor
    places the wait)."""
    return t if torch.compiler.is_compiling() else fc.wait_tensor(t)


def all_gather(x: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    """All-gather along ``gather_dim`` without autograd."""
    return _waited(_all_gather(x, gather_dim, group))


def all_gather_autograd(x: torch.Tensor, gather_dim: int, group) -> torch.Tensor:
    """All-gather along ``gather_dim``; its backward is the reduce-scatter."""
    return _waited(_all_gather_autograd(x, gather_dim, group))


def reduce_scatter_autograd(x: torch.Tensor, reduce_op: str, scatter_dim: int, group) -> torch.Tensor:
    """Reduce-scatter along ``scatter_dim``; its backward is the all-gather."""
    return _waited(_reduce_scatter_autograd(x, reduce_op, scatter_dim, group))


def _all_to_all_eager(x: torch.Tensor, output_split_sizes, input_split_sizes, group) -> torch.Tensor:
    x = x.contiguous()
    rows = x.shape[0] if output_split_sizes is None else sum(output_split_sizes)  # None: equal parts
    out = x.new_empty((rows, *x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_split_sizes, input_split_sizes, group):
        ctx.splits, ctx.group = (output_split_sizes, input_split_sizes), group
        return _all_to_all_eager(x, output_split_sizes, input_split_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        output_split_sizes, input_split_sizes = ctx.splits
        return _all_to_all_eager(grad, input_split_sizes, output_split_sizes, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_split_sizes, input_split_sizes, group) -> torch.Tensor:
    """All-to-all along dim 0 without autograd (``None`` splits: equal parts)."""
    if torch.compiler.is_compiling():
        return fc.all_to_all_single(x, output_split_sizes, input_split_sizes, group)
    return _all_to_all_eager(x, output_split_sizes, input_split_sizes, group)


def all_to_all_autograd(x: torch.Tensor, output_split_sizes, input_split_sizes, group) -> torch.Tensor:
    """All-to-all along dim 0 whose backward is the all-to-all with the split sizes swapped."""
    if torch.compiler.is_compiling():
        return fc.all_to_all_single_autograd(x, output_split_sizes, input_split_sizes, group)
    return _AllToAll.apply(x, output_split_sizes, input_split_sizes, group)


def partial_dtype(x_dtype: torch.dtype, reduce_dtype) -> torch.dtype:
    """dtype of the per-rank partial outputs summed across ranks: ``reduce_dtype`` (``apply_ep``'s,
    float32 by default), never narrower than ``x``; ``None``: ``x``'s own dtype."""
    if reduce_dtype is None or torch.finfo(reduce_dtype).bits <= torch.finfo(x_dtype).bits:
        return x_dtype
    return reduce_dtype


def host_ints(t) -> list[int]:
    """The values of a small integer tensor on the host: the one device->host sync of an EP forward.

    Under ``torch.compile`` they become unbacked symbolic ints, asserted non-negative here so
    that the shapes built from them are valid."""
    values = t.tolist()
    for v in values:
        torch._check(v >= 0)
    return values
