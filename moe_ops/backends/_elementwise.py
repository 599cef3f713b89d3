"""The expert block's elementwise math in plain PyTorch: the activations' closed forms and their
backward, and the per-expert bias (with the routing probability), accumulated in float32 (float64
for float64 inputs), any device, no host synchronisation.

These are the ``reference`` backend's kernels for those ops, and the ``cpu`` backend composes its
fused ops from them directly (one function call, not a registry round trip per step).  A helper
of those backends, not a backend: neither imports the other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moe_ops.ops.activation_kinds import merge_gate_up, split_gate_up, tanh_gelu


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``; ``t`` itself, without the call, when it has that dtype (most calls: small ones pay it)."""
    return t if t.dtype is dtype else t.to(dtype)


def group_of_rows(offsets: Tensor, rows: int) -> Tensor:
    """Group id of each row; rows past the last offset get ``len(offsets)``."""
    r = torch.arange(rows, device=offsets.device, dtype=offsets.dtype)
    return torch.searchsorted(offsets, r, right=True)


def _bias_rows(bias, offsets, rows):
    group = group_of_rows(offsets, rows)
    valid = (group < bias.shape[0]).unsqueeze(1)
    return cast(bias, acc_dtype(bias.dtype))[group.clamp(max=bias.shape[0] - 1)], valid, group


def add_expert_bias(h, bias, offsets, probs):
    b_rows, valid, _ = _bias_rows(bias, offsets, h.shape[0])
    acc = acc_dtype(h.dtype)
    if probs is not None:
        b_rows = cast(b_rows, acc) * cast(probs.reshape(-1, 1), acc)
    return cast(cast(h, acc) + torch.where(valid, cast(b_rows, acc), 0), h.dtype).contiguous()


def expert_bias_backward(grad, bias, offsets, probs):
    b_rows, valid, group = _bias_rows(bias, offsets, grad.shape[0])
    acc = acc_dtype(grad.dtype)
    g = cast(grad, acc)
    gp = g if probs is None else g * cast(probs.reshape(-1, 1), acc)
    grad_bias = torch.stack([torch.where(group.unsqueeze(1) == e, gp, 0).sum(0) for e in range(bias.shape[0])])
    if probs is None:
        grad_probs = grad.new_empty(0, dtype=torch.float32)
    else:
        dots = torch.where(valid, g * cast(b_rows, acc), 0).sum(1)
        grad_probs = cast(dots, probs.dtype).reshape(probs.shape)
    return cast(grad_bias, bias.dtype), grad_probs


def _act_forward_backward(h, kind, alpha, limit, linear_offset, d_out=None):
    """act(h) and, when ``d_out`` is given, d act / d h applied to it (closed forms)."""
    if kind == "relu2":
        r = torch.relu(h)
        return r * r, None if d_out is None else d_out * 2 * r
    gate, up = split_gate_up(h, kind)
    if kind == "geglu":
        gelu, d_gelu = tanh_gelu(gate)
        if d_out is None:
            return gelu * up, None
        return gelu * up, merge_gate_up(d_out * up * d_gelu, d_out * gelu, kind)
    if kind == "swiglu":
        s = torch.sigmoid(gate)
        silu = gate * s
        if d_out is None:
            return silu * up, None
        return silu * up, merge_gate_up(d_out * up * s * (1 + gate * (1 - s)), d_out * silu, kind)
    # quick_geglu, swigluoai (the same math; the layout differs in split_gate_up)
    gate_mask = up_mask = None
    if limit is not None:
        gate_mask, up_mask = gate <= limit, (up >= -limit) & (up <= limit)
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    s = torch.sigmoid(alpha * gate)
    glu = gate * s
    out = glu * (up + linear_offset)
    if d_out is None:
        return out, None
    d_gate = d_out * (up + linear_offset) * s * (1 + alpha * gate * (1 - s))
    d_up = d_out * glu
    if limit is not None:
        d_gate, d_up = torch.where(gate_mask, d_gate, 0), torch.where(up_mask, d_up, 0)
    return out, merge_gate_up(d_gate, d_up, kind)


def activation(h, probs, kind, alpha, limit, linear_offset):
    acc = acc_dtype(h.dtype)
    out, _ = _act_forward_backward(cast(h, acc), kind, alpha, limit, linear_offset)
    if probs is not None:
        out = out * cast(probs.reshape(-1, 1), acc)
    return cast(out, h.dtype).contiguous()


def _backward(grad, h, probs, kind, alpha, limit, linear_offset):
    """``grad_h``, ``grad_probs``, and ``act(h)`` and the probabilities in the accumulation dtype, from one
    evaluation of the closed forms."""
    acc = acc_dtype(h.dtype)
    g = cast(grad, acc)
    p = None if probs is None else cast(probs.reshape(-1, 1), acc)
    out, grad_h = _act_forward_backward(cast(h, acc), kind, alpha, limit, linear_offset, g if p is None else g * p)
    if p is None:
        grad_probs = h.new_empty(0, dtype=torch.float32)
    else:
        grad_probs = cast((g * out).sum(1), probs.dtype).reshape(probs.shape)
    return cast(grad_h, h.dtype).contiguous(), grad_probs, out, p


def activation_backward(grad, h, probs, kind, alpha, limit, linear_offset):
    return _backward(grad, h, probs, kind, alpha, limit, linear_offset)[:2]


def activation_backward_with_output(grad, h, probs, kind, alpha, limit, linear_offset):
    grad_h, grad_probs, out, p = _backward(grad, h, probs, kind, alpha, limit, linear_offset)
    return grad_h, grad_probs, cast(out if p is None else out * p, h.dtype).contiguous()
