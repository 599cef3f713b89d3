"""Every backend, registered with its priority (lower is tried first).

Backends never import each other, and none imports triton or
transformer_engine at import time: they look for them when asked.
"""

from moe_ops import registry
from moe_ops.backends import reference, torch_grouped_mm, triton_backend

# Triton first, except for the plain grouped GEMMs: there torch._grouped_mm (CUTLASS) goes first
# and declines wherever it lacks its fast path (sm90/sm100 bfloat16), so Triton takes the rest.
# Revisit with benchmarks/bench_experts.py numbers; the fused expert_up/expert_down are Triton's.
registry.register_backend(triton_backend.BACKEND, priority=0, op_priorities={"grouped_mm": 20, "grouped_mm_wgrad": 20})
registry.register_backend(torch_grouped_mm.BACKEND, priority=10)
registry.register_backend(reference.BACKEND, priority=100)
