"""moe::gather, moe::combine, moe::pair_dot — moving rows between token order and expert order.

``gather`` and ``combine`` are adjoint: ``gather`` copies token ``t`` to the
row of each of its valid pairs (optionally scaled by the pair's weight),
``combine`` sums a token's valid rows back (optionally weighted), accumulating
in float32.  ``pair_dot`` is the weight gradient of both.  All three are
gather-reduce over the K slots of a token: deterministic, no atomics.
A pair is valid when ``row_of_pair < offsets[-1]``; other rows are zero.

The expert-order side holds ``T*K`` rows by default, or any ``M <= T*K`` rows (``gather``'s
``num_rows``; the rows ``combine`` and ``pair_dot`` are given): then only pairs whose row is
below ``min(offsets[-1], M)`` are valid.  Expert parallelism sends exactly the valid rows, so it
gathers and combines ``offsets[-1]`` rows without padding them back to ``T*K``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define


def _validate_common(rows_name, rows, row_of_pair, offsets, weights=None):
    _checks.tensor(rows_name, rows, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.row_of_pair("row_of_pair", row_of_pair)
    _checks.offsets("offsets", offsets)
    _checks.pair_weights("weights", weights, row_of_pair)
    _checks.same_device(**{rows_name: rows}, row_of_pair=row_of_pair, offsets=offsets, weights=weights)


def _validate_gather(x, row_of_pair, offsets, weights, num_rows=None):
    _validate_common("x", x, row_of_pair, offsets, weights)
    _checks.size("row_of_pair", row_of_pair.shape[0], x.shape[0], "number of tokens (dim 0 of x)")
    if num_rows is not None:
        T, K = row_of_pair.shape
        _checks.between("num_rows", num_rows, 0, T * K, "a row count (at most T*K)")


def _validate_combine(rows, row_of_pair, offsets, weights):
    _validate_common("rows", rows, row_of_pair, offsets, weights)
    T, K = row_of_pair.shape
    _checks.between("rows", rows.shape[0], 0, T * K, "a row count (at most T*K)")


def _rows_of(row_of_pair, num_rows):
    return row_of_pair.shape[0] * row_of_pair.shape[1] if num_rows is None else num_rows


def _validate_pair_dot(a, rows, row_of_pair, offsets):
    _validate_gather(a, row_of_pair, offsets, None)
    _validate_combine(rows, row_of_pair, offsets, None)
    _checks.size("rows", rows.shape[1], a.shape[1], "row width (dim 1 of a)")


# ---- gather ---------------------------------------------------------------------------


def _gather_fake(x, row_of_pair, offsets, weights, num_rows=None):
    return x.new_empty(_rows_of(row_of_pair, num_rows), x.shape[1])


def _gather_setup(ctx, inputs, output):
    x, row_of_pair, offsets, weights, _ = inputs
    ctx.save_for_backward(x if weights is not None else None, row_of_pair, offsets, weights)


def _gather_backward(ctx, grad_rows):
    x, row_of_pair, offsets, weights = ctx.saved_tensors
    grad_rows = grad_rows.contiguous()
    grad_x = combine(grad_rows, row_of_pair, offsets, weights) if ctx.needs_input_grad[0] else None
    grad_w = None
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = pair_dot(x, grad_rows, row_of_pair, offsets).to(weights.dtype)
    return grad_x, None, None, grad_w, None


_gather = define("gather(Tensor x, Tensor row_of_pair, Tensor offsets, Tensor? weights, SymInt? num_rows=None) -> Tensor",
                 validate=_validate_gather, fake=_gather_fake, backward=_gather_backward, setup_context=_gather_setup)


def gather(x: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor] = None,
           num_rows: Optional[int] = None) -> Tensor:
    """Token rows into expert order: ``out[row_of_pair[t, k]] = w[t, k] * x[t]`` for valid pairs, 0 elsewhere.

    ``x [T, D]`` -> ``[T*K, D]`` in ``x.dtype`` (weights applied in float32, rounded once), or only
    the first ``num_rows`` rows (``<= T*K``; pairs whose row is past them are dropped).
    """
    return _gather(x, row_of_pair, offsets, weights, num_rows)


# ---- combine --------------------------------------------------------------------------


def _combine_fake(rows, row_of_pair, offsets, weights):
    return rows.new_empty(row_of_pair.shape[0], rows.shape[1])


def _combine_setup(ctx, inputs, output):
    rows, row_of_pair, offsets, weights = inputs
    ctx.num_rows = rows.shape[0]
    ctx.save_for_backward(rows if weights is not None else None, row_of_pair, offsets, weights)


def _combine_backward(ctx, grad_y):
    rows, row_of_pair, offsets, weights = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_rows = None
    if ctx.needs_input_grad[0]:
        grad_rows = gather(grad_y, row_of_pair, offsets, weights, ctx.num_rows)
    grad_w = None
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = pair_dot(grad_y, rows, row_of_pair, offsets).to(weights.dtype)
    return grad_rows, None, None, grad_w


_combine = define("combine(Tensor rows, Tensor row_of_pair, Tensor offsets, Tensor? weights) -> Tensor",
                  validate=_validate_combine, fake=_combine_fake, backward=_combine_backward,
                  setup_context=_combine_setup)


def combine(rows: Tensor, row_of_pair: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Expert rows back to token order: ``y[t] = sum_k w[t, k] * rows[row_of_pair[t, k]]`` over valid pairs.

    ``rows [M, D]`` (``M = T*K``, or fewer: pairs whose row is ``>= M`` are not valid) -> ``[T, D]``
    in ``rows.dtype``, accumulated in float32 in slot order (deterministic).
    """
    return _combine(rows, row_of_pair, offsets, weights)


# ---- pair_dot -------------------------------------------------------------------------


def _pair_dot_fake(a, rows, row_of_pair, offsets):
    return a.new_empty(row_of_pair.shape, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)


def _pair_dot_setup(ctx, inputs, output):
    a, rows, row_of_pair, offsets = inputs
    ctx.save_for_backward(a, rows, row_of_pair, offsets)


def _pair_dot_backward(ctx, grad):
    a, rows, row_of_pair, offsets = ctx.saved_tensors
    grad_a = combine(rows, row_of_pair, offsets, grad).to(a.dtype) if ctx.needs_input_grad[0] else None
    grad_rows = None
    if ctx.needs_input_grad[1]:
        grad_rows = gather(a, row_of_pair, offsets, grad, rows.shape[0]).to(rows.dtype)
    return grad_a, grad_rows, None, None


_pair_dot = define("pair_dot(Tensor a, Tensor rows, Tensor row_of_pair, Tensor offsets) -> Tensor",
                   validate=_validate_pair_dot, fake=_pair_dot_fake, backward=_pair_dot_backward,
                   setup_context=_pair_dot_setup)


def pair_dot(a: Tensor, rows: Tensor, row_of_pair: Tensor, offsets: Tensor) -> Tensor:
    """``out[t, k] = <a[t], rows[row_of_pair[t, k]]>`` for valid pairs, 0 elsewhere; ``[T, K]`` float32
    (float64 for float64 ``a``).

    The routing-weight gradient of both :func:`gather` and :func:`combine`.
    """
    return _pair_dot(a, rows, row_of_pair, offsets)
