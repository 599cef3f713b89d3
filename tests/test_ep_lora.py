"""LoRA experts under expert parallelism on gloo, 2 and 4 ranks (``tests/ep_lora_cases.py``): outputs and
the gradients of x, the routing weights and this rank's adapter shards against a single-process float64
reference (the merged weights ``W + scale * A @ B``), eager and compiled; the frozen base gets no
gradient; the eight parameters are ``Shard(0)`` DTensors and survive a ``torch.distributed.checkpoint``
round trip; wrapping a base that is already sharded shards the adapters alike."""

from __future__ import annotations

import functools

import pytest
import torch

import ep_cases
import ep_lora_cases as cases
import reference
from test_distributed import TOL, mismatches, needs_gloo, world_run

pytestmark = needs_gloo


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def ep_run(request, tmp_path_factory):
    return world_run(request, tmp_path_factory, "ep_lora_cases.py")


@functools.lru_cache(maxsize=None)
def float64_reference(activation: str, bias: bool, layout: str, world_size: int) -> dict:
    inputs = cases.lora_inputs(ep_cases.Case("any", activation, bias, layout), world_size)
    names = ("x", "weights", *ep_cases.PARAM_NAMES, *cases.ADAPTER_NAMES)
    leaves = {n: inputs[n].to(torch.float64).requires_grad_() for n in names if inputs[n] is not None}
    scale = cases.ALPHA / cases.RANK
    w1 = leaves["gate_and_up_projs"] + scale * torch.bmm(leaves["lora_gate_and_up_A"], leaves["lora_gate_and_up_B"])
    w2 = leaves["down_projs"] + scale * torch.bmm(leaves["lora_down_A"], leaves["lora_down_B"])
    y = reference.expert_block(leaves["x"], inputs["token_mask"], leaves["weights"], inputs["indices"], w1, w2,
                               leaves.get("gate_up_proj_bias"), leaves.get("down_proj_bias"), kind=activation)
    (y * inputs["grad_y"].to(torch.float64)).sum().backward()
    out = {"y": y.detach(), "x_grad": leaves["x"].grad, "weights_grad": leaves["weights"].grad}
    out.update({n + "_grad": leaves[n].grad for n in cases.ADAPTER_NAMES})
    return out


def test_outputs_and_adapter_gradients_match_float64_reference(ep_run):
    world_size, ranks = ep_run
    failures = []
    for case in cases.cases(world_size):
        ref = float64_reference(case.activation, case.bias, case.layout, world_size)
        for rank, results in enumerate(ranks):
            tokens, experts = ep_cases.rank_slice(case, world_size, rank), ep_cases.expert_slice(world_size, rank)
            expected = {k: v[experts] if k.startswith("lora") else v[tokens] for k, v in ref.items()}
            got = {k: v for k, v in results["cases"][case.name].items() if k not in ("base_grads", "dispatcher")}
            failures += mismatches(got, expected, TOL, f"{case.name} rank {rank}")
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures)


def test_the_frozen_base_gets_no_gradient_and_each_module_ran_over_its_transport(ep_run):
    world_size, ranks = ep_run
    transports = {"GroupedExpertsLoRA": "AllGatherDispatcher", "GroupedExpertsDeepEPLoRA": "AllToAllDispatcher",
                  "GroupedExpertsLoRA@all_to_all": "AllToAllDispatcher",
                  "GroupedExpertsDeepEPLoRA@peer": "PeerDispatcher"}
    for case in cases.cases(world_size):
        for rank, results in enumerate(ranks):
            result = results["cases"][case.name]
            assert result["base_grads"] and all(g is None for g in result["base_grads"].values()), (case.name, rank)
            assert result["dispatcher"] == transports[case.module], (case.name, rank)


def test_state_dict_is_sharded_and_survives_a_dcp_round_trip(ep_run):
    _, ranks = ep_run
    failures = [f"rank {r}: {m}" for r, results in enumerate(ranks) for m in results["state_dict_failures"]]
    assert not failures, "\n".join(failures)


def test_wrapping_an_already_sharded_base_shards_the_adapters_alike(ep_run):
    _, ranks = ep_run
    failures = [f"rank {r}: {m}" for r, results in enumerate(ranks) for m in results["wrap_sharded_failures"]]
    assert not failures, "\n".join(failures)
