"""The ``cpu`` backend: the routing, the expert GEMMs and the fused ops on CPU tensors, over the valid rows only.

On the CPU the group offsets already live on the host, so reading them is no synchronisation.
This backend reads the number of valid rows ``n`` (the last offset) and works on exactly those
rows, in blocks of whole groups of about ``BLOCK_ROWS`` rows (so a block's intermediates stay in
cache from one step to the next, as a per-expert loop's do): the block's token rows are gathered
with one ``index_select``, the GEMMs are ``torch._grouped_mm``'s CPU kernel (a loop over the groups
that multiplies only each group's rows), and the combine is a float32 ``index_add_``
(deterministic: rows are added in row order).  The activation and the bias steps are the plain
PyTorch math of ``backends/_elementwise.py``, called directly (no registry round trip per step and
per block).  Rows past ``n`` come out as zeros.

``reference`` remains the oracle: it multiplies every row by every group's matrix and masks
(exact, no host read, any device), which at real shapes costs E times the FLOPs.  Offsets are
clamped into the rows and made non-decreasing before use (as the Triton kernels do), so no
offsets make a kernel read or write out of bounds.  float32, bfloat16 and float16 with 16-byte
rows (``torch._grouped_mm``'s CPU kernel); float64 and odd widths are left to ``reference``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from moe_ops import registry
from moe_ops.backends import _grouped_mm_inputs
from moe_ops.backends._elementwise import (
    acc_dtype,
    activation,
    activation_backward_with_output,
    add_expert_bias,
    cast,
    expert_bias_backward,
)
from moe_ops.registry import Backend

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Rows per block: the fused ops run group by group in blocks of about this many rows, so each
# block's intermediates stay in cache between the steps (as a per-expert loop's do).
BLOCK_ROWS = 512


class _Block(NamedTuple):
    start: int  # first row
    end: int  # one past the last row
    groups: slice  # the block's groups
    ends: Tensor  # their end rows, relative to ``start`` (int32)


def _plan(offsets: Tensor, rows: int) -> tuple[int, Tensor, list]:
    """The number of valid rows ``n``, the group ends (clamped into ``[0, rows]``, non-decreasing; the
    offsets themselves when they already are) and the blocks: consecutive whole groups of at least
    BLOCK_ROWS rows (the last may have fewer) covering rows ``[0, n)`` and every group.  One read of
    the offsets on the host."""
    host = offsets.tolist()
    ends, last = [], 0
    for end in host:
        last = min(max(end, last), rows)
        ends.append(last)
    ends_t = offsets if ends == host else offsets.new_tensor(ends)
    if last < 2 * BLOCK_ROWS:
        return last, ends_t, [_Block(0, last, slice(None), ends_t)]
    blocks, first, start = [], 0, 0
    for g, end in enumerate(ends):
        if end - start >= BLOCK_ROWS or g == len(ends) - 1:
            relative = torch.tensor([e - start for e in ends[first:g + 1]], dtype=torch.int32)
            blocks.append(_Block(start, end, slice(first, g + 1), relative))
            first, start = g + 1, end
    return last, ends_t, blocks


def _rows(t, blk: _Block):
    return None if t is None else t[blk.start:blk.end]


def _tokens(pair_of_row, blk: _Block, topk: int):
    return pair_of_row[blk.start:blk.end] // topk


def _assemble(blocks: list, rows: int, make, widths: tuple, like: Tensor) -> tuple:
    """Tensors ``[rows, width]`` whose rows of block ``b`` are ``make(b)`` (a tuple, one per width) and
    whose other rows are zero; a single block that covers every row is returned as made, with no copy."""
    if len(blocks) == 1 and blocks[0].end == rows:
        return make(blocks[0])
    outs = tuple(like.new_empty(rows, w) for w in widths)
    for blk in blocks:  # the blocks cover rows [0, n) exactly
        for out, part in zip(outs, make(blk)):
            out[blk.start:blk.end] = part
    for out in outs:
        out[blocks[-1].end:].zero_()
    return outs


def _mm(a, b, ends):
    # The weights may be a transposed view: torch._grouped_mm takes row- or column-major matrices.
    return torch._grouped_mm(a.contiguous(), b, offs=ends)


def _wgrad(a, grad, ends):
    return torch._grouped_mm(a.contiguous().t(), grad.contiguous(), offs=ends)


def route(indices, token_mask, expert_start, num_experts):
    # The reference's sort in fewer steps (a small call's host time is its steps): the counts from one
    # bincount (the CPU's is a plain loop: deterministic), the offsets from their int32 cumsum.
    T, K = indices.shape
    local = indices - expert_start if expert_start else indices
    valid = (local >= 0) & (local < num_experts) & token_mask.unsqueeze(1)
    key = torch.where(valid, local, num_experts).reshape(-1)
    pair_of_row = torch.argsort(key, stable=True)
    tokens_per_expert = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    row_of_pair = torch.empty_like(pair_of_row).scatter_(0, pair_of_row, torch.arange(T * K))
    return pair_of_row, row_of_pair.view(T, K), tokens_per_expert, tokens_per_expert.cumsum(0, dtype=torch.int32)


def grouped_mm(a, b, offsets):
    n, ends, _ = _plan(offsets, a.shape[0])
    out = _mm(a, b, ends)
    out[n:].zero_()  # torch._grouped_mm leaves the rows past the last group unwritten
    return out


def grouped_mm_wgrad(a, grad, offsets):
    return _wgrad(a, grad, _plan(offsets, a.shape[0])[1])  # empty groups come back as zeros


def expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows=None):
    M, K = pair_of_row.shape[0] if num_rows is None else num_rows, row_of_pair.shape[1]
    n, _, blocks = _plan(offsets, M)

    def up(blk):
        h = _mm(x.index_select(0, _tokens(pair_of_row, blk, K)), w1[blk.groups], blk.ends)
        if b1 is not None:
            h = add_expert_bias(h, b1[blk.groups], blk.ends, None)
        return (h,)

    h, = _assemble(blocks, M, up, (w1.shape[2],), x)
    return h


def expert_up_backward(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1):
    M, K = grad_h.shape[0], row_of_pair.shape[1]
    n, _, blocks = _plan(offsets, M)
    acc = acc_dtype(x.dtype)
    grad_x = torch.zeros(x.shape, dtype=acc)
    grad_w1 = torch.empty_like(w1)  # the blocks cover every group (an empty one's wgrad is zeros)
    grad_b1 = x.new_empty(0) if b1 is None else torch.empty_like(b1)
    for blk in blocks:
        tokens, gh = _tokens(pair_of_row, blk, K), _rows(grad_h, blk)
        # One float32 sum per token, rows added in row order: deterministic.
        grad_x.index_add_(0, tokens, cast(_mm(gh, w1[blk.groups].transpose(1, 2), blk.ends), acc))
        grad_w1[blk.groups] = _wgrad(x.index_select(0, tokens), gh, blk.ends)
        if b1 is not None:
            grad_b1[blk.groups] = expert_bias_backward(gh, b1[blk.groups], blk.ends, None)[0]
    return cast(grad_x, x.dtype), grad_w1, grad_b1


def expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit, linear_offset, out_dtype):
    M, K = h.shape[0], row_of_pair.shape[1]
    n, _, blocks = _plan(offsets, M)
    y = torch.zeros(row_of_pair.shape[0], w2.shape[2], dtype=acc_dtype(h.dtype))
    for blk in blocks:
        p = _rows(probs, blk)
        a = activation(_rows(h, blk), p, kind, alpha, limit, linear_offset)
        out = _mm(a, w2[blk.groups], blk.ends)
        if b2 is not None:
            out = add_expert_bias(out, b2[blk.groups], blk.ends, p)
        y.index_add_(0, _tokens(pair_of_row, blk, K), cast(out, y.dtype))
    return cast(y, out_dtype or h.dtype)


def expert_down_backward(grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, alpha, limit,
                         linear_offset):
    M, K = h.shape[0], row_of_pair.shape[1]
    n, _, blocks = _plan(offsets, M)
    grad_y = cast(grad_y, h.dtype)  # the rows were in h.dtype before the float32 sum: their gradient is too
    grad_w2 = torch.empty_like(w2)  # the blocks cover every group (an empty one's wgrad is zeros)
    grad_b2 = h.new_empty(0) if b2 is None else torch.empty_like(b2)
    grad_probs = h.new_empty(0, dtype=torch.float32) if probs is None else torch.zeros_like(probs)

    def down_grads(blk):
        g, hb, p = grad_y.index_select(0, _tokens(pair_of_row, blk, K)), _rows(h, blk), _rows(probs, blk)
        # a: rebuilt for the wgrad, not kept
        gh, gp, a = activation_backward_with_output(_mm(g, w2[blk.groups].transpose(1, 2), blk.ends), hb, p, kind,
                                                    alpha, limit, linear_offset)
        grad_w2[blk.groups] = _wgrad(a, g, blk.ends)
        if b2 is not None:
            gb, gp_bias = expert_bias_backward(g, b2[blk.groups], blk.ends, p)
            grad_b2[blk.groups] = gb
            gp = gp if probs is None else gp + gp_bias.reshape(gp.shape)
        if probs is not None:
            grad_probs[blk.start:blk.end] = gp
        return (gh,)

    grad_h, = _assemble(blocks, M, down_grads, (h.shape[1],), h)
    return grad_h, grad_w2, grad_b2, grad_probs


def _input_reasons(op: str, inputs: Optional[registry.Inputs]) -> list[str]:
    if inputs is None:  # asked without inputs (the support table)
        return []
    if op == "route":
        device = inputs.indices.device.type
        return [] if device == "cpu" else [f"inputs are on {device}; needs the CPU"]
    first, second = _grouped_mm_inputs.operands(op, inputs)
    if first.device.type != "cpu":
        return [f"inputs are on {first.device.type}; needs the CPU"]
    reasons = []
    if first.dtype not in _DTYPES:
        reasons.append(f"needs float32, bfloat16 or float16, got {str(first.dtype).replace('torch.', '')}")
    return reasons + _grouped_mm_inputs.unaligned_rows(op, first, second)


def _unavailable() -> list[str]:
    return [] if hasattr(torch, "_grouped_mm") else [f"torch {torch.__version__} has no torch._grouped_mm"]


BACKEND = Backend(
    name="cpu",
    description="CPU tensors: torch._grouped_mm's CPU kernel and index_select / index_add over the valid rows only; "
                "the routing in few steps",
    kernels={
        "route": route, "grouped_mm": grouped_mm, "grouped_mm_wgrad": grouped_mm_wgrad, "expert_up": expert_up,
        "expert_up_backward": expert_up_backward, "expert_down": expert_down,
        "expert_down_backward": expert_down_backward,
    },
    unavailable_reasons=_unavailable,
    input_reasons=_input_reasons,
)
