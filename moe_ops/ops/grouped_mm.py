"""moe::grouped_mm and moe::grouped_mm_wgrad — the expert GEMMs.

Rows ``offsets[g-1] .. offsets[g]-1`` of ``a`` belong to group ``g``
(``offsets`` int32, cumulative ends).  Rows past ``offsets[-1]`` belong to no
group and come out as zeros, never garbage.  Accumulation is in float32 (or
float64 for float64 inputs); outputs have the inputs' dtype.
"""

from __future__ import annotations

from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define


def _validate_mm(a: Tensor, b: Tensor, offsets: Tensor) -> None:
    _checks.tensor("a", a, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("b", b, dim=3)
    _checks.same_dtype("b", b, "a", a)
    _checks.offsets("offsets", offsets, b.shape[0])
    _checks.size("b", b.shape[1], a.shape[1], "inner size (dim 1) equal to dim 1 of a")
    _checks.same_device(a=a, b=b, offsets=offsets)


def _validate_wgrad(a: Tensor, grad: Tensor, offsets: Tensor) -> None:
    _checks.tensor("a", a, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.tensor("grad", grad, dim=2)
    _checks.same_dtype("grad", grad, "a", a)
    _checks.offsets("offsets", offsets)
    _checks.size("grad", grad.shape[0], a.shape[0], "number of rows (dim 0 of a)")
    _checks.same_device(a=a, grad=grad, offsets=offsets)


def _mm_fake(a, b, offsets):
    return a.new_empty(a.shape[0], b.shape[2])


def _wgrad_fake(a, grad, offsets):
    return a.new_empty(offsets.shape[0], a.shape[1], grad.shape[1])


def _setup(ctx, inputs, output):
    first, second, offsets = inputs
    ctx.save_for_backward(first, second, offsets)


def _grouped_mm_backward(ctx, grad):
    a, b, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grouped_mm(grad, b.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_b = grouped_mm_wgrad(a, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


def _wgrad_backward(ctx, grad_w):
    # W[g] = a_g^T @ d_g, so dL/da_g = d_g @ grad_w[g]^T and dL/dd_g = a_g @ grad_w[g].
    a, d, offsets = ctx.saved_tensors
    grad_w = grad_w.contiguous()
    grad_a = grouped_mm(d, grad_w.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_d = grouped_mm(a, grad_w, offsets) if ctx.needs_input_grad[1] else None
    return grad_a, grad_d, None


_grouped_mm = define("grouped_mm(Tensor a, Tensor b, Tensor offsets) -> Tensor", validate=_validate_mm,
                     fake=_mm_fake, backward=_grouped_mm_backward, setup_context=_setup)
_grouped_mm_wgrad = define("grouped_mm_wgrad(Tensor a, Tensor grad, Tensor offsets) -> Tensor",
                           validate=_validate_wgrad, fake=_wgrad_fake, backward=_wgrad_backward, setup_context=_setup)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """``[M, K] x [G, K, N] -> [M, N]``: each group's rows times its own matrix; rows past ``offsets[-1]`` are 0."""
    return _grouped_mm(a, b, offsets)


def grouped_mm_wgrad(a: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """``[M, K]^T [M, N] -> [G, K, N]``: per group ``a_g^T @ grad_g`` (the weight gradient); empty groups give 0."""
    return _grouped_mm_wgrad(a, grad, offsets)


# ---- clear_tail_: zero the rows past the last group, in place ------------------------------------

def _validate_clear_tail(rows: Tensor, offsets: Tensor) -> None:
    _checks.tensor("rows", rows, dim=2, dtypes=_checks.FLOAT_DTYPES)
    _checks.offsets("offsets", offsets)
    _checks.same_device(rows=rows, offsets=offsets)


_clear_tail_ = define("clear_tail_(Tensor(a0!) rows, Tensor offsets) -> ()", validate=_validate_clear_tail,
                      fake=lambda rows, offsets: None)


def clear_tail_(rows: Tensor, offsets: Tensor) -> Tensor:
    """Zero the rows of ``rows [M, N]`` from ``offsets[-1]`` on, in place, and return ``rows``.

    For a GEMM that computed only its groups' rows (CUTLASS leaves the others unwritten).  The
    Triton kernel touches only those rows, so the cost follows the tail, not ``M``: expert
    parallelism with static shapes hands the expert block mostly tail rows."""
    _clear_tail_(rows, offsets)
    return rows
