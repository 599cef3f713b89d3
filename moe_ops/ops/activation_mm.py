"""moe::activation_mm — ``grouped_mm(activation(h, probs), w)``, the activation never stored.

The low-rank down path of a LoRA expert block (``(act(h) * p) @ A2`` per expert, ``A2 [E, I, r]``)
reads the same ``h`` that ``expert_down`` keeps for its backward.  As one op its autograd keeps
``h``, ``probs``, ``w`` and the routing — not the ``[M, I]`` activation a plain
``grouped_mm(activation(...))`` chain would save — and rebuilds the activation in the backward.

Its kernel is that composition of ``moe::`` ops (each step dispatched through the registry, on the eager
shortcut when nothing traces); so is its backward, whose steps have their own backward (every order).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define
from moe_ops.ops.activation import activation, activation_backward
from moe_ops.ops.activation_kinds import check_activation, out_width
from moe_ops.ops.grouped_mm import grouped_mm, grouped_mm_wgrad


def _validate(h, probs, w, offsets, kind, alpha, limit, linear_offset) -> None:
    check_activation(kind)
    _checks.tensor("h", h, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("w", w, dim=3)
    _checks.same_dtype("w", w, "h", h)
    _checks.size("w", w.shape[1], out_width(h, kind), f"inner size (dim 1) equal to the {kind} output width")
    _checks.row_probs("probs", probs, h.shape[0])
    _checks.offsets("offsets", offsets, w.shape[0])
    _checks.same_device(h=h, probs=probs, w=w, offsets=offsets)


def _fake(h, probs, w, offsets, kind, alpha, limit, linear_offset):
    return h.new_empty(h.shape[0], w.shape[2])


def _kernel(h, probs, w, offsets, kind, alpha, limit, linear_offset):
    return grouped_mm(activation(h, probs, kind, alpha, limit, linear_offset), w, offsets)


def _setup(ctx, inputs, output):
    h, probs, w, offsets, *params = inputs
    ctx.save_for_backward(h, probs, w, offsets)
    ctx.params = params


def _backward(ctx, grad):
    """Differentiable ops all the way (double backward through theirs): the activation rebuilt from h."""
    h, probs, w, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    needs_h, needs_probs, needs_w = ctx.needs_input_grad[:3]
    grad_h = grad_probs = grad_w = None
    if needs_w:
        grad_w = grouped_mm_wgrad(activation(h, probs, *ctx.params), grad, offsets)
    if needs_h or needs_probs:
        grad_a = grouped_mm(grad, w.transpose(1, 2), offsets)
        grad_h, grad_probs = activation_backward(grad_a, h, probs, *ctx.params)
    return grad_h, grad_probs if probs is not None and needs_probs else None, grad_w, None, None, None, None, None


_activation_mm = define(
    "activation_mm(Tensor h, Tensor? probs, Tensor w, Tensor offsets, str kind, float alpha, float? limit,"
    " float linear_offset) -> Tensor",
    validate=_validate, fake=_fake, backward=_backward, setup_context=_setup, kernel=_kernel)


def activation_mm(h: Tensor, probs: Optional[Tensor], w: Tensor, offsets: Tensor, kind: str = "swiglu",
                  alpha: float = 1.702, limit: Optional[float] = 7.0, linear_offset: float = 1.0) -> Tensor:
    """``grouped_mm(activation(h, probs, kind, alpha, limit, linear_offset), w, offsets)``: ``h [M, C]``
    (the expert-sorted first-GEMM rows), ``w [E, I, N]`` -> ``[M, N]``; the activation is rebuilt in the
    backward rather than kept."""
    return _activation_mm(h, probs, w, offsets, kind, float(alpha), None if limit is None else float(limit),
                          float(linear_offset))
