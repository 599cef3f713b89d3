"""Every Triton kernel launch of the expert block compiles for sm90 (H100) without spilling.

The GPU is not needed: tests/triton_sm90_compile.py records the launches at the benchmark
shapes on ``meta`` tensors and compiles each one with Triton's real compiler and ``ptxas``
(in a fresh process: the kernels must not be the interpreter's).  It catches what the
interpreter tests cannot — code the compiler rejects, GEMM loops that are not pipelined,
register spills, shared memory beyond the H100's 227 KB.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

SCRIPT = Path(__file__).with_name("triton_sm90_compile.py")
MAX_SHARED = 232448


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOE_TRITON_CONFIG")}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=900,
                          cwd=SCRIPT.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_family_compiles(compiled):
    names = {r["kernel"] for r in compiled}
    assert names == {
        "_histogram_kernel", "_scan_kernel", "_scatter_kernel", "_grouped_gemm_kernel", "_wgrad_kernel",
        "_gather_kernel", "_combine_kernel", "_pair_dot_kernel", "_add_bias_kernel", "_bias_grad_kernel",
        "_bias_probs_grad_kernel", "_activation_kernel", "_activation_backward_kernel",
    }


def test_no_spills_and_shared_memory_fits(compiled):
    bad = [r for r in compiled if r["spill_bytes"] or r["shared"] > MAX_SHARED]
    assert not bad, json.dumps(bad, indent=1)


def test_16_bit_gemms_are_pipelined_tensor_core_loops(compiled):
    gemms = [r for r in compiled if r["kernel"] in ("_grouped_gemm_kernel", "_wgrad_kernel")]
    sixteen_bit = [r for r in gemms if r["first_arg"] in ("*bf16", "*fp16")]
    assert sixteen_bit and len(sixteen_bit) < len(gemms)  # the float32 launches use FMA (IEEE) math
    slow = [r for r in sixteen_bit if not (r["mma"] and r["async_copies"])]
    assert not slow, json.dumps(slow, indent=1)
