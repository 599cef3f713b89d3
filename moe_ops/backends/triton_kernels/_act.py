"""Activation math and the gate/up column layout, shared by the activation kernels and the
GEMM prologue (one definition of each formula).

``h`` columns of output column block ``n0 .. n0+BN-1`` (of ``a``, width I) are held as
one or two tiles, the same way in memory loads, GEMM accumulators and stores:

* ``swiglu``, ``swigluoai``, ``geglu`` (concatenated): tile0 = gate columns ``n0 + j``, tile1 = up columns ``I + n0 + j``;
* ``quick_geglu`` (interleaved): tile0 = the ``2*BN`` contiguous columns ``2*n0 ..``,
  gate and up alternating (one contiguous load / one GEMM tile, split in registers);
* ``relu2`` / no activation: tile0 = columns ``n0 + j``.

All math in float32; NaN propagates through the clamps (``propagate_nan``), as in torch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_ops.backends.triton_kernels._common import GEGLU, QUICK_GEGLU, SWIGLU, SWIGLUOAI
from moe_ops.ops import activation_kinds

NAN_ALL = tl.constexpr(tl.PropagateNan.ALL)
GELU_C = tl.constexpr(activation_kinds.GELU_C)
GELU_B = tl.constexpr(activation_kinds.GELU_B)


def tile0_width(kind: int, block_n: int) -> int:
    """Columns of tile0 for ``block_n`` output columns."""
    return 2 * block_n if kind == 2 else block_n


@triton.jit
def h_columns(n0, I, KIND: tl.constexpr, BN: tl.constexpr, BN0: tl.constexpr):
    """``(cols0 [BN0], mask0, cols1 [BN], mask1)``: the h columns of tile0 and tile1."""
    out_cols = n0 + tl.arange(0, BN)
    if KIND == QUICK_GEGLU:
        cols0 = 2 * n0 + tl.arange(0, BN0)
        return cols0, cols0 < 2 * I, out_cols, out_cols < I
    else:
        return out_cols, out_cols < I, out_cols + I, out_cols < I


@triton.jit
def gate_up(tile0, tile1, KIND: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """gate, up ``[BR, BN]`` from the tiles (relu2: up is unused)."""
    if KIND == QUICK_GEGLU:
        gate, up = tl.split(tl.reshape(tile0, (BR, BN, 2)))
        return gate, up
    elif KIND == SWIGLU or KIND == SWIGLUOAI or KIND == GEGLU:
        return tile0, tile1
    else:
        return tile0, tile0


@triton.jit
def h_tiles(gate, up, KIND: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr):
    """The inverse of :func:`gate_up` (e.g. to store ``grad_h``)."""
    if KIND == QUICK_GEGLU:
        return tl.reshape(tl.join(gate, up), (BR, 2 * BN)), up
    else:
        return gate, up


@triton.jit
def _clamp_quick(gate, up, limit, HAS_LIMIT: tl.constexpr):
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit, propagate_nan=NAN_ALL)
        up = tl.minimum(tl.maximum(up, -limit, propagate_nan=NAN_ALL), limit, propagate_nan=NAN_ALL)
    return gate, up


@triton.jit
def _gelu_sigmoid(gate):
    """``sigmoid(2 k(gate))``: tanh-approximated GELU is ``gate`` times it (``0.5 (1 + tanh k) = sigmoid(2k)``)."""
    return tl.sigmoid(2.0 * GELU_C * (gate + GELU_B * gate * gate * gate))


@triton.jit
def act_forward(gate, up, alpha, limit, linear_offset, KIND: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """``act(h)`` from float32 gate/up."""
    if KIND == SWIGLU:
        return gate * tl.sigmoid(gate) * up
    elif KIND == QUICK_GEGLU or KIND == SWIGLUOAI:
        gate, up = _clamp_quick(gate, up, limit, HAS_LIMIT)
        return gate * tl.sigmoid(alpha * gate) * (up + linear_offset)
    elif KIND == GEGLU:
        return gate * _gelu_sigmoid(gate) * up
    else:
        r = tl.maximum(gate, 0.0, propagate_nan=NAN_ALL)
        return r * r


@triton.jit
def act_backward(gate, up, d_out, alpha, limit, linear_offset, KIND: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """``(act(h), d_gate, d_up)`` for the output gradient ``d_out`` (relu2: d_up is unused)."""
    if KIND == SWIGLU:
        s = tl.sigmoid(gate)
        silu = gate * s
        return silu * up, d_out * up * s * (1.0 + gate * (1.0 - s)), d_out * silu
    elif KIND == QUICK_GEGLU or KIND == SWIGLUOAI:
        gate_kept = gate <= limit
        up_kept = (up >= -limit) & (up <= limit)
        gate, up = _clamp_quick(gate, up, limit, HAS_LIMIT)
        s = tl.sigmoid(alpha * gate)
        glu = gate * s
        d_gate = d_out * (up + linear_offset) * s * (1.0 + alpha * gate * (1.0 - s))
        d_up = d_out * glu
        if HAS_LIMIT:
            d_gate = tl.where(gate_kept, d_gate, 0.0)
            d_up = tl.where(up_kept, d_up, 0.0)
        return glu * (up + linear_offset), d_gate, d_up
    elif KIND == GEGLU:
        s = _gelu_sigmoid(gate)
        gelu = gate * s
        k1 = GELU_C * (1.0 + 3.0 * GELU_B * gate * gate)
        return gelu * up, d_out * up * (s + 2.0 * gate * k1 * s * (1.0 - s)), d_out * gelu
    else:
        r = tl.maximum(gate, 0.0, propagate_nan=NAN_ALL)
        d = d_out * 2.0 * r
        return r * r, d, d


@triton.jit
def load_h(h_rows, row_ok, n0, I, KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, BC0: tl.constexpr):
    """gate, up ``[BR, BC]`` (float32) of the h columns of output columns ``n0 ..`` (rows ``h_rows``, unit column stride)."""
    cols0, mask0, cols1, mask1 = h_columns(n0, I, KIND, BC, BC0)
    tile0 = tl.load(h_rows + cols0[None, :], mask=row_ok[:, None] & mask0[None, :], other=0.0).to(tl.float32)
    tile1 = tile0
    if KIND == SWIGLU or KIND == SWIGLUOAI or KIND == GEGLU:
        tile1 = tl.load(h_rows + cols1[None, :], mask=row_ok[:, None] & mask1[None, :], other=0.0).to(tl.float32)
    return gate_up(tile0, tile1, KIND, BR, BC)
