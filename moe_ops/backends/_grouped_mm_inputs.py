"""What the two ``torch._grouped_mm`` backends (``torch``: CUTLASS on CUDA, ``cpu``) read off an op's
arguments: which of them the GEMMs multiply, and ``torch._grouped_mm``'s 16-byte row rule.

A helper of those backends, not a backend: neither imports the other.
"""

from __future__ import annotations

import torch

# The operands of the GEMMs each op runs: (rows operand, weight) positions in its arguments.
_OPERANDS = {
    "grouped_mm": (0, 1), "grouped_mm_wgrad": (0, 1),
    "expert_up": (0, 4), "expert_up_backward": (1, 6), "expert_down": (0, 1), "expert_down_backward": (1, 2),
}


def operands(op: str, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows operand and the weight (or second operand) of ``op``'s GEMMs."""
    i, j = _OPERANDS[op]
    return args[i], args[j]


def unaligned_rows(op: str, first: torch.Tensor, second: torch.Tensor) -> list[str]:
    """Why the rows of these operands break ``torch._grouped_mm``'s rule (every row a multiple of 16 bytes)."""
    widths = {"rows": first.shape[1], "weights": second.shape[-1]}
    if op.startswith("expert_"):
        widths["weights (inner)"] = second.shape[1]
    return [f"rows of {name} ({width} elements) are not a multiple of 16 bytes"
            for name, width in widths.items() if (width * first.element_size()) % 16]
