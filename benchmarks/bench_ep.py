"""Expert-parallel benchmark: all-to-all dispatch+combine bandwidth, and the EP layer against one GPU.

    torchrun --nproc-per-node 2 benchmarks/bench_ep.py
    torchrun --nproc-per-node 4 benchmarks/bench_ep.py
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --device cpu --tiny   # gloo dry run

Defaults are DeepSeek-V3's expert shapes: D=7168, I=2048, E=256, K=8, 4096 tokens per rank, bf16,
routing uniform over the experts.

1. Dispatch+combine of ``GroupedExpertsDeepEP``'s all-to-all path (route, count exchange, host
   read of the split sizes, gather of the rows, all-to-all of rows and probabilities, all-to-all
   back, float32 combine; identity experts) against a raw ``dist.all_to_all_single`` there and
   back with the same split sizes and bytes.  Bandwidth = bytes this rank sends / time.
2. Forward+backward of the EP layer (``GroupedExperts`` by all-gather / reduce-scatter,
   ``GroupedExpertsDeepEP`` by all-to-all) with 4096 tokens per rank, against one GPU running the
   single-device module on the whole batch (world_size x 4096 tokens, all experts): the same work,
   so the ideal speedup is the world size.

Times are the median over ``--iters`` on each rank, then the maximum over ranks.  Prints a table;
writes ``$OUT/bench_ep_ws{N}.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import wait_tensor

import ep_common
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig, apply_ep
from moe_modules.parallel import AllToAllDispatcher


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU/gloo check of the script's logic)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--dim", type=int, default=7168)
    p.add_argument("--inter", type=int, default=2048)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip-single", action="store_true", help="skip the one-GPU baseline (all experts on one GPU)")
    args = p.parse_args()
    if args.tiny:
        args.tokens, args.dim, args.inter, args.experts, args.topk, args.warmup, args.iters = 16, 32, 16, 8, 2, 1, 3
    return args


def bench_dispatch_combine(args, mesh, device, rank: int, world_size: int) -> dict:
    dispatcher = AllToAllDispatcher(mesh, args.experts)
    inp = ep_common.routed_tokens(args.tokens, args.experts, args.topk, args.dim, torch.bfloat16, device,
                                  seed=1000 + rank)
    x, mask, weights, indices = inp["x"], inp["token_mask"], inp["weights"], inp["indices"]

    def ours():
        d = dispatcher.dispatch(x, mask, weights, indices)
        wait_tensor(d.probs)  # identity experts do not read the probabilities; still wait for them
        return dispatcher.combine(d.rows, d)

    def dispatch_only():
        d = dispatcher.dispatch(x, mask, weights, indices)
        return wait_tensor(d.rows), wait_tensor(d.probs)  # the rows have arrived

    with torch.no_grad():
        d = dispatcher.dispatch(x, mask, weights, indices)
        wait_tensor(d.rows), wait_tensor(d.probs)
        send_splits, recv_splits = d.send_splits, d.recv_splits
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        send = torch.randn(n_send, args.dim, device=device).to(torch.bfloat16)
        recv = torch.empty(n_recv, args.dim, device=device, dtype=torch.bfloat16)
        back = torch.empty_like(send)

        def raw_there():
            dist.all_to_all_single(recv, send, recv_splits, send_splits)

        def raw_there_and_back():
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
            dist.all_to_all_single(back, recv, send_splits, recv_splits)

        timings = {
            "ours_dispatch_combine_ms": ep_common.time_ms(ours, device, args.warmup, args.iters),
            "raw_there_and_back_ms": ep_common.time_ms(raw_there_and_back, device, args.warmup, args.iters),
            "ours_dispatch_ms": ep_common.time_ms(dispatch_only, device, args.warmup, args.iters),
            "raw_there_ms": ep_common.time_ms(raw_there, device, args.warmup, args.iters),
        }
    row_bytes = args.dim * 2
    sent = torch.tensor([n_send, n_recv], dtype=torch.float64, device=device)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)  # the busiest rank bounds the step
    there_bytes, back_bytes = float(sent[0]) * row_bytes, float(sent[1]) * row_bytes
    result = dict(timings, rows_sent_max=int(sent[0]), rows_received_max=int(sent[1]),
                  send_splits_rank0=send_splits if rank == 0 else None)
    result["ours_GBps"] = (there_bytes + back_bytes) / timings["ours_dispatch_combine_ms"] / 1e6
    result["raw_GBps"] = (there_bytes + back_bytes) / timings["raw_there_and_back_ms"] / 1e6
    result["ours_dispatch_GBps"] = there_bytes / timings["ours_dispatch_ms"] / 1e6
    result["raw_there_GBps"] = there_bytes / timings["raw_there_ms"] / 1e6
    result["fraction_of_raw"] = timings["raw_there_and_back_ms"] / timings["ours_dispatch_combine_ms"]
    result["dispatch_fraction_of_raw"] = timings["raw_there_ms"] / timings["ours_dispatch_ms"]
    return result


def layer_step(module, inp: dict):
    """One forward+backward; parameter gradients are dropped first so nothing accumulates."""
    x = inp["x"].detach().requires_grad_()
    weights = inp["weights"].detach().requires_grad_()

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = weights.grad = None
        y = module(x, inp["token_mask"], weights, inp["indices"])
        y.backward(inp["grad_y"])

    return step


def build(cls, cfg, device):
    with torch.device(device):
        module = cls(cfg)
    module.init_weights(device)
    return module


def bench_layers(args, mesh, device, rank: int, world_size: int) -> dict:
    cfg = MoEConfig(n_routed_experts=args.experts, n_activated_experts=args.topk, dim=args.dim,
                    moe_inter_dim=args.inter, dtype=torch.bfloat16)
    results = {}
    if not args.skip_single:
        # Timed on each rank alone (no collective inside the try), so an out-of-memory error on one
        # rank cannot leave the others waiting; the slowest rank's time is reported (inf: a rank failed).
        single_ms = float("inf")
        try:
            module = build(GroupedExperts, cfg, device)
            batch = ep_common.routed_tokens(args.tokens * world_size, args.experts, args.topk, args.dim,
                                            torch.bfloat16, device, seed=7)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            single_ms = ep_common.local_median_ms(layer_step(module, batch), device, args.warmup, args.iters)
            if device.type == "cuda":
                results["one_gpu_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.cuda.OutOfMemoryError as error:
            results["one_gpu_error"] = "out of memory: " + str(error).splitlines()[0][:200]
        finally:
            module = batch = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        single_ms = ep_common.max_over_ranks(single_ms, device)
        results["one_gpu_whole_batch_ms"] = single_ms if single_ms != float("inf") else None
    mine = ep_common.routed_tokens(args.tokens, args.experts, args.topk, args.dim, torch.bfloat16, device,
                                   seed=2000 + rank)
    for cls in (GroupedExperts, GroupedExpertsDeepEP):
        module = apply_ep(build(cls, cfg, device), mesh)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the step's peak, not the full-size build's
        results[f"{cls.__name__}_ep_ms"] = ep_common.time_ms(layer_step(module, mine), device, args.warmup,
                                                             args.iters)
        module = None
        if device.type == "cuda":
            results[f"{cls.__name__}_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    return results


def main() -> None:
    args = parse_args()
    rank, world_size, device, mesh = ep_common.init_distributed(args.device)
    if args.experts % world_size:
        raise SystemExit(f"--experts {args.experts} is not divisible by the world size {world_size}")
    bandwidth = bench_dispatch_combine(args, mesh, device, rank, world_size)
    layers = bench_layers(args, mesh, device, rank, world_size)
    if rank == 0:
        shape = (f"D={args.dim} I={args.inter} E={args.experts} K={args.topk}, {args.tokens} tokens/rank, "
                 f"{world_size} ranks ({device.type}, {dist.get_backend()})")
        print(f"Dispatch + combine, {shape}; busiest rank sends {bandwidth['rows_sent_max']} rows "
              f"({bandwidth['rows_sent_max'] * args.dim * 2 / 1e6:.1f} MB) each way")
        print(ep_common.table(
            ["path", "ours ms", "raw a2a ms", "ours GB/s", "raw GB/s", "ours / raw"],
            [["dispatch", bandwidth["ours_dispatch_ms"], bandwidth["raw_there_ms"], bandwidth["ours_dispatch_GBps"],
              bandwidth["raw_there_GBps"], bandwidth["dispatch_fraction_of_raw"]],
             ["dispatch+combine", bandwidth["ours_dispatch_combine_ms"], bandwidth["raw_there_and_back_ms"],
              bandwidth["ours_GBps"], bandwidth["raw_GBps"], bandwidth["fraction_of_raw"]]]))
        single = layers.get("one_gpu_whole_batch_ms")
        rows = [[f"one GPU, {args.tokens * world_size} tokens, all experts",
                 single if single is not None else layers.get("one_gpu_error", "skipped"), "1",
                 layers.get("one_gpu_peak_GiB", "-")]]
        for name in ("GroupedExperts", "GroupedExpertsDeepEP"):
            ms = layers[f"{name}_ep_ms"]
            rows.append([f"{name} EP x{world_size}", ms, f"{single / ms:.2f}" if single else "-",
                         layers.get(f"{name}_peak_GiB", "-")])
        print(f"\nForward+backward, {shape}")
        print(ep_common.table(["layer", "ms", f"speedup (ideal {world_size})", "peak GiB (rank 0)"], rows))
        ep_common.write_json(f"bench_ep_ws{world_size}.json",
                             {"env": ep_common.environment(device), "args": vars(args), "dispatch_combine": bandwidth,
                              "layers": layers})
    ep_common.finish(0)


if __name__ == "__main__":
    main()
