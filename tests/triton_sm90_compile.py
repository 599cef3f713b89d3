"""Compile every Triton kernel launch of the expert block for sm90 (H100) on a machine without a GPU.

Runs the triton backend's launch wrappers on ``meta`` tensors at the benchmark shapes, records
each launch instead of running it, specialises its arguments as Triton would on a GPU (16-byte
alignment, divisibility), and compiles it with the real compiler down to a cubin; ``ptxas -v``
then reports registers and spills.  This catches what the interpreter cannot: code the compiler
rejects, loops it does not pipeline, spills and shared-memory overflow.

    python tests/triton_sm90_compile.py          # prints one JSON line per distinct kernel

Run in a fresh process without ``TRITON_INTERPRET`` (the kernels must be compiled, not interpreted);
tests/test_triton_compile.py does that.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile, make_backend
from triton.runtime.jit import create_function_from_signature

from moe_ops.backends.triton_kernels import _common

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 232448  # bytes of shared memory a block may use on H100

SHAPES = {  # name: (E, K, D, I, activation, bias, T) — the benchmark shapes
    "qwen3_30b_a3b": (128, 8, 2048, 768, "swiglu", False, 16384),
    "gpt_oss_20b": (32, 4, 2880, 2880, "quick_geglu", True, 8192),
    "deepseek_v3_rank": (32, 8, 7168, 2048, "swiglu", False, 8192),
    "relu2_fp32": (8, 2, 512, 384, "relu2", True, 1024),
    "swigluoai_small": (8, 2, 512, 384, "swigluoai", True, 1024),  # NeMo's activations (issue 18)
    "geglu_small": (8, 2, 512, 384, "geglu", False, 1024),
}


def record_launches():
    launches = []

    def record(kernel, grid, *args, **meta):
        launches.append((kernel, args, meta))

    _common.launch = record
    return launches


def run_block(E, K, D, I, kind, bias, T, dtype):
    """Every forward and backward launch of route -> expert_up -> expert_down, on meta tensors."""
    import moe_ops.backends.triton_kernels  # noqa: F401  (fills _common.BODIES)

    # The triton backend's kernels themselves: a moe:: op on meta tensors runs its fake, not the backend.
    ops = types.SimpleNamespace(**_common.BODIES)
    meta = dict(device="meta", dtype=dtype)
    C = I if kind == "relu2" else 2 * I
    M = T * K
    x, w1, w2 = torch.empty(T, D, **meta), torch.empty(E, D, C, **meta), torch.empty(E, I, D, **meta)
    b1, b2 = (torch.empty(E, C, **meta), torch.empty(E, D, **meta)) if bias else (None, None)
    probs = torch.empty(M, device="meta", dtype=torch.float32)
    indices = torch.empty(T, K, device="meta", dtype=torch.int64)
    mask = torch.empty(T, device="meta", dtype=torch.bool)
    pair_of_row, row_of_pair, _, offsets = ops.route(indices, mask, 0, E)
    limit = 7.0 if kind in ("quick_geglu", "swigluoai") else None
    act = (kind, 1.702, limit, 1.0)
    h = ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1)
    ops.expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, *act, None)
    grad_h, _, _, _ = ops.expert_down_backward(x, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, *act)
    ops.expert_up_backward(grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1)
    # the unfused ops (the functional API and the all-to-all path use them)
    rows = torch.empty(M, D, **meta)
    ops.gather(x, row_of_pair, offsets, torch.empty(T, K, **meta))
    ops.combine(rows, row_of_pair, offsets, torch.empty(T, K, **meta))
    ops.pair_dot(x, rows, row_of_pair, offsets)
    ops.grouped_mm(rows, w1, offsets)
    ops.grouped_mm_wgrad(rows, h, offsets)
    ops.add_expert_bias(h, torch.empty(E, C, **meta), offsets, probs)
    ops.expert_bias_backward(h, torch.empty(E, C, **meta), offsets, probs)
    a = ops.activation(h, probs, kind, 1.702, limit, 1.0)
    ops.activation_backward(a, h, probs, kind, 1.702, limit, 1.0)
    ops.activation_backward_with_output(a, h, probs, kind, 1.702, limit, 1.0)


def compile_launch(kernel, args, meta):
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    start = time.time()
    compiled = compile(ASTSource(kernel, signature, constexprs, attrs), target=TARGET, options=options.__dict__)
    seconds = time.time() - start
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as fh:
        fh.write(compiled.asm["ptx"])
    report = subprocess.run([ptxas, f"-arch=sm_{TARGET.arch}a", "-v", fh.name, "-o", os.devnull],
                            capture_output=True, text=True).stderr
    os.unlink(fh.name)
    ttgir = compiled.asm["ttgir"]
    return {
        "kernel": kernel.__name__,
        "first_arg": signature[kernel.arg_names[0]],  # e.g. "*bf16"
        "constexprs": {kernel.arg_names[k[0]]: str(v) for k, v in constexprs.items()
                       if kernel.arg_names[k[0]].isupper()},
        "warps": options.num_warps,
        "stages": options.num_stages,
        "shared": compiled.metadata.shared,
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
        "async_copies": ttgir.count("async_copy_global_to_local"),
        "mma": ttgir.count("warp_group_dot") + ttgir.count("ttg.mma") + ttgir.count("mma_v2"),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    assert not _common.INTERPRET, "run without TRITON_INTERPRET: the kernels must be compiled"
    launches = record_launches()
    for name, shape in SHAPES.items():
        run_block(*shape, dtype=torch.float32 if name.endswith("fp32") else torch.bfloat16)
    seen = set()
    for kernel, args, meta in launches:
        key = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in meta.items())),
               tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args))
        if key in seen:
            continue
        seen.add(key)
        print(json.dumps(compile_launch(kernel, args, meta)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
