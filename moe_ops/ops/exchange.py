"""moe::peer_dispatch and moe::peer_combine — tokens between the ranks of a group, static shapes.

The static-shape expert-parallel transport (``moe_modules.ep.peer``) moves tokens with these two
ops through a :mod:`~moe_ops.ops.mailbox` (GPU peer memory on CUDA; an all-gather / all-to-all
stand-in on gloo).  Every shape is fixed by the capacity ``C`` (``index [ep, C]``), so nothing is
read on the host.  The layout of this rank's ``T`` tokens:

* ``pos [T, ep]`` int64: the row of token ``t`` in its block on rank ``r``, -1 where not sent there;
* ``index [ep, C]`` int64: the tokens sent to each rank, in order (any in-range value past the count);
* ``counts [ep]`` int64: how many go to each rank.

``peer_dispatch`` is a pull: every rank publishes its tokens ``x [T, D]``, their metadata
``meta [T, M]`` and its layout; rank ``d`` loads, from each source ``s``, the rows
``x_s[index_s[d, j]]`` (``j < counts_s[d]``) into rows ``s*C + j`` of ``[ep*C, D]`` (zero rows after).
``peer_combine`` is a push: each rank stores block ``s`` of its ``[ep*C, D]`` rows into rank ``s``'s
mailbox; the home rank sums, per token, the rows of the ranks it was sent to, in rank order, in
float32 (``out_dtype``, default the rows' dtype).  Each is the other's adjoint: that is the whole
autograd formula.  Their kernels run the row-moving steps (``gather_from``, ``put_to``,
``sum_from``) through the registry, as kernels, not as nested ops.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks, registry
from moe_ops._library import define
from moe_ops.ops.mailbox import mailbox


def _validate(rows_name: str, rows: Tensor, meta: Tensor, pos: Tensor, index: Tensor, counts: Tensor,
              rows_expected) -> None:
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


# ---- peer_dispatch ----------------------------------------------------------------------------


def _validate_dispatch(x, meta, pos, index, counts, group_name):
    _validate("x", x, meta, pos, index, counts, pos.shape[0])


def _dispatch_kernel(x, meta, pos, index, counts, group_name):
    ep, C = index.shape
    box = mailbox(group_name, x.device)
    me = box.rank
    wide = [index, counts, x] + ([meta] if meta.shape[1] else [])
    shapes = [(ep, C), (ep,), (C, x.shape[1])] + ([(C, meta.shape[1])] if meta.shape[1] else [])
    views = box.publish(wide, shapes)
    # Each source's list of its tokens for this rank, and their number, read where they live.
    my_index, my_counts = [v[me] for v in views[0]], [v[me:me + 1] for v in views[1]]
    rows = registry.call("gather_from", views[2], my_index, my_counts)
    if meta.shape[1]:
        meta_rows = registry.call("gather_from", views[3], my_index, my_counts)
    else:
        meta_rows = meta.new_zeros(ep * C, 0)
    box.release()
    return rows, meta_rows


def _dispatch_fake(x, meta, pos, index, counts, group_name):
    ep, C = index.shape
    return x.new_empty(ep * C, x.shape[1]), meta.new_empty(ep * C, meta.shape[1])


def _dispatch_setup(ctx, inputs, output):
    x, meta, pos, index, counts, group_name = inputs
    ctx.save_for_backward(pos, index, counts)
    ctx.group_name, ctx.dtypes = group_name, (x.dtype, meta.dtype)


def _dispatch_backward(ctx, grad_rows, grad_meta_rows):
    pos, index, counts = ctx.saved_tensors
    grad_x, grad_meta = peer_combine(grad_rows, grad_meta_rows, pos, index, counts, ctx.group_name, ctx.dtypes[0])
    return grad_x, grad_meta.to(ctx.dtypes[1]), None, None, None, None


_peer_dispatch = define(
    "peer_dispatch(Tensor x, Tensor meta, Tensor pos, Tensor index, Tensor counts, str group_name)"
    " -> (Tensor, Tensor)",
    validate=_validate_dispatch, fake=_dispatch_fake, backward=_dispatch_backward, setup_context=_dispatch_setup,
    kernel=_dispatch_kernel)


# ---- peer_combine -----------------------------------------------------------------------------


def _validate_combine(rows, meta_rows, pos, index, counts, group_name, out_dtype=None):
    _validate("rows", rows, meta_rows, pos, index, counts, index.shape[0] * index.shape[1])


def _combine_kernel(rows, meta_rows, pos, index, counts, group_name, out_dtype=None):
    box = mailbox(group_name, rows.device)
    blocks = box.push([rows] + ([meta_rows] if meta_rows.shape[1] else []))
    y = registry.call("sum_from", blocks[0], pos, out_dtype)
    y_meta = registry.call("sum_from", blocks[1], pos) if meta_rows.shape[1] else meta_rows.new_zeros(pos.shape[0], 0)
    box.release()
    return y, y_meta


def _combine_fake(rows, meta_rows, pos, index, counts, group_name, out_dtype=None):
    T = pos.shape[0]
    return rows.new_empty(T, rows.shape[1], dtype=out_dtype or rows.dtype), meta_rows.new_empty(T, meta_rows.shape[1])


def _combine_setup(ctx, inputs, output):
    rows, meta_rows, pos, index, counts, group_name, *_ = inputs
    ctx.save_for_backward(pos, index, counts)
    ctx.group_name, ctx.dtypes = group_name, (rows.dtype, meta_rows.dtype)


def _combine_backward(ctx, grad_y, grad_y_meta):
    pos, index, counts = ctx.saved_tensors
    grad_rows, grad_meta = peer_dispatch(grad_y.to(ctx.dtypes[0]), grad_y_meta.to(ctx.dtypes[1]), pos, index, counts,
                                         ctx.group_name)
    return grad_rows, grad_meta, None, None, None, None, None


_peer_combine = define(
    "peer_combine(Tensor rows, Tensor meta_rows, Tensor pos, Tensor index, Tensor counts, str group_name,"
    " ScalarType? out_dtype=None) -> (Tensor, Tensor)",
    validate=_validate_combine, fake=_combine_fake, backward=_combine_backward, setup_context=_combine_setup,
    kernel=_combine_kernel)


# ---- public wrappers ----------------------------------------------------------------------------


def peer_dispatch(x: Tensor, meta: Tensor, pos: Tensor, index: Tensor, counts: Tensor,
                  group_name: str) -> tuple[Tensor, Tensor]:
    """Every rank of the group ``group_name`` receives, from each source rank ``s``, the rows
    ``x_s[index_s[me, j]]`` (``j < counts_s[me]``) at rows ``s*C + j`` of ``[ep*C, D]`` (zero rows
    after), and the same rows of ``meta [T, M]``.  Collective: every rank calls it."""
    return _peer_dispatch(x, meta, pos, index, counts, group_name)


def peer_combine(rows: Tensor, meta_rows: Tensor, pos: Tensor, index: Tensor, counts: Tensor, group_name: str,
                 out_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """The adjoint of :func:`peer_dispatch`: block ``s`` of ``rows [ep*C, D]`` goes back to rank ``s``,
    where ``y[t] = sum_r block_r[pos[t, r]]`` over the ranks ``r`` token ``t`` went to (float32, rank
    order, returned in ``out_dtype``, default ``rows.dtype``); the same for ``meta_rows``.  Collective."""
    return _peer_combine(rows, meta_rows, pos, index, counts, group_name, out_dtype)
