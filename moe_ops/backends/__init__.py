"""Every backend, registered with its priority (lower is tried first).

Backends never import each other, and none imports triton or
transformer_engine at import time: they look for them when asked.
"""

from moe_ops import registry
from moe_ops.backends import cpu, reference, torch_grouped_mm, triton_backend

# Triton first, except for the GEMMs: there torch._grouped_mm (CUTLASS) goes first — also for the
# fused ops, which the torch backend runs as CUTLASS GEMMs + Triton steps — and declines wherever it
# lacks its fast path (sm90/sm100 bfloat16), so Triton takes the rest.  Measured on H100 at Qwen3
# shapes (BENCHMARKS.md): CUTLASS GEMMs ran at 635 TFLOP/s, our Triton GEMMs at 508 (dgrad/forward)
# and ~180 (wgrad), so the fused Triton kernels lose despite skipping the gathers.
_GEMM_OPS = ("grouped_mm", "grouped_mm_wgrad", "expert_up", "expert_up_backward", "expert_down",
             "expert_down_backward")
registry.register_backend(triton_backend.BACKEND, priority=0, op_priorities={op: 20 for op in _GEMM_OPS})
registry.register_backend(torch_grouped_mm.BACKEND, priority=10)
# On the CPU: torch._grouped_mm's CPU kernel over the valid rows (reference multiplies every row by
# every expert's matrix: E times the FLOPs).
registry.register_backend(cpu.BACKEND, priority=50)
registry.register_backend(reference.BACKEND, priority=100)
