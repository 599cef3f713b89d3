"""gather_from / sum_from / put_to: rows read from, or written to, up to eight tensors (other GPUs'
buffers under expert parallelism, which these loads and stores reach over NVLink).

Each source is its own pointer argument; ``_source`` picks one by a compile-time index, so a
kernel holds one copy of its loop body per source.  ``gather_from`` programs each own a block of
one source's rows (a runtime branch selects the source); ``sum_from`` programs own tokens and add
the sources in order, in float32: deterministic.  Indices outside a source read nothing.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C
from moe_ops.ops.peer import MAX_SOURCES


@triton.jit
def _source(i: tl.constexpr, a0, a1, a2, a3, a4, a5, a6, a7):
    """Argument ``i`` of eight, chosen while compiling."""
    picked = a0
    if i == 1:
        picked = a1
    if i == 2:
        picked = a2
    if i == 3:
        picked = a3
    if i == 4:
        picked = a4
    if i == 5:
        picked = a5
    if i == 6:
        picked = a6
    if i == 7:
        picked = a7
    return picked


@triton.jit
def _gather_from_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, n4, n5, n6, n7,
    i0, i1, i2, i3, i4, i5, i6, i7, c0, c1, c2, c3, c4, c5, c6, c7,
    out_ptr, C, D,
    S: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    blocks_per_source = tl.cdiv(C, BR)
    s = tl.program_id(0) // blocks_per_source
    j = (tl.program_id(0) % blocks_per_source) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    col_ok = cols < D
    row_ok = j < C
    val = tl.zeros((BR, BD), dtype=out_ptr.dtype.element_ty)
    for i in tl.static_range(S):
        if s == i:  # this program's source: its rows, index and count (each may be another GPU's)
            take = row_ok & (j < tl.load(_source(i, c0, c1, c2, c3, c4, c5, c6, c7)))
            idx = tl.load(_source(i, i0, i1, i2, i3, i4, i5, i6, i7) + j, mask=take, other=0).to(tl.int64)
            ok = take & (idx >= 0) & (idx < _source(i, n0, n1, n2, n3, n4, n5, n6, n7))
            src = _source(i, p0, p1, p2, p3, p4, p5, p6, p7)
            val = tl.load(src + tl.where(ok, idx, 0)[:, None] * D + cols[None, :],
                          mask=ok[:, None] & col_ok[None, :], other=0.0)
    out_rows = s.to(tl.int64) * C + j
    tl.store(out_ptr + out_rows[:, None] * D + cols[None, :], val, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _sum_from_kernel(
    p0, p1, p2, p3, p4, p5, p6, p7, n0, n1, n2, n3, n4, n5, n6, n7,
    row_ptr, y_ptr, T, D,
    S: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    tokens = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    token_ok = tokens < T
    col_ok = cols < D
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    for i in tl.static_range(S):
        row = tl.load(row_ptr + tokens.to(tl.int64) * S + i, mask=token_ok, other=-1).to(tl.int64)
        ok = token_ok & (row >= 0) & (row < _source(i, n0, n1, n2, n3, n4, n5, n6, n7))
        src = _source(i, p0, p1, p2, p3, p4, p5, p6, p7)
        acc += tl.load(src + tl.where(ok, row, 0)[:, None] * D + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    tl.store(y_ptr + tokens.to(tl.int64)[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _put_to_kernel(
    rows_ptr, d0, d1, d2, d3, d4, d5, d6, d7, C, D,
    S: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr,
):
    blocks_per_dest = tl.cdiv(C, BR)
    s = tl.program_id(0) // blocks_per_dest
    j = (tl.program_id(0) % blocks_per_dest) * BR + tl.arange(0, BR)
    cols = tl.program_id(1) * BD + tl.arange(0, BD)
    mask = (j < C)[:, None] & (cols < D)[None, :]
    offs = j.to(tl.int64)[:, None] * D + cols[None, :]
    val = tl.load(rows_ptr + s.to(tl.int64) * C * D + offs, mask=mask)
    for i in tl.static_range(S):
        if s == i:
            tl.store(_source(i, d0, d1, d2, d3, d4, d5, d6, d7) + offs, val, mask=mask)


def _eight(tensors: list[Tensor]) -> list[Tensor]:
    """Eight contiguous tensors (unused slots repeat the first; never read)."""
    tensors = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    return tensors + [tensors[0]] * (MAX_SOURCES - len(tensors))


def _padded(sources: list[Tensor]) -> tuple[list[Tensor], list[int]]:
    """Eight sources and their row counts."""
    return _eight(sources), [s.shape[0] for s in sources] + [0] * (MAX_SOURCES - len(sources))


@C.kernel_body("gather_from")
def gather_from(sources: list[Tensor], index: list[Tensor], counts: list[Tensor]) -> Tensor:
    S, Cap = len(index), index[0].shape[0]
    D = sources[0].shape[1]
    out = sources[0].new_empty(S * Cap, D)
    ptrs, rows = _padded(sources)
    blocks = C.rows_blocks(D)
    C.launch(
        _gather_from_kernel, (S * triton.cdiv(Cap, blocks.m), triton.cdiv(D, blocks.n)),
        *ptrs, *rows, *_eight(index), *_eight(counts), out, Cap, D,
        S=S, BR=blocks.m, BD=blocks.n, **blocks.meta(),
    )
    return out


@C.kernel_body("sum_from")
def sum_from(sources: list[Tensor], row: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    T, S = row.shape
    D = sources[0].shape[1]
    y = sources[0].new_empty(T, D, dtype=out_dtype or sources[0].dtype)
    ptrs, rows = _padded(sources)
    blocks = C.rows_blocks(D)
    C.launch(
        _sum_from_kernel, (triton.cdiv(T, blocks.m), triton.cdiv(D, blocks.n)),
        *ptrs, *rows, row.contiguous(), y, T, D,
        S=S, BT=blocks.m, BD=blocks.n, **blocks.meta(),
    )
    return y


@C.kernel_body("put_to")
def put_to(rows: Tensor, dests: list[Tensor]) -> None:
    S, Cap, D = len(dests), dests[0].shape[0], dests[0].shape[1]
    assert all(d.is_contiguous() for d in dests), "put_to writes contiguous destinations"
    blocks = C.rows_blocks(D)
    C.launch(
        _put_to_kernel, (S * triton.cdiv(Cap, blocks.m), triton.cdiv(D, blocks.n)),
        rows.contiguous(), *_eight(dests), Cap, D,
        S=S, BR=blocks.m, BD=blocks.n, **blocks.meta(),
    )
