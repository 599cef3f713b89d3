"""A compiled or exported expert module called with inputs that disagree raises the eager error.

The README's recipes (``torch.compile(fullgraph=True)`` with unbacked token counts, ``dynamic=True``,
``torch.export`` with a ``Dim`` per input) build a graph for every token count.  A later call whose
``weights``, ``indices`` or ``token_mask`` have another token count than ``x``, or ``indices``
another K than ``weights``, runs that graph and gets the eager ``ValueError`` (the argument, the
expected and the actual size) from ``moe::check_expert_inputs``.  A model dim other than the
module's is another graph: the trace fails, with the eager ``ValueError`` in Dynamo's error chain.
An exported program's static sizes (K, the model dim) are its own input contract: torch checks
them before the graph runs (``AssertionError: Guard failed: indices.size()[1] == 2``).
"""

from __future__ import annotations

import pytest
import torch

from compile_tests.builders import REPRESENTATIVE, export, make_inputs, mark_tokens_dynamic, module_of

T = 6
BAD = {  # name: (argument index, replacement for the inputs of T tokens)
    "weights-T": (2, lambda inputs: make_inputs(T + 1, torch.float32)[2]),
    "indices-T": (3, lambda inputs: make_inputs(T + 1, torch.float32)[3]),
    "token_mask-T": (1, lambda inputs: make_inputs(T - 1, torch.float32)[1]),
    "indices-K": (3, lambda inputs: inputs[3][:, :1]),
}


def bad_inputs(name: str) -> tuple:
    inputs = list(make_inputs(T, torch.float32, seed=1))
    position, replace = BAD[name]
    inputs[position] = replace(inputs)
    return tuple(inputs)


def eager_error(module, inputs) -> str:
    with pytest.raises(ValueError) as err:
        module(*inputs)
    return str(err.value)


def compiled_call(mode: str):
    """The module compiled as the README does, already run once on good inputs; returns (module, call)."""
    module = module_of(REPRESENTATIVE)
    compiled = torch.compile(module, fullgraph=True, dynamic=True if mode == "dynamic" else None)

    def call(inputs):
        if mode == "unbacked":
            mark_tokens_dynamic(inputs)
        return compiled(*inputs)

    call(make_inputs(5, torch.float32))
    return module, call


@pytest.mark.parametrize("mode", ["unbacked", "dynamic"])
@pytest.mark.parametrize("name", list(BAD))
def test_compiled_call_with_mismatched_inputs_raises_the_eager_error(mode, name):
    module, call = compiled_call(mode)
    inputs = bad_inputs(name)
    expected = eager_error(module, inputs)
    with pytest.raises(ValueError) as err:
        call(inputs)
    assert str(err.value) == expected
    assert torch.isfinite(call(make_inputs(9, torch.float32))).all()  # the good graph still runs


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "nonstrict"])
@pytest.mark.parametrize("name", [name for name in BAD if name.endswith("-T")])
def test_exported_program_with_mismatched_inputs_raises_the_eager_error(strict, name):
    program = export(REPRESENTATIVE, strict).module()
    inputs = bad_inputs(name)
    with pytest.raises(ValueError) as err:
        program(*inputs)
    assert str(err.value) == eager_error(module_of(REPRESENTATIVE), inputs)


def exception_chain(err: BaseException) -> list:
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


@pytest.mark.parametrize("mode", ["unbacked", "dynamic"])
def test_compiled_call_with_another_model_dim_fails_the_trace_with_the_eager_error(mode):
    module, call = compiled_call(mode)
    x, token_mask, weights, indices = make_inputs(T, torch.float32)
    inputs = (torch.cat([x, x[:, :1]], 1), token_mask, weights, indices)
    expected = eager_error(module, inputs)
    assert "x" in expected and str(x.shape[1]) in expected and str(x.shape[1] + 1) in expected
    with pytest.raises(Exception) as err:
        call(inputs)
    assert [str(e) for e in exception_chain(err.value) if isinstance(e, ValueError)] == [expected], err.value
