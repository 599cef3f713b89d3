"""Expert-parallel faults injected on one rank, and the worker that runs a world of them.

``tests/test_ep_faults.py`` launches ``python tests/ep_fault_cases.py --rank R --world-size W --dir DIR``
with ``EP_FAULT_WORLD`` naming one of :data:`WORLDS`.  Each rank runs that world's scenarios in order,
on one gloo group with a short timeout, and saves ``{scenario: outcome}`` — ``("ok", max |error|
against the unsharded module)`` or ``("error", exception type, message)`` — then leaves at once
(no barrier: after some faults the ranks are out of step on purpose).  The last rank is the faulty one.
"""

from __future__ import annotations

import copy
import os
import sys

import torch

import ep_cases

E, K, D, I = 4, 2, 8, 6
GLOO_TIMEOUT_S = 20  # a rank left waiting fails after this
TRANSPORTS = ("all_gather", "all_to_all", "peer")
CAPACITY = 40  # the peer transport's max_tokens_per_rank: the most tokens a scenario gives a rank
OPTIONS = {"all_gather": {"transport": "all_gather"}, "all_to_all": {"transport": "all_to_all"},
           "peer": {"max_tokens_per_rank": CAPACITY}}
# Scenarios that leave every rank in step run first, one world for all of them; each fault that leaves
# the ranks out of step ends its world.
IN_STEP = ("K", "x_dtype", "weights_dtype", "D", "zero_and_many", "raise_then_retry")
# The peer transport checks once per shape (no host exchange per call): the calling-order faults are
# the caller's contract there.
WORLDS = {
    "in_step": [(s, t) for t in TRANSPORTS for s in IN_STEP] + [("forward_twice", "all_gather")],
    "forward_twice_all_to_all": [("forward_twice", "all_to_all")],
    "raise_then_exit": [("raise_then_exit", "all_to_all")],
    "raise_after_dispatch": [("raise_after_dispatch", "all_gather")],
    "forward_twice_then_stop": [("forward_twice_then_stop", "all_gather")],
}


def config():
    from moe_modules import MoEConfig

    return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, dtype=torch.float32)


def modules(transport: str, mesh, layers: int = 1):
    """``layers`` expert modules sharded over ``mesh`` (same parameters on every rank), and their unsharded twins."""
    import moe_modules

    pairs = []
    for layer in range(layers):
        torch.manual_seed(100 + layer)
        full = moe_modules.GroupedExperts(config())
        full.init_weights(torch.device("cpu"), init_std=0.5)
        pairs.append((moe_modules.apply_ep(copy.deepcopy(full), mesh, **OPTIONS[transport]), full))
    return pairs


def inputs(T: int, seed: int, k: int = K, dim: int = D, dtype=torch.float32, weights_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, dim, generator=g).to(dtype), torch.ones(T, dtype=torch.bool),
            torch.rand(T, k, generator=g).to(weights_dtype), torch.randint(-1, E, (T, k), generator=g))


def error_against(module, full, args) -> float:
    """Run ``module`` (forward + backward) and return its largest difference from the unsharded ``full``."""
    x, token_mask, weights, indices = args
    y = module(x, token_mask, weights, indices)
    y.square().sum().backward()
    return (y - full(x, token_mask, weights, indices)).abs().max().item() if y.numel() else 0.0


def run(scenario: str, transport: str, mesh, rank: int, world_size: int):
    faulty = rank == world_size - 1
    if scenario == "D":  # a dispatcher alone: a module's own check would refuse the width before any exchange
        from moe_modules.ep import make_dispatcher

        dispatcher = make_dispatcher(mesh, E, **OPTIONS[transport])
        dispatcher.dispatch(*inputs(5, rank, dim=D + 1 if faulty else D))
        return "no error"
    ((module, full),) = modules(transport, mesh)
    if scenario == "K":
        return error_against(module, full, inputs(5, rank, k=K + 1 if faulty else K))
    if scenario == "x_dtype":
        return error_against(module, full, inputs(5, rank, dtype=torch.float64 if faulty else torch.float32))
    if scenario == "weights_dtype":
        return error_against(module, full, inputs(5, rank, weights_dtype=torch.float64 if faulty else torch.float32))
    if scenario == "zero_and_many":
        return error_against(module, full, inputs({0: 0, world_size - 1: CAPACITY}.get(rank, 3), rank))
    if scenario == "raise_then_retry":
        if faulty:
            x, token_mask, weights, indices = inputs(5, rank)
            try:
                module(x, token_mask[:-1], weights, indices)  # a bad input: refused before any exchange
            except ValueError:
                pass
        return error_against(module, full, inputs(5, rank))
    if scenario == "raise_then_exit":
        if faulty:
            x, token_mask, weights, indices = inputs(5, rank)
            module(x, token_mask[:-1], weights, indices)  # raises; the worker saves it and leaves
        return error_against(module, full, inputs(5, rank))
    if scenario == "raise_after_dispatch":  # the faulty rank's experts raise between dispatch and combine
        if faulty:
            import moe_modules.grouped_experts as grouped_experts

            def broken(*args):
                raise RuntimeError("injected: the experts failed")

            grouped_experts.run_experts = broken
        return error_against(module, full, inputs(5, rank))
    if scenario == "forward_twice":  # the faulty rank runs layer 0 twice, then layer 1
        (first, _), (second, _) = modules(transport, mesh, layers=2)
        args = inputs(5, rank)
        for layer in ([first, first, second] if faulty else [first, second]):
            args = (layer(*args).detach(), *args[1:])
        return "no error"
    if scenario == "forward_twice_then_stop":  # the others leave after one call
        for _ in range(2 if faulty else 1):
            module(*inputs(5, rank))
        return "no error"
    raise ValueError(f"unknown scenario {scenario!r}")


def worker(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    ep_cases.join_gloo(rank, world_size, directory, timeout_s=GLOO_TIMEOUT_S)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    outcomes = {}
    for scenario, transport in WORLDS[os.environ["EP_FAULT_WORLD"]]:
        try:
            result = run(scenario, transport, mesh, rank, world_size)
            outcomes[(scenario, transport)] = ("ok", result)
        except Exception as e:  # noqa: BLE001  (the outcome under test)
            outcomes[(scenario, transport)] = ("error", type(e).__name__, str(e))
            if scenario.startswith("raise_") and scenario != "raise_then_retry":
                break
    torch.save(outcomes, os.path.join(directory, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    del dist
    os._exit(0)  # no barrier, no teardown: the ranks may be out of step


if __name__ == "__main__":
    ep_cases.main(worker)
