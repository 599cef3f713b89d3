"""Grouped GEMM ``out[r] = A(r) @ B[g(r)]`` over expert-sorted rows, with a fused prologue and epilogue.

One kernel serves every forward-shaped GEMM of the expert block:

* ``moe::grouped_mm`` (plain; also its dgrad, with ``B`` transposed by strides — no copy);
* ``moe::expert_up``: A rows gathered from ``x`` in token order (``src(r) = pair_of_row[r] // K``),
  epilogue ``h = acc + b1``;
* ``moe::expert_down``: prologue ``A = act(h) * p``, computed as each A tile is loaded (``a`` is
  never stored), epilogue ``acc + p * b2``;
* ``moe::expert_down_backward``'s dgrad: A rows gathered from ``grad_y``.

Static grid: ``(cdiv(M, BM) + G + 1)`` row slots x ``cdiv(N, BN)`` column tiles; each slot
finds its (group, row tile) on the device (``_common.tile_of_slot``), slots past the last tile
exit, and the tail slots (rows past ``offsets[-1]``) write zeros.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C
from moe_ops.backends.triton_kernels._act import act_forward, load_h, tile0_width
from moe_ops.backends.triton_kernels._common import NO_ACT


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, stride_am, stride_ak, n_a_rows,
    pair_of_row_ptr, topk,
    b_ptr, stride_bg, stride_bk, stride_bn,
    bias_ptr, stride_bias_g, probs_ptr,
    out_ptr, stride_om,
    offsets_ptr, G, M, N, KD,
    alpha, limit, linear_offset,
    GATHER_A: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_TIMES_PROBS: tl.constexpr,
    ACT: tl.constexpr, ACT_TIMES_PROBS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BK0: tl.constexpr, G_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # KD: the inner size (I when ACT is set: A is then act(h), h having 2*KD columns when gated).
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(N, BN)
    slot = pid // n_col_tiles
    n0 = (pid % n_col_tiles) * BN
    group, row_start, row_end = C.tile_of_slot(offsets_ptr, G, M, slot, BM, G_PAD)
    if group > G:
        return
    in_group = group < G  # False for the tail tile: no product, no bias, zeros out
    rows = row_start + tl.arange(0, BM)
    rows64 = rows.to(tl.int64)
    row_ok = rows < row_end
    src, src_ok = C.source_rows(rows, row_ok, pair_of_row_ptr, topk, n_a_rows, GATHER_A)
    a_rows = a_ptr + src[:, None] * stride_am
    b_group = b_ptr + group.to(tl.int64) * stride_bg
    cols = n0 + tl.arange(0, BN)
    col_ok = cols < N
    p = tl.zeros((BM,), dtype=tl.float32)
    if BIAS_TIMES_PROBS or ACT_TIMES_PROBS:
        p = tl.load(probs_ptr + rows64, mask=row_ok & in_group, other=0.0).to(tl.float32)

    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_tiles = tl.where(in_group, tl.cdiv(KD, BK), 0)
    for kt in range(0, k_tiles):
        ks = kt * BK + tl.arange(0, BK)
        k_ok = ks < KD
        if ACT == NO_ACT:
            a = tl.load(a_rows + ks[None, :] * stride_ak, mask=src_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            # The activation's op rounds act(h) * p to h's dtype: so does this prologue (same values).
            gate, up = load_h(a_rows, src_ok, kt * BK, KD, ACT, BM, BK, BK0)
            act = act_forward(gate, up, alpha, limit, linear_offset, ACT, HAS_LIMIT)
            if ACT_TIMES_PROBS:
                act = act * p[:, None]
            a = act.to(a_ptr.dtype.element_ty)
        b = tl.load(b_group + ks[:, None].to(tl.int64) * stride_bk + cols[None, :] * stride_bn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = C.mma(a, b, acc, PRECISION)

    # ---- epilogue: bias (times the probability); zeros for the tail tile ----
    if HAS_BIAS:
        bias = tl.load(bias_ptr + group.to(tl.int64) * stride_bias_g + cols, mask=col_ok & in_group,
                       other=0.0).to(tl.float32)
        if BIAS_TIMES_PROBS:
            acc += p[:, None] * bias[None, :]
        else:
            acc += bias[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def grouped_gemm(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    *,
    pair_of_row: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    act: Optional[str] = None,
    alpha: float = 1.702,
    limit: Optional[float] = None,
    linear_offset: float = 1.0,
    topk: Optional[int] = None,
) -> Tensor:
    """``out [M, N]`` for ``b [G, KD, N]`` (any strides).

    ``pair_of_row`` given: A row of output row r is ``a[pair_of_row[r] // K]`` with
    ``K = topk`` (default ``M // a.shape[0]``), M = ``pair_of_row.numel()``; else A is ``a [M, KD]``.
    ``act`` given: ``a`` is ``h`` (``[M, 2*KD]`` gated, ``[M, KD]`` relu2) and A is ``act(h) * probs``.
    ``probs`` also scales the bias.  Rows past ``offsets[-1]`` are zeros.
    """
    a = a if a.stride(-1) == 1 else a.contiguous()
    G, KD, N = b.shape
    gather = pair_of_row is not None
    M = pair_of_row.shape[0] if gather else a.shape[0]
    topk = topk or (M // a.shape[0] if gather and a.shape[0] > 0 else 1)
    kind = C.ACT_KIND[act]
    out = a.new_empty(M, N)
    blocks = C.gemm_blocks(M, G, N, a.dtype)
    grid = (C.row_slots(M, G, blocks.m) * triton.cdiv(N, blocks.n),)
    C.launch(
        _grouped_gemm_kernel, grid,
        a, a.stride(0), a.stride(1), a.shape[0],
        pair_of_row if gather else offsets, topk,
        b, b.stride(0), b.stride(1), b.stride(2),
        bias if bias is not None else b, bias.stride(0) if bias is not None else 0,
        probs if probs is not None else b,
        out, out.stride(0),
        offsets, G, M, N, KD,
        float(alpha), float(limit) if limit is not None else 0.0, float(linear_offset),
        GATHER_A=gather, HAS_BIAS=bias is not None, BIAS_TIMES_PROBS=bias is not None and probs is not None,
        ACT=kind, ACT_TIMES_PROBS=act is not None and probs is not None, HAS_LIMIT=limit is not None,
        BM=blocks.m, BN=blocks.n, BK=blocks.k, BK0=tile0_width(kind, blocks.k), G_PAD=C.g_pad(G),
        PRECISION=C.dot_precision(a.dtype), **blocks.meta(),
    )
    return out


@C.kernel_body("grouped_mm")
def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    return grouped_gemm(a, b, offsets)


@triton.jit
def _clear_tail_kernel(rows_ptr, stride_m, offsets_ptr, G, M, N, BM: tl.constexpr, BN: tl.constexpr):
    # Blocks wholly inside the groups leave at once, so the work follows the tail's size.
    first = tl.program_id(0) * BM
    end = C.valid_limit(offsets_ptr, G, tl.cast(M, tl.int64))
    if first + BM > end:
        rows = first + tl.arange(0, BM)
        tail = (rows >= end) & (rows < M)
        zeros = tl.zeros((BM, BN), dtype=rows_ptr.dtype.element_ty)
        for n0 in range(0, N, BN):
            cols = n0 + tl.arange(0, BN)
            tl.store(rows_ptr + rows.to(tl.int64)[:, None] * stride_m + cols[None, :], zeros,
                     mask=tail[:, None] & (cols < N)[None, :])


@C.kernel_body("clear_tail_")
def clear_tail_(rows: Tensor, offsets: Tensor) -> None:
    M, N = rows.shape
    blocks = C.rows_blocks(N)
    C.launch(_clear_tail_kernel, (triton.cdiv(M, blocks.m),), rows, rows.stride(0), offsets, offsets.shape[0], M, N,
             BM=blocks.m, BN=blocks.n, **blocks.meta())
