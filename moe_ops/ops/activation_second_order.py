"""The autograd formula of ``moe::activation_backward`` (the activation's double backward).

``activation_backward(grad, h, probs)`` returns ``grad_h = J(h)^T (grad * p)`` and
``grad_probs = sum_cols(grad * act(h))``.  Its own gradient needs the activation's
second derivatives, written here in closed form with elementwise ATen ops (no host
reads, traceable), in float32 (float64 for float64 inputs).  Every gated activation
is ``A(x, y) = q(x) * (y + offset)`` with ``q(z) = z * sigmoid(a * z)``: swiglu is
``a = 1, offset = 0`` without clamps; quick_geglu and swigluoai (the same on concatenated columns) clamp
``x <= limit``, ``|y| <= limit``; geglu's ``q`` is tanh-approximated GELU, ``offset = 0``, no clamps.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops.ops.activation_kinds import merge_gate_up, split_gate_up, tanh_gelu


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _sigmoid_q(x: Tensor, a: float):
    """``q, q', q''`` of ``q(x) = x sigmoid(a x)``."""
    s = torch.sigmoid(a * x)
    return x * s, s + a * x * s * (1 - s), a * s * (1 - s) * (2 + a * x * (1 - 2 * s))


def _gated_derivatives(x: Tensor, y: Tensor, kind: str, alpha: float, limit, linear_offset: float):
    """``A, A_x, A_y, A_xx, A_xy`` of ``A(x, y) = q(x) (y + offset)`` (``A_yy = 0``)."""
    clamped = kind in ("quick_geglu", "swigluoai")
    offset = linear_offset if clamped else 0.0
    limit = limit if clamped else None
    if limit is not None:
        x_in, y_in = x <= limit, (y >= -limit) & (y <= limit)
        x, y = x.clamp(max=limit), y.clamp(-limit, limit)
    q, q1, q2 = tanh_gelu(x, second=True) if kind == "geglu" else _sigmoid_q(x, alpha if clamped else 1.0)
    y_off = y + offset
    A, A_x, A_y, A_xx, A_xy = q * y_off, q1 * y_off, q, q2 * y_off, q1
    if limit is not None:
        A_x, A_xx = torch.where(x_in, A_x, 0), torch.where(x_in, A_xx, 0)
        A_y, A_xy = torch.where(y_in, A_y, 0), torch.where(x_in & y_in, A_xy, 0)
    return A, A_x, A_y, A_xx, A_xy


def setup_double_backward(ctx, inputs, output):
    grad, h, probs, kind, alpha, limit, linear_offset = inputs
    ctx.save_for_backward(grad, h, probs)
    ctx.params = (kind, alpha, limit, linear_offset)


def double_backward(ctx, gg_h: Tensor, gg_probs: Tensor):
    """Cotangents ``gg_h`` (of ``grad_h``) and ``gg_probs`` (of ``grad_probs``) -> grads of grad, h, probs."""
    grad, h, probs = ctx.saved_tensors
    d_grad, d_h, d_probs = activation_double_backward(grad, h, probs, *ctx.params, gg_h, gg_probs,
                                                      probs_grad=ctx.needs_input_grad[2])
    return d_grad, d_h, d_probs, None, None, None, None


def activation_double_backward(grad: Tensor, h: Tensor, probs, kind: str, alpha: float, limit, linear_offset: float,
                               gg_h: Tensor, gg_probs, probs_grad: bool = True):
    """The vector-Jacobian product of ``activation_backward(grad, h, probs)`` with the cotangents
    ``gg_h`` and ``gg_probs`` (ignored when ``probs`` is None): ``(d_grad, d_h, d_probs or None)``."""
    acc = _acc(h.dtype)
    g, hh, gg = grad.to(acc), h.to(acc), gg_h.to(acc)
    p = 1.0 if probs is None else probs.reshape(-1, 1).to(acc)
    gp = None if probs is None else gg_probs.reshape(-1, 1).to(acc)
    u = g * p
    if kind == "relu2":
        r = torch.relu(hh)
        A, A_h = r * r, 2 * r
        along = gg * A_h  # J(h) gg_h
        d_h = u * gg * 2 * (hh > 0)
        if gp is not None:
            d_h = d_h + gp * g * A_h
    else:
        x, y = split_gate_up(hh, kind)
        gx, gy = split_gate_up(gg, kind)
        A, A_x, A_y, A_xx, A_xy = _gated_derivatives(x, y, kind, alpha, limit, linear_offset)
        along = gx * A_x + gy * A_y
        d_x, d_y = u * (gx * A_xx + gy * A_xy), u * gx * A_xy
        if gp is not None:
            d_x, d_y = d_x + gp * g * A_x, d_y + gp * g * A_y
        d_h = merge_gate_up(d_x, d_y, kind)
    d_grad = p * along if gp is None else p * along + gp * A
    d_probs = None
    if probs is not None and probs_grad:
        d_probs = (g * along).sum(1).reshape(probs.shape).to(probs.dtype)
    return d_grad.to(grad.dtype), d_h.to(h.dtype), d_probs
