"""What the expert-parallel GPU scripts share: process group, inputs, timing, table and JSON output.

Both scripts run under ``torchrun`` (NCCL on GPUs; ``--device cpu`` uses gloo so their logic can be
checked on a laptop).  Nothing here enables NVLink multicast: ``NCCL_NVLS_ENABLE`` is left as the
machine sets it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist


def init_distributed(device_kind: str):
    """``(rank, world_size, device, ep_mesh)`` from torchrun's environment."""
    from torch.distributed.device_mesh import init_device_mesh

    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device; use --device cpu for a gloo dry run")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=120), device_id=device if backend == "nccl" else None)
    world_size = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("ep",))
    return dist.get_rank(), world_size, device, mesh


def routed_tokens(num_tokens: int, num_experts: int, top_k: int, dim: int, dtype, device, seed: int,
                  mask_fraction: float = 0.0) -> dict:
    """Random tokens with top-k routing over all experts (balanced in expectation); the same on every
    rank for the same seed and device type."""
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(num_tokens, num_experts, generator=gen, device=device)
    top = scores.topk(top_k, dim=1)
    return {
        "x": torch.randn(num_tokens, dim, generator=gen, device=device).to(dtype),
        "token_mask": torch.rand(num_tokens, generator=gen, device=device) >= mask_fraction,
        "weights": torch.softmax(top.values, dim=1).to(dtype),
        "indices": top.indices,
        "grad_y": torch.randn(num_tokens, dim, generator=gen, device=device).to(dtype),
    }


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on each rank (started together), then the maximum over ranks (a
    collective step is as slow as its slowest rank).  Every rank must call it with the same arguments."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    dist.barrier()
    return max_over_ranks(local_median_ms(fn, device, 0, iters), device)


def time_pipelined_ms(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Milliseconds per call of ``iters`` back-to-back calls (one start and one end event; the host
    may run ahead of the device, as in a training step), then the maximum over ranks."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    dist.barrier()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / iters
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / iters
    return max_over_ranks(ms, device)


def time_host_ahead_ms(fn: Callable[[], object], device, warmup: int, iters: int) -> tuple[float, bool]:
    """Device milliseconds per call of ``iters`` calls queued behind a sleep kernel, so that the whole
    queue is built before the device reaches it: the device's own time, with every host cost hidden
    as in a training step whose GEMMs keep the host ahead.  Returns ``(max over ranks, whether the
    host finished queueing before the sleep ended on every rank)``.  A host sync inside ``fn``
    drains the queue, so for such a path this is its back-to-back time.  CPU: back to back."""
    if device.type != "cuda":
        return time_pipelined_ms(fn, device, warmup, iters), True
    for _ in range(warmup):
        fn()
    synchronize(device)
    sleep_ms = 200.0
    probe_s, probe_e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe_s.record()
    torch.cuda._sleep(10_000_000)
    probe_e.record()
    probe_e.synchronize()
    cycles = int(10_000_000 * sleep_ms / probe_s.elapsed_time(probe_e))
    dist.barrier()
    synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    queued_ms = (time.perf_counter() - t0) * 1e3
    end.synchronize()
    ahead = torch.tensor([0.0 if queued_ms < 0.8 * sleep_ms else 1.0], device=device)
    dist.all_reduce(ahead, op=dist.ReduceOp.MAX)
    return max_over_ranks(start.elapsed_time(end) / iters, device), bool(ahead.item() == 0.0)


def cuda_graph(fn: Callable[[], object]):
    """``(graph, output)``: ``fn`` captured in a CUDA graph after two warm-up calls on a side stream
    (every rank captures together; collectives inside run only at replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def local_median_ms(fn: Callable[[], object], device, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` on this rank alone (no collective: safe inside try/except)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def profile_table(fn: Callable[[], object], device, rank: int, rows: int = 18) -> str:
    """CUDA time per kernel of one call of ``fn`` (after a warm-up call), as torch.profiler's table.
    Every rank runs it (``fn`` holds collectives); only rank 0's table is returned."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize(device)
    if rank != 0:
        return ""
    averages = prof.key_averages()
    return (averages.table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)
            + "\nby host time:\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))


def write_trace(fn: Callable[[], object], device, rank: int, filename: str, calls: int = 3) -> None:
    """torch.profiler chrome trace of ``calls`` back-to-back calls of ``fn`` (after one warm-up), written
    to ``$OUT/filename`` by rank 0 (every rank runs it: ``fn`` holds collectives)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        synchronize(device)
    out = os.environ.get("OUT")
    if rank == 0 and out:
        prof.export_chrome_trace(os.path.join(out, filename))


def max_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Norm-wise relative error in float64 (0 when both are empty or zero)."""
    a, b = actual.detach().double(), expected.detach().double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float(a.norm())


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(code: int) -> None:
    """Tear the process group down and leave without Python's interpreter finalisation.

    Seen on gloo (torch 2.13): a rank sometimes aborts ("terminate called without an active
    exception") while the interpreter is being finalised after a clean destroy_process_group.
    Everything is written and flushed by then, so skip finalisation."""
    dist.barrier()  # nobody tears the group down while rank 0 still writes
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def write_json(filename: str, data: dict) -> None:
    """Write ``data`` to ``$OUT/filename`` when ``OUT`` is set (rank 0 only)."""
    out = os.environ.get("OUT")
    if out and dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, filename), "w") as f:
            json.dump(data, f, indent=2)
        print(f"wrote {os.path.join(out, filename)}")


def environment(device) -> dict:
    info = {"torch": torch.__version__, "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
