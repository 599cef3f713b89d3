"""Chart of bench_ep.py runs: dispatch+combine time against raw all-to-alls, and the EP layer against one GPU.

    python benchmarks/plot_ep.py benchmarks/results/bench_ep_peer_h200x2.json \
        benchmarks/results/bench_ep_peer_h200x4.json --out benchmarks/results/bench_ep_peer_h200.png

Needs only the JSON files and matplotlib, so it also runs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# (key in "dispatch_combine", label): ours, then the raw all-to-alls it is measured against.  Bars a
# report lacks (runs from before the peer-memory dispatch existed) are drawn as 0.
TRANSFER_BARS = (
    ("ours_dispatch_combine_ms", "all-to-all (exact splits), eager, one call"),
    ("ours_compiled_pipelined_ms", "all-to-all (exact splits), compiled, back to back"),
    ("peer_dispatch_combine_host_ahead_ms", "peer memory, eager, host ahead"),
    ("peer_compiled_host_ahead_ms", "peer memory, compiled, host ahead"),
    ("peer_graph_ms", "peer memory, CUDA graph, one call"),
    ("raw_there_and_back_host_ahead_ms", "raw all_to_all_single, same rows, host ahead"),
    ("raw_there_and_back_ms", "raw all_to_all_single, same rows, one call"),
    ("raw_per_pair_there_and_back_ms", "raw all_to_all_single, one row per (token, expert)"),
)


def _grouped_bars(ax, groups: list[str], series: list[tuple[str, list[float]]], fmt: str, ylabel: str,
                  title: str) -> None:
    """One bar per series in each group, labelled with its value."""
    width = 0.8 / len(series)
    ax.set_ylim(0, 1.45 * max(max(values) for _, values in series))  # room for the legend above the bars
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        ax.bar_label(ax.bar(xs, values, width, label=label), fmt=fmt, fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")


def _single_gpu_ms(report: dict) -> float:
    layers = report.get("layers", {})
    return layers.get("one_gpu_whole_batch_ms") or layers.get("one_gpu_scaled_ms") or 0.0


LAYER_BARS = (("GroupedExperts_ep_ms", "GroupedExperts (all-gather)"),
              ("GroupedExpertsDeepEP_ep_ms", "GroupedExpertsDeepEP (all-to-all, float32 partials)"),
              ("GroupedExpertsDeepEP_bf16_partials_ep_ms", "GroupedExpertsDeepEP (all-to-all, bf16 partials)"),
              ("GroupedExpertsDeepEP_peer_ep_ms", "GroupedExpertsDeepEP (peer memory, float32 partials)"))


def plot(reports: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = sorted(reports, key=lambda r: r["env"]["world_size"])
    sizes = [f"EP x{r['env']['world_size']}" for r in reports]
    fig, (left, right) = plt.subplots(1, 2, figsize=(16, 6))
    _grouped_bars(left, sizes, [(label, [r["dispatch_combine"].get(key, 0.0) for r in reports])
                                for key, label in TRANSFER_BARS],
                  "%.2f", "ms (forward dispatch + combine)",
                  "Dispatch + combine, DeepSeek-V3 shapes (D7168 K8 E256, 4096 tokens/rank)")
    layers = [("one GPU, whole batch", [_single_gpu_ms(r) for r in reports])]
    layers += [(label, [r.get("layers", {}).get(key, 0.0) for r in reports]) for key, label in LAYER_BARS]
    _grouped_bars(right, sizes, layers, "%.1f", "ms (forward + backward)",
                  "EP layer against one GPU on the whole batch (the same work)")
    env = reports[0]["env"]
    fig.suptitle(f"{env.get('gpu', '?')}, torch {env['torch']}, NCCL", fontsize=10)
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
