"""Chart of bench_ep.py runs: dispatch+combine time against raw all-to-alls, and the EP layer against one GPU.

    python benchmarks/plot_ep.py benchmarks/results/bench_ep_h200x2.json benchmarks/results/bench_ep_h200x4.json \
        --out benchmarks/results/bench_ep_h200.png

Needs only the JSON files and matplotlib, so it also runs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (key in "dispatch_combine", label): ours, then the raw all-to-alls it is measured against.
TRANSFER_BARS = (
    ("ours_dispatch_combine_ms", "ours, eager, one call"),
    ("ours_pipelined_ms", "ours, eager, back to back"),
    ("ours_compiled_pipelined_ms", "ours, compiled, back to back"),
    ("raw_there_and_back_ms", "raw all_to_all_single, same rows"),
    ("raw_per_pair_there_and_back_ms", "raw all_to_all_single, one row per (token, expert)"),
)


def plot(reports: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted(reports, key=lambda r: r["env"]["world_size"])
    sizes = [f"EP x{r['env']['world_size']}" for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / len(TRANSFER_BARS)
    for i, (key, label) in enumerate(TRANSFER_BARS):
        values = [r["dispatch_combine"].get(key, 0.0) for r in reports]
        xs = [j + (i - (len(TRANSFER_BARS) - 1) / 2) * width for j in range(len(reports))]
        bars = left.bar(xs, values, width, label=label)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(range(len(reports)), sizes)
    left.set_ylabel("ms (forward dispatch + combine)")
    left.set_title("Dispatch + combine, DeepSeek-V3 shapes (D7168 K8 E256, 4096 tokens/rank)", fontsize=9)
    left.legend(fontsize=7)

    layer_bars = (("single", "one GPU, whole batch"), ("GroupedExperts_ep_ms", "GroupedExperts (all-gather)"),
                  ("GroupedExpertsDeepEP_ep_ms", "GroupedExpertsDeepEP (all-to-all)"))
    width = 0.8 / len(layer_bars)
    for i, (key, label) in enumerate(layer_bars):
        values = []
        for r in reports:
            layers = r.get("layers", {})
            single = layers.get("one_gpu_whole_batch_ms") or layers.get("one_gpu_scaled_ms") or 0.0
            values.append(single if key == "single" else layers.get(key, 0.0))
        xs = [j + (i - (len(layer_bars) - 1) / 2) * width for j in range(len(reports))]
        bars = right.bar(xs, values, width, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=7)
    right.set_xticks(range(len(reports)), sizes)
    right.set_ylabel("ms (forward + backward)")
    right.set_title("EP layer against one GPU on the whole batch (the same work)", fontsize=9)
    right.legend(fontsize=7)
    card = reports[0]["env"].get("gpu", "?")
    fig.suptitle(f"{card}, torch {reports[0]['env']['torch']}, NCCL", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path, help="bench_ep.py JSON files (one per world size)")
    p.add_argument("--out", type=Path, default=Path("bench_ep.png"))
    args = p.parse_args()
    print(plot([json.loads(r.read_text()) for r in args.reports], args.out))


if __name__ == "__main__":
    main()
