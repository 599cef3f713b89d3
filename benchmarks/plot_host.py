"""Chart of a bench_host.py run: time per call against T for every path, forward and forward+backward,
with our host time per call as a dashed line (one panel per shape and mode).

    python benchmarks/plot_host.py [path/to/bench_host.json] [--out benchmarks/results/bench_host.png]

Needs only the JSON and matplotlib, so it also runs on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = (("fwd", "forward (no grad)"), ("fwd_bwd", "forward + backward"))


def series(cases: list, path: str, mode: str, key: str) -> tuple[list, list]:
    points = [(c["T"], c["results"][path][mode].get(key)) for c in cases
              if c["results"].get(path, {}).get("status") == "ok"]
    points = [(t, v) for t, v in points if v is not None]
    return [t for t, _ in points], [v for _, v in points]


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(c["shape"] for c in report["cases"]))
    paths = list(dict.fromkeys(p for c in report["cases"] for p in c["results"]))
    fig, axes = plt.subplots(len(shapes), len(MODES), figsize=(12, 4.2 * len(shapes)), squeeze=False)
    for row, shape in zip(axes, shapes):
        cases = [c for c in report["cases"] if c["shape"] == shape]
        for ax, (mode, title) in zip(row, MODES):
            for path in paths:
                ts, ms = series(cases, path, mode, "call_ms")
                if ts:
                    ax.plot(ts, ms, marker="o", label=f"{path}: time per call")
            ts, us = series(cases, "ours", mode, "host_us")
            if ts:
                ax.plot(ts, [u / 1e3 for u in us], "k--", label="ours: host time per call")
            ts, ms = series(cases, "ours", mode, "graph_ms")
            if ts:
                ax.plot(ts, ms, "k:", label="ours: CUDA-graph replay (GPU time)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens per call (T)")
            ax.set_ylabel("ms")
            ax.set_title(f"{shape}: {title}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    env = report["env"]
    fig.suptitle(f"expert block host time: {env['card']}, torch {env['torch']}, {report['dtype']}, {env['date'][:10]}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("json", nargs="?", default=str(HERE / "results" / "bench_host.json"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    report = json.loads(Path(args.json).read_text())
    out = Path(args.out) if args.out else Path(args.json).with_suffix(".png")
    print(plot(report, out))


if __name__ == "__main__":
    main()
