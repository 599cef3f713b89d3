"""What the two ``torch._grouped_mm`` backends (``torch``: CUTLASS on CUDA, ``cpu``) read off an op's
inputs (``registry.Inputs``, by name): which of them the GEMMs multiply, and ``torch._grouped_mm``'s
16-byte row rule.

A helper of those backends, not a backend: neither imports the other.
"""

from __future__ import annotations

import torch

from moe_ops.registry import Inputs

# The operands of the GEMMs each op runs: the names of its (rows operand, weight) arguments.
_OPERANDS = {
    "grouped_mm": ("a", "b"), "grouped_mm_wgrad": ("a", "grad"),
    "expert_up": ("x", "w1"), "expert_up_backward": ("x", "w1"), "expert_down": ("h", "w2"),
    "expert_down_backward": ("h", "w2"),
}


def operands(op: str, inputs: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows operand and the weight (or second operand) of ``op``'s GEMMs."""
    first, second = _OPERANDS[op]
    return getattr(inputs, first), getattr(inputs, second)


def unaligned_rows(op: str, first: torch.Tensor, second: torch.Tensor) -> list[str]:
    """Why the rows of these operands break ``torch._grouped_mm``'s rule (every row a multiple of 16 bytes)."""
    widths = {"rows": first.shape[1], "weights": second.shape[-1]}
    if op.startswith("expert_"):
        widths["weights (inner)"] = second.shape[1]
    return [f"rows of {name} ({width} elements) are not a multiple of 16 bytes"
            for name, width in widths.items() if (width * first.element_size()) % 16]
