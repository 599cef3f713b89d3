"""moe::gather_from, moe::sum_from, moe::put_to — rows read from, or written to, several tensors
(other ranks' buffers).

Expert parallelism over GPU peer memory (``moe_modules.ep.peer``) hands these ops one source tensor
per rank: views of the other GPUs' buffers, which a kernel on this GPU reads directly.  They are
ordinary tensors to the ops, so the ops are also correct (and tested) on plain local tensors.

* ``gather_from``: ``out[s*C + j] = sources[s][index[s][j]]`` for ``j < counts[s]``, 0 after: the
  rows each rank asked this rank for, in capacity-padded blocks of ``C`` rows per source.  The
  index and count of a source are tensors of their own, so they too are read where they live.
* ``sum_from``: ``y[t] = sum_s sources[s][row[t, s]]`` over the ``s`` with ``0 <= row[t, s]``,
  accumulated in float32 (float64 for float64) in source order: deterministic.
* ``put_to`` (in place): ``dests[s][j] = rows[s*C + j]``: each block of rows written to its own
  destination (another GPU's buffer: the stores cross the link, no copy is made first).

Counts and rows are device tensors (no host sync).  No autograd formula: the expert-parallel
transport that calls them defines the gradients (each op is the other's adjoint there); their
inputs never require grad.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define

MAX_SOURCES = 8  # one GPU host; the Triton kernels take each source as its own pointer argument


def _validate_sources(sources: list) -> None:
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"sources: expected 1 to {MAX_SOURCES} tensors, got {len(sources)}")
    first = sources[0]
    for s, src in enumerate(sources):
        _checks.tensor(f"sources[{s}]", src, dim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.same_dtype(f"sources[{s}]", src, "sources[0]", first)
        _checks.size(f"sources[{s}]", src.shape[1], first.shape[1], "row width (dim 1 of sources[0])")
        _checks.same_device(**{"sources[0]": first, f"sources[{s}]": src})


def _validate_gather_from(sources, index, counts) -> None:
    _validate_sources(sources)
    _checks.size("index", len(index), len(sources), "one index tensor per source")
    _checks.size("counts", len(counts), len(sources), "one count tensor per source")
    for s, (idx, cnt) in enumerate(zip(index, counts)):
        _checks.tensor(f"index[{s}]", idx, dim=1, dtypes=(torch.int32, torch.int64))
        _checks.size(f"index[{s}]", idx.shape[0], index[0].shape[0], "capacity (the length of index[0])")
        _checks.tensor(f"counts[{s}]", cnt, dim=1, dtypes=(torch.int32, torch.int64))
        _checks.size(f"counts[{s}]", cnt.shape[0], 1, "one element")
        _checks.same_device(sources=sources[0], **{f"index[{s}]": idx, f"counts[{s}]": cnt})


def _validate_sum_from(sources, row, out_dtype=None) -> None:
    _validate_sources(sources)
    _checks.tensor("row", row, dim=2, dtypes=(torch.int32, torch.int64))
    _checks.size("row", row.shape[1], len(sources), "one column per source (dim 1)")
    _checks.same_device(sources=sources[0], row=row)
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None or a floating dtype, got {out_dtype}")


# ---- gather_from ----------------------------------------------------------------------


def _gather_from_fake(sources, index, counts):
    return sources[0].new_empty(len(index) * index[0].shape[0], sources[0].shape[1])


_gather_from = define("gather_from(Tensor[] sources, Tensor[] index, Tensor[] counts) -> Tensor",
                      validate=_validate_gather_from, fake=_gather_from_fake)


def gather_from(sources: list[Tensor], index: list[Tensor], counts: list[Tensor]) -> Tensor:
    """Rows of several sources into capacity-padded blocks: ``out[s*C + j] = sources[s][index[s][j]]``
    for ``j < counts[s]``, zero rows after.

    ``sources``: 1 to 8 tensors ``[R_s, D]`` of one dtype (rows may differ); ``index``: one int
    tensor ``[C]`` per source (entries past its count are ignored; an entry outside ``[0, R_s)``
    reads nothing); ``counts``: one int tensor ``[1]`` per source.  Returns ``[S*C, D]`` in the
    sources' dtype.
    """
    return _gather_from(sources, index, counts)


# ---- sum_from -------------------------------------------------------------------------


def _sum_from_fake(sources, row, out_dtype=None):
    return sources[0].new_empty(row.shape[0], sources[0].shape[1], dtype=out_dtype or sources[0].dtype)


_sum_from = define("sum_from(Tensor[] sources, Tensor row, ScalarType? out_dtype=None) -> Tensor",
                   validate=_validate_sum_from, fake=_sum_from_fake)


def sum_from(sources: list[Tensor], row: Tensor, out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """One row per token summed over the sources: ``y[t] = sum_s sources[s][row[t, s]]`` over the
    ``s`` with ``row[t, s] >= 0`` (negative: the token has no row there).

    ``sources``: 1 to 8 tensors ``[R_s, D]``; ``row [T, S]`` int (non-negative entries ``< R_s``).
    Returns ``[T, D]`` in ``out_dtype`` (default the sources' dtype), accumulated in float32
    (float64 for float64) in source order and rounded once; a token with no row gets zeros.
    """
    return _sum_from(sources, row, out_dtype)


# ---- put_to ---------------------------------------------------------------------------


def _validate_put_to(rows, dests) -> None:
    _validate_sources(dests)
    _checks.tensor("rows", rows, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.same_dtype("rows", rows, "dests[0]", dests[0])
    C = dests[0].shape[0]
    for s, dest in enumerate(dests):
        _checks.size(f"dests[{s}]", dest.shape[0], C, "rows (dim 0 of dests[0])")
    _checks.size("rows", rows.shape[0], len(dests) * C, "one block of C rows per destination")
    _checks.size("rows", rows.shape[1], dests[0].shape[1], "row width (dim 1 of dests[0])")
    _checks.same_device(rows=rows, dests=dests[0])


_put_to = define("put_to(Tensor rows, Tensor(a1!)[] dests) -> ()", validate=_validate_put_to,
                 fake=lambda rows, dests: None)


def put_to(rows: Tensor, dests: list[Tensor]) -> None:
    """Write block ``s`` of ``rows [S*C, D]`` into ``dests[s] [C, D]``, in place, for every ``s``.

    ``dests``: 1 to 8 tensors of one shape and dtype, typically views of other GPUs' buffers."""
    _put_to(rows, dests)
