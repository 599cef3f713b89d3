"""Expert-parallel benchmark: all-to-all dispatch+combine bandwidth, and the EP layer against one GPU.

    torchrun --nproc-per-node 2 benchmarks/bench_ep.py
    torchrun --nproc-per-node 4 benchmarks/bench_ep.py
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py --device cpu --tiny   # gloo dry run

Defaults are DeepSeek-V3's expert shapes: D=7168, I=2048, E=256, K=8, 4096 tokens per rank, bf16,
routing uniform over the experts.

1. Dispatch+combine of ``GroupedExpertsDeepEP``'s all-to-all path (route over ranks, count
   exchange, host read of the split sizes, gather of the rows, all-to-all of the rows and of their
   weights / local expert ids, all-to-all back, float32 combine; identity experts) against a raw
   ``dist.all_to_all_single`` there and back with the same split sizes and bytes.  Bandwidth =
   token-row bytes the busiest rank sends / time (the metadata, 0.5% more, count against ours).
   Also timed: a raw all-to-all of one row per (token, expert) pair, what a per-pair dispatch moves.
2. Forward+backward of the EP layer (``GroupedExperts`` by all-gather / reduce-scatter,
   ``GroupedExpertsDeepEP`` by all-to-all) with 4096 tokens per rank, against one GPU running the
   single-device module on the whole batch (world_size x 4096 tokens, all experts): the same work,
   so the ideal speedup is the world size.

Times are the median over ``--iters`` on each rank, then the maximum over ranks; "back to back"
times ``--iters`` calls queued together.  ``--host-costs`` adds the host time of each step,
``--profile`` a torch.profiler table and ``--trace`` a chrome trace (rank 0).  Prints tables;
writes ``$OUT/bench_ep_ws{N}.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import ep_common
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig, apply_ep
from moe_modules.ep import AllToAllDispatcher, PeerDispatcher, deep_ep_importable


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
    p.add_argument("--skip-layers", action="store_true", help="only the dispatch+combine bandwidth")
    p.add_argument("--profile", action="store_true", help="print rank 0's CUDA kernel times of dispatch+combine")
    p.add_argument("--host-costs", action="store_true",
                   help="host time per call of each step of dispatch+combine (queued back to back, one sync)")
    p.add_argument("--trace", action="store_true", help="write rank 0's torch.profiler trace of dispatch+combine to $OUT")
    args = p.parse_args()
    if args.tiny:
        args.tokens, args.dim, args.inter, args.experts, args.topk, args.warmup, args.iters = 16, 32, 16, 8, 2, 1, 3
    return args


def bench_dispatch_combine(args, mesh, device, rank: int, world_size: int) -> dict:
    dispatcher = AllToAllDispatcher(mesh, args.experts)
    inp = ep_common.routed_tokens(args.tokens, args.experts, args.topk, args.dim, torch.bfloat16, device,
                                  seed=1000 + rank)
    x, mask, weights, indices = inp["x"], inp["token_mask"], inp["weights"], inp["indices"]

    def dispatch_only():
        d = dispatcher.dispatch(x, mask, weights, indices)
        return d.x, d.weights

    def ours():
        d = dispatcher.dispatch(x, mask, weights, indices)
        return dispatcher.combine(d.x, d)  # identity experts: each token's partial is its row

    with torch.no_grad():
        d = dispatcher.dispatch(x, mask, weights, indices)
        send_splits, recv_splits = d.state.send_splits, d.state.recv_splits
        n_send, n_recv = sum(send_splits), sum(recv_splits)
        send = torch.randn(n_send, args.dim, device=device).to(torch.bfloat16)
        recv = torch.empty(n_recv, args.dim, device=device, dtype=torch.bfloat16)
        back = torch.empty_like(send)
        # What a per-(token, expert) dispatch would move: every routed pair's row, split by owner rank.
        owner = indices // (args.experts // world_size)
        pair_splits = torch.bincount(owner.reshape(-1), minlength=world_size)
        pair_recv_splits = torch.empty_like(pair_splits)
        dist.all_to_all_single(pair_recv_splits, pair_splits)
        pair_splits, pair_recv_splits = pair_splits.tolist(), pair_recv_splits.tolist()
        pair_send = torch.randn(sum(pair_splits), args.dim, device=device).to(torch.bfloat16)
        pair_recv = torch.empty(sum(pair_recv_splits), args.dim, device=device, dtype=torch.bfloat16)
        pair_back = torch.empty_like(pair_send)

        def raw_there():
            dist.all_to_all_single(recv, send, recv_splits, send_splits)

        def raw_there_and_back():
            dist.all_to_all_single(recv, send, recv_splits, send_splits)
            dist.all_to_all_single(back, recv, send_splits, recv_splits)

        def raw_back():
            dist.all_to_all_single(back, recv, send_splits, recv_splits)

        def raw_per_pair_there_and_back():
            dist.all_to_all_single(pair_recv, pair_send, pair_recv_splits, pair_splits)
            dist.all_to_all_single(pair_back, pair_recv, pair_splits, pair_recv_splits)

        timings = {
            "ours_dispatch_combine_ms": ep_common.time_ms(ours, device, args.warmup, args.iters),
            "raw_there_and_back_ms": ep_common.time_ms(raw_there_and_back, device, args.warmup, args.iters),
            "ours_dispatch_ms": ep_common.time_ms(dispatch_only, device, args.warmup, args.iters),
            "raw_there_ms": ep_common.time_ms(raw_there, device, args.warmup, args.iters),
            "raw_per_pair_there_and_back_ms": ep_common.time_ms(raw_per_pair_there_and_back, device, args.warmup,
                                                                args.iters),
            # Back to back: the host runs ahead (as in a training step) and launch costs overlap transfers.
            "ours_pipelined_ms": ep_common.time_pipelined_ms(ours, device, args.warmup, args.iters),
            "raw_pipelined_ms": ep_common.time_pipelined_ms(raw_there_and_back, device, args.warmup, args.iters),
        }
        try:
            compiled = torch.compile(ours, fullgraph=True)
            timings["ours_compiled_ms"] = ep_common.time_ms(compiled, device, args.warmup, args.iters)
            timings["ours_compiled_pipelined_ms"] = ep_common.time_pipelined_ms(compiled, device, args.warmup,
                                                                                args.iters)
        except Exception as error:  # noqa: BLE001 - reported, the eager figures stand on their own
            timings["ours_compiled_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        timings.update(bench_peer(args, mesh, device, (x, mask, weights, indices),
                                  {"raw_there_and_back": raw_there_and_back, "raw_there": raw_there,
                                   "raw_back": raw_back, "ours_dispatch_combine": ours}))
        if args.profile and device.type == "cuda":
            timings["profile"] = ep_common.profile_table(ours, device, rank)
        if args.host_costs:
            timings["host_us"] = host_costs(dispatcher, x, mask, weights, indices, d, device, ours)
        if args.trace and device.type == "cuda":
            ep_common.write_trace(ours, device, rank, f"trace_dispatch_combine_ws{world_size}.json")
    row_bytes = args.dim * 2
    sent = torch.tensor([n_send, n_recv, sum(pair_splits)], dtype=torch.float64, device=device)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)  # the busiest rank bounds the step
    there_bytes, back_bytes = float(sent[0]) * row_bytes, float(sent[1]) * row_bytes
    result = dict(timings, rows_sent_max=int(sent[0]), rows_received_max=int(sent[1]),
                  pair_rows_sent_max=int(sent[2]), rows_per_token=n_send / max(args.tokens, 1),
                  send_splits_rank0=send_splits if rank == 0 else None)
    result["ours_GBps"] = (there_bytes + back_bytes) / timings["ours_dispatch_combine_ms"] / 1e6
    result["raw_GBps"] = (there_bytes + back_bytes) / timings["raw_there_and_back_ms"] / 1e6
    result["ours_dispatch_GBps"] = there_bytes / timings["ours_dispatch_ms"] / 1e6
    result["raw_there_GBps"] = there_bytes / timings["raw_there_ms"] / 1e6
    result["fraction_of_raw"] = timings["raw_there_and_back_ms"] / timings["ours_dispatch_combine_ms"]
    result["dispatch_fraction_of_raw"] = timings["raw_there_ms"] / timings["ours_dispatch_ms"]
    result["speedup_vs_raw_per_pair"] = timings["raw_per_pair_there_and_back_ms"] / timings["ours_dispatch_combine_ms"]
    result["pipelined_fraction_of_raw"] = timings["raw_pipelined_ms"] / timings["ours_pipelined_ms"]
    for ours_name, raw_name in (("peer_dispatch_combine", "raw_there_and_back"), ("peer_dispatch", "raw_there"),
                                ("peer_combine", "raw_back"), ("ours_dispatch_combine", "raw_there_and_back"),
                                ("peer_compiled", "raw_there_and_back"), ("peer_graph", "raw_there_and_back")):
        if f"{ours_name}_host_ahead_ms" in timings:
            result[f"{ours_name}_host_ahead_fraction_of_raw"] = (timings[f"{raw_name}_host_ahead_ms"]
                                                                 / timings[f"{ours_name}_host_ahead_ms"])
    result["peer_fraction_of_raw"] = timings["raw_there_and_back_ms"] / timings["peer_dispatch_combine_ms"]
    result["peer_pipelined_fraction_of_raw"] = timings["raw_pipelined_ms"] / timings["peer_pipelined_ms"]
    if "ours_compiled_ms" in timings:
        result["compiled_fraction_of_raw"] = timings["raw_there_and_back_ms"] / timings["ours_compiled_ms"]
        result["compiled_pipelined_fraction_of_raw"] = timings["raw_pipelined_ms"] / timings["ours_compiled_pipelined_ms"]
    return result


def bench_peer(args, mesh, device, inputs: tuple, baselines: dict) -> dict:
    """The peer-memory dispatch (``apply_ep(max_tokens_per_rank=tokens)``) with identity experts, and
    device time with the host ahead of the device for it and the baselines (the raw all-to-alls, and
    the all-to-all dispatch, whose host read of the split sizes keeps the host from getting ahead)."""
    x, mask, weights, indices = inputs
    peer = PeerDispatcher(mesh, args.experts, args.tokens, reduce_dtype=None)  # bf16 partials, like the raw a2a
    received = peer.dispatch(x, mask, weights, indices)

    def peer_dispatch():
        return peer.dispatch(x, mask, weights, indices).x

    def peer_combine():
        return peer.combine(received.x, received)

    def peer_dispatch_combine():
        got = peer.dispatch(x, mask, weights, indices)
        return peer.combine(got.x, got)  # identity experts

    timings = {"peer_dispatch_combine_ms": ep_common.time_ms(peer_dispatch_combine, device, args.warmup, args.iters),
               "peer_pipelined_ms": ep_common.time_pipelined_ms(peer_dispatch_combine, device, args.warmup,
                                                                args.iters)}
    host_ahead = {}
    runs = {"peer_dispatch_combine": peer_dispatch_combine, "peer_dispatch": peer_dispatch,
            "peer_combine": peer_combine, **baselines}
    try:
        runs["peer_compiled"] = torch.compile(peer_dispatch_combine, fullgraph=True)
        timings["peer_compiled_ms"] = ep_common.time_ms(runs["peer_compiled"], device, args.warmup, args.iters)
    except Exception as error:  # noqa: BLE001 - reported; the eager figures stand on their own
        runs.pop("peer_compiled", None)
        timings["peer_compiled_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    if device.type == "cuda":  # no host sync: the whole dispatch+combine replays as one CUDA graph
        try:
            graph, _ = ep_common.cuda_graph(peer_dispatch_combine)
            runs["peer_graph"] = graph.replay
            timings["peer_graph_ms"] = ep_common.time_ms(graph.replay, device, args.warmup, args.iters)
        except Exception as error:  # noqa: BLE001 - reported; the other figures stand on their own
            timings["peer_graph_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    for name, fn in runs.items():
        timings[f"{name}_host_ahead_ms"], host_ahead[name] = ep_common.time_host_ahead_ms(fn, device, args.warmup,
                                                                                          args.iters)
    timings["host_ahead_held"] = host_ahead
    timings["peer_capacity_rows"] = peer.capacity * peer.ep_size
    if args.profile and device.type == "cuda":
        timings["peer_profile"] = ep_common.profile_table(peer_dispatch_combine, device, dist.get_rank())
        if "peer_compiled" in runs:
            timings["peer_compiled_profile"] = ep_common.profile_table(runs["peer_compiled"], device, dist.get_rank())
    return timings


# (result name, module, apply_ep's keyword arguments for these args): the defaults, the all-to-all module sending its
# partial outputs home in bf16 (DeepEP's choice: half the combine bytes), and the peer-memory dispatch.
EP_LAYERS = (("GroupedExperts", GroupedExperts, lambda args: {}),
             ("GroupedExpertsDeepEP", GroupedExpertsDeepEP, lambda args: {}),
             ("GroupedExpertsDeepEP_bf16_partials", GroupedExpertsDeepEP,
              lambda args: {"reduce_dtype": None, "use_deep_ep": False}),
             ("GroupedExpertsDeepEP_peer", GroupedExpertsDeepEP, lambda args: {"max_tokens_per_rank": args.tokens}))
if deep_ep_importable():  # the optional package: the same bf16 partials through DeepEP's own buffers
    EP_LAYERS += (("GroupedExpertsDeepEP_deep_ep", GroupedExpertsDeepEP,
                   lambda args: {"reduce_dtype": None, "use_deep_ep": True}),)


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


def host_costs(dispatcher, x, mask, weights, indices, d, device, whole) -> dict:
    """Host microseconds per call of each step, queued back to back with one sync at the end: while
    the device keeps up, this is what the host spends launching the step (every rank runs it)."""
    import time

    import moe_ops
    from moe_modules.ep import _comm as comm

    group = dispatcher.ep_mesh.get_group()
    row_of_pair, offsets, pair_of_row, rows_per_rank, _ = dispatcher._send_layout(mask, indices)
    sent = d.state
    n_send = sum(sent.send_splits)
    rows = moe_ops.gather(x, row_of_pair, offsets, None, n_send)
    small = torch.zeros(8, device=device)
    steps = {
        "tiny aten op (add)": lambda: small.add(1),
        "send layout (moe.route over the ranks [T, ep], and its inputs)": lambda: dispatcher._send_layout(mask, indices),
        "moe.route over all experts [T, K]": lambda: moe_ops.route(indices, mask, 0, dispatcher.num_experts),
        "moe.gather of the rows sent": lambda: moe_ops.gather(x, row_of_pair, offsets, None, n_send),
        "moe.combine of the rows received back": lambda: moe_ops.combine(rows, row_of_pair, offsets),
        "all_to_all (eager c10d, ours)": lambda: comm.all_to_all_autograd(rows, sent.recv_splits, sent.send_splits, group),
        "all_to_all (functional collective)": lambda: comm.fc.wait_tensor(
            comm.fc.all_to_all_single(rows, sent.recv_splits, sent.send_splits, group)),
        "dist.all_to_all_single into a preallocated buffer": lambda: dist.all_to_all_single(
            torch.empty_like(d.x), rows, sent.recv_splits, sent.send_splits, group=group),
        "host read of 8 ints (tolist, idle queue)": lambda: small.tolist(),
        "whole dispatch + combine": whole,
    }
    costs = {}
    for name, fn in steps.items():
        fn()
        ep_common.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        costs[name] = (time.perf_counter() - t0) / 20 * 1e6
        ep_common.synchronize(device)
    return costs


def single_gpu_ms(cfg, args, tokens: int, device, results: dict) -> tuple[float, str | None]:
    """fwd+bwd ms of the single-device module with every expert on ``tokens`` tokens; ``(inf, why)`` on OOM."""
    module = batch = None
    try:
        module = build(GroupedExperts, cfg, device)
        batch = ep_common.routed_tokens(tokens, args.experts, args.topk, args.dim, torch.bfloat16, device, seed=7)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ms = ep_common.local_median_ms(layer_step(module, batch), device, args.warmup, args.iters)
        if device.type == "cuda":
            results[f"one_gpu_{tokens}_tokens_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        return ms, None
    except torch.cuda.OutOfMemoryError as error:
        return float("inf"), f"{tokens} tokens: out of memory: " + str(error).splitlines()[0][:160]
    finally:
        module = batch = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_layers(args, mesh, device, rank: int, world_size: int) -> dict:
    cfg = MoEConfig(n_routed_experts=args.experts, n_activated_experts=args.topk, dim=args.dim,
                    moe_inter_dim=args.inter, dtype=torch.bfloat16)
    results = {}
    if not args.skip_single:
        # Timed on each rank alone (no collective inside), so an out-of-memory error on one rank
        # cannot leave the others waiting; the slowest rank's time is reported (inf: a rank failed).
        # When the whole batch does not fit one GPU (EP4 at DeepSeek-V3 shapes on 80 GB), one rank's
        # batch is timed and scaled by the world size: the expert GEMMs dominate and are linear in tokens.
        whole, error = single_gpu_ms(cfg, args, args.tokens * world_size, device, results)
        scaled = float("inf")
        if error is not None:
            results["one_gpu_error"] = error
            one_rank, _ = single_gpu_ms(cfg, args, args.tokens, device, results)
            scaled = one_rank * world_size
        whole, scaled = ep_common.max_over_ranks(whole, device), ep_common.max_over_ranks(scaled, device)
        results["one_gpu_whole_batch_ms"] = whole if whole != float("inf") else None
        if scaled != float("inf"):
            results["one_gpu_scaled_ms"] = scaled
    mine = ep_common.routed_tokens(args.tokens, args.experts, args.topk, args.dim, torch.bfloat16, device,
                                   seed=2000 + rank)
    for name, cls, ep_kwargs in EP_LAYERS:
        module = apply_ep(build(cls, cfg, device), mesh, **ep_kwargs(args))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the step's peak, not the full-size build's
        results[f"{name}_ep_ms"] = ep_common.time_ms(layer_step(module, mine), device, args.warmup, args.iters)
        module = None
        if device.type == "cuda":
            results[f"{name}_peak_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    return results


def main() -> None:
    args = parse_args()
    rank, world_size, device, mesh = ep_common.init_distributed(args.device)
    if args.experts % world_size:
        raise SystemExit(f"--experts {args.experts} is not divisible by the world size {world_size}")
    bandwidth = bench_dispatch_combine(args, mesh, device, rank, world_size)
    layers = {} if args.skip_layers else bench_layers(args, mesh, device, rank, world_size)
    if rank == 0:
        shape = (f"D={args.dim} I={args.inter} E={args.experts} K={args.topk}, {args.tokens} tokens/rank, "
                 f"{world_size} ranks ({device.type}, {dist.get_backend()})")
        print(f"Dispatch + combine, {shape}; the busiest rank sends {bandwidth['rows_sent_max']} rows "
              f"({bandwidth['rows_sent_max'] * args.dim * 2 / 1e6:.1f} MB; {bandwidth['rows_per_token']:.2f} per token "
              f"on rank 0) each way; one row per (token, expert) would be {bandwidth['pair_rows_sent_max']}")
        print(ep_common.table(
            ["path", "ours ms", "raw a2a ms", "ours GB/s", "raw GB/s", "ours / raw"],
            [["dispatch", bandwidth["ours_dispatch_ms"], bandwidth["raw_there_ms"], bandwidth["ours_dispatch_GBps"],
              bandwidth["raw_there_GBps"], bandwidth["dispatch_fraction_of_raw"]],
             ["dispatch+combine", bandwidth["ours_dispatch_combine_ms"], bandwidth["raw_there_and_back_ms"],
              bandwidth["ours_GBps"], bandwidth["raw_GBps"], bandwidth["fraction_of_raw"]],
             ["dispatch+combine, back to back", bandwidth["ours_pipelined_ms"], bandwidth["raw_pipelined_ms"], "-",
              "-", bandwidth["pipelined_fraction_of_raw"]]]
            + ([["dispatch+combine, compiled", bandwidth["ours_compiled_ms"], bandwidth["raw_there_and_back_ms"], "-",
                 "-", bandwidth["compiled_fraction_of_raw"]],
                ["dispatch+combine, compiled, back to back", bandwidth["ours_compiled_pipelined_ms"],
                 bandwidth["raw_pipelined_ms"], "-", "-", bandwidth["compiled_pipelined_fraction_of_raw"]]]
               if "compiled_fraction_of_raw" in bandwidth else [])))
        if "ours_compiled_error" in bandwidth:
            print("compiled dispatch+combine failed:", bandwidth["ours_compiled_error"])
        print(f"\nPeer-memory dispatch (max_tokens_per_rank={args.tokens}: {bandwidth['peer_capacity_rows']} receive "
              f"rows per rank), same rows; device ms per call with the host ahead (held on every rank: "
              f"{bandwidth['host_ahead_held']})")
        ahead = [[name, bandwidth[f"{name}_host_ahead_ms"], bandwidth[f"{raw}_host_ahead_ms"],
                  bandwidth.get(f"{name}_host_ahead_fraction_of_raw", "-")]
                 for name, raw in (("peer_dispatch", "raw_there"), ("peer_combine", "raw_back"),
                                   ("peer_dispatch_combine", "raw_there_and_back"),
                                   ("peer_compiled", "raw_there_and_back"), ("peer_graph", "raw_there_and_back"),
                                   ("ours_dispatch_combine", "raw_there_and_back"))
                 if f"{name}_host_ahead_ms" in bandwidth]
        print(ep_common.table(["path (host ahead)", "ours ms", "raw a2a ms", "raw / ours"], ahead))
        print(f"peer dispatch+combine, one call: {bandwidth['peer_dispatch_combine_ms']:.3g} ms "
              f"({bandwidth['peer_fraction_of_raw']:.2f} of raw); back to back: {bandwidth['peer_pipelined_ms']:.3g} ms "
              f"({bandwidth['peer_pipelined_fraction_of_raw']:.2f} of raw)"
              + (f"; compiled, one call: {bandwidth['peer_compiled_ms']:.3g} ms" if "peer_compiled_ms" in bandwidth
                 else f"; compiled failed: {bandwidth.get('peer_compiled_error')}")
              + (f"; CUDA graph replay, one call: {bandwidth['peer_graph_ms']:.3g} ms "
                 f"({bandwidth['raw_there_and_back_ms'] / bandwidth['peer_graph_ms']:.2f} of raw)"
                 if "peer_graph_ms" in bandwidth else f"; CUDA graph: {bandwidth.get('peer_graph_error', 'n/a')}"))
        print(f"raw all_to_all_single there and back of one row per (token, expert): "
              f"{bandwidth['raw_per_pair_there_and_back_ms']:.3g} ms "
              f"({bandwidth['speedup_vs_raw_per_pair']:.2f}x ours' time)")
        if "host_us" in bandwidth:
            print("\nrank 0, host us per call (queued back to back):")
            for name, us in bandwidth["host_us"].items():
                print(f"  {us:9.1f}  {name}")
        if "profile" in bandwidth:
            print("\nrank 0, dispatch+combine, CUDA time per kernel (one call):\n" + bandwidth["profile"])
        for key, what in (("peer_profile", "eager"), ("peer_compiled_profile", "compiled")):
            if key in bandwidth:
                print(f"\nrank 0, peer dispatch+combine ({what}), CUDA time per kernel (one call):\n{bandwidth[key]}")
        if not layers:
            ep_common.write_json(f"bench_ep_ws{world_size}.json", {"env": ep_common.environment(device),
                                                                  "args": vars(args), "dispatch_combine": bandwidth})
            ep_common.finish(0)
        single = layers.get("one_gpu_whole_batch_ms")
        label = f"one GPU, {args.tokens * world_size} tokens, all experts"
        if single is None and "one_gpu_scaled_ms" in layers:
            single = layers["one_gpu_scaled_ms"]
            label = f"one GPU, {args.tokens} tokens x {world_size} (the whole batch is out of memory)"
        peak = layers.get(f"one_gpu_{args.tokens * world_size}_tokens_peak_GiB",
                          layers.get(f"one_gpu_{args.tokens}_tokens_peak_GiB", "-"))
        rows = [[label, single if single is not None else layers.get("one_gpu_error", "skipped"), "1", peak]]
        for name, _, _ in EP_LAYERS:
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
