"""Chart of a bench_experts.py run: TFLOP/s per case and path (the card's dense bf16 rate as a line), and
memory: the peak extra during forward+backward, with the part saved for backward hatched.

    python benchmarks/plot.py [path/to/bench_experts.json] [--out benchmarks/results/bench_experts.png]

Needs only the JSON and matplotlib, so it also runs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = (("fwd_bwd", "forward + backward"), ("fwd", "forward"))
GIB = 2**30


def rate(result: dict, mode: str):
    """TFLOP/s of one path in one mode, or None when it did not run (n/a, OOM, skipped, error)."""
    if not result or result.get("status") != "ok":
        return None
    return result.get(f"{mode}_tflops")


def gib(result: dict, key: str):
    """``result[key]`` in GiB, or None when the path did not run or has no such figure."""
    if not result or result.get("status") != "ok" or result.get(key) is None:
        return None
    return result[key] / GIB


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    labels = [f"{c['shape']}\n{c['routing']}" for c in cases]
    paths = [p for p in report["paths"] if any(rate(c["results"].get(p), "fwd_bwd") for c in cases)]
    dense = report.get("dense", {}).get("tflops")
    fig, axes = plt.subplots(len(MODES) + 1, 1, figsize=(max(8, 1.5 * len(cases) + 3), 13), sharex=True)
    width = 0.8 / max(len(paths), 1)
    for ax, (mode, title) in zip(axes, MODES):
        for i, path in enumerate(paths):
            values = [rate(c["results"].get(path), mode) for c in cases]
            xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(cases))]
            ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None],
                   width, label=path)
            for j, (x, v) in enumerate(zip(xs, values)):
                if v is None:  # say why the bar is missing (n/a, OOM, skipped, error)
                    status = (cases[j]["results"].get(path) or {}).get("status", "")
                    ax.text(x, 0, status, rotation=90, ha="center", va="bottom", fontsize=6)
        if dense:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense bf16 matmul ({dense:.3g})")
        ax.set_ylabel("TFLOP/s (matmul FLOPs)")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    memory = axes[-1]
    for i, path in enumerate(paths):
        xs = [j + (i - (len(paths) - 1) / 2) * width for j in range(len(cases))]
        peak = [gib(c["results"].get(path), "peak_extra_bytes") for c in cases]
        saved = [gib(c["results"].get(path), "saved_bytes") for c in cases]
        memory.bar([x for x, v in zip(xs, peak) if v is not None], [v for v in peak if v is not None], width,
                   label=path, color=f"C{i}")
        memory.bar([x for x, v in zip(xs, saved) if v is not None], [v for v in saved if v is not None], width,
                   fill=False, hatch="///", edgecolor="black", linewidth=0)
    memory.set_ylabel("GiB")
    memory.set_title("peak extra memory during forward + backward (hatched: saved for backward)")
    memory.grid(axis="y", alpha=0.3)
    axes[-1].set_xticks(range(len(cases)))
    axes[-1].set_xticklabels(labels, fontsize=8)
    axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    env = report.get("env", {})
    fig.suptitle(f"MoE expert block, bf16 — {env.get('card')} ({env.get('capability')}), torch {env.get('torch')}, "
                 f"triton {env.get('triton')}, TE {env.get('transformer_engine')}, {env.get('date', '')[:10]}",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", type=Path, default=HERE / "results" / "bench_experts.json")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_experts.png")
    opts = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"matplotlib is not installed: copy {opts.json} to a machine with it and run "
              f"`python benchmarks/plot.py {opts.json.name}` there", file=sys.stderr)
        return 3
    report = json.loads(opts.json.read_text())
    print(f"wrote {plot(report, opts.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
