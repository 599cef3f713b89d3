"""Host time of one expert-block call, and the time per call it leads to: our eager, compiled,
compiled reduce-overhead and CUDA-graph paths against the torch reference path, one run, one card.

    python benchmarks/bench_host.py                         # CUDA: Qwen3 and GPT-OSS shapes, T in TOKENS
    python benchmarks/bench_host.py --tokens 1,512 --shapes qwen3
    python benchmarks/bench_host.py --device cpu            # CPU, one thread: the tiny and the mid shape
    python benchmarks/bench_host.py --device cpu --quick    # the tiny shape, few repetitions (CI)

For every shape, T and path, forward (no grad) and forward+backward (``torch.autograd.grad`` of a
random output gradient with respect to x, the routing weights and the four expert parameters):

* ``host_us``: the host time to enqueue one call: wall time of a few calls issued back to back
  without waiting for the device (after a synchronisation; too few to fill the launch queue), per
  call — best of several rounds (on the CPU it is the whole call);
* ``call_ms``: wall time per call of calls back to back (what a training or decode loop sees:
  the larger of host and device time, and their overlap);
* ``graph_ms`` (ours, CUDA): the same call replayed from a CUDA graph, GPU time only.

Paths: ``ours`` (``GroupedExperts``, registry defaults, eager), ``ours_compiled``
(``torch.compile(fullgraph=True)``, T unbacked: one graph for every T), ``ours_reduce_overhead``
(the same with ``mode="reduce-overhead"``: Inductor's CUDA graphs), ``torch_ref`` (argsort +
index_select + ``torch._grouped_mm`` + eager activation + float32 scatter_add, benchmarks/baselines.py)
and, on the CPU, ``loop`` (a Python loop over experts).  Every number goes to
``$OUT/bench_host.json`` (benchmarks/results/ without $OUT); a table is printed last.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import torch  # noqa: E402

from benchmarks import baselines, common  # noqa: E402

TOKENS = (1, 64, 512, 2048, 8192, 16384)
CUDA_SHAPES = ("qwen3", "gptoss20b")
# The CPU shapes: a tiny one (host cost is everything) and a mid one (the GEMMs are).
CPU_SHAPES = {
    "tiny": common.Shape("tiny", E=8, K=2, D=16, I=8, T=4),
    "mid": common.Shape("mid", E=64, K=8, D=512, I=256, T=4096),
}


def with_tokens(shape: common.Shape, T: int) -> common.Shape:
    return common.Shape(shape.name, shape.E, shape.K, shape.D, shape.I, T, shape.activation, shape.bias)


class Inputs:
    """Module, tokens, routing and output gradient of one (shape, T), on ``device``."""

    def __init__(self, shape: common.Shape, device, dtype, seed: int = 0, module=None):
        self.shape, self.device = shape, device
        torch.manual_seed(seed)
        self.module = module if module is not None else make_module(shape, device, dtype)
        self.indices, weights, self.token_mask = common.make_routing(shape, "uniform", device, seed)
        self.weights = weights.requires_grad_()
        self.x = (torch.randn(shape.T, shape.D, device=device) * 0.5).to(dtype).requires_grad_()
        self.grad_out = torch.randn(shape.T, shape.D, device=device).to(dtype)
        self.params = [p for p in self.module.parameters()]

    def args(self):
        return self.x, self.token_mask, self.weights, self.indices

    def grad_inputs(self):
        return [self.x, self.weights, *self.params]


def make_module(shape: common.Shape, device, dtype):
    from moe_modules import GroupedExperts

    module = GroupedExperts(shape.config(dtype)).to(device)
    module.init_weights(device)
    if shape.bias:  # random, never zero, so the bias paths compute something
        with torch.no_grad():
            module.gate_up_proj_bias.normal_(0, 0.02)
            module.down_proj_bias.normal_(0, 0.02)
    return module


def _ours(inputs: Inputs, module) -> Callable:
    return lambda: module(*inputs.args())


def _baseline(fn) -> Callable[[Inputs], Callable]:
    def build(inputs: Inputs):
        m = inputs.module
        b1, b2 = m.gate_up_proj_bias, m.down_proj_bias
        kind = inputs.shape.activation
        return lambda: fn(*inputs.args(), m.gate_and_up_projs, m.down_projs, b1, b2, kind)

    return build


def _compiled(mode=None) -> Callable[[Inputs], Callable]:
    cache: dict = {}

    def build(inputs: Inputs):
        key = id(inputs.module)
        if key not in cache:  # one compiled module per shape (T is unbacked: one graph for every T)
            cache.clear()
            cache[key] = torch.compile(inputs.module, fullgraph=True, mode=mode)
        compiled = cache[key]
        for t in inputs.args():  # once per set of inputs (they are the same tensors in every call)
            torch._dynamo.decorators.mark_unbacked(t, 0)
        return lambda: compiled(*inputs.args())

    return build


def paths(device) -> dict:
    out = {"ours": lambda inputs: _ours(inputs, inputs.module),
           "torch_ref": _baseline(baselines.torch_reference_path),
           "ours_compiled": _compiled()}
    if common.is_cuda(device):
        out["ours_reduce_overhead"] = _compiled("reduce-overhead")
    else:
        out["loop"] = _baseline(baselines.per_expert_loop)
    return out


def modes(inputs: Inputs, call: Callable) -> dict:
    def fwd():
        with torch.no_grad():
            return call()

    def fwd_bwd():
        y = call()
        return torch.autograd.grad(y, inputs.grad_inputs(), inputs.grad_out, allow_unused=True)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def host_us(fn: Callable, device, reps: int, burst: int = 16) -> float:
    """Best over rounds of the host time per call of ``burst`` calls issued without waiting for the device."""
    samples = []
    for _ in range(max(1, reps // burst)):
        common.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(burst):
            fn()
        samples.append((time.perf_counter() - t0) * 1e6 / burst)
    common.synchronize(device)
    return min(samples)


def call_ms(fn: Callable, device, reps: int, rounds: int = 3) -> float:
    """Best of ``rounds`` of the mean time per call of ``reps`` calls back to back."""
    best = float("inf")
    for _ in range(rounds):
        common.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        common.synchronize(device)
        best = min(best, (time.perf_counter() - t0) * 1e3 / reps)
    return best


def graph_ms(fn: Callable, device, reps: int) -> float:
    """GPU time of ``fn`` replayed from a CUDA graph (median of ``reps`` replays, events around each)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return common.time_ms(graph.replay, device, reps=reps, warmup=3)["median_ms"]


def reps_for(fn: Callable, device, budget_s: float, low: int, high: int) -> int:
    common.synchronize(device)
    t0 = time.perf_counter()
    fn()
    common.synchronize(device)
    once = max(time.perf_counter() - t0, 1e-6)
    return int(min(high, max(low, budget_s / once)))


def measure(inputs: Inputs, name: str, call: Callable, args) -> dict:
    device = inputs.device
    result = {}
    for mode, fn in modes(inputs, call).items():
        for _ in range(args.warmup):  # compiles, autotunes, fills caches
            fn()
        reps = reps_for(fn, device, args.budget, args.min_reps, args.max_reps)
        result[mode] = {"host_us": host_us(fn, device, reps), "call_ms": call_ms(fn, device, reps), "reps": reps}
        if name == "ours" and common.is_cuda(device):
            try:
                result[mode]["graph_ms"] = graph_ms(fn, device, reps)
            except Exception as e:  # report, never hide, a capture that fails
                result[mode]["graph_error"] = f"{type(e).__name__}: {e}"[:300]
    return result


def profile_host(args) -> None:
    """Where the host time of one eager call goes (torch.profiler, CPU self time), at the first shape and T."""
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(args.device)
    dtype = torch.bfloat16 if common.is_cuda(device) else torch.float32
    shapes = CPU_SHAPES if not common.is_cuda(device) else common.SHAPES
    base = shapes[args.shapes[0]]
    shape = with_tokens(base, args.tokens[0] if args.tokens else (1 if common.is_cuda(device) else base.T))
    inputs = Inputs(shape, device, dtype)
    for mode, fn in modes(inputs, _ours(inputs, inputs.module)).items():
        for _ in range(5):
            fn()
        common.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                fn()
            common.synchronize(device)
        print(f"\n== host profile: ours {mode}, {shape.name} T={shape.T} (20 calls; self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        # The host time is Python: where it goes, per function (cProfile adds its own overhead per call).
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            fn()
        profiler.disable()
        common.synchronize(device)
        print(f"\n== Python profile: ours {mode}, {shape.name} T={shape.T} (200 calls; by own time)")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(40)


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",)))


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if common.is_cuda(device) else torch.float32
    if not common.is_cuda(device):
        torch.set_num_threads(args.threads)
    shapes = ([CPU_SHAPES[s] for s in args.shapes] if not common.is_cuda(device)
              else [common.SHAPES[s] for s in args.shapes])
    report = {"env": common.environment(device) | {"threads": torch.get_num_threads()}, "dtype": str(dtype),
              "command": " ".join(sys.argv), "cases": []}
    builders = {k: v for k, v in paths(device).items() if k in args.paths}
    for base in shapes:
        module = make_module(base, device, dtype)  # one module (and compiled module) for every T
        for T in (args.tokens or ([base.T] if not common.is_cuda(device) else TOKENS)):
            shape = with_tokens(base, T)
            inputs = Inputs(shape, device, dtype, module=module)
            case = {"shape": shape.name, "T": T, "E": shape.E, "K": shape.K, "D": shape.D, "I": shape.I,
                    "activation": shape.activation, "bias": shape.bias, "results": {}}
            for name, build in builders.items():
                try:
                    case["results"][name] = {"status": "ok", **measure(inputs, name, build(inputs), args)}
                except Exception as e:
                    traceback.print_exc()
                    case["results"][name] = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:400]}
            report["cases"].append(case)
            print(row(case), flush=True)
            del inputs
            common.free_memory()
        del module
    if "ours_reduce_overhead" in builders:
        report["inductor_cudagraph_skips"] = cudagraph_skips()
    return report


def fmt(value, unit="") -> str:
    return "-" if value is None else f"{value:.3f}{unit}" if value < 10 else f"{value:.1f}{unit}"


def row(case: dict) -> str:
    parts = [f"{case['shape']:>9} T={case['T']:<6}"]
    for name, r in case["results"].items():
        if r.get("status") != "ok":
            parts.append(f"{name}: {r.get('status')}")
            continue
        f, fb = r["fwd"], r["fwd_bwd"]
        text = f"{name}: host {f['host_us']:.0f}/{fb['host_us']:.0f} us, call {fmt(f['call_ms'])}/{fmt(fb['call_ms'])} ms"
        if "graph_ms" in f:
            text += f", graph {fmt(f['graph_ms'])}/{fmt(fb.get('graph_ms'))} ms"
        parts.append(text)
    return " | ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="comma list (CUDA: qwen3,gptoss20b; CPU: tiny,mid)")
    p.add_argument("--tokens", default=None, help="comma list of T (default: TOKENS on CUDA, the shape's T on CPU)")
    p.add_argument("--paths", default=None, help="comma list of paths (default: all for the device)")
    p.add_argument("--quick", action="store_true", help="CPU tiny shape, eager paths, few repetitions (CI)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=float, default=0.3, help="seconds of repetitions per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=200)
    p.add_argument("--profile", action="store_true", help="also profile the host time of our eager calls")
    args = p.parse_args(argv)
    cuda = common.is_cuda(args.device)
    args.shapes = (args.shapes or (",".join(CUDA_SHAPES) if cuda else "tiny" if args.quick else "tiny,mid")).split(",")
    args.tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    default_paths = ["ours", "torch_ref", "loop"] if args.quick else list(paths(args.device))
    args.paths = args.paths.split(",") if args.paths else default_paths
    if args.quick:
        args.budget, args.warmup, args.min_reps, args.max_reps = 0.05, 2, 3, 20
    if args.profile:
        profile_host(args)
    report = run(args)
    out_dir = Path(os.environ.get("OUT", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_host.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"\ncard: {report['env']['card']}  torch {report['env']['torch']}  triton {report['env']['triton']}  "
          f"{report['dtype']}  threads {report['env']['threads']}  -> {path}")
    for case in report["cases"]:
        print(row(case))
    return 0


if __name__ == "__main__":
    sys.exit(main())
