"""Grouped weight gradient ``out[g] = A_g^T @ B_g`` (``[G, KD, N]``) over expert-sorted rows.

Grid over (KD tile x N tile, group); each program reduces its group's rows in order
(deterministic, no split-K atomics) and an empty group stores zeros.  Either operand can be
read straight from token order (``GATHER_A``: ``x`` for ``grad_w1``; ``GATHER_B``: ``grad_y``
for ``grad_w2``), row ``r`` reading token ``pair_of_row[r] // K``.
"""

from __future__ import annotations

from typing import Optional

import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C


@triton.jit
def _wgrad_kernel(
    a_ptr, stride_am, n_a_rows, b_ptr, stride_bm, n_b_rows, pair_of_row_ptr, topk,
    out_ptr, stride_og, stride_ok,
    offsets_ptr, G, M, KD, N,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
    BKD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, G_PAD: tl.constexpr, PRECISION: tl.constexpr,
):
    # Group-major launch order: the programs running at once share one group's rows in L2.
    group = tl.program_id(1)
    n_tiles = tl.cdiv(N, BN)
    ks = (tl.program_id(0) // n_tiles) * BKD + tl.arange(0, BKD)
    ns = (tl.program_id(0) % n_tiles) * BN + tl.arange(0, BN)
    k_ok = ks < KD
    n_ok = ns < N
    start, end = C.group_rows(offsets_ptr, G, M, group, G_PAD)
    acc = tl.zeros((BKD, BN), dtype=tl.float32)
    for r0 in range(start, end, BR):
        rows = r0 + tl.arange(0, BR)
        row_ok = rows < end
        src_a, ok_a = C.source_rows(rows, row_ok, pair_of_row_ptr, topk, n_a_rows, GATHER_A)
        src_b, ok_b = C.source_rows(rows, row_ok, pair_of_row_ptr, topk, n_b_rows, GATHER_B)
        a = tl.load(a_ptr + src_a[:, None] * stride_am + ks[None, :], mask=ok_a[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + src_b[:, None] * stride_bm + ns[None, :], mask=ok_b[:, None] & n_ok[None, :], other=0.0)
        acc = C.mma(tl.trans(a), b, acc, PRECISION)
    out_ptrs = out_ptr + group.to(tl.int64) * stride_og + ks.to(tl.int64)[:, None] * stride_ok + ns[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=k_ok[:, None] & n_ok[None, :])


def grouped_wgrad(
    a: Tensor,
    b: Tensor,
    offsets: Tensor,
    *,
    pair_of_row: Optional[Tensor] = None,
    gather_a: bool = False,
    gather_b: bool = False,
    topk: Optional[int] = None,
) -> Tensor:
    """``[G, KD, N]``: per group ``A_g^T @ B_g``; a gathered operand is in token order (``[T, .]``) and
    row r reads token ``pair_of_row[r] // topk`` (default ``topk = M // T``)."""
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    G = offsets.shape[0]
    M = pair_of_row.shape[0] if pair_of_row is not None else a.shape[0]
    token_rows = b.shape[0] if gather_b else a.shape[0]
    topk = topk or (M // token_rows if (gather_a or gather_b) and token_rows > 0 else 1)
    KD, N = a.shape[1], b.shape[1]
    out = a.new_empty(G, KD, N)
    blocks = C.wgrad_blocks(a.dtype)
    C.launch(
        _wgrad_kernel, (triton.cdiv(KD, blocks.m) * triton.cdiv(N, blocks.n), G),
        a, a.stride(0), a.shape[0], b, b.stride(0), b.shape[0],
        pair_of_row if pair_of_row is not None else offsets, topk,
        out, out.stride(0), out.stride(1),
        offsets, G, M, KD, N,
        GATHER_A=gather_a, GATHER_B=gather_b,
        BKD=blocks.m, BN=blocks.n, BR=blocks.k, G_PAD=C.g_pad(G), PRECISION=C.dot_precision(a.dtype),
        **blocks.meta(),
    )
    return out


@C.kernel_body("grouped_mm_wgrad")
def grouped_mm_wgrad(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return grouped_wgrad(a, grad, offsets)
