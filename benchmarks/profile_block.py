"""Where the time of one forward+backward goes: CUDA kernels by total time, per backend variant.

    python benchmarks/profile_block.py --shape qwen3 --routing uniform

Uses bench_experts' case builder and variants; prints one table per variant (top kernels, their
share of the GPU time) and the summed time per kernel family, so a missed target can be traced
to the kernels that cost it (METHOD.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_experts  # noqa: E402
import common  # noqa: E402


def profile_variant(case, name, spec, iters=3, top=14):
    _, fwd_bwd = bench_experts.ours_path(case, spec)
    for _ in range(3):  # compile kernels, warm caches
        fwd_bwd()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fwd_bwd()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / iters / 1000
    print(f"\n== {name}  ({spec or 'registry default'}): {total:.3f} ms of GPU time per forward+backward")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        ms = e.self_device_time_total / iters / 1000
        print(f"  {ms:8.3f} ms {100 * ms / total:5.1f}%  x{e.count // iters:<3} {e.key[:96]}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="qwen3")
    p.add_argument("--routing", default="uniform")
    p.add_argument("--variants", default="all", help="comma list of bench_experts VARIANTS names, 'default', or all")
    args = p.parse_args()
    case = bench_experts.build_case(common.SHAPES[args.shape], args.routing, torch.device("cuda"))
    variants = [("default", None), *bench_experts.VARIANTS]
    if args.variants != "all":
        keep = args.variants.split(",")
        variants = [v for v in variants if v[0] in keep]
    for name, spec in variants:
        profile_variant(case, name, spec)


if __name__ == "__main__":
    main()
