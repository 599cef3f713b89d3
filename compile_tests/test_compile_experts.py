"""torch.compile(fullgraph=True) of the expert modules: no graph break, one graph for every token
count (T=1 included), outputs and every gradient equal to eager.

Each test compiles one configuration once and runs it at T = 1, 7, 64, 300 under the default
Dynamo config (no ``capture_scalar_outputs``, no dynamic output shapes): a host read of data
(``.item()``, ``.tolist()``, ``nonzero()``) would break the graph (an error under fullgraph), and
any recompile raises (``error_on_recompile``) and is counted.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from compile_tests.builders import (
    ALL_CASES, LORA_CASES, OUTPUT_NAMES, RTOL, TOKEN_COUNTS, assert_close, forward_backward, make_inputs,
)

DEFAULT_DYNAMO = dict(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False)


def check_one_graph_matches_eager(case, backend: str) -> None:
    torch._dynamo.reset()
    module = case.build()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(**DEFAULT_DYNAMO, error_on_recompile=True):
        for T in TOKEN_COUNTS:
            inputs = make_inputs(T, case.dtype)
            got = forward_backward(compiled, module, inputs, tokens_dynamic=True)
            expected = forward_backward(module, module, inputs)
            assert_close(got, expected, RTOL[backend, case.dtype], f"{case.id} {backend} T={T}",
                         getattr(case, "output_names", OUTPUT_NAMES))
    assert counter.frame_count == 1, f"{case.id}: {counter.frame_count} graphs for T in {TOKEN_COUNTS}"


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_aot_eager_one_graph_matches_eager(case):
    check_one_graph_matches_eager(case, "aot_eager")


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
def test_inductor_one_graph_matches_eager(case):
    check_one_graph_matches_eager(case, "inductor")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: c.id)
def test_lora_one_graph_matches_eager(case, backend):
    check_one_graph_matches_eager(case, backend)
