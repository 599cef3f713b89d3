"""The benchmark harness on CPU: bench_experts.py --tiny end to end, the baselines' math, routing, counts, plot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from benchmarks import baselines, common  # noqa: E402
from moe_modules import GroupedExperts  # noqa: E402

CORE_PATHS = ("ours", "torch_ref", "gemm_only", "loop")


def run_benchmark(out: Path, script: str, *args: str, timeout: int = 120):
    """Run ``benchmarks/<script>.py`` on the CPU (CUDA hidden) writing into ``out``: its JSON path, JSON and stdout."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(out))
    env.pop("MOE_OPS_BACKEND", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = out / f"{script}.json"
    return path, json.loads(path.read_text()), proc.stdout


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `bench_experts.py --tiny` run on the CPU, its JSON and stdout."""
    return run_benchmark(tmp_path_factory.mktemp("bench"), "bench_experts", "--tiny")


def test_tiny_run_has_every_shape_routing_and_path(tiny_run):
    _, report, stdout = tiny_run
    cases = {(c["shape"], c["routing"]) for c in report["cases"]}
    assert cases == {(s, r) for s in common.SHAPES for r in common.ROUTINGS}
    assert set(CORE_PATHS) | {"te"} <= set(report["paths"])
    for case in report["cases"]:
        assert set(case["results"]) == set(report["paths"]), case["results"].keys()
        for path, result in case["results"].items():
            assert result["status"] in ("ok", "n/a", "same", "OOM", "skipped", "error"), (path, result)
            if result["status"] != "ok":
                assert result["reason"], (path, result)  # every missing number says why
        for path in CORE_PATHS:
            result = case["results"][path]
            assert result["status"] == "ok", (case["shape"], case["routing"], path, result)
            for mode in ("fwd", "fwd_bwd"):
                ms = result[mode]["median_ms"]
                assert math.isfinite(ms) and ms > 0, (path, mode, ms)
                assert result[f"{mode}_tflops"] > 0
        for path in ("ours", "loop"):
            gate = case["correctness"][path]
            assert gate["pass"] and gate["max"] < 2e-2, (case["shape"], path, gate)
        assert case["flops"]["fwd_bwd"] == 3 * case["flops"]["fwd"]
    assert report["dense"]["tflops"] > 0
    for key in ("card", "torch", "triton", "transformer_engine", "date", "capability"):
        assert key in report["env"]
    # The table is the last thing printed.
    lines = stdout.strip().splitlines()
    assert lines[-1].startswith("ref/x, gemm/x")
    assert any(line.startswith("qwen3/uniform") and " ours " in line for line in lines)


@pytest.mark.parametrize("shape_name", ["qwen3", "gptoss20b"])
def test_baselines_match_float64_experts(shape_name):
    """torch_ref, loop (float32) against GroupedExperts in float64 (reference backend), with masked tokens."""
    shape = common.TINY_SHAPES[shape_name]
    torch.manual_seed(0)
    module = GroupedExperts(shape.config(torch.float64))
    module.init_weights("cpu", init_std=0.1)
    with torch.no_grad():
        for p in (module.gate_up_proj_bias, module.down_proj_bias):
            if p is not None:
                p.normal_(0, 0.1)
    indices, weights, token_mask = common.make_routing(shape, "zipf", "cpu", seed=3)
    token_mask[::5] = False
    x = torch.randn(shape.T, shape.D, dtype=torch.float64)
    grad_y = torch.randn_like(x)
    params64 = [p for p in module.parameters()]

    def grads(y, inputs):
        return [y, *torch.autograd.grad(y, inputs, grad_y.to(y.dtype))]

    x64, w64 = x.clone().requires_grad_(), weights.double().requires_grad_()
    expected = grads(module(x64, token_mask, w64, indices), [x64, w64, *params64])
    assert expected[0][~token_mask].abs().max() == 0

    act = module.activation
    for fn in (baselines.torch_reference_path, baselines.per_expert_loop):
        x32, w32 = x.float().requires_grad_(), weights.clone().requires_grad_()
        p32 = [p.detach().float().requires_grad_() for p in params64]
        b1, b2 = (p32[2], p32[3]) if shape.bias else (None, None)
        y = fn(x32, token_mask, w32, indices, p32[0], p32[1], b1, b2, act.kind, act.alpha, act.limit, act.linear_offset)
        got = grads(y, [x32, w32, *p32])
        for name, a, b in zip(["y", "dx", "dweights", "dW1", "dW2", "db1", "db2"], got, expected):
            assert common.rel_err(a, b) < 1e-5, (fn.__name__, name, common.rel_err(a, b))


def test_grouped_gemms_only_matches_per_group_matmul():
    torch.manual_seed(0)
    counts = [3, 0, 5, 8]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    rows, w1, w2 = torch.randn(16, 32), torch.randn(4, 32, 48), torch.randn(4, 24, 32)
    got = baselines.grouped_gemms_only(rows, w1, w2, offsets, "swiglu")
    start, expected = 0, []
    for g, n in enumerate(counts):
        h = rows[start:start + n] @ w1[g]
        expected.append((torch.nn.functional.silu(h[:, :24]) * h[:, 24:]) @ w2[g])
        start += n
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", common.ROUTINGS)
def test_routing_has_k_distinct_experts_and_normalised_weights(kind):
    shape = common.Shape("s", E=16, K=4, D=8, I=8, T=2000)
    indices, weights, token_mask = common.make_routing(shape, kind, "cpu")
    assert indices.shape == (2000, 4) and indices.dtype == torch.int64 and token_mask.all()
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()  # K distinct per token
    assert indices.min() >= 0 and indices.max() < 16
    assert weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(2000))


def test_zipf_routing_is_skewed_and_uniform_is_not():
    shape = common.Shape("s", E=32, K=4, D=8, I=8, T=8192)
    load = {k: common.expert_counts(common.make_routing(shape, k, "cpu")[0], 32).float() for k in common.ROUTINGS}
    mean = shape.R / shape.E
    assert load["uniform"].max() < 1.2 * mean
    assert load["zipf"].max() > 3 * mean and load["zipf"].max() <= shape.T


def test_flop_and_byte_counts_of_qwen3():
    s = common.SHAPES["qwen3"]
    rows = 16384 * 8
    assert common.flops(s)["fwd"] == 2 * rows * 2048 * 1536 + 2 * rows * 768 * 2048
    weights = 128 * (2048 * 1536 + 768 * 2048)
    assert common.min_bytes(s)["fwd"] == 2 * (2 * 16384 * 2048 + weights)


def assert_plots(script: str, json_path: Path, png: Path) -> None:
    """``benchmarks/<script>.py JSON --out PNG`` exits 0 and writes a PNG."""
    pytest.importorskip("matplotlib", reason="needs matplotlib (pip install -e '.[bench]')")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), str(json_path), "--out", str(png)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_from_json(tiny_run, tmp_path):
    assert_plots("plot", tiny_run[0], tmp_path / "chart.png")


def test_run_gpu_script_goes_on_after_a_failing_step(tmp_path):
    """Without a GPU the env step still runs; plot fails (no JSON in $OUT) and its exit code is recorded."""
    env = dict(os.environ, OUT=str(tmp_path), STEPS="plot env", TOTAL_S="100", CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = dict(line.split(" ", 1) for line in (tmp_path / "steps.txt").read_text().splitlines())
    assert list(steps) == ["env", "plot"], steps  # the script's order, not STEPS' order
    assert steps["env"].startswith("rc=0")
    assert not steps["plot"].startswith("rc=0")
    assert "torch" in (tmp_path / "env.log").read_text()


def test_run_gpu_script_packs_more_than_eight_files(tmp_path):
    """The device machine returns at most 8 files: more are packed into results.tgz, steps.txt stays beside it."""
    import tarfile

    for i in range(9):
        (tmp_path / f"extra{i}.json").write_text("{}")
    env = dict(os.environ, OUT=str(tmp_path), STEPS="env", TOTAL_S="100", CUDA_VISIBLE_DEVICES="",
               PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.tgz", "steps.txt"]
    with tarfile.open(tmp_path / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert names >= {f"extra{i}.json" for i in range(9)} | {"env.log"}


def test_plot_ep_from_the_recorded_runs(tmp_path):
    pytest.importorskip("matplotlib", reason="needs matplotlib (pip install -e '.[bench]')")
    reports = sorted((ROOT / "benchmarks" / "results").glob("bench_ep_peer_h200x[0-9].json"))
    assert len(reports) == 2, reports
    png = tmp_path / "ep.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plot_ep.py"), *map(str, reports), "--out", str(png)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def host_run(tmp_path_factory):
    """One `bench_host.py --device cpu --quick` run (the tiny shape, eager paths), its JSON and stdout."""
    return run_benchmark(tmp_path_factory.mktemp("host"), "bench_host", "--device", "cpu", "--quick", timeout=300)


def test_host_benchmark_times_every_path_on_the_cpu(host_run):
    _, report, stdout = host_run
    (case,) = report["cases"]
    assert (case["shape"], case["T"], case["E"], case["K"], case["D"], case["I"]) == ("tiny", 4, 8, 2, 16, 8)
    assert set(case["results"]) == {"ours", "torch_ref", "loop"}
    for name, result in case["results"].items():
        assert result["status"] == "ok", (name, result)
        for mode in ("fwd", "fwd_bwd"):
            assert result[mode]["host_us"] > 0 and result[mode]["call_ms"] > 0, (name, mode, result)
    assert report["env"]["threads"] == 1 and report["dtype"] == "torch.float32"
    assert "tiny T=4" in stdout.strip().splitlines()[-1]


def test_plot_host_from_json(host_run, tmp_path):
    assert_plots("plot_host", host_run[0], tmp_path / "host.png")


def test_hf_benchmark_runs_both_implementations_on_the_cpu(tmp_path):
    pytest.importorskip("transformers", minversion="5.17", reason="needs transformers >= 5.17 (the test extra)")
    _, report, stdout = run_benchmark(tmp_path, "bench_hf", "--device", "cpu", "--quick", timeout=300)
    assert set(report["results"]) == {"grouped_mm", "moe_ops"}
    for name, result in report["results"].items():
        assert result["train_step_ms"]["median_ms"] > 0 and result["generate_tok_s"] > 0, (name, result)
        assert result["same_tokens"] and result["max_logit_err"] <= 1e-4, (name, result)
    assert "moe_ops: train step" in stdout


def test_lora_rows_time_frozen_ours_and_nemo_and_gate_ours_against_nemo(tmp_path):
    """``bench_experts.py --lora``: the frozen-base block and, per rank, ours and NeMo's LoRA block."""
    pytest.importorskip("nemo_automodel", reason="nemo-automodel is not installed (pip install --no-deps, README)")
    _, report, stdout = run_benchmark(tmp_path, "bench_experts", "--tiny", "--shapes", "qwen3,gptoss20b",
                                      "--routing", "uniform", "--lora", "4,8", "--skip-baselines", "--paths", "ours",
                                      "--no-checks", timeout=300)
    for case in report["cases"]:
        rows = case["lora"]["results"]
        assert set(rows) == {"frozen", "ours_lora r4", "nemo_lora r4", "ours_lora r8", "nemo_lora r8"}
        for name, result in rows.items():
            assert result["status"] == "ok" and result["fwd_bwd"]["median_ms"] > 0, (name, result)
        gate = case["lora"]["correctness"]
        assert set(gate) == {"ours_lora r4", "ours_lora r8"}
        assert all(g["pass"] and g["max"] < 2e-2 for g in gate.values()), gate
    assert any(line.startswith("qwen3/uniform") and "ours_lora r8" in line and "x frozen" in line
               for line in stdout.splitlines())


def test_decode_benchmark_measures_every_path_against_the_floor(tmp_path):
    """``bench_decode.py --tiny``: per shape, routing and T, the floor from the experts touched, and ours, the
    exported program and the torch reference path, all agreeing with ours."""
    _, report, stdout = run_benchmark(tmp_path, "bench_decode", "--tiny", "--reps", "3", timeout=600)
    assert {(c["shape"], c["routing"], c["T"]) for c in report["cases"]} == {
        (s, r, t) for s in ("qwen3", "gptoss20b") for r in ("uniform", "zipf") for t in (1, 2, 8)}
    for case in report["cases"]:
        assert 1 <= case["experts_touched"] <= case["T"] * common.TINY_SHAPES[case["shape"]].K
        assert case["floor_us"] > 0 and case["bytes"] > 0
        for path in ("ours", "exported", "torch_ref"):
            result = case["paths"][path]
            assert "error" not in result, (path, result)
            assert result["call_us"] > 0 and result["rel_err_vs_ours"] < 1e-5, (path, result)
    assert stdout.strip().splitlines()[-1].startswith("floor/graph")
