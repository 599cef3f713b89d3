"""GroupedExpertsDeepEP through DeepEP's own buffers (``apply_ep(use_deep_ep=...)``), on CPU with gloo.

The real ``deep_ep`` needs CUDA and NVSHMEM to build, so ``tests/deep_ep_stand_in.py`` plays it (its
own tests: ``tests/test_deep_ep_stand_in.py``).  What is checked here is our side: that the layout
handed to DeepEP, the local experts on what it returns, and the autograd wiring (dispatch's gradient
by combine, combine's by a cached dispatch) give the results of our all-to-all path, and float64's;
when DeepEP is used, skipped, or refused; and that compile traces the functional path.
"""

from __future__ import annotations

import functools

import pytest
import torch

import ep_cases
import ep_deep_ep_cases
import reference
from test_distributed import HERE, mismatches, needs_gloo, run_world

pytestmark = needs_gloo  # the reason is in test_distributed.needs_gloo
BF16_TOL = reference.TOLERANCE[torch.bfloat16]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def deep_ep_run(request, tmp_path_factory):
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"deep_ep_world{world_size}")
    return world_size, run_world(HERE / "ep_deep_ep_cases.py", world_size, directory, 180)


@functools.lru_cache(maxsize=None)
def float64_of_bf16_inputs(activation: str, bias: bool, layout: str, world_size: int) -> dict:
    """The whole batch in float64 from the bfloat16-rounded inputs the EP run was given."""
    inputs = ep_cases.make_inputs(ep_cases.Case("any", activation, bias, layout), world_size)
    leaves = {n: inputs[n].to(torch.bfloat16).to(torch.float64).requires_grad_()
              for n in ("x", "weights", *ep_cases.PARAM_NAMES) if inputs[n] is not None}
    y = reference.expert_block(leaves["x"], inputs["token_mask"], leaves["weights"], inputs["indices"],
                               leaves["gate_and_up_projs"], leaves["down_projs"], leaves.get("gate_up_proj_bias"),
                               leaves.get("down_proj_bias"), kind=activation)
    (y * inputs["grad_y"].to(torch.bfloat16).to(torch.float64)).sum().backward()
    out = {"y": y.detach(), "x_grad": leaves["x"].grad, "weights_grad": leaves["weights"].grad}
    out.update({n + "_grad": leaves[n].grad for n in ep_cases.PARAM_NAMES if n in leaves})
    return out


def on_rank(full: dict, case, world_size: int, rank: int) -> dict:
    tokens, experts = ep_cases.rank_slice(case, world_size, rank), ep_cases.expert_slice(world_size, rank)
    return {k: v[experts] if k.endswith(("projs_grad", "bias_grad")) else v[tokens] for k, v in full.items()}


def test_deep_ep_path_is_used_and_runs_both_directions(deep_ep_run):
    world_size, ranks = deep_ep_run
    for rank, out in enumerate(ranks):
        assert out["dispatcher"] == "DeepEPDispatcher"
        for case in ep_deep_ep_cases.CASES:
            calls = out["deep_ep"][case.name]["calls"]
            # Forward: layout, dispatch, combine.  Backward: combine (the dispatch's gradient) and a
            # cached dispatch (the combine's), so two of each.
            assert calls.get("get_dispatch_layout") == 1 and calls.get("dispatch") == 2, (rank, case.name, calls)
            assert calls.get("combine") == 2, (rank, case.name, calls)
            assert not out["all_to_all"][case.name]["calls"], "use_deep_ep=False still called DeepEP"


def test_deep_ep_path_matches_the_all_to_all_path_and_float64(deep_ep_run):
    """Bit for bit against our all-to-all path with bf16 partials (same math, other transport), and
    float64 of the same bf16 inputs, for every activation, with and without bias, uneven tokens and
    an empty rank."""
    world_size, ranks = deep_ep_run
    failures, compared = [], 0
    for case in ep_deep_ep_cases.CASES:
        full = float64_of_bf16_inputs(case.activation, case.bias, case.layout, world_size)
        for rank, out in enumerate(ranks):
            got = out["deep_ep"][case.name]["result"]
            plain = out["all_to_all"][case.name]["result"]
            failures += [f"{case.name} rank {rank} {k}: differs from the all-to-all path" for k in plain
                         if not torch.equal(got[k], plain[k])]
            failures += mismatches(got, on_rank(full, case, world_size, rank), BF16_TOL,
                                   f"{case.name} rank {rank} vs float64")
            compared += 1
    assert compared == len(ep_deep_ep_cases.CASES) * world_size
    assert not failures, "\n".join(failures)


def test_compile_traces_the_functional_path_instead(deep_ep_run):
    world_size, ranks = deep_ep_run
    case = ep_deep_ep_cases.COMPILED_CASE
    failures = []
    for rank, out in enumerate(ranks):
        assert not out["compiled"]["calls"], f"rank {rank}: the compiled forward called DeepEP"
        failures += mismatches(out["compiled"]["result"], out["deep_ep"][case.eager().name]["result"], 1e-6,
                               f"compiled vs eager DeepEP, rank {rank}")
    assert not failures, "\n".join(failures)


def test_unsupported_calls_fall_back_or_raise_the_reasons(deep_ep_run):
    _, ranks = deep_ep_run
    for rank, out in enumerate(ranks):
        assert not out["float32_auto"]["calls"], f"rank {rank}: float32 tokens went to DeepEP"
        auto, plain = out["float32_auto"]["result"], out["float32_all_to_all"]["result"]
        assert sorted(auto) == sorted(plain)
        assert all(torch.equal(auto[k], plain[k]) for k in plain), f"rank {rank}: the fallback is not the plain path"
        assert not out["float32_partials_auto"]["calls"], f"rank {rank}: float32 partial rows went to DeepEP"
        required = out["required_float32"]
        assert required is not None and required.startswith("NotImplementedError"), required
        assert "tokens in torch.float32" in required and "reduce_dtype" not in required, required
        required = out["required_float32_partials"]
        assert required is not None and required.startswith("NotImplementedError"), required
        assert "reduce_dtype=torch.float32" in required and "tokens in" not in required, required
        assert "ValueError" in out["with_peer"] and "max_tokens_per_rank" in out["with_peer"], out["with_peer"]


def test_every_module_runs_over_deep_ep(deep_ep_run):
    """GroupedExperts (all-gather by default) and GroupedExpertsTE take DeepEP's buffers too: the same
    calls, bit for bit the all-to-all path with bf16 partials, and float64 of the same bf16 inputs."""
    world_size, ranks = deep_ep_run
    failures = []
    for case in ep_deep_ep_cases.OTHER_MODULE_CASES:
        full = float64_of_bf16_inputs(case.activation, case.bias, case.layout, world_size)
        for rank, out in enumerate(ranks):
            got = out["other_modules"][case.name]
            assert got["dispatcher"] == "DeepEPDispatcher", (case.name, got["dispatcher"])
            assert got["calls"].get("dispatch") == 2 and got["calls"].get("combine") == 2, (case.name, got["calls"])
            assert not got["all_to_all"]["calls"], f"{case.name}: use_deep_ep=False still called DeepEP"
            plain = got["all_to_all"]["result"]
            assert sorted(got["result"]) == sorted(plain), case.name
            failures += [f"{case.name} rank {rank} {k}: differs from the all-to-all path" for k in plain
                         if not torch.equal(got["result"][k], plain[k])]
            failures += mismatches(got["result"], on_rank(full, case, world_size, rank), BF16_TOL,
                                   f"{case.name} rank {rank} vs float64")
    assert not failures, "\n".join(failures)


def test_without_the_package_deep_ep_is_optional(deep_ep_run):
    _, ranks = deep_ep_run
    for out in ranks:
        assert not out["importable_before"] and not out["importable_after"] and out["importable_with_stand_in"]
        assert out["default_without_package"] == "AllToAllDispatcher"
        message = out["not_importable"]
        assert message is not None and "not importable" in message, message
        assert out["left_unsharded"], "apply_ep sharded the parameters before refusing use_deep_ep=True"


def test_not_supported_reasons_name_every_limit():
    """Each of DeepEP's limits is reported, all at once, in the words a user can act on."""
    from moe_modules.ep.deep_ep import deep_ep_not_supported_reasons

    x = torch.zeros(2, 7, dtype=torch.float32)
    reasons = "\n".join(deep_ep_not_supported_reasons(x, 33, torch.float64, 3, 200))
    for expected in ("deep_ep package is not importable", "tokens on cpu", "tokens in torch.float32",
                     "reduce_dtype=torch.float64", "rows of 28 bytes", "top_k=33", "200 experts per rank",
                     "ep_size=3"):
        assert expected in reasons, (expected, reasons)
    fine = torch.zeros(2, 8, dtype=torch.bfloat16)
    assert deep_ep_not_supported_reasons(fine, 8, None, 4, 64) == [
        "the deep_ep package is not importable (optional; build DeepEP from source)",
        "tokens on cpu: DeepEP runs on cuda"]
