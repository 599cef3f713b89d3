"""add_expert_bias / expert_bias_backward: per-expert bias rows, optionally probability-weighted.

* add: row tiles inside one group (``tile_of_slot``), one bias row per program;
  tail rows (past ``offsets[-1]``) are copied unchanged.
* ``grad_bias``: one program per (group, column block) reduces the group's rows in order;
* ``grad_probs``: one program per row tile reduces each row over all columns.
No atomics: deterministic.  The gradient rows can be read straight from token order
(``grad_y`` for the down bias, row ``r`` reading token ``pair_of_row[r] // K``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C


@triton.jit
def _add_bias_kernel(
    h_ptr, stride_h, bias_ptr, stride_bias, probs_ptr, out_ptr, stride_out,
    offsets_ptr, G, M, N,
    HAS_PROBS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, G_PAD: tl.constexpr,
):
    group, row_start, row_end = C.tile_of_slot(offsets_ptr, G, M, tl.program_id(0), BR, G_PAD)
    if group > G:
        return
    in_group = group < G
    rows = row_start + tl.arange(0, BR)
    row_ok = rows < row_end
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    m = row_ok[:, None] & (cols < N)[None, :]
    h = tl.load(h_ptr + rows64[:, None] * stride_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + group.to(tl.int64) * stride_bias + cols, mask=(cols < N) & in_group, other=0.0)
    b = b.to(tl.float32)[None, :]
    if HAS_PROBS:
        b = b * tl.load(probs_ptr + rows64, mask=row_ok & in_group, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], (h + b).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bias_grad_kernel(
    grad_ptr, stride_grad, n_grad_rows, pair_of_row_ptr, topk, probs_ptr, out_ptr, stride_out,
    offsets_ptr, G, M, N,
    GATHER: tl.constexpr, HAS_PROBS: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, G_PAD: tl.constexpr,
):
    group = tl.program_id(0)
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < N
    start, end = C.group_rows(offsets_ptr, G, M, group, G_PAD)
    acc = tl.zeros((BC,), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        src, ok = C.source_rows(rows, rows < end, pair_of_row_ptr, topk, n_grad_rows, GATHER)
        g = tl.load(grad_ptr + src[:, None] * stride_grad + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        if HAS_PROBS:
            g = g * tl.load(probs_ptr + rows.to(tl.int64), mask=ok, other=0.0).to(tl.float32)[:, None]
        acc += tl.sum(g, 0)
    tl.store(out_ptr + group.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _bias_probs_grad_kernel(
    grad_ptr, stride_grad, n_grad_rows, pair_of_row_ptr, topk, bias_ptr, stride_bias, out_ptr,
    offsets_ptr, G, M, N,
    GATHER: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, G_PAD: tl.constexpr,
):
    group, row_start, row_end = C.tile_of_slot(offsets_ptr, G, M, tl.program_id(0), BR, G_PAD)
    if group > G:
        return
    rows = row_start + tl.arange(0, BR)
    row_ok = rows < row_end
    src, ok = C.source_rows(rows, row_ok, pair_of_row_ptr, topk, n_grad_rows, GATHER)
    bias_row = bias_ptr + group.to(tl.int64) * stride_bias
    acc = tl.zeros((BR,), dtype=tl.float32)
    n_end = tl.where(group < G, N, 0)  # the tail's gradient is 0, never read
    for c0 in range(0, n_end, BC):
        cols = c0 + tl.arange(0, BC)
        col_ok = cols < N
        g = tl.load(grad_ptr + src[:, None] * stride_grad + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0)
        b = tl.load(bias_row + cols, mask=col_ok, other=0.0)
        acc += tl.sum(g.to(tl.float32) * b.to(tl.float32)[None, :], 1)
    tl.store(out_ptr + rows.to(tl.int64), acc.to(out_ptr.dtype.element_ty), mask=row_ok)


def add_bias(h: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor]) -> Tensor:
    h = h if h.stride(-1) == 1 else h.contiguous()
    bias = bias.contiguous()
    M, N = h.shape
    G = offsets.shape[0]
    out = torch.empty_like(h, memory_format=torch.contiguous_format)
    blocks = C.rows_blocks(N)
    C.launch(
        _add_bias_kernel, (C.row_slots(M, G, blocks.m), triton.cdiv(N, blocks.n)),
        h, h.stride(0), bias, bias.stride(0), probs.contiguous() if probs is not None else h, out, out.stride(0),
        offsets, G, M, N,
        HAS_PROBS=probs is not None, BR=blocks.m, BC=blocks.n, G_PAD=C.g_pad(G), **blocks.meta(),
    )
    return out


def bias_grads(
    grad: Tensor,
    bias: Tensor,
    offsets: Tensor,
    probs: Optional[Tensor],
    pair_of_row: Optional[Tensor] = None,
    *,
    want_probs_grad: bool = True,
    topk: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """``grad_bias [G, N]`` and ``grad_probs`` (like ``probs``; empty float32 when None or not wanted).

    ``pair_of_row`` given: ``grad`` is in token order (``[T, N]``) and row r reads token
    ``pair_of_row[r] // K`` (``K = topk``, default ``M // T``); else ``grad`` is ``[M, N]`` in expert order.
    """
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    bias = bias.contiguous()
    G, N = bias.shape
    gather = pair_of_row is not None
    M = pair_of_row.shape[0] if gather else grad.shape[0]
    topk = topk or (M // grad.shape[0] if gather and grad.shape[0] > 0 else 1)
    src = pair_of_row if gather else offsets
    blocks = C.rows_blocks(N)
    reduce_rows = blocks.m * 4  # rows per step of the per-group column reduction
    grad_bias = bias.new_empty(G, N)
    C.launch(
        _bias_grad_kernel, (G, triton.cdiv(N, blocks.n)),
        grad, grad.stride(0), grad.shape[0], src, topk, probs.contiguous() if probs is not None else grad,
        grad_bias, grad_bias.stride(0), offsets, G, M, N,
        GATHER=gather, HAS_PROBS=probs is not None, BR=reduce_rows, BC=blocks.n, G_PAD=C.g_pad(G), **blocks.meta(),
    )
    if probs is None or not want_probs_grad:
        return grad_bias, grad.new_empty(0, dtype=torch.float32)
    grad_probs = torch.empty_like(probs, memory_format=torch.contiguous_format)
    C.launch(
        _bias_probs_grad_kernel, (C.row_slots(M, G, blocks.m),),
        grad, grad.stride(0), grad.shape[0], src, topk, bias, bias.stride(0), grad_probs,
        offsets, G, M, N,
        GATHER=gather, BR=blocks.m, BC=blocks.n, G_PAD=C.g_pad(G), **blocks.meta(),
    )
    return grad_bias, grad_probs


@C.kernel_body("add_expert_bias")
def add_expert_bias(h: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor]) -> Tensor:
    return add_bias(h, bias, offsets, probs)


@C.kernel_body("expert_bias_backward")
def expert_bias_backward(grad: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return bias_grads(grad, bias, offsets, probs)
