"""Decode-sized expert-block forwards against their floor: the bytes of the experts a step touches over the
card's copy bandwidth (issue 16).  One run, one card: our path eager, replayed from a CUDA graph, as a
``torch.export``ed program (eager and graph-replayed) and optionally as an AOTInductor package, with the
torch reference path (eager and graph-replayed) beside it.

    python benchmarks/bench_decode.py                        # CUDA: every shape, T in TOKENS, both routings
    python benchmarks/bench_decode.py --shapes qwen3 --tokens 1,16,256 --aoti
    python benchmarks/bench_decode.py --tiny                 # CPU smoke (CI): tiny shapes, eager and export

Floor of a step: ``bytes(touched experts' W1, W2 and biases) / copy rate``, with the copy rate measured in the
same run (a 1 GiB device copy, read + write) and, on an H200, also the datasheet's 4.8 TB/s.  Every figure is a
forward with no grad, bf16 (float32 on the CPU), µs per call (CUDA graph: GPU time of a replay; eager and
exported: wall time of calls back to back).  JSON: ``$OUT/bench_decode.json``; ``--plot PNG`` draws µs against
T with the floor line (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

import torch  # noqa: E402

from benchmarks import baselines, common  # noqa: E402
from benchmarks.bench_host import call_ms, graph_ms, make_module  # noqa: E402

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
SHAPES = {
    "qwen3": common.SHAPES["qwen3"],
    "gptoss20b": common.SHAPES["gptoss20b"],
    "dsv3_all256": common.Shape("dsv3_all256", E=256, K=8, D=7168, I=2048, T=1),
    "dsv3_ep8_rank": common.SHAPES["dsv3_ep8_rank"],
}
TINY = {"qwen3": common.TINY_SHAPES["qwen3"], "gptoss20b": common.TINY_SHAPES["gptoss20b"]}
TINY_TOKENS = (1, 2, 8)
H200_DATASHEET_GBPS = 4800.0


def with_tokens(shape: common.Shape, T: int) -> common.Shape:
    return common.Shape(shape.name, shape.E, shape.K, shape.D, shape.I, T, shape.activation, shape.bias)


def touched_bytes(shape: common.Shape, indices: torch.Tensor, dtype: torch.dtype) -> tuple[int, int]:
    """``(distinct experts touched, their weight and bias bytes)``."""
    touched = int(torch.unique(indices[indices >= 0]).numel())
    C = 2 * shape.I if shape.activation != "relu2" else shape.I
    per_expert = shape.D * C + shape.I * shape.D + ((C + shape.D) if shape.bias else 0)
    return touched, touched * per_expert * torch.finfo(dtype).bits // 8


def copy_gbps(device, dtype) -> float:
    nbytes = (16 if device.type == "cpu" else 1024) * 2**20
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = common.time_ms(lambda: dst.copy_(src), device, reps=20, warmup=3)["median_ms"]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def exported(module, args, aoti: bool):
    """``(program.module(), AOTInductor runner or None)`` of ``module`` with a dynamic token count."""
    T = torch.export.Dim("T", min=1, max=1 << 16)
    program = torch.export.export(module, args, dynamic_shapes=({0: T}, {0: T}, {0: T}, {0: T}))
    runner = None
    if aoti:
        path = os.path.join(tempfile.mkdtemp(), "experts.pt2")
        torch._inductor.aoti_compile_and_package(program, package_path=path)
        runner = torch._inductor.aoti_load_package(path)
    return program.module(), runner


def timings(fn, device, reps: int) -> dict:
    """µs per call: back to back (eager / exported) and, on CUDA, replayed from a CUDA graph."""
    out = {}
    for name, measure in (("call_us", lambda: call_ms(fn, device, reps) * 1e3),
                          ("graph_us", (lambda: graph_ms(fn, device, reps) * 1e3) if common.is_cuda(device) else None)):
        if measure is None:
            continue
        try:
            out[name] = measure()
        except Exception as e:  # recorded, the run goes on
            out[name] = f"{type(e).__name__}: {e}"[:300]
    return out


def run_case(shape: common.Shape, routing: str, T: int, device, dtype, args, module, programs) -> dict:
    case = with_tokens(shape, T)
    indices, weights, mask = common.make_routing(case, routing, device, args.seed)
    x = (torch.randn(T, case.D, device=device) * 0.5).to(dtype)
    inputs = (x, mask, weights, indices)
    touched, nbytes = touched_bytes(case, indices, dtype)
    record = {"shape": shape.name, "routing": routing, "T": T, "experts_touched": touched, "bytes": nbytes,
              "floor_us": nbytes / (args.copy_gbps * 1e3), "paths": {}}
    if args.datasheet_gbps:
        record["floor_datasheet_us"] = nbytes / (args.datasheet_gbps * 1e3)
    m = module
    ref = (lambda: baselines.torch_reference_path(*inputs, m.gate_and_up_projs, m.down_projs, m.gate_up_proj_bias,
                                                  m.down_proj_bias, case.activation))
    calls = {"ours": lambda: module(*inputs), "torch_ref": ref}
    if isinstance(programs[0], str):
        record["paths"]["exported"] = {"error": programs[0]}
    else:
        calls["exported"] = lambda: programs[0](*inputs)
    if programs[1] is not None:
        calls["aoti"] = lambda: programs[1](*inputs)
    with torch.no_grad():
        want = module(*inputs)
        for name, fn in calls.items():
            try:
                got = fn()
                got = got[0] if isinstance(got, (tuple, list)) else got
                err = common.rel_err(got, want)
                for _ in range(args.warmup):
                    fn()
                record["paths"][name] = {"rel_err_vs_ours": err, **timings(fn, device, args.reps)}
            except Exception as e:
                record["paths"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return record


def fraction_of_floor(record: dict, path: str, key: str):
    value = record["paths"].get(path, {}).get(key)
    return record["floor_us"] / value if isinstance(value, float) and value > 0 else None


def table(report: dict) -> str:
    lines = [f"card: {report['env'].get('card')}  torch {report['env']['torch']}  copy {report['copy_gbps']:.0f} GB/s"
             f"  dtype {report['dtype']}",
             f"{'shape/routing':24s} {'T':>5s} {'touched':>7s} {'floor us':>9s} {'ours':>9s} {'graph':>9s} "
             f"{'export':>9s} {'ref graph':>9s} {'floor/graph':>11s}"]

    def us(record, path, key):
        v = record["paths"].get(path, {}).get(key)
        return f"{v:9.1f}" if isinstance(v, float) else f"{'-':>9s}"

    for r in report["cases"]:
        frac = fraction_of_floor(r, "ours", "graph_us") or fraction_of_floor(r, "ours", "call_us")
        lines.append(f"{r['shape'] + '/' + r['routing']:24s} {r['T']:5d} {r['experts_touched']:7d} {r['floor_us']:9.1f} "
                     f"{us(r, 'ours', 'call_us')} {us(r, 'ours', 'graph_us')} {us(r, 'exported', 'call_us')} "
                     f"{us(r, 'torch_ref', 'graph_us')} {'-' if frac is None else f'{frac:11.2f}'}")
    lines.append("floor/graph: the floor over ours replayed from a CUDA graph (eager calls on the CPU); 1 is the floor")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["shape"], r["routing"]) for r in report["cases"]})
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    for ax, (shape, routing) in zip(axes[0], groups):
        rows = [r for r in report["cases"] if r["shape"] == shape and r["routing"] == routing]
        Ts = [r["T"] for r in rows]
        ax.plot(Ts, [r["floor_us"] for r in rows], "k--", label="floor")
        for path, key in (("ours", "graph_us"), ("ours", "call_us"), ("exported", "call_us"), ("torch_ref", "graph_us")):
            ys = [r["paths"].get(path, {}).get(key) for r in rows]
            if any(isinstance(y, float) for y in ys):
                ax.plot(Ts, [y if isinstance(y, float) else float("nan") for y in ys], marker="o", label=f"{path} {key}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="µs", title=f"{shape} {routing}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=None)
    p.add_argument("--tokens", default=None)
    p.add_argument("--routing", default="uniform,zipf")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU (eager and export): the harness only")
    p.add_argument("--aoti", action="store_true", help="also an AOTInductor package per shape (minutes to build)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.tiny:
        print("no CUDA device: use --tiny on the CPU", file=sys.stderr)
        return 2
    table_ = TINY if args.tiny else SHAPES
    shapes = [table_[s] for s in (args.shapes.split(",") if args.shapes else table_)]
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else (TINY_TOKENS if args.tiny else TOKENS)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if device.type == "cpu":
        torch.set_num_threads(1)
    args.copy_gbps = copy_gbps(device, dtype)
    name = torch.cuda.get_device_name() if common.is_cuda(device) else ""
    args.datasheet_gbps = H200_DATASHEET_GBPS if "H200" in name else None
    report = {"env": common.environment(device), "dtype": str(dtype), "copy_gbps": args.copy_gbps,
              "datasheet_gbps": args.datasheet_gbps, "command": " ".join(sys.argv), "cases": []}
    for shape in shapes:
        module = make_module(with_tokens(shape, max(tokens)), device, dtype)
        example = common.make_routing(with_tokens(shape, 4), "uniform", device, args.seed)
        args_ = ((torch.randn(4, shape.D, device=device)).to(dtype), example[2], example[1], example[0])
        try:
            programs = exported(module, args_, args.aoti)
        except Exception as e:  # recorded per case, the run goes on
            traceback.print_exc()
            programs = (f"{type(e).__name__}: {e}"[:300], None)
        for routing in args.routing.split(","):
            for T in tokens:
                record = run_case(shape, routing, T, device, dtype, args, module, programs)
                report["cases"].append(record)
                print(f"  {shape.name}/{routing} T={T}: floor {record['floor_us']:.1f} us, "
                      f"ours {record['paths']['ours']}", flush=True)
        del module, programs
        common.free_memory()
    out = Path(os.environ.get("OUT", HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_decode.json").write_text(json.dumps(report, indent=1, default=str))
    if args.plot:
        plot(report, args.plot)
    print(table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
