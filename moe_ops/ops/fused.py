"""moe::expert_up and moe::expert_down — the expert block in two fused steps.

Both take the routing of :func:`moe_ops.route` (``pair_of_row [T*K]``, ``row_of_pair [T, K]``,
``offsets [E]``) and are, exactly, compositions of the unfused ops::

    expert_up:   h = grouped_mm(gather(x), w1) [+ b1]                                  -> h
    expert_down: y = combine(grouped_mm(activation(h, probs), w2) [+ probs * b2])     -> y

Their kernels skip the permuted copies where they can: GEMM1 reads token rows of ``x`` in place
with the bias in its epilogue; GEMM2 applies the activation and the probability to ``h`` as it
loads it (Triton) and adds the weighted bias in its epilogue before the float32 gather-reduce.

What is kept for the backward (SonicMoE's choice): only ``h`` (pre-activation, bias added,
``[M, C]``) and the routing, besides the caller's own ``x`` and parameters.  The activation
``a = act(h) * p`` lives inside ``expert_down`` and is never stored: its backward rebuilds it from
``h`` for the ``w2`` gradient and computes ``grad_h`` and the probability gradient from
``grad_a = gather(grad_y) @ w2^T``, so ``expert_up``'s backward needs neither ``h`` nor ``a``.
Store vs recompute, per layer at Qwen3-30B-A3B (M = 131072 rows, D = 2048, C = 1536, bf16):
storing ``h`` costs ``2*M*C`` = 403 MB; recomputing it would cost GEMM1 again (0.82 TFLOP, a third
of the forward's FLOPs), so ``h`` is stored; ``a`` (201 MB) is not: rebuilding it costs one
elementwise pass over ``h`` in the backward.

``expert_up(num_rows=M)`` (a device-side row count, as ``gather`` takes) keeps only the first M of
the T*K expert-sorted rows: ``h`` has M rows, the groups end at ``min(offsets, M)``, and
``expert_down`` reads M from its ``h``.  The expert-parallel receiver, which knows how many of its
(row, expert) pairs are valid, runs exactly those (default: all T*K rows).

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
from moe_ops.ops.activation_kinds import GATED, check_activation, out_width


def _validate_routing(pair_of_row: Tensor, row_of_pair: Tensor, offsets: Tensor, experts) -> None:
    _checks.row_of_pair("row_of_pair", row_of_pair)
    _checks.tensor("pair_of_row", pair_of_row, dim=1, dtypes=(torch.int64,))
    _checks.size("pair_of_row", pair_of_row.shape[0], row_of_pair.shape[0] * row_of_pair.shape[1],
                 "number of rows T*K (the numel of row_of_pair)")
    _checks.offsets("offsets", offsets, experts)


def _validate_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows=None) -> None:
    _checks.tensor("x", x, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w1", w1, dim=3)
    _checks.same_dtype("w1", w1, "x", x)
    _validate_routing(pair_of_row, row_of_pair, offsets, w1.shape[0])
    _checks.size("row_of_pair", row_of_pair.shape[0], x.shape[0], "number of tokens (dim 0 of x)")
    _checks.size("w1", w1.shape[1], x.shape[1], "inner size (dim 1) equal to dim 1 of x")
    if b1 is not None:
        _checks.tensor("b1", b1, dim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.size("b1", b1.shape[0], w1.shape[0], "number of experts (dim 0 of w1)")
        _checks.size("b1", b1.shape[1], w1.shape[2], "width (dim 1) equal to dim 2 of w1")
    if num_rows is not None:
        _checks.between("num_rows", num_rows, 0, pair_of_row.shape[0], "a row count (at most T*K)")
    _checks.same_device(x=x, pair_of_row=pair_of_row, row_of_pair=row_of_pair, offsets=offsets, w1=w1, b1=b1)


def _validate_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha=None, limit=None,
                   linear_offset=None, out_dtype=None) -> None:
    check_activation(kind)
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"out_dtype: expected None or a floating dtype, got {out_dtype}")
    _checks.tensor("h", h, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w2", w2, dim=3)
    _checks.same_dtype("w2", w2, "h", h)
    _validate_routing(pair_of_row, row_of_pair, offsets, w2.shape[0])
    _checks.between("h", h.shape[0], 0, pair_of_row.shape[0], "at most T*K rows (dim 0 of pair_of_row)")
    inner = out_width(h, kind)
    if GATED[kind]:
        torch._check_value(h.shape[1] % 2 == 0,
                           lambda: f"h: expected an even width (gate and up) for {kind}, got {h.shape[1]}")
    _checks.size("w2", w2.shape[1], inner, f"inner size (dim 1) equal to the width of {kind}(h)")
    if b2 is not None:
        _checks.tensor("b2", b2, dim=2, dtypes=_checks.FLOAT_DTYPES)
        _checks.size("b2", b2.shape[0], w2.shape[0], "number of experts (dim 0 of w2)")
        _checks.size("b2", b2.shape[1], w2.shape[2], "width (dim 1) equal to dim 2 of w2")
    _checks.row_probs("probs", probs, pair_of_row.shape[0])
    _checks.same_device(h=h, w2=w2, b2=b2, probs=probs, pair_of_row=pair_of_row, row_of_pair=row_of_pair,
                        offsets=offsets)


def _empty_grad(like: Tensor, t: Optional[Tensor]) -> Tensor:
    """Fake of the gradient of an optional input: empty when it is None."""
    return like.new_empty(0) if t is None else torch.empty_like(t)


# ---- expert_up: h = gather(x) @ w1 [+ b1] ------------------------------------------------


def _up_fake(x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows=None):
    M = pair_of_row.shape[0] if num_rows is None else num_rows
    return x.new_empty(M, w1.shape[2])


def _validate_up_backward(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1):
    _validate_up(x, pair_of_row, row_of_pair, offsets, w1, b1)
    _checks.tensor("grad_h", grad_h, dim=2)
    _checks.between("grad_h", grad_h.shape[0], 0, pair_of_row.shape[0], "at most T*K rows (dim 0 of pair_of_row)")
    _checks.size("grad_h", grad_h.shape[1], w1.shape[2], "width (dim 1) equal to dim 2 of w1")


def _up_backward_fake(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(w1), _empty_grad(x, b1)


def _up_setup(ctx, inputs, output):
    x, pair_of_row, row_of_pair, offsets, w1, b1 = inputs[:6]
    ctx.save_for_backward(x, pair_of_row, row_of_pair, offsets, w1, b1)  # no h: GEMM1 is linear


def _up_backward(ctx, grad_h):
    x, pair_of_row, row_of_pair, offsets, w1, b1 = ctx.saved_tensors
    grad_x, grad_w1, grad_b1 = _expert_up_backward.unchecked(grad_h.contiguous(), x, pair_of_row, row_of_pair,
                                                             offsets, w1, b1)
    return grad_x, None, None, None, grad_w1, grad_b1 if b1 is not None else None, None


_expert_up = define(
    "expert_up(Tensor x, Tensor pair_of_row, Tensor row_of_pair, Tensor offsets, Tensor w1, Tensor? b1,"
    " SymInt? num_rows=None) -> Tensor",
    validate=_validate_up, fake=_up_fake, backward=_up_backward, setup_context=_up_setup)
_expert_up_backward = define(
    "expert_up_backward(Tensor grad_h, Tensor x, Tensor pair_of_row, Tensor row_of_pair, Tensor offsets,"
    " Tensor w1, Tensor? b1) -> (Tensor, Tensor, Tensor)",
    validate=_validate_up_backward, fake=_up_backward_fake, backward=fused_second_order.up_double_backward,
    setup_context=fused_second_order.up_setup)


# ---- expert_down: y = combine(act(h, probs) @ w2 [+ probs * b2]) ---------------------------


def _down_fake(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit, linear_offset, out_dtype):
    return h.new_empty(row_of_pair.shape[0], w2.shape[2], dtype=out_dtype or h.dtype)


def _validate_down_backward(grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, *params):
    _validate_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind)
    _checks.tensor("grad_y", grad_y, dim=2)


def _down_backward_fake(grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit,
                        linear_offset):
    grad_probs = h.new_empty(0, dtype=torch.float32) if probs is None else torch.empty_like(probs)
    return (torch.empty_like(h, memory_format=torch.contiguous_format), torch.empty_like(w2), _empty_grad(h, b2),
            grad_probs)


def _down_setup(ctx, inputs, output):
    h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit, linear_offset, _ = inputs
    ctx.save_for_backward(h, w2, b2, probs, pair_of_row, row_of_pair, offsets)  # a = act(h) * p is rebuilt
    ctx.params = (kind, alpha, limit, linear_offset)


def _down_backward(ctx, grad_y):
    h, w2, b2, probs, pair_of_row, row_of_pair, offsets = ctx.saved_tensors
    # The rows are in h.dtype before the float32 sum: their gradient is rounded to it, as an
    # explicit rows.to(out_dtype) would do.
    grad_h, grad_w2, grad_b2, grad_probs = _expert_down_backward.unchecked(
        grad_y.to(h.dtype).contiguous(), h, w2, b2, probs, pair_of_row, row_of_pair, offsets, *ctx.params
    )
    return (grad_h, grad_w2, grad_b2 if b2 is not None else None, grad_probs if probs is not None else None,
            None, None, None, None, None, None, None, None)


_expert_down = define(
    "expert_down(Tensor h, Tensor w2, Tensor? b2, Tensor? probs, Tensor pair_of_row, Tensor row_of_pair,"
    " Tensor offsets, str kind, float alpha, float? limit, float linear_offset, ScalarType? out_dtype) -> Tensor",
    validate=_validate_down, fake=_down_fake, backward=_down_backward, setup_context=_down_setup)
_expert_down_backward = define(
    "expert_down_backward(Tensor grad_y, Tensor h, Tensor w2, Tensor? b2, Tensor? probs, Tensor pair_of_row,"
    " Tensor row_of_pair, Tensor offsets, str kind, float alpha, float? limit, float linear_offset)"
    " -> (Tensor, Tensor, Tensor, Tensor)",
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
    num_rows: Optional[int] = None,
) -> Tensor:
    """GEMM1 of the experts, fused: ``h [M, C]``, ``h = x[token(r)] @ w1[e] (+ b1[e])`` over the first
    M = ``num_rows`` (default T*K) expert-sorted rows; rows past ``offsets[-1]`` are 0.

    ``x [T, D]``, ``w1 [E, D, C]`` (C = 2I gated, I for relu2), ``b1 [E, C]``.  ``h`` is the
    pre-activation: :func:`expert_down` applies the activation.
    """
    return _expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows)


def expert_down(
    h: Tensor,
    w2: Tensor,
    b2: Optional[Tensor],
    probs: Optional[Tensor],
    pair_of_row: Tensor,
    row_of_pair: Tensor,
    offsets: Tensor,
    kind: str = "swiglu",
    alpha: float = 1.702,
    limit: Optional[float] = 7.0,
    linear_offset: float = 1.0,
    out_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """The activation, GEMM2 and the combine, fused: ``y [T, D]``,
    ``y[t] = sum_k (act(h[r]) * probs[r] @ w2[e] + probs[r] * b2[e])`` over the valid pairs' rows
    ``r = row_of_pair[t, k]`` among the ``h.shape[0]`` (at most T*K) rows of ``h``, accumulated in
    float32 (deterministic).

    ``h [M, C]`` (:func:`expert_up`'s), ``w2 [E, I, D]``, ``b2 [E, D]``, ``probs [T*K]`` or ``[T*K, 1]``;
    ``alpha``, ``limit``, ``linear_offset`` are quick_geglu's.  ``act(h) * probs`` and the rows are
    rounded to ``h.dtype``; the sum is returned in ``out_dtype`` (default ``h.dtype``; float32 keeps
    expert-parallel partial sums unrounded)."""
    return _expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, float(alpha),
                        None if limit is None else float(limit), float(linear_offset), out_dtype)


def expert_up_backward(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`expert_up`: ``grad_x``, ``grad_w1`` and ``grad_b1`` (empty when ``b1`` is None)."""
    return _expert_up_backward(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1)


def expert_down_backward(grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit,
                         linear_offset) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`expert_down`: ``grad_h``, ``grad_w2``, ``grad_b2`` and ``grad_probs`` (the
    activation's and the bias term's; empty when ``b2`` / ``probs`` is None)."""
    return _expert_down_backward(grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit,
                                 linear_offset)
