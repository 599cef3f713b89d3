"""moe::expert_up and moe::expert_down — the expert block in two fused steps.

Both take the routing of :func:`moe_ops.route` (``pair_of_row [T*K]``, ``row_of_pair [T, K]``,
``offsets [E]``) and are, exactly, compositions of the unfused ops::

    expert_up:   h = grouped_mm(gather(x), w1) [+ b1];  a = activation(h, probs)   -> (a, h)
    expert_down: y = combine(grouped_mm(a, w2) [+ probs * b2])

Their kernels skip the permuted copies: GEMM1 reads token rows of ``x`` in place, with
bias, activation and probability in its epilogue; GEMM2 adds the weighted bias in its
epilogue before the float32 gather-reduce.

``expert_up(num_rows=M)`` (a device-side row count, as ``gather`` takes) keeps only the first M of
the T*K expert-sorted rows: ``a`` and ``h`` have M rows, the groups end at ``min(offsets, M)``, and
``expert_down`` reads M from its ``a``.  The expert-parallel receiver, which knows how many of its
(row, expert) pairs are valid, runs exactly those (default: all T*K rows).

``h`` (pre-activation, bias added, ``[M, C]``) is an output so the backward can reuse it
(a custom op saves only inputs and outputs).  Store vs recompute, per layer at Qwen3-30B-A3B
(M = 131072 rows, D = 2048, C = 1536, bf16): storing ``h`` costs ``2*M*C`` = 403 MB held until the
backward, written once by GEMM1's epilogue and read once by the activation backward (~0.27 ms of
H100 bandwidth); recomputing it costs GEMM1 again, ``2*M*D*C`` = 0.82 TFLOP (~1.2 ms at
700 TFLOP/s, a third of the forward's FLOPs) plus re-reading ``x`` and ``w1`` (0.87 GB) — so
``h`` is stored.  ``a`` (201 MB) is expert_down's input and saved by it anyway.

The backward formulas are ops too (``moe::expert_up_backward``, ``moe::expert_down_backward``),
so they dispatch through the registry like every other kernel; their own autograd (double
backward) is in ``fused_second_order.py``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define
from moe_ops.ops import fused_second_order
from moe_ops.ops.activation import GATED, check_activation


def _validate_routing(pair_of_row: Tensor, row_of_pair: Tensor, offsets: Tensor, experts) -> None:
    _checks.row_of_pair("row_of_pair", row_of_pair)
    _checks.tensor("pair_of_row", pair_of_row, dim=1, dtypes=(torch.int64,))
    _checks.size("pair_of_row", pair_of_row.shape[0], row_of_pair.shape[0] * row_of_pair.shape[1],
                 "number of rows T*K (the numel of row_of_pair)")
    _checks.offsets("offsets", offsets, experts)


def _validate_up(x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha=None, limit=None,
                 linear_offset=None, num_rows=None) -> None:
    check_activation(kind)
    _checks.tensor("x", x, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w1", w1, dim=3)
    _checks.same_dtype("w1", w1, "x", x)
    _validate_routing(pair_of_row, row_of_pair, offsets, w1.shape[0])
    _checks.size("row_of_pair", row_of_pair.shape[0], x.shape[0], "number of tokens (dim 0 of x)")
    _checks.size("w1", w1.shape[1], x.shape[1], "inner size (dim 1) equal to dim 1 of x")
    if GATED[kind]:
        torch._check_value(w1.shape[2] % 2 == 0,
                           lambda: f"w1: expected an even width (gate and up) for {kind}, got {w1.shape[2]}")
    if b1 is not None:
        _checks.tensor("b1", b1, dim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.size("b1", b1.shape[0], w1.shape[0], "number of experts (dim 0 of w1)")
        _checks.size("b1", b1.shape[1], w1.shape[2], "width (dim 1) equal to dim 2 of w1")
    _checks.row_probs("probs", probs, pair_of_row.shape[0])
    if num_rows is not None:
        _checks.between("num_rows", num_rows, 0, pair_of_row.shape[0], "a row count (at most T*K)")
    _checks.same_device(x=x, pair_of_row=pair_of_row, row_of_pair=row_of_pair, offsets=offsets, w1=w1, b1=b1,
                        probs=probs)


def _validate_down(a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype=None) -> None:
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None or a floating dtype, got {out_dtype}")
    _checks.tensor("a", a, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w2", w2, dim=3)
    _checks.same_dtype("w2", w2, "a", a)
    _validate_routing(pair_of_row, row_of_pair, offsets, w2.shape[0])
    _checks.between("a", a.shape[0], 0, pair_of_row.shape[0], "at most T*K rows (dim 0 of pair_of_row)")
    _checks.size("w2", w2.shape[1], a.shape[1], "inner size (dim 1) equal to dim 1 of a")
    if b2 is not None:
        _checks.tensor("b2", b2, dim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.size("b2", b2.shape[0], w2.shape[0], "number of experts (dim 0 of w2)")
        _checks.size("b2", b2.shape[1], w2.shape[2], "width (dim 1) equal to dim 2 of w2")
    _checks.row_probs("probs", probs, pair_of_row.shape[0])
    _checks.same_device(a=a, w2=w2, b2=b2, probs=probs, pair_of_row=pair_of_row, row_of_pair=row_of_pair,
                        offsets=offsets)


def _up_width(w1: Tensor, kind: str):
    return w1.shape[2] // 2 if GATED[kind] else w1.shape[2]


def _empty_grads(like: Tensor, bias: Optional[Tensor], probs: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Fakes of (grad_bias, grad_probs): empty when the input is None."""
    grad_bias = like.new_empty(0) if bias is None else torch.empty_like(bias)
    grad_probs = like.new_empty(0, dtype=torch.float32) if probs is None else torch.empty_like(probs)
    return grad_bias, grad_probs


# ---- expert_up --------------------------------------------------------------------------


def _up_fake(x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit, linear_offset,
             num_rows=None):
    M = pair_of_row.shape[0] if num_rows is None else num_rows
    return x.new_empty(M, _up_width(w1, kind)), x.new_empty(M, w1.shape[2])


def _validate_up_backward(grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, *params):
    _validate_up(x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind)
    _checks.between("h", h.shape[0], 0, pair_of_row.shape[0], "at most T*K rows (dim 0 of pair_of_row)")
    _checks.tensor("grad_a", grad_a, dim=2)
    _checks.tensor("h", h, dim=2)


def _up_backward_fake(grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit,
                      linear_offset):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1),
            *_empty_grads(x, b1, probs))


def _up_setup(ctx, inputs, output):
    x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit, linear_offset = inputs[:11]
    _, h = output
    ctx.set_materialize_grads(False)  # h's gradient is None unless h is used (no zero-filled [M, C])
    ctx.save_for_backward(x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs)
    ctx.params = (kind, alpha, limit, linear_offset)


def _up_backward(ctx, grad_a, grad_h):
    x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs = ctx.saved_tensors
    if grad_h is None and grad_a is not None:  # the usual case: h is kept only for this backward
        grads = expert_up_backward(grad_a.contiguous(), x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs,
                                   *ctx.params)
    elif grad_h is None:
        return (None,) * 12
    else:  # h has a gradient of its own (used downstream, or a double backward through h)
        grads = fused_second_order.up_backward_with_grad_h(grad_a, grad_h, x, h, row_of_pair, offsets, w1, b1, probs,
                                                           ctx.params)
    grad_x, grad_w1, grad_b1, grad_probs = grads
    return (grad_x, None, None, None, grad_w1, grad_b1 if b1 is not None else None,
            grad_probs if probs is not None else None, None, None, None, None, None)


_expert_up = define(
    "expert_up(Tensor x, Tensor pair_of_row, Tensor row_of_pair, Tensor offsets, Tensor w1, Tensor? b1,"
    " Tensor? probs, str kind, float alpha, float? limit, float linear_offset, SymInt? num_rows=None)"
    " -> (Tensor, Tensor)",
    validate=_validate_up, fake=_up_fake, backward=_up_backward, setup_context=_up_setup)
_expert_up_backward = define(
    "expert_up_backward(Tensor grad_a, Tensor x, Tensor h, Tensor pair_of_row, Tensor row_of_pair,"
    " Tensor offsets, Tensor w1, Tensor? b1, Tensor? probs, str kind, float alpha, float? limit,"
    " float linear_offset) -> (Tensor, Tensor, Tensor, Tensor)",
    validate=_validate_up_backward, fake=_up_backward_fake, backward=fused_second_order.up_double_backward,
    setup_context=fused_second_order.up_setup)


# ---- expert_down ------------------------------------------------------------------------


def _down_fake(a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype):
    return a.new_empty(row_of_pair.shape[0], w2.shape[2], dtype=out_dtype or a.dtype)


def _validate_down_backward(grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets):
    _validate_down(a, w2, b2, probs, pair_of_row, row_of_pair, offsets)
    _checks.tensor("grad_y", grad_y, dim=2)


def _down_backward_fake(grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets):
    grad_b2, grad_probs = _empty_grads(a, b2, probs if b2 is not None else None)
    return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(w2), grad_b2, grad_probs


def _down_setup(ctx, inputs, output):
    a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype = inputs
    ctx.save_for_backward(a, w2, b2, probs, pair_of_row, row_of_pair, offsets)


def _down_backward(ctx, grad_y):
    a, w2, b2, probs, pair_of_row, row_of_pair, offsets = ctx.saved_tensors
    # The rows are in a.dtype before the float32 sum: their gradient is rounded to it, as an
    # explicit rows.to(out_dtype) would do.
    grad_a, grad_w2, grad_b2, grad_probs = expert_down_backward(
        grad_y.to(a.dtype).contiguous(), a, w2, b2, probs, pair_of_row, row_of_pair, offsets
    )
    has_bias = b2 is not None
    return (grad_a, grad_w2, grad_b2 if has_bias else None, grad_probs if has_bias and probs is not None else None,
            None, None, None, None)


_expert_down = define(
    "expert_down(Tensor a, Tensor w2, Tensor? b2, Tensor? probs, Tensor pair_of_row, Tensor row_of_pair,"
    " Tensor offsets, ScalarType? out_dtype) -> Tensor",
    validate=_validate_down, fake=_down_fake, backward=_down_backward, setup_context=_down_setup)
_expert_down_backward = define(
    "expert_down_backward(Tensor grad_y, Tensor a, Tensor w2, Tensor? b2, Tensor? probs, Tensor pair_of_row,"
    " Tensor row_of_pair, Tensor offsets) -> (Tensor, Tensor, Tensor, Tensor)",
    validate=_validate_down_backward, fake=_down_backward_fake, backward=fused_second_order.down_double_backward,
    setup_context=fused_second_order.down_setup)


# ---- public wrappers ----------------------------------------------------------------------


def expert_up(
    x: Tensor,
    pair_of_row: Tensor,
    row_of_pair: Tensor,
    offsets: Tensor,
    w1: Tensor,
    b1: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    kind: str = "swiglu",
    alpha: float = 1.702,
    limit: Optional[float] = 7.0,
    linear_offset: float = 1.0,
    num_rows: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """GEMM1 of the experts, fused: ``(a [M, I], h [M, C])`` with ``h = x[token(r)] @ w1[e] (+ b1[e])``
    and ``a = act(h) * probs`` over the first M = ``num_rows`` (default T*K) expert-sorted rows; rows past
    ``offsets[-1]`` are 0.

    ``x [T, D]``, ``w1 [E, D, C]`` (C = 2I gated, I for relu2), ``b1 [E, C]``, ``probs [T*K]`` or ``[T*K, 1]``;
    ``alpha``, ``limit``, ``linear_offset`` are quick_geglu's.  ``h`` is returned for the backward.
    """
    return _expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, float(alpha),
                       None if limit is None else float(limit), float(linear_offset), num_rows)


def expert_down(
    a: Tensor,
    w2: Tensor,
    b2: Optional[Tensor],
    probs: Optional[Tensor],
    pair_of_row: Tensor,
    row_of_pair: Tensor,
    offsets: Tensor,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """GEMM2 and the combine, fused: ``y [T, D]``, ``y[t] = sum_k (a[r] @ w2[e] + probs[r] * b2[e])``
    over the valid pairs' rows ``r = row_of_pair[t, k]`` among the ``a.shape[0]`` (at most T*K) rows of
    ``a``, accumulated in float32 (deterministic).

    The rows are rounded to ``a.dtype``; the sum is returned in ``out_dtype`` (default ``a.dtype``;
    float32 keeps expert-parallel partial sums unrounded)."""
    return _expert_down(a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype)


def expert_up_backward(grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit,
                       linear_offset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`expert_up`: ``grad_x``, ``grad_w1``, ``grad_b1`` and ``grad_probs``
    (the last two empty when ``b1`` / ``probs`` is None)."""
    return _expert_up_backward(grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit,
                               linear_offset)


def expert_down_backward(grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`expert_down`: ``grad_a``, ``grad_w2``, ``grad_b2`` and ``grad_probs``
    (the bias term's; both empty when ``b2`` is None, ``grad_probs`` also when ``probs`` is)."""
    return _expert_down_backward(grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets)
