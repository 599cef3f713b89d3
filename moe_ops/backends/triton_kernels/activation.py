"""activation / activation_backward: ``act(h) * p`` and its gradients (float32 math, one rounding).

The backward program owns a block of rows and walks all columns, so ``grad_probs[r] =
sum_j grad[r, j] * act(h)[r, j]`` is a per-row reduction inside one program (no atomics)
fused with ``grad_h``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C
from moe_ops.backends.triton_kernels._act import (
    act_backward, act_forward, h_columns, h_tiles, load_h, tile0_width,
)
from moe_ops.backends.triton_kernels._common import GEGLU, SWIGLU, SWIGLUOAI
from moe_ops.ops.activation_kinds import out_width


@triton.jit
def _activation_kernel(
    h_ptr, stride_h, probs_ptr, out_ptr, stride_out, M, I,
    alpha, limit, linear_offset,
    KIND: tl.constexpr, HAS_PROBS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, BC0: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    n0 = tl.program_id(1) * BC
    gate, up = load_h(h_ptr + rows64[:, None] * stride_h, row_ok, n0, I, KIND, BR, BC, BC0)
    out = act_forward(gate, up, alpha, limit, linear_offset, KIND, HAS_LIMIT)
    if HAS_PROBS:
        out = out * tl.load(probs_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    cols = n0 + tl.arange(0, BC)
    tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols < I)[None, :])


@triton.jit
def _activation_backward_kernel(
    grad_ptr, stride_grad, h_ptr, stride_h, probs_ptr, grad_h_ptr, stride_gh, grad_probs_ptr, out_ptr, stride_out,
    M, I, alpha, limit, linear_offset,
    KIND: tl.constexpr, HAS_PROBS: tl.constexpr, HAS_LIMIT: tl.constexpr, STORE_OUT: tl.constexpr,
    BR: tl.constexpr, BC: tl.constexpr, BC0: tl.constexpr,
):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    h_rows = h_ptr + rows64[:, None] * stride_h
    gh_rows = grad_h_ptr + rows64[:, None] * stride_gh
    p = tl.full((BR,), 1.0, dtype=tl.float32)
    if HAS_PROBS:
        p = tl.load(probs_ptr + rows64, mask=row_ok, other=0.0).to(tl.float32)
    grad_p = tl.zeros((BR,), dtype=tl.float32)
    for n0 in range(0, I, BC):
        gate, up = load_h(h_rows, row_ok, n0, I, KIND, BR, BC, BC0)
        cols = n0 + tl.arange(0, BC)
        g = tl.load(grad_ptr + rows64[:, None] * stride_grad + cols[None, :],
                    mask=row_ok[:, None] & (cols < I)[None, :], other=0.0).to(tl.float32)
        out, d_gate, d_up = act_backward(gate, up, g * p[:, None], alpha, limit, linear_offset, KIND, HAS_LIMIT)
        grad_p += tl.sum(g * out, 1)
        if STORE_OUT:  # the forward's output act(h) * p, from the same read of h
            tl.store(out_ptr + rows64[:, None] * stride_out + cols[None, :],
                     (out * p[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < I)[None, :])
        tile0, tile1 = h_tiles(d_gate, d_up, KIND, BR, BC)
        cols0, mask0, cols1, mask1 = h_columns(n0, I, KIND, BC, BC0)
        tl.store(gh_rows + cols0[None, :], tile0.to(grad_h_ptr.dtype.element_ty), mask=row_ok[:, None] & mask0[None, :])
        if KIND == SWIGLU or KIND == SWIGLUOAI or KIND == GEGLU:
            tl.store(gh_rows + cols1[None, :], tile1.to(grad_h_ptr.dtype.element_ty), mask=row_ok[:, None] & mask1[None, :])
    if HAS_PROBS:
        tl.store(grad_probs_ptr + rows64, grad_p.to(grad_probs_ptr.dtype.element_ty), mask=row_ok)


def _act_meta(h, kind, alpha, limit, linear_offset, probs, blocks):
    k = C.ACT_KIND[kind]
    return dict(
        alpha=float(alpha), limit=float(limit) if limit is not None else 0.0, linear_offset=float(linear_offset),
        KIND=k, HAS_PROBS=probs is not None, HAS_LIMIT=limit is not None,
        BR=blocks.m, BC=blocks.n, BC0=tile0_width(k, blocks.n), **blocks.meta(),
    )


def activation_forward(h, probs, kind, alpha, limit, linear_offset) -> Tensor:
    h = h if h.stride(-1) == 1 else h.contiguous()
    M, I = h.shape[0], out_width(h, kind)
    out = h.new_empty(M, I)
    blocks = C.rows_blocks(I, max_cols=128)  # quick_geglu holds 2x the columns
    C.launch(
        _activation_kernel, (triton.cdiv(M, blocks.m), triton.cdiv(I, blocks.n)),
        h, h.stride(0), probs.contiguous() if probs is not None else h, out, out.stride(0), M, I,
        **_act_meta(h, kind, alpha, limit, linear_offset, probs, blocks),
    )
    return out


def activation_grads(grad, h, probs, kind, alpha, limit, linear_offset, with_output=False) -> tuple:
    """``grad_h`` (like ``h``) and ``grad_probs`` (like ``probs``; empty float32 when None); with
    ``with_output``, also the forward's ``act(h) * probs``."""
    h = h if h.stride(-1) == 1 else h.contiguous()
    grad = grad if grad.stride(-1) == 1 else grad.contiguous()
    M, I = h.shape[0], out_width(h, kind)
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format)
    grad_probs = (torch.empty_like(probs, memory_format=torch.contiguous_format) if probs is not None
                  else h.new_empty(0, dtype=torch.float32))
    out = h.new_empty(M, I) if with_output else grad_h
    blocks = C.rows_blocks(I, max_cols=128)  # quick_geglu holds 2x the columns
    C.launch(
        _activation_backward_kernel, (triton.cdiv(M, blocks.m),),
        grad, grad.stride(0), h, h.stride(0), probs.contiguous() if probs is not None else h,
        grad_h, grad_h.stride(0), grad_probs if probs is not None else grad_h, out, out.stride(0), M, I,
        STORE_OUT=with_output, **_act_meta(h, kind, alpha, limit, linear_offset, probs, blocks),
    )
    return (grad_h, grad_probs, out) if with_output else (grad_h, grad_probs)


@C.kernel_body("activation")
def activation(
    h: Tensor, probs: Optional[Tensor], kind: str, alpha: float, limit: Optional[float], linear_offset: float
) -> Tensor:
    return activation_forward(h, probs, kind, alpha, limit, linear_offset)


@C.kernel_body("activation_backward")
def activation_backward(
    grad: Tensor, h: Tensor, probs: Optional[Tensor], kind: str, alpha: float, limit: Optional[float],
    linear_offset: float,
) -> tuple[Tensor, Tensor]:
    return activation_grads(grad, h, probs, kind, alpha, limit, linear_offset)


@C.kernel_body("activation_backward_with_output")
def activation_backward_with_output(
    grad: Tensor, h: Tensor, probs: Optional[Tensor], kind: str, alpha: float, limit: Optional[float],
    linear_offset: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return activation_grads(grad, h, probs, kind, alpha, limit, linear_offset, with_output=True)
