"""The ``triton`` backend: this project's Triton kernels (``moe_ops/backends/triton_kernels``).

Every ``moe`` op has a kernel here: a plain Python function (``_common.BODIES[op]``) that the
backend calls inside the opaque ``moe::`` op, so it only ever runs eagerly; there is no second op
namespace.  Triton is imported only when a kernel first runs: this module looks for it with
``importlib.util.find_spec``.

Runs on CUDA with bfloat16, float16 or float32; float64 is left to the reference backend.
With ``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter and CPU tensors are
accepted, so CI without a GPU checks them (slowly: tiny shapes only).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from typing import Optional

import torch

from moe_ops.registry import Backend, Inputs

_KERNELS_MODULE = "moe_ops.backends.triton_kernels"
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Groups (experts) and routing bins are held in one vector of next_pow2(E + 2) lanes.
MAX_EXPERTS = 1022

OPS = (
    "route", "gather", "combine", "pair_dot", "grouped_mm", "grouped_mm_wgrad", "add_expert_bias",
    "expert_bias_backward", "activation", "activation_backward", "activation_backward_with_output",
    "expert_up", "expert_up_backward", "expert_down", "expert_down_backward", "gather_from", "sum_from",
    "put_to", "clear_tail_",
)


def _loaded_interpreted():
    """None until the kernels are imported; then whether Triton decorated them for its interpreter
    (it decides once, from TRITON_INTERPRET at that moment)."""
    common = sys.modules.get(_KERNELS_MODULE + "._common")
    return None if common is None else common.INTERPRET


def _interpreting() -> bool:
    """``TRITON_INTERPRET=1`` now, and the kernels are (or, not imported yet, will be) interpreted."""
    return os.environ.get("TRITON_INTERPRET") == "1" and _loaded_interpreted() is not False


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None  # asked once: it walks sys.path


def _unavailable() -> list[str]:
    if not _triton_installed():
        return ["triton is not installed (pip install triton)"]
    if _loaded_interpreted() and not _interpreting():
        return ["the kernels were loaded for Triton's interpreter in this process (TRITON_INTERPRET=1 was set)"]
    if not _interpreting() and not torch.cuda.is_available():
        return ["no CUDA device (TRITON_INTERPRET=1 runs the kernels on the CPU, slowly)"]
    return []


def _experts(op: str, inputs: Inputs) -> int:
    """Number of groups: ``route``'s ``num_experts``, else the length of the ``offsets`` argument (0 for the
    ops without one: the activations and the peer ops)."""
    if op == "route":
        return inputs.num_experts
    offsets = inputs.get("offsets")
    return offsets.shape[0] if isinstance(offsets, torch.Tensor) else 0


def _input_reasons(op: str, inputs: Optional[Inputs]) -> list[str]:
    tensors = [] if inputs is None else inputs.tensors()  # lists flattened: gather_from's sources
    if not tensors:  # asked without inputs (a support table): nothing to decline yet
        return []
    reasons = []
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not _interpreting():
        reasons.append(f"inputs are on {'/'.join(sorted(devices))}; needs CUDA")
    floats = {t.dtype for t in tensors if t.is_floating_point()}
    if floats - set(_DTYPES):
        names = ", ".join(sorted(str(d).replace("torch.", "") for d in floats - set(_DTYPES)))
        reasons.append(f"needs bfloat16, float16 or float32, got {names}")
    if torch.bfloat16 in floats and "cuda" in devices and torch.cuda.get_device_capability()[0] < 8:
        reasons.append("bfloat16 needs sm80 or newer")
    if any(t.numel() == 0 for t in tensors):
        reasons.append("an input is empty")
    if any(size >= 2**31 for t in tensors for size in t.shape):
        reasons.append("a dimension of 2^31 or more (row indices are int32 in the kernels)")
    experts = _experts(op, inputs)
    if experts > MAX_EXPERTS:
        reasons.append(f"supports at most {MAX_EXPERTS} experts, got {experts}")
    return reasons


@functools.lru_cache(maxsize=None)
def _bodies() -> dict:
    importlib.import_module(_KERNELS_MODULE)  # imports triton, fills _common.BODIES
    return sys.modules[_KERNELS_MODULE + "._common"].BODIES


def _kernel(op: str):
    def run(*args):
        # Inside the opaque moe:: op already: the body launches its kernels straight away.
        return _bodies()[op](*args)

    run.__name__ = run.__qualname__ = op
    return run


BACKEND = Backend(
    name="triton",
    description="this project's Triton kernels (fused expert GEMMs, device-side routing); CUDA, or TRITON_INTERPRET=1",
    kernels={op: _kernel(op) for op in OPS},
    unavailable_reasons=_unavailable,
    input_reasons=_input_reasons,
    state=lambda: (os.environ.get("TRITON_INTERPRET"), _loaded_interpreted()),
)
