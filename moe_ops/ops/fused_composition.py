"""The fused ops (``expert_up``, ``expert_down`` and their backwards) written as chains of primitive steps.

One definition, two users: the ``reference`` backend passes its own kernels as the steps (the
oracle of the fused kernels), the ``torch`` backend passes ``torch.ops.moe.*`` with its own
``torch._grouped_mm`` GEMMs (each other step then runs on the best backend for it).  ``k`` is any
object with the attributes gather, combine, grouped_mm, grouped_mm_any_tail, grouped_mm_wgrad,
add_expert_bias, expert_bias_backward, activation and activation_backward, with the ops' signatures.

Rows past ``offsets[-1]`` (pairs that are masked, not routed or not local): every GEMM below
either gets such rows as zeros from ``gather`` and must return them as zeros (``grouped_mm``,
whose output feeds the activation and its backward), or returns rows that nothing reads — the
combine and the weight gradients skip them (``grouped_mm_any_tail``).  A backend may use that to
skip zeroing; for the reference both are ``grouped_mm``.
"""

from __future__ import annotations

import torch


def expert_up(k, x, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit, linear_offset):
    h = k.grouped_mm(k.gather(x, row_of_pair, offsets, None), w1, offsets)
    if b1 is not None:
        h = k.add_expert_bias(h, b1, offsets, None)
    return k.activation(h, probs, kind, alpha, limit, linear_offset), h


def expert_up_backward(k, grad_a, x, h, pair_of_row, row_of_pair, offsets, w1, b1, probs, kind, alpha, limit,
                       linear_offset):
    grad_h, grad_probs = k.activation_backward(grad_a, h, probs, kind, alpha, limit, linear_offset)
    grad_x = k.combine(k.grouped_mm_any_tail(grad_h, w1.transpose(1, 2), offsets), row_of_pair, offsets, None)
    grad_w1 = k.grouped_mm_wgrad(k.gather(x, row_of_pair, offsets, None), grad_h, offsets)
    grad_b1 = x.new_empty(0) if b1 is None else k.expert_bias_backward(grad_h, b1, offsets, None)[0]
    return grad_x, grad_w1, grad_b1, grad_probs


def expert_down(k, a, w2, b2, probs, pair_of_row, row_of_pair, offsets, out_dtype):
    out = k.grouped_mm_any_tail(a, w2, offsets)
    if b2 is not None:
        out = k.add_expert_bias(out, b2, offsets, probs)
    return k.combine(out.to(out_dtype or out.dtype), row_of_pair, offsets, None)


def expert_down_backward(k, grad_y, a, w2, b2, probs, pair_of_row, row_of_pair, offsets):
    grad_out = k.gather(grad_y.to(a.dtype), row_of_pair, offsets, None)  # the rows were in a.dtype
    grad_a = k.grouped_mm(grad_out, w2.transpose(1, 2), offsets)
    grad_w2 = k.grouped_mm_wgrad(a, grad_out, offsets)
    if b2 is None:
        return grad_a, grad_w2, a.new_empty(0), a.new_empty(0, dtype=torch.float32)
    grad_b2, grad_probs = k.expert_bias_backward(grad_out, b2, offsets, probs)
    return grad_a, grad_w2, grad_b2, grad_probs


FUSED_OPS = ("expert_up", "expert_up_backward", "expert_down", "expert_down_backward")


def kernels(k) -> dict:
    """``{op: kernel}`` for the four fused ops, with ``k``'s steps bound."""
    import functools

    return {op: functools.partial(globals()[op], k) for op in FUSED_OPS}
