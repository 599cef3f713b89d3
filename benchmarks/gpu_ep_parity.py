"""bf16 parity of both expert-parallel modules with the single-GPU module on the same tokens.

    torchrun --nproc-per-node 2 benchmarks/gpu_ep_parity.py
    torchrun --nproc-per-node 4 benchmarks/gpu_ep_parity.py
    torchrun --nproc-per-node 2 benchmarks/gpu_ep_parity.py --device cpu --tiny   # gloo dry run

Every rank builds the same global batch (uneven token counts, one rank with none at 4 ranks) and
the same parameters.  Each rank runs the single-device ``GroupedExperts`` on the whole batch in
bf16 and in float32 (the reference), then ``GroupedExperts`` (all-gather) and
``GroupedExpertsDeepEP`` (all-to-all, and the peer-memory dispatch of ``max_tokens_per_rank``)
under ``apply_ep`` on its own tokens, and compares the output
and every gradient (x, routing weights, its parameter shards).  Passes when each EP result is within
1e-2 (norm-wise relative) of the float32 reference, like the single-device bf16 result.
``--compile-backend`` also runs the EP modules under ``torch.compile(fullgraph=True)``.
Writes ``$OUT/ep_parity_ws{N}.json`` when ``OUT`` is set; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.distributed as dist

import ep_common
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig, apply_ep
from moe_modules.ep import deep_ep_importable

PARAMS = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")
CONFIGS = (("swiglu", False), ("quick_geglu", True), ("relu2", False))
BF16_TOL = 1e-2


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU/gloo check of the script's logic)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the first rank (others get fewer)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--compile-backend", default=None, help="also check torch.compile(fullgraph=True) with this backend")
    args = p.parse_args()
    if args.tiny:
        args.tokens, args.dim, args.inter, args.experts, args.topk = 12, 16, 8, 8, 2
    return args


def variants(compile_backend, capacity: int) -> list[tuple]:
    """``(name, module class, apply_ep's keyword arguments, compiled)`` of each EP run checked: both
    modules with the defaults (float32 partial sums), the all-to-all module sending bf16 partials as
    DeepEP does, the peer-memory dispatch (``max_tokens_per_rank``), and the defaults and the
    peer-memory dispatch under torch.compile when a backend is given; and, where the optional
    ``deep_ep`` package imports, the same bf16 partials through DeepEP's own buffers."""
    runs = [("GroupedExperts", GroupedExperts, {}, False),
            ("GroupedExpertsDeepEP", GroupedExpertsDeepEP, {}, False),
            ("GroupedExpertsDeepEP (bf16 partials)", GroupedExpertsDeepEP,
             {"reduce_dtype": None, "use_deep_ep": False}, False),
            ("GroupedExpertsDeepEP (peer memory)", GroupedExpertsDeepEP, {"max_tokens_per_rank": capacity}, False)]
    if compile_backend:
        runs += [(name, cls, kwargs, True) for name, cls, kwargs, _ in (runs[0], runs[1], runs[3])]
    if deep_ep_importable():
        runs.append(("GroupedExpertsDeepEP (DeepEP buffers)", GroupedExpertsDeepEP,
                     {"reduce_dtype": None, "use_deep_ep": True}, False))
    return runs


def token_counts(first: int, world_size: int) -> list[int]:
    """Uneven tokens per rank; from 3 ranks on, the third rank has none."""
    if world_size == 2:
        return [first, first * 5 // 8]
    pattern = (1.0, 0.5, 0.0, 0.75)
    return [int(first * pattern[r % 4]) for r in range(world_size)]


def make_params(cfg, device, seed: int) -> dict:
    """float32 expert parameters, the same on every rank (std 0.05 weights; nonzero biases so
    their gradients are checked too)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    E, D, I, W = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim, cfg.up_width
    shapes = {"gate_and_up_projs": (E, D, W), "down_projs": (E, I, D)}
    if cfg.expert_bias:
        shapes.update(gate_up_proj_bias=(E, W), down_proj_bias=(E, D))
    return {n: torch.randn(shape, generator=gen, device=device) * 0.05 for n, shape in shapes.items()}


def make_module(cls, cfg, params: dict, device):
    with torch.device(device):
        module = cls(cfg)
    with torch.no_grad():
        for name in PARAMS:
            if getattr(module, name) is not None:
                getattr(module, name).copy_(params[name])
    return module


def run(module, inputs: dict, tokens: slice) -> dict:
    """Forward + backward on ``tokens``; the output and every gradient (local shards for DTensors)."""
    x = inputs["x"][tokens].detach().clone().requires_grad_()
    weights = inputs["weights"][tokens].detach().clone().requires_grad_()
    y = module(x, inputs["token_mask"][tokens], weights, inputs["indices"][tokens])
    (y * inputs["grad_y"][tokens]).sum().backward()
    out = {"y": y.detach(), "x_grad": x.grad, "weights_grad": weights.grad}
    for name in PARAMS:
        p = getattr(module, name)
        if p is not None:
            grad = p.grad
            out[name + "_grad"] = grad.to_local() if hasattr(grad, "to_local") else grad
    return out


def cuda_graph_error(module, inputs: dict, tokens: slice) -> float | str:
    """The peer-memory dispatch has no host sync: capture the forward in a CUDA graph, replay it, and
    return its relative error against an eager forward on the same inputs (or why capture failed)."""
    args = (inputs["x"][tokens].detach(), inputs["token_mask"][tokens], inputs["weights"][tokens].detach(),
            inputs["indices"][tokens])
    try:
        with torch.no_grad():
            eager = module(*args)
            graph, out = ep_common.cuda_graph(lambda: module(*args))
            graph.replay()
            torch.cuda.synchronize()
            return ep_common.rel_err(out, eager)
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        return f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"


def main() -> None:
    args = parse_args()
    rank, world_size, device, mesh = ep_common.init_distributed(args.device)
    counts = token_counts(args.tokens, world_size)
    mine = slice(sum(counts[:rank]), sum(counts[: rank + 1]))
    experts = slice(rank * args.experts // world_size, (rank + 1) * args.experts // world_size)
    records, graph_checks = [], []
    runs = variants(args.compile_backend, max(counts))
    if rank == 0 and not deep_ep_importable():
        print("DeepEP buffers: not checked (the optional deep_ep package does not import here)")
    for activation, bias in CONFIGS:
        cfg32 = MoEConfig(n_routed_experts=args.experts, n_activated_experts=args.topk, dim=args.dim,
                          moe_inter_dim=args.inter, expert_activation=activation, expert_bias=bias,
                          dtype=torch.float32)
        cfg16 = dataclasses.replace(cfg32, dtype=torch.bfloat16)
        inputs32 = ep_common.routed_tokens(sum(counts), args.experts, args.topk, args.dim, torch.float32, device,
                                           seed=1234, mask_fraction=0.1)
        inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs32.items()}
        params32 = make_params(cfg32, device, seed=4321)
        params16 = {n: p.to(torch.bfloat16) for n, p in params32.items()}

        everything = slice(0, sum(counts))
        ref = run(make_module(GroupedExperts, cfg32, params32, device), inputs32, everything)
        single = run(make_module(GroupedExperts, cfg16, params16, device), inputs16, everything)

        def expected(full: dict) -> dict:
            return {k: v[experts] if k.endswith(("projs_grad", "bias_grad")) else v[mine] for k, v in full.items()}

        ref, single = expected(ref), expected(single)
        for name, cls, ep_kwargs, compiled in runs:
            module = apply_ep(make_module(cls, cfg16, params16, device), mesh, **ep_kwargs)
            forward = torch.compile(module, fullgraph=True, backend=args.compile_backend) if compiled else module
            got = run(forward, inputs16, mine)
            if "max_tokens_per_rank" in ep_kwargs and not compiled and device.type == "cuda":
                graph_checks.append(cuda_graph_error(module, inputs16, mine))
            for key in ref:
                records.append({"module": name + (" (compiled)" if compiled else ""), "activation": activation,
                                "bias": bias, "tensor": key, "rank": rank,
                                "err_vs_fp32": ep_common.rel_err(got[key], ref[key]),
                                "err_vs_single_bf16": ep_common.rel_err(got[key], single[key]),
                                "single_bf16_err_vs_fp32": ep_common.rel_err(single[key], ref[key])})

    gathered = [None] * world_size
    dist.all_gather_object(gathered, records)
    worst = {}
    for r in (rec for per_rank in gathered for rec in per_rank):
        key = (r["module"], r["activation"], r["bias"], r["tensor"])
        if key not in worst or r["err_vs_fp32"] > worst[key]["err_vs_fp32"]:
            worst[key] = r
    failed = [r for r in worst.values() if not r["err_vs_fp32"] < BF16_TOL]
    all_graphs = [None] * world_size
    dist.all_gather_object(all_graphs, graph_checks)
    graph_checks = [g for per_rank in all_graphs for g in per_rank]
    # A replay reruns the same kernels on the same inputs: it must equal the eager forward.
    graph_failed = [g for g in graph_checks if not (isinstance(g, float) and g < 1e-6)]
    if rank == 0:
        rows = []  # one row per (module, activation, bias): the worst tensor and rank
        for group in dict.fromkeys(k[:3] for k in worst):
            members = [r for k, r in worst.items() if k[:3] == group]
            top = max(members, key=lambda r: r["err_vs_fp32"])
            rows.append([group[0], group[1], "bias" if group[2] else "-", top["tensor"], top["err_vs_fp32"],
                         max(r["err_vs_single_bf16"] for r in members),
                         max(r["single_bf16_err_vs_fp32"] for r in members),
                         "ok" if all(r["err_vs_fp32"] < BF16_TOL for r in members) else "FAIL"])
        print(f"EP bf16 parity, {world_size} ranks ({device.type}), tokens per rank {counts}, "
              f"E={args.experts} K={args.topk} D={args.dim} I={args.inter}; worst over ranks and over "
              f"y and the gradients of x, routing weights and parameter shards")
        print(ep_common.table(["module", "act", "bias", "worst tensor", "EP vs fp32", "EP vs 1-dev bf16",
                               "1-dev bf16 vs fp32", ""], rows))
        if graph_checks:
            print(f"CUDA graph of the peer-memory forward, replay vs eager on every rank and config: "
                  f"{'ok' if not graph_failed else 'FAILED'} {graph_checks}")
        print(f"{'FAILED' if failed or graph_failed else 'PASSED'}: {len(worst) - len(failed)}/{len(worst)} "
              f"within {BF16_TOL:g}")
        ep_common.write_json(f"ep_parity_ws{world_size}.json",
                             {"env": ep_common.environment(device), "token_counts": counts, "args": vars(args),
                              "tolerance": BF16_TOL, "passed": not failed and not graph_failed,
                              "cuda_graph_rel_err": graph_checks, "results": list(worst.values())})
    ep_common.finish(0)


if __name__ == "__main__":
    main()
