"""moe::add_expert_bias — per-expert bias rows, optionally weighted by routing probability.

``out[r] = h[r] + p[r] * bias[g(r)]`` for rows of group ``g(r)``; rows past
``offsets[-1]`` are copied unchanged.  The backward is its own op
(``moe::expert_bias_backward``): a per-group reduction, deterministic, no atomics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define


def _validate(h: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor]) -> None:
    _checks.tensor("h", h, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("bias", bias, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.offsets("offsets", offsets, bias.shape[0])
    _checks.size("bias", bias.shape[1], h.shape[1], "width (dim 1) equal to dim 1 of h")
    _checks.row_probs("probs", probs, h.shape[0])
    _checks.same_device(h=h, bias=bias, offsets=offsets, probs=probs)


def _add_fake(h, bias, offsets, probs):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _backward_fake(grad, bias, offsets, probs):
    grad_probs = grad.new_empty(0, dtype=torch.float32) if probs is None else torch.empty_like(probs)
    return torch.empty_like(bias, memory_format=torch.contiguous_format), grad_probs


def _setup(ctx, inputs, output):
    h, bias, offsets, probs = inputs
    ctx.save_for_backward(bias, offsets, probs)


def _backward(ctx, grad):
    bias, offsets, probs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_bias, grad_probs = expert_bias_backward(grad, bias, offsets, probs)
    return grad, grad_bias, None, grad_probs if probs is not None else None


def _bias_backward_setup(ctx, inputs, output):
    grad, bias, offsets, probs = inputs
    ctx.save_for_backward(grad, bias, offsets, probs)


def _bias_double_backward(ctx, gg_bias, gg_probs):
    # grad_bias[g] = sum_r p[r] grad[r] and grad_probs[r] = <grad[r], bias[g(r)]> are bilinear:
    # each cotangent maps back through add_expert_bias / expert_bias_backward themselves.
    grad, bias, offsets, probs = ctx.saved_tensors
    gg_bias = gg_bias.contiguous()
    d_grad = d_bias = d_probs = None
    if ctx.needs_input_grad[0]:
        d_grad = add_expert_bias(grad.new_zeros(grad.shape), gg_bias, offsets, probs)
        if probs is not None:
            d_grad = add_expert_bias(d_grad, bias, offsets, gg_probs.reshape(probs.shape))
    if probs is not None and ctx.needs_input_grad[1]:
        d_bias = expert_bias_backward(grad, bias, offsets, gg_probs.reshape(probs.shape))[0]
    if probs is not None and ctx.needs_input_grad[3]:
        d_probs = expert_bias_backward(grad, gg_bias, offsets, probs)[1]
    return d_grad, d_bias, None, d_probs


_add_expert_bias = define("add_expert_bias(Tensor h, Tensor bias, Tensor offsets, Tensor? probs) -> Tensor",
                          validate=_validate, fake=_add_fake, backward=_backward, setup_context=_setup)
_expert_bias_backward = define(
    "expert_bias_backward(Tensor grad, Tensor bias, Tensor offsets, Tensor? probs) -> (Tensor, Tensor)",
    validate=_validate, fake=_backward_fake, backward=_bias_double_backward, setup_context=_bias_backward_setup)


def add_expert_bias(h: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor] = None) -> Tensor:
    """``h [N, C] + probs[r] * bias[g(r)]`` per row of expert ``g(r)`` (``bias [G, C]``, ``probs [N]`` or ``[N, 1]``).

    Computed in float32, rounded once to ``h.dtype``.
    """
    return _add_expert_bias(h, bias, offsets, probs)


def expert_bias_backward(
    grad: Tensor, bias: Tensor, offsets: Tensor, probs: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`add_expert_bias`.

    ``grad_bias [G, C]``: per-group sums of ``probs[r] * grad[r]`` (fixed order, no atomics);
    ``grad_probs``: ``<grad[r], bias[g(r)]>`` shaped like ``probs`` (0 past the last group),
    or an empty float32 tensor when ``probs`` is None.
    """
    return _expert_bias_backward(grad, bias, offsets, probs)
