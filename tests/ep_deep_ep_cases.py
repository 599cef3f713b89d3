"""The worker of ``tests/test_ep_deep_ep.py``: ``GroupedExpertsDeepEP`` through DeepEP's buffers, on gloo.

The ``deep_ep`` package cannot be built without CUDA and NVSHMEM, so ``tests/deep_ep_stand_in.py``
stands in for it: DeepEP's intranode API and contract (bfloat16 tokens, float32 weights, int64 ids,
received order, local ids, float32 combine), over ``torch.distributed`` collectives.  Each rank runs
every case and saves what it got; the test compares.

    python tests/ep_deep_ep_cases.py --rank R --world-size N --dir D
"""

from __future__ import annotations


import torch

import deep_ep_stand_in
import ep_cases
import te_stand_in
from ep_cases import PARAM_NAMES, Case, config, make_inputs, rank_slice

MODULE = "GroupedExpertsDeepEP"
CASES = [Case(MODULE, act, bias, layout) for act, bias in (("swiglu", False), ("quick_geglu", True), ("relu2", True))
         for layout in ("uneven", "empty_rank")]
COMPILED_CASE = Case(MODULE, "quick_geglu", True, "empty_rank", compiled=True)
# The other modules over DeepEP's buffers (one dispatcher protocol: any module, any transport).
OTHER_MODULE_CASES = [Case(m, "quick_geglu", True, "uneven") for m in ("GroupedExperts", "GroupedExpertsTE")]


def build(case: Case, mesh, dtype: torch.dtype, **options):
    import moe_modules

    inputs = make_inputs(case, mesh.size())
    module = ep_cases.new_module(case.module, config(case.activation, case.bias, dtype=dtype))
    module.load_state_dict({name: inputs[name].to(dtype) for name in PARAM_NAMES if inputs[name] is not None})
    return moe_modules.apply_ep(module, mesh, **options)


def run(module, case: Case, rank: int, world_size: int, dtype: torch.dtype) -> dict:
    """Output and gradients (x, routing weights, local parameter shards) of this rank's tokens, and the
    stand-in's calls they made."""
    inputs, mine = make_inputs(case, world_size), rank_slice(case, world_size, rank)
    forward = torch.compile(module, fullgraph=True, backend="aot_eager") if case.compiled else module
    x = inputs["x"][mine].to(dtype).requires_grad_()
    weights = inputs["weights"][mine].to(dtype).requires_grad_()
    deep_ep_stand_in.Buffer.reset_calls()
    y = forward(x, inputs["token_mask"][mine], weights, inputs["indices"][mine])
    (y * inputs["grad_y"][mine].to(dtype)).sum().backward()
    result = {"y": y.detach(), "x_grad": x.grad, "weights_grad": weights.grad}
    result.update(ep_cases.local_grads(module))
    return {"result": result, "calls": dict(deep_ep_stand_in.Buffer.calls)}


def message_of(call) -> str | None:
    try:
        call()
    except (ValueError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def worker(rank: int, world_size: int, directory: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import moe_modules
    from moe_modules.ep import deep_ep as ep_deep_ep

    ep_cases.join_gloo(rank, world_size, directory)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    bf16 = torch.bfloat16
    out = {"importable_before": ep_deep_ep.deep_ep_importable()}

    # Without the package: use_deep_ep=True refuses before sharding anything.
    module = moe_modules.GroupedExpertsDeepEP(config("swiglu", False))
    out["not_importable"] = message_of(lambda: moe_modules.apply_ep(module, mesh, use_deep_ep=True))
    out["left_unsharded"] = not any(isinstance(getattr(module, n), DTensor) for n in PARAM_NAMES
                                    if getattr(module, n) is not None)
    out["default_without_package"] = type(build(CASES[0], mesh, bf16, reduce_dtype=None).token_dispatcher).__name__

    with deep_ep_stand_in.install():
        # The real package runs on CUDA only; its stand-in runs here.
        ep_deep_ep.DEEP_EP_DEVICE_TYPES = ("cuda", "cpu")
        out["importable_with_stand_in"] = ep_deep_ep.deep_ep_importable()
        out["deep_ep"], out["all_to_all"] = {}, {}
        for case in CASES:
            module = build(case, mesh, bf16, reduce_dtype=None)
            out["dispatcher"] = type(module.token_dispatcher).__name__
            out["deep_ep"][case.name] = run(module, case, rank, world_size, bf16)
            reference_path = build(case, mesh, bf16, reduce_dtype=None, use_deep_ep=False)
            out["all_to_all"][case.name] = run(reference_path, case, rank, world_size, bf16)
        # torch.compile traces the functional all-to-all path instead (same arithmetic).
        out["compiled"] = run(build(COMPILED_CASE, mesh, bf16, reduce_dtype=None), COMPILED_CASE, rank,
                              world_size, bf16)
        # Unsupported calls fall back (use_deep_ep=None) or raise the reasons (True).
        fp32_case = CASES[1]
        out["float32_auto"] = run(build(fp32_case, mesh, torch.float32), fp32_case, rank, world_size, torch.float32)
        out["float32_all_to_all"] = run(build(fp32_case, mesh, torch.float32, use_deep_ep=False), fp32_case, rank,
                                        world_size, torch.float32)
        out["float32_partials_auto"] = run(build(fp32_case, mesh, bf16), fp32_case, rank, world_size, bf16)
        required = build(fp32_case, mesh, torch.float32, use_deep_ep=True)
        out["required_float32"] = message_of(lambda: run(required, fp32_case, rank, world_size, torch.float32))
        required = build(fp32_case, mesh, bf16, use_deep_ep=True)  # float32 partials (the default reduce_dtype)
        out["required_float32_partials"] = message_of(lambda: run(required, fp32_case, rank, world_size, bf16))
        out["with_peer"] = message_of(lambda: build(fp32_case, mesh, bf16, use_deep_ep=True,
                                                    max_tokens_per_rank=ep_cases.PEER_CAPACITY))
        out["other_modules"] = {}
        with te_stand_in.stand_in_engine():
            for case in OTHER_MODULE_CASES:
                module = build(case, mesh, bf16, reduce_dtype=None, use_deep_ep=True)
                out["other_modules"][case.name] = dict(
                    run(module, case, rank, world_size, bf16), dispatcher=type(module.token_dispatcher).__name__,
                    all_to_all=run(build(case, mesh, bf16, reduce_dtype=None, transport="all_to_all",
                                         use_deep_ep=False), case, rank, world_size, bf16))
    out["importable_after"] = ep_deep_ep.deep_ep_importable()

    ep_cases.save_and_exit(out, rank, directory)


if __name__ == "__main__":
    ep_cases.main(worker)
