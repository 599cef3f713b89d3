"""The fused ops (``expert_up``, ``expert_down`` and their backwards) written as chains of primitive steps.

One definition, two users: the ``reference`` backend passes its own kernels as the steps (the
oracle of the fused kernels), the ``torch`` backend passes ``torch.ops.moe.*`` with its own
``torch._grouped_mm`` GEMMs (each other step then runs on the best backend for it).  ``k`` is any
object with the attributes gather, combine, grouped_mm, grouped_mm_any_tail, grouped_mm_wgrad,
add_expert_bias, expert_bias_backward, activation, activation_backward and activation_backward_with_output,
with the ops' signatures.

Rows past ``offsets[-1]`` (pairs that are masked, not routed or not local): every GEMM below
either gets such rows as zeros from ``gather`` and must return them as zeros (``grouped_mm``,
whose output feeds the activation and its backward), or returns rows that nothing reads — the
combine and the weight gradients skip them (``grouped_mm_any_tail``).  A backend may use that to
skip zeroing; for the reference both are ``grouped_mm``.

``num_rows`` (``expert_up``; the others read it from their ``h`` / ``grad_h``): only the first rows of the
expert-sorted order exist (the expert-parallel receiver runs exactly its valid pairs); the groups are
cut at it (:func:`first_rows`) and the probability gradients of the dropped rows are zero.
"""

from __future__ import annotations

import torch


def first_rows(rows: int, pair_of_row, offsets):
    """The routing of the first ``rows`` expert-sorted rows (the fused ops' ``num_rows``): pairs whose row
    is past them are dropped, so the groups end at ``min(offsets, rows)``.  No copy for all T*K rows."""
    if rows == pair_of_row.shape[0]:
        return pair_of_row, offsets
    return pair_of_row[:rows], offsets.clamp(max=rows)


def padded_rows(t, rows: int):
    """``t`` (per-row values of the first rows) with zeros for the dropped rows, ``rows`` in all (dim 0)."""
    return t if t.shape[0] == rows else torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1) + (0, rows - t.shape[0]))


def _probs(probs, rows: int):
    return None if probs is None else probs[:rows]


def expert_up(k, x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows=None):
    M = pair_of_row.shape[0] if num_rows is None else num_rows
    _, offsets = first_rows(M, pair_of_row, offsets)
    h = k.grouped_mm(k.gather(x, row_of_pair, offsets, None, M), w1, offsets)
    return h if b1 is None else k.add_expert_bias(h, b1, offsets, None)


def expert_up_backward(k, grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1):
    M = grad_h.shape[0]
    _, offsets = first_rows(M, pair_of_row, offsets)
    grad_x = k.combine(k.grouped_mm_any_tail(grad_h, w1.transpose(1, 2), offsets), row_of_pair, offsets, None)
    grad_w1 = k.grouped_mm_wgrad(k.gather(x, row_of_pair, offsets, None, M), grad_h, offsets)
    grad_b1 = x.new_empty(0) if b1 is None else k.expert_bias_backward(grad_h, b1, offsets, None)[0]
    return grad_x, grad_w1, grad_b1


def expert_down(k, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit, linear_offset,
                out_dtype):
    M = h.shape[0]
    _, offsets = first_rows(M, pair_of_row, offsets)
    probs = _probs(probs, M)
    out = k.grouped_mm_any_tail(k.activation(h, probs, kind, alpha, limit, linear_offset), w2, offsets)
    if b2 is not None:
        out = k.add_expert_bias(out, b2, offsets, probs)
    return k.combine(out.to(out_dtype or out.dtype), row_of_pair, offsets, None)


def expert_down_backward(k, grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit,
                         linear_offset):
    """``grad_a = G @ w2^T`` with ``G = gather(grad_y)``; the activation's backward on ``grad_a`` gives
    ``grad_h`` and the probabilities' gradient (plus the bias term's) and, from the same read of ``h``,
    ``a`` again for ``grad_w2`` (then dropped).  Transients are released as soon as they are used."""
    M = h.shape[0]
    _, offsets = first_rows(M, pair_of_row, offsets)
    p = _probs(probs, M)
    G = k.gather(grad_y.to(h.dtype), row_of_pair, offsets, None, M)  # the rows were in h.dtype
    # One pass over h gives the activation's gradients and a itself (for the W2 gradient).
    grad_h, grad_probs, a = k.activation_backward_with_output(k.grouped_mm(G, w2.transpose(1, 2), offsets), h, p,
                                                              kind, alpha, limit, linear_offset)
    grad_w2 = k.grouped_mm_wgrad(a, G, offsets)
    del a
    grad_b2, bias_grad_probs = h.new_empty(0), None
    if b2 is not None:
        grad_b2, bias_grad_probs = k.expert_bias_backward(G, b2, offsets, p)
    del G
    if probs is None:
        return grad_h, grad_w2, grad_b2, h.new_empty(0, dtype=torch.float32)
    if bias_grad_probs is not None:
        grad_probs = grad_probs + bias_grad_probs.reshape(grad_probs.shape)
    return grad_h, grad_w2, grad_b2, padded_rows(grad_probs, probs.shape[0])


FUSED_OPS = ("expert_up", "expert_up_backward", "expert_down", "expert_down_backward")


def kernels(k) -> dict:
    """``{op: kernel}`` for the four fused ops, with ``k``'s steps bound."""
    import functools

    return {op: functools.partial(globals()[op], k) for op in FUSED_OPS}
