"""The rare autograd paths of the fused ops: the double backward of ``moe::expert_up_backward`` and
``moe::expert_down_backward``, and ``expert_up``'s backward when its output ``h`` has a gradient.

Each backward op is, exactly, a composition of unfused ops (see ``moe_ops/backends/reference.py``);
its vector-Jacobian product is written here with those ops, which are differentiable themselves
(so higher orders work too).  Rare (gradient penalties, Hessian-vector products), so clarity
beats fusion.  With fewer rows than T*K (``expert_up``'s ``num_rows``) the groups are cut at them and
the probabilities' rows past them get zero gradients, as in ``fused_composition``.  Notation: ``G = gather(grad_y)``, ``X = gather(x)``, ``u_*`` the cotangent of ``grad_*``.
"""

from __future__ import annotations

from moe_ops.ops.activation import activation_backward
from moe_ops.ops.activation_second_order import activation_double_backward
from moe_ops.ops.bias import add_expert_bias, expert_bias_backward
from moe_ops.ops.fused_composition import first_rows, padded_rows
from moe_ops.ops.grouped_mm import grouped_mm, grouped_mm_wgrad
from moe_ops.ops.permute import combine, gather


def _used(t):
    return t is not None and t.numel() > 0


def _cut(rows, row_of_pair, offsets, probs):
    """The groups and the probabilities of the first ``rows`` expert-sorted rows."""
    _, offsets = first_rows(rows, row_of_pair.reshape(-1), offsets)
    return offsets, None if probs is None else probs[:rows]


def _padded(grad_probs, probs):
    return None if grad_probs is None or probs is None else padded_rows(grad_probs, probs.shape[0])


# ---- expert_down_backward -> (grad_a, grad_w2, grad_b2, grad_probs) -----------------------------
#   grad_a = mm(G, w2^T), grad_w2 = wgrad(a, G), grad_b2 = sum_g p*G, grad_probs = <G, b2[g]>


def down_setup(ctx, inputs, output):
    grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets = inputs
    ctx.save_for_backward(grad_y, a, w2, b2, probs, row_of_pair, offsets)


def down_double_backward(ctx, u_a, u_w2, u_b2, u_probs):
    grad_y, a, w2, b2, all_probs, row_of_pair, offsets = ctx.saved_tensors
    M = a.shape[0]
    offsets, probs = _cut(M, row_of_pair, offsets, all_probs)
    G = gather(grad_y, row_of_pair, offsets, None, M)
    u_a, u_w2 = u_a.contiguous(), u_w2.contiguous()
    d_G = grouped_mm(u_a, w2, offsets) + grouped_mm(a, u_w2, offsets)
    d_b2 = d_probs = None
    if b2 is not None:
        if _used(u_b2):
            d_G = add_expert_bias(d_G, u_b2.contiguous(), offsets, probs)
        if probs is not None and _used(u_probs):
            u_probs = u_probs.reshape(all_probs.shape)[:M]
            d_G = add_expert_bias(d_G, b2, offsets, u_probs)
            d_b2 = expert_bias_backward(G, b2, offsets, u_probs)[0]
        if probs is not None and _used(u_b2):
            d_probs = _padded(expert_bias_backward(G, u_b2.contiguous(), offsets, probs)[1], all_probs)
    d_grad_y = combine(d_G, row_of_pair, offsets)
    d_a = grouped_mm(G, u_w2.transpose(1, 2), offsets)
    d_w2 = grouped_mm_wgrad(u_a, G, offsets)
    return d_grad_y, d_a, d_w2, d_b2, d_probs, None, None, None


# ---- expert_up_backward -> (grad_x, grad_w1, grad_b1, grad_probs) -------------------------------
#   (grad_h, grad_probs) = activation_backward(grad_a, h, p); grad_x = combine(mm(grad_h, w1^T));
#   grad_w1 = wgrad(X, grad_h); grad_b1 = per-group sums of grad_h


def up_setup(ctx, inputs, output):
    grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, *params = inputs
    grad_x, grad_w1, grad_b1, grad_probs = output
    ctx.save_for_backward(grad_a, x, h, row_of_pair, offsets, w1, b1, probs)
    ctx.params = params


def up_double_backward(ctx, u_x, u_w1, u_b1, u_probs):
    grad_a, x, h, row_of_pair, offsets, w1, b1, all_probs = ctx.saved_tensors
    M = h.shape[0]
    offsets, probs = _cut(M, row_of_pair, offsets, all_probs)
    grad_h, _ = activation_backward(grad_a, h, probs, *ctx.params)
    X = gather(x, row_of_pair, offsets, None, M)
    U = gather(u_x.contiguous(), row_of_pair, offsets, None, M)
    u_w1 = u_w1.contiguous()
    d_grad_h = grouped_mm(U, w1, offsets) + grouped_mm(X, u_w1, offsets)
    if b1 is not None and _used(u_b1):
        d_grad_h = add_expert_bias(d_grad_h, u_b1.contiguous(), offsets)
    d_x = combine(grouped_mm(grad_h, u_w1.transpose(1, 2), offsets), row_of_pair, offsets)
    d_w1 = grouped_mm_wgrad(U, grad_h, offsets)
    u_probs = u_probs.reshape(all_probs.shape)[:M] if probs is not None and _used(u_probs) else None
    if probs is not None and u_probs is None:
        u_probs = probs.new_zeros(probs.shape)
    d_grad_a, d_h, d_probs = activation_double_backward(grad_a, h, probs, *ctx.params, d_grad_h.to(h.dtype), u_probs,
                                                        probs_grad=probs is not None and ctx.needs_input_grad[8])
    return d_grad_a, d_x, d_h, None, None, None, d_w1, None, _padded(d_probs, all_probs), None, None, None, None


def up_backward_with_grad_h(grad_a, grad_h, x, h, row_of_pair, offsets, w1, b1, all_probs, params):
    """``expert_up``'s gradients when ``h`` has a cotangent too: the activation's ``grad_h`` plus it."""
    M = h.shape[0]
    offsets, probs = _cut(M, row_of_pair, offsets, all_probs)
    grad_probs = None
    if grad_a is not None:
        act_grad_h, grad_probs = activation_backward(grad_a.contiguous(), h, probs, *params)
        grad_h = grad_h + act_grad_h
    grad_h = grad_h.contiguous()
    grad_x = combine(grouped_mm(grad_h, w1.transpose(1, 2), offsets), row_of_pair, offsets)
    grad_w1 = grouped_mm_wgrad(gather(x, row_of_pair, offsets, None, M), grad_h, offsets)
    grad_b1 = None if b1 is None else expert_bias_backward(grad_h, b1, offsets)[0]
    return grad_x, grad_w1, grad_b1, _padded(grad_probs, all_probs)
