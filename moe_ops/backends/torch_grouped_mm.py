"""The ``torch`` backend: ``torch._grouped_mm`` for the expert GEMMs.

Taken only where it has its fast path (CUTLASS, no host sync): CUDA sm90 or
sm100 with bfloat16 and 16-byte-aligned rows.  Elsewhere ``torch._grouped_mm``
falls back to a per-expert loop that copies the offsets to the host, so this
backend declines and the registry moves on (on the CPU, to the ``cpu`` backend).

It also runs the fused ops (``expert_up``, ``expert_down`` and their backwards)
as their step-by-step composition (``moe_ops/ops/fused_composition.py``): its own
GEMMs, and for the other steps the kernel the registry picks for them (a kernel, not
an op: no second dispatch or validation inside an op that has validated its inputs).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from moe_ops import registry
from moe_ops.backends import _grouped_mm_inputs
from moe_ops.ops import fused_composition
from moe_ops.registry import Backend

_FAST_CAPABILITIES = {(9, 0), (10, 0)}


def _row_or_column_major(t):
    # CUTLASS takes the weights in either layout (a transposed view as is, no copy).
    return t if t.stride(-1) == 1 or t.stride(-2) == 1 else t.contiguous()


def grouped_mm(a, b, offsets):
    """``torch._grouped_mm`` computes only the groups' rows and leaves the rows past ``offsets[-1]``
    unwritten; ``moe.clear_tail_`` zeroes just those (its Triton kernel's work follows the tail).
    Taking the tail into the last group instead would make CUTLASS multiply it: no extra pass, but
    when most rows are tail (the static-shape expert-parallel receiver) that is most of the FLOPs."""
    out = _grouped_mm_any_tail(a, b, offsets)
    registry.call("clear_tail_", out, offsets)
    return out


def grouped_mm_wgrad(a, grad, offsets):
    # Empty groups come back as exact zeros (checked on H100, torch 2.11, with NaN-poisoned memory:
    # benchmarks/check_grouped_mm_tails.py; tests/gpu keeps checking it), so no zeroing pass.
    return torch._grouped_mm(a.contiguous().t(), grad.contiguous(), offs=offsets)


def _unavailable() -> list[str]:
    if not hasattr(torch, "_grouped_mm"):
        return [f"torch {torch.__version__} has no torch._grouped_mm"]
    if not torch.cuda.is_available():
        return ["no CUDA device (torch._grouped_mm has a fast path only on CUDA sm90/sm100)"]
    return []


def _grouped_mm_any_tail(a, b, offsets):
    return torch._grouped_mm(a.contiguous(), _row_or_column_major(b), offs=offsets)


class _Steps:
    """The fused ops' GEMMs on CUTLASS; every other step on the kernel the registry picks for it.
    See fused_composition.py for which GEMM outputs need zero rows past the last group."""

    grouped_mm = staticmethod(grouped_mm)
    grouped_mm_any_tail = staticmethod(_grouped_mm_any_tail)
    grouped_mm_wgrad = staticmethod(grouped_mm_wgrad)

    def __getattr__(self, name):
        return functools.partial(registry.call, name)


# The expert-sorted rows (T*K) each fused forward op handles: the name of an argument with that many rows.
_ROWS = {"expert_up": "pair_of_row", "expert_down": "h"}
# Below this many rows the fused Triton forward kernels (one GEMM launch with the gather, bias, activation
# and probability inside) beat this backend's composition of CUTLASS GEMMs and Triton steps, in GPU time
# and in host time: measured on H200 at Qwen3 and GPT-OSS shapes (BENCHMARKS.md, "Host path").  The
# backward ops stay here at every size: the Triton backward was slower on the GPU (Qwen3 T=512: 1.74 ms
# forward+backward against 1.47; GPT-OSS T=2048: 5.30 against 3.53).  A power of two: the registry's
# cache key keeps the row count to a power of two.
MIN_FUSED_ROWS = 16384


def _fused_rows(op: str, inputs: registry.Inputs) -> Optional[int]:
    if op not in _ROWS:
        return None
    num_rows = getattr(inputs, "num_rows", None)
    return getattr(inputs, _ROWS[op]).shape[0] if num_rows is None else num_rows


def _input_reasons(op: str, inputs: Optional[registry.Inputs]) -> list[str]:
    if inputs is None:  # asked without inputs (the support table)
        return []
    first, second = _grouped_mm_inputs.operands(op, inputs)
    reasons = []
    if first.device.type != "cuda":
        return [f"inputs are on {first.device.type}; needs CUDA"]
    cap = torch.cuda.get_device_capability(first.device)
    if cap not in _FAST_CAPABILITIES:
        reasons.append(f"needs sm90/sm100 for the fast path, got sm{cap[0]}{cap[1]}")
    if first.dtype != torch.bfloat16:
        reasons.append(f"needs bfloat16, got {str(first.dtype).replace('torch.', '')}")
    reasons += _grouped_mm_inputs.unaligned_rows(op, first, second)
    if first.shape[0] == 0:
        reasons.append("no rows")
    rows = _fused_rows(op, inputs)
    if rows is not None and rows < MIN_FUSED_ROWS:
        reasons.append(f"{rows} rows, fewer than {MIN_FUSED_ROWS}: the fused Triton kernels are faster")
    return reasons


BACKEND = Backend(
    name="torch",
    description="torch._grouped_mm (CUTLASS) for the expert GEMMs on CUDA sm90/sm100, bfloat16",
    kernels={"grouped_mm": grouped_mm, "grouped_mm_wgrad": grouped_mm_wgrad, **fused_composition.kernels(_Steps())},
    unavailable_reasons=_unavailable,
    input_reasons=_input_reasons,
)
