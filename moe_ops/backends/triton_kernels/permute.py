"""gather / combine / pair_dot: moving rows between token order and expert order.

All three walk the (token, slot) pairs through ``row_of_pair`` — a program owns tokens, so
``combine`` and ``pair_dot`` are gather-reduces over the K slots in slot order, float32,
with no atomics: deterministic.  A pair is valid when ``0 <= row < min(offsets[-1], M)``, ``M`` the
number of expert-order rows (``T*K``, or fewer); invalid pairs read nothing and contribute exactly zero.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C


@triton.jit
def _pair_rows(row_of_pair_ptr, tokens, token_ok, k, K, limit):
    """Row (int64) of pair (t, k) for a block of tokens, and whether the pair is valid."""
    row = tl.load(row_of_pair_ptr + tokens.to(tl.int64) * K + k, mask=token_ok, other=-1)
    return row, token_ok & (row >= 0) & (row < limit)


@triton.jit
def _gather_kernel(
    x_ptr, stride_x, row_of_pair_ptr, offsets_ptr, w_ptr, out_ptr, stride_out,
    T, K, D, G, M,
    HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    # One program: BT tokens x BD columns, all K slots (x read once, written K times).
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    token_ok = tokens < T
    col_ok = cols < D
    n_rows = tl.cast(M, tl.int64)
    limit = C.valid_limit(offsets_ptr, G, n_rows)
    x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * stride_x + cols[None, :],
                mask=token_ok[:, None] & col_ok[None, :], other=0.0)
    for k in range(0, K):
        row, valid = _pair_rows(row_of_pair_ptr, tokens, token_ok, k, K, limit)
        val = tl.where(valid[:, None], x.to(tl.float32), 0.0)
        if HAS_W:
            w = tl.load(w_ptr + tokens.to(tl.int64) * K + k, mask=valid, other=0.0).to(tl.float32)
            val = val * w[:, None]
        # Every in-bounds row is written (zero for an invalid pair), so the output needs no memset.
        in_bounds = token_ok & (row >= 0) & (row < n_rows)
        tl.store(out_ptr + tl.where(in_bounds, row, 0)[:, None] * stride_out + cols[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=in_bounds[:, None] & col_ok[None, :])


@triton.jit
def _combine_kernel(
    rows_ptr, stride_rows, row_of_pair_ptr, offsets_ptr, w_ptr, y_ptr, stride_y,
    T, K, D, G, M,
    HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    token_ok = tokens < T
    col_ok = cols < D
    limit = C.valid_limit(offsets_ptr, G, tl.cast(M, tl.int64))
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for k in range(0, K):
        row, valid = _pair_rows(row_of_pair_ptr, tokens, token_ok, k, K, limit)
        val = tl.load(rows_ptr + tl.where(valid, row, 0)[:, None] * stride_rows + cols[None, :],
                      mask=valid[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + tokens.to(tl.int64) * K + k, mask=valid, other=0.0).to(tl.float32)
            val = val * w[:, None]
        acc += val
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * stride_y + cols[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _pair_dot_kernel(
    a_ptr, stride_a, rows_ptr, stride_rows, row_of_pair_ptr, offsets_ptr, out_ptr,
    T, K, D, G, M,
    BT: tl.constexpr, BD: tl.constexpr,
):
    # One program: BT tokens, one slot k; a fixed-order sum over D.
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    k = tl.program_id(1)
    token_ok = tokens < T
    limit = C.valid_limit(offsets_ptr, G, tl.cast(M, tl.int64))
    row, valid = _pair_rows(row_of_pair_ptr, tokens, token_ok, k, K, limit)
    a_rows = a_ptr + tokens.to(tl.int64)[:, None] * stride_a
    r_rows = rows_ptr + tl.where(valid, row, 0)[:, None] * stride_rows
    acc = tl.zeros((BT,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        cols = d0 + tl.arange(0, BD)
        m = valid[:, None] & (cols < D)[None, :]
        a = tl.load(a_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        r = tl.load(r_rows + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(a * r, 1)
    tl.store(out_ptr + tokens.to(tl.int64) * K + k, tl.where(valid, acc, 0.0), mask=token_ok)


def _contiguous_rows(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid_tokens(T, D, blocks):
    return (triton.cdiv(T, blocks.m), triton.cdiv(D, blocks.n))


def gather_rows(x: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor],
                num_rows: Optional[int] = None) -> Tensor:
    x = _contiguous_rows(x)
    row_of_pair = row_of_pair.contiguous()
    T, K = row_of_pair.shape
    D = x.shape[1]
    M = T * K if num_rows is None else num_rows
    out = x.new_empty(M, D)
    blocks = C.rows_blocks(D)
    C.launch(
        _gather_kernel, _grid_tokens(T, D, blocks),
        x, x.stride(0), row_of_pair, offsets, weights.contiguous() if weights is not None else x,
        out, out.stride(0), T, K, D, offsets.shape[0], M,
        HAS_W=weights is not None, BT=blocks.m, BD=blocks.n, **blocks.meta(),
    )
    return out


def combine_rows(
    rows: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor], out_dtype=None
) -> Tensor:
    rows = _contiguous_rows(rows)
    row_of_pair = row_of_pair.contiguous()
    T, K = row_of_pair.shape
    D = rows.shape[1]
    y = rows.new_empty(T, D, dtype=out_dtype or rows.dtype)
    blocks = C.rows_blocks(D)
    C.launch(
        _combine_kernel, _grid_tokens(T, D, blocks),
        rows, rows.stride(0), row_of_pair, offsets, weights.contiguous() if weights is not None else rows,
        y, y.stride(0), T, K, D, offsets.shape[0], rows.shape[0],
        HAS_W=weights is not None, BT=blocks.m, BD=blocks.n, **blocks.meta(),
    )
    return y


@C.kernel_body("gather")
def gather(x: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor],
           num_rows: Optional[int] = None) -> Tensor:
    return gather_rows(x, row_of_pair, offsets, weights, num_rows)


@C.kernel_body("combine")
def combine(rows: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor]) -> Tensor:
    return combine_rows(rows, row_of_pair, offsets, weights)


@C.kernel_body("pair_dot")
def pair_dot(a: Tensor, rows: Tensor, row_of_pair: Tensor, offsets: Tensor) -> Tensor:
    a, rows = _contiguous_rows(a), _contiguous_rows(rows)
    row_of_pair = row_of_pair.contiguous()
    T, K = row_of_pair.shape
    D = a.shape[1]
    out = a.new_empty(T, K, dtype=torch.float32)
    blocks = C.rows_blocks(D)
    C.launch(
        _pair_dot_kernel, (triton.cdiv(T, blocks.m), K),
        a, a.stride(0), rows, rows.stride(0), row_of_pair, offsets, out, T, K, D, offsets.shape[0], rows.shape[0],
        BT=blocks.m, BD=blocks.n, **blocks.meta(),
    )
    return out
