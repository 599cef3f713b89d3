"""Expert-parallel LoRA cases and their worker (``tests/test_ep_lora.py`` launches one per rank).

Each case builds the base module from :func:`ep_cases.make_inputs`' full parameters, wraps it in its
LoRA module, loads nonzero adapters from :func:`lora_inputs` (the same in every process), shards it
with ``apply_ep`` and saves this rank's output and gradients; the test compares them with a float64
single-process reference.  Also: the sharded state dict (eight ``Shard(0)`` DTensors) through a
``torch.distributed.checkpoint`` round trip.
"""

from __future__ import annotations

import os
import zlib

import torch

import ep_cases
from ep_cases import NUM_EXPERTS, DIM, INTER, PARAM_NAMES, Case

ADAPTER_NAMES = ("lora_gate_and_up_A", "lora_gate_and_up_B", "lora_down_A", "lora_down_B")
RANK, ALPHA = 3, 6.0
MODULES = ("GroupedExpertsLoRA", "GroupedExpertsDeepEPLoRA", "GroupedExpertsLoRA@all_to_all",
           "GroupedExpertsDeepEPLoRA@peer")


def cases(world_size: int) -> list[Case]:
    layouts = list(ep_cases.TOKEN_LAYOUTS[world_size])
    eager = [Case(m, a, b, layout) for m in MODULES[:2] for a, b in (("swiglu", True), ("quick_geglu", True),
                                                                     ("relu2", False)) for layout in layouts]
    eager += [Case(m, "swiglu", True, layout) for m in MODULES[2:] for layout in layouts]
    compiled = [Case(m, "swiglu", True, "empty_rank", compiled=True) for m in MODULES]
    return eager + compiled


def lora_inputs(case: Case, world_size: int) -> dict:
    """``ep_cases.make_inputs`` plus nonzero adapters (B too, so every term matters)."""
    inputs = ep_cases.make_inputs(case, world_size)
    gen = torch.Generator().manual_seed(zlib.crc32(f"lora-{case.activation}-{case.layout}-{world_size}".encode()))
    up = inputs["gate_and_up_projs"].shape[2]
    shapes = {"lora_gate_and_up_A": (NUM_EXPERTS, DIM, RANK), "lora_gate_and_up_B": (NUM_EXPERTS, RANK, up),
              "lora_down_A": (NUM_EXPERTS, INTER, RANK), "lora_down_B": (NUM_EXPERTS, RANK, DIM)}
    inputs.update({name: torch.randn(shape, generator=gen) * 0.3 for name, shape in shapes.items()})
    return inputs


def build_module(module_name: str, cfg, params: dict, mesh):
    import moe_modules

    lora_name, _, transport = module_name.partition("@")
    base = getattr(moe_modules, lora_name.removesuffix("LoRA"))(cfg)
    base.load_state_dict({name: params[name] for name in PARAM_NAMES if params[name] is not None})
    module = getattr(moe_modules, lora_name)(base, lora_dim=RANK, alpha=ALPHA)
    module.load_state_dict({name: params[name] for name in PARAM_NAMES + ADAPTER_NAMES if params[name] is not None})
    return moe_modules.apply_ep(module, mesh, **(ep_cases.TRANSPORT_OPTIONS[transport] if transport else {}))


def run_case(case: Case, mesh, rank: int, world_size: int) -> dict:
    inputs = lora_inputs(case, world_size)
    module = build_module(case.module, ep_cases.config(case.activation, case.bias), inputs, mesh)
    forward = torch.compile(module, fullgraph=True, backend="aot_eager") if case.compiled else module
    mine = ep_cases.rank_slice(case, world_size, rank)
    x = inputs["x"][mine].clone().requires_grad_()
    weights = inputs["weights"][mine].clone().requires_grad_()
    y = forward(x, inputs["token_mask"][mine], weights, inputs["indices"][mine])
    (y * inputs["grad_y"][mine]).sum().backward()
    result = {"y": y.detach(), "x_grad": x.grad, "weights_grad": weights.grad}
    result.update({name + "_grad": None if getattr(module, name).grad is None else getattr(module, name).grad.to_local()
                   for name in ADAPTER_NAMES})
    base = [name for name in PARAM_NAMES if getattr(module, name) is not None]
    result["base_grads"] = {name: getattr(module, name).grad for name in base}
    result["dispatcher"] = type(module.token_dispatcher).__name__
    return result


def check_state_dict_round_trip(mesh, world_size: int, directory: str) -> list[str]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor, Shard

    failures = []
    for module_name in MODULES[:2]:
        cfg = ep_cases.config("swiglu", True)
        saved = lora_inputs(Case(module_name, "swiglu", True, "uneven"), world_size)
        module = build_module(module_name, cfg, saved, mesh)
        state = module.state_dict()
        if sorted(state) != sorted(PARAM_NAMES + ADAPTER_NAMES):
            failures.append(f"{module_name}: keys {sorted(state)}")
        for name, value in state.items():
            if not isinstance(value, DTensor) or tuple(value.placements) != (Shard(0),):
                failures.append(f"{module_name}.{name}: expected a Shard(0) DTensor, got {type(value).__name__}")
        checkpoint = os.path.join(directory, f"checkpoint_{module_name}")
        dcp.save(state, checkpoint_id=checkpoint)
        restored = build_module(module_name, cfg, lora_inputs(Case(module_name, "swiglu", True, "empty_rank"),
                                                              world_size), mesh)
        loaded = restored.state_dict()
        dcp.load(loaded, checkpoint_id=checkpoint)
        restored.load_state_dict(loaded)
        for name in PARAM_NAMES + ADAPTER_NAMES:
            if not torch.equal(getattr(restored, name).full_tensor(), saved[name]):
                failures.append(f"{module_name}.{name}: differs after a dcp save/load round trip")
    return failures


def check_wrapping_a_sharded_base(mesh, rank: int, world_size: int) -> list[str]:
    """A LoRA module over a base apply_ep already sharded: its adapters are Shard(0) DTensors on the same mesh,
    and with B = 0 (the init) its forward is the base module's."""
    import moe_modules
    from torch.distributed.tensor import DTensor, Shard

    failures = []
    case = Case("GroupedExpertsLoRA", "swiglu", True, "uneven")
    inputs = lora_inputs(case, world_size)
    base = moe_modules.GroupedExperts(ep_cases.config("swiglu", True))
    base.load_state_dict({name: inputs[name] for name in PARAM_NAMES})
    moe_modules.apply_ep(base, mesh)
    module = moe_modules.GroupedExpertsLoRA(base, lora_dim=RANK, alpha=ALPHA)
    for name in ADAPTER_NAMES:
        p = getattr(module, name)
        if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.device_mesh != mesh:
            failures.append(f"{name}: expected a Shard(0) DTensor on the base's mesh, got {type(p).__name__}")
    mine = ep_cases.rank_slice(case, world_size, rank)
    args = (inputs["x"][mine], inputs["token_mask"][mine], inputs["weights"][mine], inputs["indices"][mine])
    if not torch.allclose(module(*args), base(*args), rtol=1e-6, atol=1e-6):
        failures.append("with B = 0 the LoRA module's forward differs from the base module's")
    return failures


def worker(rank: int, world_size: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    ep_cases.join_gloo(rank, world_size, directory)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    results = {"cases": {case.name: run_case(case, mesh, rank, world_size) for case in cases(world_size)},
               "state_dict_failures": check_state_dict_round_trip(mesh, world_size, directory),
               "wrap_sharded_failures": check_wrapping_a_sharded_base(mesh, rank, world_size)}
    ep_cases.save_and_exit(results, rank, directory)


if __name__ == "__main__":
    ep_cases.main(worker)
