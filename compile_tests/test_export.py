"""torch.export of the expert modules, strict and non-strict, with a ``Dim`` for the token count of
each of the four inputs: the graph keeps the ``moe.*`` ops, the token count stays symbolic, and a program
saved with ``torch.export.save`` loads in a fresh process that imports only ``moe_ops`` and
matches eager at token counts other than the one it was exported with.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from compile_tests.builders import (ALL_CASES, EXPORT_T, RTOL, RUN_TS, assert_close, eager, export, make_inputs,
                                    module_of, run_in_fresh_process)

CASES = [(case, strict) for case in ALL_CASES for strict in (True, False)]


def case_id(param) -> str:
    case, strict = param
    return f"{case.id}-{'strict' if strict else 'nonstrict'}"


class _RecordOps(TorchDispatchMode):
    """The ops an eager call dispatches (custom ops as themselves, not their kernels' insides)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def moe_ops_of_eager(case) -> collections.Counter:
    """The ``moe.*`` ops the eager module runs, with multiplicity (whatever the composition)."""
    with torch.no_grad(), _RecordOps() as recorder:
        module_of(case)(*make_inputs(EXPORT_T, case.dtype))
    return collections.Counter({op: n for op, n in recorder.ops.items() if op.startswith("moe.")})


@pytest.mark.parametrize("param", CASES, ids=case_id)
def test_export_keeps_moe_ops_and_symbolic_tokens(param):
    case, strict = param
    program = export(case, strict)
    moe_ops = collections.Counter(
        str(n.target) for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("moe.")
    )
    expected = moe_ops_of_eager(case)
    assert expected["moe.route.default"] == 1, expected  # the recorder sees the custom ops
    expected["moe.check_expert_inputs.default"] += 1  # traced only: the inputs' check (eagerly plain Python)
    assert moe_ops == expected, "every moe op of the eager forward is one node of the exported graph"
    user_inputs = program.graph_signature.user_inputs
    assert len(user_inputs) == 4, user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    token_dims = [str(placeholders[name].meta["val"].shape[0]) for name in user_inputs]
    assert not any(d.isdigit() for d in token_dims), f"dim 0 of the inputs stays symbolic: {token_dims}"
    for T in RUN_TS:
        with torch.no_grad():
            got = program.module()(*make_inputs(T, case.dtype))
        assert_close([got], [eager(case, T)], RTOL["aot_eager", case.dtype], f"{case_id(param)} T={T}")


@pytest.fixture(scope="module")
def fresh_process_outputs(tmp_path_factory):
    """Every exported program saved, then loaded and run at RUN_TS in ONE fresh process."""
    directory = tmp_path_factory.mktemp("export")
    jobs = []
    for param in CASES:
        path = str(directory / f"{case_id(param)}.pt2")
        torch.export.save(export(*param), path)
        inputs = {T: make_inputs(T, param[0].dtype) for T in RUN_TS}
        jobs.append({"name": case_id(param), "kind": "export", "path": path, "inputs": inputs})
    return run_in_fresh_process(jobs, directory)


def test_fresh_process_needs_only_moe_ops(fresh_process_outputs):
    assert fresh_process_outputs["moe_modules_imported"] is False


@pytest.mark.parametrize("param", CASES, ids=case_id)
def test_saved_program_matches_eager_in_fresh_process(param, fresh_process_outputs):
    case, _ = param
    outputs = fresh_process_outputs["outputs"][case_id(param)]
    for T in RUN_TS:
        assert_close([outputs[T]], [eager(case, T)], RTOL["aot_eager", case.dtype], f"{case_id(param)} T={T}")
