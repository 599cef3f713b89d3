"""moe::activation — the expert activation, optionally times the routing probability.

``h`` is the first GEMM's output (bias already added), ``[N, 2I]`` for gated
activations and ``[N, I]`` for ``relu2``:

* ``swiglu``: ``silu(gate) * up`` with ``gate, up = h[:, :I], h[:, I:]``;
* ``quick_geglu`` (GPT-OSS): ``gate, up = h[:, 0::2], h[:, 1::2]`` (interleaved),
  ``gate = min(gate, limit)``, ``up = clamp(up, -limit, limit)`` (no clamp when
  ``limit`` is None), ``gate * sigmoid(alpha * gate) * (up + linear_offset)``;
* ``swigluoai`` (NeMo AutoModel's): ``quick_geglu``'s math on concatenated gate|up columns
  (NeMo's clamped SwiGLU, ``swiglu_limit > 0``, is this with ``alpha = 1``, ``linear_offset = 0``);
* ``geglu`` (NeMo AutoModel's, Gemma): ``gelu_tanh(gate) * up`` on concatenated gate|up columns;
* ``relu2``: ``relu(h) ** 2``.

The result is multiplied by ``probs`` per row, all in float32, and rounded once
to ``h.dtype``.  The backward (``moe::activation_backward``) also returns the
gradient of ``probs``, so the router trains through it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define
from moe_ops.ops import activation_second_order
from moe_ops.ops.activation_kinds import GATED, check_activation, out_width
from moe_ops.ops.composition_vjp import save_inputs, vjp_of_composition

def _validate(h: Tensor, probs: Optional[Tensor], kind: str, *params) -> None:
    check_activation(kind)
    _checks.tensor("h", h, dim=2, dtypes=_checks.FLOAT_DTYPES)
    if GATED[kind]:
        torch._check_value(h.shape[1] % 2 == 0, lambda: f"h: expected an even width (gate and up) for {kind}, got {h.shape[1]}")
    _checks.row_probs("probs", probs, h.shape[0])
    _checks.same_device(h=h, probs=probs)


def _validate_backward(grad: Tensor, h: Tensor, probs: Optional[Tensor], kind: str, *params) -> None:
    _validate(h, probs, kind)
    _checks.tensor("grad", grad, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.size("grad", grad.shape[0], h.shape[0], "number of rows (dim 0 of h)")
    _checks.size("grad", grad.shape[1], out_width(h, kind), f"width of the {kind} output")
    _checks.same_device(h=h, grad=grad)


def _fake(h, probs, kind, alpha, limit, linear_offset):
    return h.new_empty(h.shape[0], out_width(h, kind))


def _backward_fake(grad, h, probs, kind, alpha, limit, linear_offset):
    grad_probs = h.new_empty(0, dtype=torch.float32) if probs is None else torch.empty_like(probs)
    return torch.empty_like(h, memory_format=torch.contiguous_format), grad_probs


def _setup(ctx, inputs, output):
    h, probs, kind, alpha, limit, linear_offset = inputs
    ctx.save_for_backward(h, probs)
    ctx.params = (kind, alpha, limit, linear_offset)


def _backward(ctx, grad):
    h, probs = ctx.saved_tensors
    grad_h, grad_probs = activation_backward(grad.contiguous(), h, probs, *ctx.params)
    return grad_h, grad_probs if probs is not None else None, None, None, None, None


_activation = define(
    "activation(Tensor h, Tensor? probs, str kind, float alpha, float? limit, float linear_offset) -> Tensor",
    validate=_validate, fake=_fake, backward=_backward, setup_context=_setup)
# Its backward has a backward too (gradient penalties, Hessian-vector products, opcheck's aot_dispatch test).
_activation_backward = define(
    "activation_backward(Tensor grad, Tensor h, Tensor? probs, str kind, float alpha, float? limit,"
    " float linear_offset) -> (Tensor, Tensor)",
    validate=_validate_backward, fake=_backward_fake, backward=activation_second_order.double_backward,
    setup_context=activation_second_order.setup_double_backward)



def _with_output_fake(grad, h, probs, kind, alpha, limit, linear_offset):
    return (*_backward_fake(grad, h, probs, kind, alpha, limit, linear_offset), _fake(h, probs, kind, alpha, limit,
                                                                                     linear_offset))


def _with_output_composition(k, grad, h, probs, kind, alpha, limit, linear_offset):
    """What ``activation_backward_with_output`` is, exactly (its autograd differentiates this)."""
    return (*k.activation_backward(grad, h, probs, kind, alpha, limit, linear_offset),
            k.activation(h, probs, kind, alpha, limit, linear_offset))


def _with_output_backward(ctx, *cotangents):
    return vjp_of_composition(_with_output_composition, ctx, cotangents)


# activation_backward and activation in one pass over h (the backward of expert_down needs both).
_activation_backward_with_output = define(
    "activation_backward_with_output(Tensor grad, Tensor h, Tensor? probs, str kind, float alpha, float? limit,"
    " float linear_offset) -> (Tensor, Tensor, Tensor)",
    validate=_validate_backward, fake=_with_output_fake, backward=_with_output_backward,
    setup_context=save_inputs)


def activation(
    h: Tensor,
    probs: Optional[Tensor] = None,
    kind: str = "swiglu",
    alpha: float = 1.702,
    limit: Optional[float] = 7.0,
    linear_offset: float = 1.0,
) -> Tensor:
    """``act(h) * probs`` (see the module docstring); ``alpha``, ``limit``, ``linear_offset`` are quick_geglu's."""
    return _activation(h, probs, kind, float(alpha), None if limit is None else float(limit), float(linear_offset))


def activation_backward(
    grad: Tensor,
    h: Tensor,
    probs: Optional[Tensor],
    kind: str,
    alpha: float = 1.702,
    limit: Optional[float] = 7.0,
    linear_offset: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`activation`: ``grad_h`` (like ``h``) and ``grad_probs`` (like ``probs``; empty when None)."""
    return _activation_backward(grad, h, probs, kind, alpha, limit, linear_offset)


def activation_backward_with_output(grad: Tensor, h: Tensor, probs: Optional[Tensor], kind: str, alpha: float = 1.702,
                                    limit: Optional[float] = 7.0, linear_offset: float = 1.0
                                    ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`activation_backward`'s ``(grad_h, grad_probs)`` and :func:`activation`'s output ``act(h) * probs``,
    from one read of ``h``."""
    return _activation_backward_with_output(grad, h, probs, kind, alpha, limit, linear_offset)
