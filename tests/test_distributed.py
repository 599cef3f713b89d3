"""Expert parallelism on CPU with gloo, world sizes 2 and 4.

One launch per world size runs every sub-case on one process group (``tests/ep_cases.py``); the
tests here compare what each rank saved with a single-process float64 reference:

* outputs and gradients (x, routing weights, the rank's parameter shards) of ``GroupedExperts``
  (all-gather / reduce-scatter) and ``GroupedExpertsDeepEP`` (all-to-all, peer memory), every
  activation, with and without bias, uneven token counts and a rank with no token;
* every module (``GroupedExpertsTE`` on the stand-in of Transformer Engine) over every transport;
* ``torch.compile(fullgraph=True)`` of each against eager;
* ``apply_ep``'s state dict (same keys, Shard(0) DTensors, ``torch.distributed.checkpoint`` round trip)
  and its error for an expert count the EP size does not divide.

Nothing can hang: each launch has a deadline after which every rank is killed, and gloo
collectives time out before that.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ep_cases
import reference

# Every test here spawns CPU ranks that talk over gloo; a torch built without torch.distributed or
# without gloo (USE_DISTRIBUTED=0 / USE_GLOO=0, e.g. some macOS and Windows wheels) cannot run them.
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed gloo backend (dist.is_available() and "
           "dist.is_gloo_available() are not both True); these tests spawn gloo ranks on CPU")
pytestmark = needs_gloo

HERE = Path(__file__).resolve().parent
LAUNCH_DEADLINE_S = 240  # a whole world's sub-cases; gloo's own timeout (ep_cases.GLOO_TIMEOUT_S) is shorter
TOL = reference.TOLERANCE[torch.float32]


def launch(command_of_rank, world_size: int, env: dict, deadline_s: float) -> list[str]:
    """Start one process per rank, wait for all with a deadline, kill every one still running after it.
    Returns each rank's output; raises with the outputs if a rank failed or the deadline passed."""
    logs, procs, log_files = [], [], []
    for rank in range(world_size):
        log = open(Path(env["EP_TEST_LOG_DIR"]) / f"rank{rank}.log", "w+")
        log_files.append(log)
        procs.append(subprocess.Popen(command_of_rank(rank), stdout=log, stderr=subprocess.STDOUT, env=env,
                                      cwd=HERE.parent))
    end = time.monotonic() + deadline_s
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(end - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for log in log_files:
        log.seek(0)
        logs.append(log.read())
        log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if timed_out or failed:
        tails = "\n".join(f"--- rank {r} ---\n{logs[r][-3000:]}" for r in range(world_size))
        reason = f"deadline of {deadline_s}s passed" if timed_out else f"ranks {failed} failed"
        raise AssertionError(f"{world_size}-rank launch: {reason}\n{tails}")
    return logs


def worker_env(log_dir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", EP_TEST_LOG_DIR=str(log_dir))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def run_world(script: Path, world_size: int, directory: Path, deadline_s: float) -> list:
    """Launch ``python script --rank R --world-size W --dir directory`` on every rank (an
    ``ep_cases.main`` worker) and return what each rank saved."""
    launch(lambda rank: [sys.executable, str(script), "--rank", str(rank), "--world-size", str(world_size),
                         "--dir", str(directory)],
           world_size, worker_env(directory), deadline_s)
    return [torch.load(directory / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def world_run(request, tmp_path_factory, script: str) -> tuple[int, list]:
    """``(world size, every rank's saved results)`` of one launch of ``tests/<script>`` at the world size that
    parametrizes the requesting fixture."""
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"{Path(script).stem}_world{world_size}")
    return world_size, run_world(HERE / script, world_size, directory, LAUNCH_DEADLINE_S)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def ep_run(request, tmp_path_factory):
    """Every rank's saved results of one launch of ``tests/ep_cases.py`` at this world size."""
    return world_run(request, tmp_path_factory, "ep_cases.py")


@functools.lru_cache(maxsize=None)
def float64_reference(activation: str, bias: bool, layout: str, world_size: int) -> dict:
    """Output and gradients of the whole (all ranks') batch in float64, from tests/reference.py."""
    inputs = ep_cases.make_inputs(ep_cases.Case("any", activation, bias, layout), world_size)
    leaves = {name: inputs[name].to(torch.float64).requires_grad_()
              for name in ("x", "weights", *ep_cases.PARAM_NAMES) if inputs[name] is not None}
    y = reference.expert_block(leaves["x"], inputs["token_mask"], leaves["weights"], inputs["indices"],
                               leaves["gate_and_up_projs"], leaves["down_projs"], leaves.get("gate_up_proj_bias"),
                               leaves.get("down_proj_bias"), kind=activation)
    (y * inputs["grad_y"].to(torch.float64)).sum().backward()
    out = {"y": y.detach(), "x_grad": leaves["x"].grad, "weights_grad": leaves["weights"].grad}
    out.update({name + "_grad": leaves[name].grad for name in ep_cases.PARAM_NAMES if name in leaves})
    return out


def expected_on_rank(case: ep_cases.Case, world_size: int, rank: int) -> dict:
    ref = float64_reference(case.activation, case.bias, case.layout, world_size)
    tokens, experts = ep_cases.rank_slice(case, world_size, rank), ep_cases.expert_slice(world_size, rank)
    return {key: value[experts] if key.endswith("projs_grad") or key.endswith("bias_grad") else value[tokens]
            for key, value in ref.items()}


def mismatches(actual: dict, expected: dict, tol: float, where: str) -> list[str]:
    failures = []
    if sorted(actual) != sorted(expected):
        return [f"{where}: results {sorted(actual)} != expected {sorted(expected)}"]
    for key, want in expected.items():
        got = actual[key]
        if got is None:
            failures.append(f"{where} {key}: None (expected a tensor, zeros included)")
            continue
        try:
            reference.assert_matches(got, want, tol, f"{where} {key}")
        except AssertionError as error:
            failures.append(str(error))
    return failures


def test_outputs_and_gradients_match_float64_reference(ep_run):
    world_size, ranks = ep_run
    failures, compared = [], 0
    for case in ep_cases.cases(world_size):
        for rank, results in enumerate(ranks):
            expected = expected_on_rank(case, world_size, rank)
            failures += mismatches(results["cases"][case.name], expected, TOL, f"{case.name} rank {rank}")
            compared += 1
    assert compared == len(ep_cases.cases(world_size)) * world_size
    assert not failures, f"{len(failures)} mismatches:\n" + "\n".join(failures)


DISPATCHERS = {"all_gather": "AllGatherDispatcher", "all_to_all": "AllToAllDispatcher", "peer": "PeerDispatcher"}
DEFAULT_TRANSPORTS = {"GroupedExperts": "all_gather", "GroupedExpertsDeepEP": "all_to_all",
                      "GroupedExpertsTE": "all_to_all"}


def test_every_module_ran_over_every_transport(ep_run):
    """Each module spec ran on the dispatcher it names (its default where it names none)."""
    world_size, ranks = ep_run
    specs = ep_cases.MODULES + ep_cases.TRANSPORT_MATRIX
    assert {(m.split("@")[0], DISPATCHERS.get(m.partition("@")[2] or DEFAULT_TRANSPORTS[m])) for m in specs} >= {
        (module, DISPATCHERS[t]) for module in DEFAULT_TRANSPORTS for t in ("all_gather", "all_to_all")}
    for case in ep_cases.cases(world_size):
        transport = case.module.partition("@")[2] or DEFAULT_TRANSPORTS[case.module]
        for rank, results in enumerate(ranks):
            assert results["dispatchers"][case.name] == DISPATCHERS[transport], (case.name, rank)


def test_all_to_all_forward_routes_once_before_the_block_and_combines_once_after(ep_run):
    """One route and one gather dispatch the rows, the block routes what arrived once and runs its fused
    ops on exactly the valid pairs, one combine brings the partials home (issue 14: there were three
    routes, two gathers and two combines)."""
    _, ranks = ep_run
    for rank, results in enumerate(ranks):
        forward = results["a2a_forward"]
        assert forward["GroupedExpertsDeepEP"]["ops"] == ep_cases.A2A_OPS, (rank, forward["GroupedExpertsDeepEP"])
        assert forward["GroupedExperts@all_to_all"]["ops"] == ep_cases.A2A_OPS, rank
        assert forward["GroupedExpertsTE"]["ops"] == ep_cases.A2A_OPS_TE, (rank, forward["GroupedExpertsTE"])


def test_token_layouts_include_an_empty_rank_and_uneven_counts(ep_run):
    world_size, _ = ep_run
    layouts = ep_cases.TOKEN_LAYOUTS[world_size]
    assert any(0 in counts for counts in layouts.values())
    assert all(len(set(counts)) > 1 for counts in layouts.values())
    compiled = [c for c in ep_cases.cases(world_size) if c.compiled]
    assert {c.module for c in compiled} == set(ep_cases.MODULES + ep_cases.TRANSPORT_MATRIX)
    assert all(0 in ep_cases.token_counts(c, world_size) for c in compiled)


def test_compiled_fullgraph_matches_eager(ep_run):
    world_size, ranks = ep_run
    failures = []
    compiled = [c for c in ep_cases.cases(world_size) if c.compiled]
    assert compiled
    for case in compiled:
        for rank, results in enumerate(ranks):
            failures += mismatches(results["cases"][case.name], results["cases"][case.eager().name], 1e-6,
                                   f"{case.name} vs eager, rank {rank}")
    assert not failures, "\n".join(failures)


def test_state_dict_keys_dtensor_values_and_dcp_round_trip(ep_run):
    _, ranks = ep_run
    failures = [f"rank {r}: {message}" for r, results in enumerate(ranks)
                for message in results["state_dict_failures"]]
    assert not failures, "\n".join(failures)


def test_apply_ep_rejects_indivisible_experts_and_double_sharding(ep_run):
    world_size, ranks = ep_run
    for results in ranks:
        messages = results["bad_mesh_messages"]
        for module in ep_cases.MODULES:
            indivisible = messages[module + "-indivisible"]
            assert indivisible is not None, f"{module}: no ValueError for {world_size + 1} experts"
            assert f"n_routed_experts={world_size + 1}" in indivisible and f"ep_size={world_size}" in indivisible
            twice = messages[module + "-twice"]
            assert twice is not None and "already" in twice, f"{module}: second apply_ep gave {twice!r}"
        over = messages["peer-over-capacity"]
        assert over is not None and f"max_tokens_per_rank={ep_cases.PEER_CAPACITY}" in over, over
        assert f"got {ep_cases.PEER_CAPACITY + 1}" in over, over
        for name, fragment in {"unknown-transport": "transport: expected one of",
                               "capacity-without-peer": "max_tokens_per_rank: it sizes the peer-memory transport",
                               "deep-ep-over-all-gather": "DeepEP moves tokens all-to-all"}.items():
            assert messages[name] is not None and fragment in messages[name], (name, messages[name])
            assert messages[name + "-left-unsharded"] == "LocalDispatcher", name


def test_peer_dispatch_ops_pass_opcheck(ep_run):
    """moe::peer_dispatch / moe::peer_combine: schema, autograd registration, fake tensors, AOT dispatch."""
    _, ranks = ep_run
    for rank, results in enumerate(ranks):
        outcomes = results["peer_opcheck"]
        assert set(outcomes) == {"dispatch", "combine"}
        failures = {(op, test): o for op, tests in outcomes.items() for test, o in tests.items() if o != "SUCCESS"}
        assert len(outcomes["dispatch"]) == 4 and not failures, f"rank {rank}: {failures}"


def run_torchrun(script: str, args: list[str], nproc: int, out_dir: Path, deadline_s: float) -> str:
    """``torchrun --standalone --nproc-per-node N script args`` in its own session, killed whole after
    the deadline.  Returns its output; raises with the output when it fails."""
    import signal

    env = worker_env(out_dir)
    env["OUT"] = str(out_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(HERE.parent / script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=HERE.parent, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise AssertionError(f"{script}: deadline of {deadline_s}s passed\n{output[-4000:]}")
    assert proc.returncode == 0, f"{script} exited with {proc.returncode}\n{output[-4000:]}"
    return output


def test_gpu_parity_script_runs_on_cpu_gloo(tmp_path):
    """benchmarks/gpu_ep_parity.py's logic, on gloo with tiny shapes (the GPU run uses NCCL)."""
    import json

    output = run_torchrun("benchmarks/gpu_ep_parity.py", ["--device", "cpu", "--tiny"], 2, tmp_path, 120)
    assert "PASSED: 68/68" in output, output[-3000:]  # 17 tensors x 4 EP runs (gpu_ep_parity.variants)
    report = json.loads((tmp_path / "ep_parity_ws2.json").read_text())
    assert report["passed"] and report["token_counts"] == [12, 7]
    assert {r["module"] for r in report["results"]} == {"GroupedExperts", "GroupedExpertsDeepEP",
                                                        "GroupedExpertsDeepEP (bf16 partials)",
                                                        "GroupedExpertsDeepEP (peer memory)"}
    assert all(r["err_vs_fp32"] < report["tolerance"] for r in report["results"])


def test_ep_benchmark_script_runs_on_cpu_gloo(tmp_path):
    """benchmarks/bench_ep.py's logic, on gloo with tiny shapes (the GPU run uses NCCL)."""
    import json

    output = run_torchrun("benchmarks/bench_ep.py", ["--device", "cpu", "--tiny", "--host-costs"], 2, tmp_path, 180)
    assert "dispatch+combine" in output and "GroupedExpertsDeepEP EP x2" in output, output[-3000:]
    assert "unwaited collective" not in output, output[-3000:]
    report = json.loads((tmp_path / "bench_ep_ws2.json").read_text())
    bandwidth, layers = report["dispatch_combine"], report["layers"]
    assert bandwidth["rows_sent_max"] > 0 and bandwidth["ours_GBps"] > 0 and bandwidth["raw_GBps"] > 0
    # One row per (token, rank that owns one of its experts): between 1 and the EP size (2) per token.
    assert 1.0 <= bandwidth["rows_per_token"] <= 2.0, bandwidth["rows_per_token"]
    assert bandwidth["pair_rows_sent_max"] >= bandwidth["rows_sent_max"]
    assert "ours_compiled_ms" in bandwidth, bandwidth.get("ours_compiled_error")
    assert all(us > 0 for us in bandwidth["host_us"].values()), bandwidth["host_us"]
    for key in ("one_gpu_whole_batch_ms", "GroupedExperts_ep_ms", "GroupedExpertsDeepEP_ep_ms",
                "GroupedExpertsDeepEP_peer_ep_ms"):
        assert layers[key] > 0, key
    # The peer-memory dispatch, timed eager, back to back, compiled and with the host ahead.
    for key in ("peer_dispatch_combine_ms", "peer_pipelined_ms", "peer_compiled_ms",
                "peer_dispatch_combine_host_ahead_ms", "peer_dispatch_host_ahead_ms", "peer_combine_host_ahead_ms",
                "raw_there_and_back_host_ahead_ms"):
        assert bandwidth[key] > 0, (key, bandwidth.get("peer_compiled_error"))
    assert bandwidth["peer_capacity_rows"] == 2 * 16  # world size x --tiny's 16 tokens per rank


def test_ep_on_a_submesh_of_a_dp_x_ep_mesh(ep_run):
    """At 4 ranks, a (dp=2, ep=2) mesh: both modules on mesh["ep"] match the 2-rank reference, a
    4-way checkpoint loads into the 2-way sharding, and apply_ep refuses the 2-D mesh itself."""
    world_size, ranks = ep_run
    if world_size != 4:
        pytest.skip("the (dp, ep) mesh needs 4 ranks")
    failures = []
    for rank, results in enumerate(ranks):
        ep_rank = results["submesh_ep_rank"]
        assert ep_rank == rank % 2
        for case in ep_cases.submesh_cases():
            failures += mismatches(results["submesh_cases"][case.name], expected_on_rank(case, 2, ep_rank), TOL,
                                   f"submesh {case.name} rank {rank}")
        failures += [f"rank {rank}: {m}" for m in results["reshard_failures"]]
        message = results["mesh_2d_message"]
        assert message is not None and "1-D" in message and "(2, 2)" in message, f"2-D mesh: {message!r}"
    assert not failures, "\n".join(failures)
