"""AOTInductor: the exported GroupedExperts compiled with ``aoti_compile_and_package`` on the CPU,
loaded with ``aoti_load_package`` in a fresh process that imports only ``moe_ops`` (the package
calls back into the Python custom ops), and run at token counts other than the exported one
(RUN_TS, not EXPORT_T).

Each package costs a C++ build (10-25 s on 2 cores), so this covers a representative subset:
both dtypes, every activation once, with and without bias.  The full matrix is exported and
reloaded by test_export.py.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from compile_tests.builders import (DEVICE, RTOL, RUN_TS, Case, assert_close, eager, export, make_inputs,
                                    run_in_fresh_process)
from moe_modules import GroupedExperts

pytestmark = [
    pytest.mark.skipif(DEVICE.type != "cpu", reason="AOTInductor is CPU-tested (loading AOTI packages segfaulted "
                       "on the GPU image, see PITFALLS.md)"),
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                       reason="AOTInductor needs a C++ compiler (g++ or c++ on PATH)"),
]

AOTI_CASES = [
    Case(GroupedExperts, "swiglu", True, torch.float32),
    Case(GroupedExperts, "quick_geglu", False, torch.bfloat16),
    Case(GroupedExperts, "relu2", True, torch.bfloat16),
]


@pytest.fixture(scope="module")
def fresh_process_outputs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("aoti")
    jobs = []
    for case in AOTI_CASES:
        path = str(directory / f"{case.id}.pt2")
        torch._inductor.aoti_compile_and_package(export(case, False), package_path=path)
        inputs = {T: make_inputs(T, case.dtype) for T in RUN_TS}
        jobs.append({"name": case.id, "kind": "aoti", "path": path, "inputs": inputs})
    return run_in_fresh_process(jobs, directory)


@pytest.mark.parametrize("case", AOTI_CASES, ids=lambda c: c.id)
def test_aoti_package_matches_eager_in_fresh_process(case, fresh_process_outputs):
    assert fresh_process_outputs["moe_modules_imported"] is False
    for T in RUN_TS:
        expected = eager(case, T)
        # AOTInductor compiles the ATen glue between the ops like inductor does: inductor's bounds.
        assert_close([fresh_process_outputs["outputs"][case.id][T]], [expected], RTOL["inductor", case.dtype],
                     f"{case.id} T={T}")
