"""The fused expert block: ``expert_up`` / ``expert_down`` and their backward ops.

Forward, per layer, three launches and no permuted copy of ``x``, no stored ``a``:

* ``expert_up``: one grouped GEMM whose A-load reads token rows of ``x`` in place and whose
  epilogue adds ``b1``; stores ``h``.
* ``expert_down``: one grouped GEMM whose A-load applies the activation and the probability to
  ``h`` (``a`` exists only in registers), with ``p * b2`` in the epilogue, then the deterministic
  float32 gather-reduce ``combine``.

Backward: ``grad_y`` is never permuted either — the dgrad GEMM, the ``w2`` wgrad and the
down-bias reductions read its token rows in place; likewise ``x`` in the ``w1`` wgrad.  ``a`` is
rebuilt from ``h`` by the activation-backward pass itself (one read of ``h``) for the ``w2`` wgrad.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops.backends.triton_kernels import _common as C
from moe_ops.backends.triton_kernels.activation import activation_grads
from moe_ops.backends.triton_kernels.bias import bias_grads
from moe_ops.backends.triton_kernels.grouped_gemm import grouped_gemm
from moe_ops.backends.triton_kernels.permute import combine_rows
from moe_ops.backends.triton_kernels.wgrad import grouped_wgrad
from moe_ops.ops.fused_composition import first_rows, padded_rows


def _flat(probs: Optional[Tensor], rows: int) -> Optional[Tensor]:
    return None if probs is None else probs.reshape(-1)[:rows].contiguous()


@C.kernel_body("expert_up")
def expert_up(
    x: Tensor, pair_of_row: Tensor, row_of_pair: Tensor, offsets: Tensor, w1: Tensor, b1: Optional[Tensor],
    num_rows: Optional[int] = None,
) -> Tensor:
    M = pair_of_row.shape[0] if num_rows is None else num_rows
    pair_of_row, offsets = first_rows(M, pair_of_row, offsets)
    return grouped_gemm(x, w1, offsets, pair_of_row=pair_of_row.contiguous(),
                        bias=None if b1 is None else b1.contiguous(), topk=row_of_pair.shape[1])


@C.kernel_body("expert_down")
def expert_down(
    h: Tensor, w2: Tensor, b2: Optional[Tensor], probs: Optional[Tensor], pair_of_row: Tensor, row_of_pair: Tensor,
    offsets: Tensor, kind: str, alpha: float, limit: Optional[float], linear_offset: float,
    out_dtype: Optional[torch.dtype],
) -> Tensor:
    M = h.shape[0]
    _, offsets = first_rows(M, pair_of_row, offsets)
    # The D-wide rows cannot be summed per token inside the GEMM without atomics (a token's K
    # rows sit in K different experts' tiles), so they go through memory once, in h.dtype.
    out = grouped_gemm(h, w2, offsets, bias=None if b2 is None else b2.contiguous(), probs=_flat(probs, M),
                       act=kind, alpha=alpha, limit=limit, linear_offset=linear_offset)
    return combine_rows(out, row_of_pair, offsets, None, out_dtype)


@C.kernel_body("expert_down_backward")
def expert_down_backward(
    grad_y: Tensor, h: Tensor, w2: Tensor, b2: Optional[Tensor], probs: Optional[Tensor], pair_of_row: Tensor,
    row_of_pair: Tensor, offsets: Tensor, kind: str, alpha: float, limit: Optional[float], linear_offset: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    M, K = h.shape[0], row_of_pair.shape[1]
    pair_of_row, offsets = first_rows(M, pair_of_row, offsets)
    grad_y = grad_y.to(h.dtype).contiguous()  # the GEMMs multiply it with w2 / a
    pair_of_row = pair_of_row.contiguous()
    p = _flat(probs, M)
    grad_a = grouped_gemm(grad_y, w2.transpose(1, 2), offsets, pair_of_row=pair_of_row, topk=K)
    # One pass over h: the activation's gradients and a itself (for the W2 gradient, then dropped).
    grad_h, grad_probs, a = activation_grads(grad_a, h, p, kind, alpha, limit, linear_offset, with_output=True)
    del grad_a
    grad_w2 = grouped_wgrad(a, grad_y, offsets, pair_of_row=pair_of_row, gather_b=True, topk=K)
    del a
    grad_b2 = h.new_empty(0)
    if b2 is not None:
        grad_b2, bias_grad_probs = bias_grads(grad_y, b2, offsets, p, pair_of_row, topk=K)
        if probs is not None:
            grad_probs = grad_probs + bias_grad_probs.reshape(grad_probs.shape)
    if probs is None:
        return grad_h, grad_w2, grad_b2, h.new_empty(0, dtype=torch.float32)
    return grad_h, grad_w2, grad_b2, padded_rows(grad_probs.reshape(-1), probs.numel()).reshape(probs.shape)


@C.kernel_body("expert_up_backward")
def expert_up_backward(
    grad_h: Tensor, x: Tensor, pair_of_row: Tensor, row_of_pair: Tensor, offsets: Tensor, w1: Tensor,
    b1: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    M, K = grad_h.shape[0], row_of_pair.shape[1]
    pair_of_row, offsets = first_rows(M, pair_of_row, offsets)
    grad_rows = grouped_gemm(grad_h, w1.transpose(1, 2), offsets)
    grad_x = combine_rows(grad_rows, row_of_pair, offsets, None)
    grad_w1 = grouped_wgrad(x, grad_h, offsets, pair_of_row=pair_of_row.contiguous(), gather_a=True, topk=K)
    grad_b1 = x.new_empty(0) if b1 is None else bias_grads(grad_h, b1, offsets, None)[0]
    return grad_x, grad_w1, grad_b1
