"""Forward and forward+backward of the whole expert block: our path against the baselines, one run, one card.

    python benchmarks/bench_experts.py                      # every shape x routing x path (CUDA)
    python benchmarks/bench_experts.py --shapes qwen3 --routing uniform --reps 20
    python benchmarks/bench_experts.py --tiny               # tiny shapes, runs on CPU (the CI test)

Paths (see benchmarks/baselines.py):
  ours        moe_modules.GroupedExperts with the registry's default backends
  ours[...]   the same with backends forced per op (VARIANTS below)
  torch_ref   argsort + index_select + torch._grouped_mm + eager activation + fp32 scatter_add (NeMo / torchtitan)
  gemm_only   the two torch._grouped_mm GEMMs + activation on pre-sorted rows, nothing else
  loop        Python loop over experts
  nemo        NeMo AutoModel 0.7.0's own GroupedExperts, BackendConfig(experts="torch_mm"), on the same
              weights (its state dict is ours), when nemo_automodel imports (pip install --no-deps)
  te          Transformer Engine GroupedLinear (benchmarks/bench_te.py), when it imports

Inputs: bf16 x and expert weights (normal, std 0.02; biases random too, never zeros), routing
weights float32 softmax over the K slots, token mask all True.  "fwd" is the training forward
(autograd recording); "fwd_bwd" is forward plus torch.autograd.grad of a random output gradient
with respect to x, the routing weights and every expert parameter.  TFLOP/s counts matmul FLOPs
only (common.flops); memory is the peak allocated above the inputs during one forward+backward, and
the bytes the training forward saves for backward (common.saved_bytes: not the inputs or parameters).
Then, for our path: a run under torch.cuda.set_sync_debug_mode("error") and a CUDA graph
capture + replay of forward+backward.  The table is printed last; every number goes to
$OUT/bench_experts.json (benchmarks/results/ without $OUT), rewritten after each case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
# bench_te.py may import its siblings as ``benchmarks.x`` or as ``x``: allow both.
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

from benchmarks import baselines, common, lora_paths  # noqa: E402

# Our path with backends forced per op: (name, spec as in MOE_OPS_BACKEND).  Add rows freely;
# a variant that resolves to exactly the backends of the default path is recorded, not timed.
# (Forcing "reference" everywhere is left out: far too slow at these shapes.)
_FUSED_OPS = ("expert_up", "expert_up_backward", "expert_down", "expert_down_backward")
VARIANTS = [
    # The fused ops on Triton: GEMMs with the gather, bias, activation and probability fused in.
    ("ours[triton fused]", ",".join(f"{op}=triton" for op in _FUSED_OPS)),
    # The fused ops as their steps: torch._grouped_mm (CUTLASS) GEMMs, Triton gather/activation/combine.
    ("ours[cutlass+triton]", ",".join(f"{op}=torch" for op in _FUSED_OPS)),
]
BASELINES = ["torch_ref", "gemm_only", "loop", "nemo", "te"]
GATE_REL_ERR = 2e-2  # bf16 operands: 1e-3..1e-2 expected (METHOD.md); above this the path is WRONG
TINY_DENSE_N, DENSE_N = 256, 8192


class NotAvailable(Exception):
    """A path that cannot run here (missing package, no CUDA, forced backend absent)."""


# ----------------------------------------------------------------------------- one case
@dataclass
class Case:
    shape: common.Shape
    routing: str
    device: torch.device
    module: torch.nn.Module
    x: torch.Tensor
    token_mask: torch.Tensor
    weights: torch.Tensor
    indices: torch.Tensor
    grad_out: torch.Tensor
    params: list = field(default_factory=list)

    @property
    def act(self):
        return self.module.activation

    @property
    def grad_inputs(self) -> list:
        return [self.x, self.weights, *self.params]

    @property
    def grad_names(self) -> list:
        names = ["dx", "dweights", "dW1", "dW2"]
        return names + (["db1", "db2"] if self.shape.bias else [])


def build_case(shape: common.Shape, routing: str, device: torch.device, seed: int = 0) -> Case:
    from moe_modules import GroupedExperts

    torch.manual_seed(seed)
    with torch.device(device):
        module = GroupedExperts(shape.config())
    module.init_weights(device)
    with torch.no_grad():  # random biases: zeros would hide a wrong bias row
        for p in (module.gate_up_proj_bias, module.down_proj_bias):
            if p is not None:
                p.normal_(0.0, 0.02)
    indices, weights, token_mask = common.make_routing(shape, routing, device, seed)
    x = torch.randn(shape.T, shape.D, device=device, dtype=torch.bfloat16).requires_grad_()
    params = [p for p in (module.gate_and_up_projs, module.down_projs, module.gate_up_proj_bias,
                          module.down_proj_bias) if p is not None]
    return Case(shape, routing, device, module, x, token_mask, weights.requires_grad_(), indices,
                torch.randn_like(x), params)


# ----------------------------------------------------------------------------- paths
@contextlib.contextmanager
def forced_backends(spec: Optional[str]):
    """``"triton"`` or ``"grouped_mm=torch,grouped_mm_wgrad=torch"`` -> moe_ops.use_backend(...)."""
    if not spec:
        yield
        return
    import moe_ops

    everything, per_op = None, {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, name = item.rpartition("=")
        if op:
            per_op[op] = name
        else:
            everything = name
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(moe_ops.use_backend(everything, **per_op))
        except ValueError as e:  # a backend or op this build does not have
            raise NotAvailable(str(e)) from e
        yield


@contextlib.contextmanager
def record_backends():
    """Which backend the registry picked for each op while inside (best effort)."""
    from moe_ops import registry

    used: dict = {}
    original = registry.choose

    def choose(op, args):
        backend = original(op, args)
        used.setdefault(op, set()).add(backend.name)
        return backend

    registry.choose = choose
    registry.clear_caches()  # every op asks choose() at least once while recording
    try:
        yield used
    finally:
        registry.choose = original


def ours_path(case: Case, spec: Optional[str] = None):
    def forward():
        with forced_backends(spec):
            return case.module(case.x, case.token_mask, case.weights, case.indices)

    def fwd_bwd():
        with forced_backends(spec):
            y = case.module(case.x, case.token_mask, case.weights, case.indices)
            return (y, *torch.autograd.grad(y, case.grad_inputs, case.grad_out))

    return forward, fwd_bwd


def _block_baseline(fn: Callable, case: Case):
    m, act = case.module, case.act

    def forward():
        return fn(case.x, case.token_mask, case.weights, case.indices, m.gate_and_up_projs, m.down_projs,
                  m.gate_up_proj_bias, m.down_proj_bias, act.kind, act.alpha, act.limit, act.linear_offset)

    def fwd_bwd():
        y = forward()
        return (y, *torch.autograd.grad(y, case.grad_inputs, case.grad_out))

    return forward, fwd_bwd


def torch_ref_path(case: Case):
    _needs_grouped_mm()
    return _block_baseline(baselines.torch_reference_path, case)


def loop_path(case: Case):
    return _block_baseline(baselines.per_expert_loop, case)


def gemm_only_path(case: Case):
    _needs_grouped_mm()
    s, m = case.shape, case.module
    offsets = common.expert_counts(case.indices, s.E).cumsum(0).to(torch.int32)
    rows = torch.randn(s.R, s.D, device=case.device, dtype=torch.bfloat16).requires_grad_()
    grad_rows = torch.randn_like(rows)
    inputs = [rows, m.gate_and_up_projs, m.down_projs]

    def forward():
        return baselines.grouped_gemms_only(rows, m.gate_and_up_projs, m.down_projs, offsets, case.act.kind)

    def fwd_bwd():
        y = forward()
        return (y, *torch.autograd.grad(y, inputs, grad_rows))

    return forward, fwd_bwd


def nemo_module(case: Case):
    """NeMo AutoModel's ``GroupedExperts`` with ``BackendConfig(experts="torch_mm")``, holding our weights."""
    try:
        from nemo_automodel.components.models.common.utils import BackendConfig
        from nemo_automodel.components.moe.config import MoEConfig as NemoMoEConfig
        from nemo_automodel.components.moe.experts import GroupedExperts as NemoGroupedExperts
    except Exception as e:
        raise NotAvailable(f"nemo_automodel not importable ({type(e).__name__}: {e})") from e
    _needs_grouped_mm()
    ours = case.module.config
    config = NemoMoEConfig(
        n_routed_experts=ours.n_routed_experts, n_shared_experts=0, n_activated_experts=ours.n_activated_experts,
        n_expert_groups=1, n_limited_groups=1, train_gate=False, gate_bias_update_factor=0.0, aux_loss_coeff=0.0,
        score_func="softmax", route_scale=1.0, dim=ours.dim, inter_dim=ours.moe_inter_dim,
        moe_inter_dim=ours.moe_inter_dim, norm_topk_prob=False, expert_bias=ours.expert_bias,
        expert_activation=ours.expert_activation, activation_alpha=ours.activation_alpha,
        activation_limit=ours.activation_limit, dtype=torch.bfloat16)
    with torch.device(case.device):
        module = NemoGroupedExperts(config, backend=BackendConfig(experts="torch_mm", dispatcher="torch"))
    module.load_state_dict(case.module.state_dict())
    return module


def nemo_path(case: Case):
    module = nemo_module(case)
    params = [p for p in (module.gate_and_up_projs, module.down_projs, module.gate_up_proj_bias,
                          module.down_proj_bias) if p is not None]
    return lora_paths.fwd_bwd_path(module, case, params)


def nemo_lora_path(case: Case, ours):
    """NeMo's ``GroupedExpertsLoRA`` over :func:`nemo_module`, holding ``ours``' adapters."""
    try:
        from nemo_automodel.components._peft.lora_experts import GroupedExpertsLoRA
    except Exception as e:
        raise NotAvailable(f"nemo_automodel not importable ({type(e).__name__}: {e})") from e
    module = GroupedExpertsLoRA(nemo_module(case), lora_dim=ours.lora_dim, alpha=ours.lora_dim * ours.scale)
    module.load_state_dict(ours.state_dict())
    return lora_paths.lora_path(module, case)


def lora_rows(case: Case, opts, budget: "Budget") -> dict:
    """``--lora``: the frozen-base block, and per rank ours and NeMo's LoRA block (lora_paths.py), gated ours
    against NeMo's."""
    rows, gate = {}, {}
    names = ["dx", "dweights", "dA1", "dB1", "dA2", "dB2"]
    builds = [("frozen", lambda: lora_paths.frozen_path(case))]
    for rank in opts.lora_ranks:
        module = lora_paths.ours_lora(case, rank)
        builds += [(f"ours_lora r{rank}", lambda m=module: lora_paths.lora_path(m, case)),
                   (f"nemo_lora r{rank}", lambda m=module: nemo_lora_path(case, m))]
    outputs_of = {}
    for name, build in builds:
        if budget.left() <= 0:
            rows[name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        try:
            forward, fwd_bwd = build()
            outputs = fwd_bwd()
            if name.startswith("ours_lora"):
                outputs_of[name] = outputs
            elif name.startswith("nemo_lora") and name.replace("nemo", "ours") in outputs_of:
                gate[name.replace("nemo", "ours")] = compare(outputs_of.pop(name.replace("nemo", "ours")),
                                                             outputs, names)
            del outputs
            rows[name] = measure(forward, fwd_bwd, case, opts)
        except Exception as e:  # one failing path must not end the run
            rows[name] = describe_error(e)
        finally:
            common.free_memory()
        _print_progress(case.shape, case.routing, name, rows[name])
    return {"results": rows, "correctness": gate}


def _needs_grouped_mm():
    if not hasattr(torch, "_grouped_mm"):
        raise NotAvailable(f"torch {torch.__version__} has no torch._grouped_mm")


def te_result(case: Case) -> dict:
    """Transformer Engine GroupedLinear, timed by benchmarks/bench_te.py's own function."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:
        raise NotAvailable(f"TE not installed ({type(e).__name__})") from e
    if not common.is_cuda(case.device):
        raise NotAvailable("TE needs CUDA")
    try:
        from benchmarks.bench_te import time_grouped_experts_te
    except ImportError as e:
        raise NotAvailable(f"benchmarks/bench_te.py: {e}") from e
    raw = time_grouped_experts_te(case.shape.config(), case.shape.T, case.routing)
    return _normalise_te(raw)


def _normalise_te(raw) -> dict:
    """Accept {'fwd_ms', 'fwd_bwd_ms', 'peak_extra_bytes'} or {'fwd': {'median_ms'}, ...}; keep the raw dict."""
    if not isinstance(raw, dict):
        return {"status": "error", "reason": f"bench_te returned {type(raw).__name__}, expected dict", "raw": repr(raw)}
    out = {"status": "ok", "raw": raw}
    for mode in ("fwd", "fwd_bwd"):
        value = raw.get(mode, raw.get(f"{mode}_ms"))
        if isinstance(value, dict):
            value = value.get("median_ms")
        if isinstance(value, (int, float)):
            out[mode] = {"median_ms": float(value)}
    peak = raw.get("peak_extra_bytes")
    if peak is None and raw.get("peak_extra_gib") is not None:
        peak = raw["peak_extra_gib"] * 2**30
    out["peak_extra_bytes"] = peak
    return out


# ----------------------------------------------------------------------------- measuring
class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def describe_error(e: BaseException) -> dict:
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return {"status": "OOM", "reason": str(e).splitlines()[0][:200]}
    if isinstance(e, NotAvailable):
        return {"status": "n/a", "reason": str(e).splitlines()[0][:200]}
    name = type(e).__name__
    if name == "NoBackendError":
        lines = str(e).splitlines()
        return {"status": "n/a", "reason": " | ".join(lines[:3])[:300]}
    return {"status": "error", "reason": f"{name}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            "traceback": traceback.format_exc(limit=6)[-2000:]}


def measure(forward: Callable, fwd_bwd: Callable, case: Case, opts) -> dict:
    dev = case.device
    timing = dict(reps=opts.reps, warmup=opts.warmup, budget_s=opts.budget_s, min_reps=opts.min_reps)
    out = {"status": "ok"}
    out["fwd"] = common.time_ms(forward, dev, **timing)
    out["fwd_bwd"] = common.time_ms(fwd_bwd, dev, **timing)
    out["peak_extra_bytes"] = common.peak_extra_bytes(fwd_bwd, dev)
    out["saved_bytes"], saved = common.saved_bytes(forward, [case.x, case.weights, case.indices, case.token_mask])
    out["saved_largest"] = [[n, list(shape), str(dtype)] for n, shape, dtype in saved[:4]]
    return out


def add_rates(result: dict, flops: dict, dense_tflops: Optional[float]) -> None:
    for mode in ("fwd", "fwd_bwd"):
        ms = result.get(mode, {}).get("median_ms") if isinstance(result.get(mode), dict) else None
        rate = common.tflops(flops[mode], ms)
        result[f"{mode}_tflops"] = rate
        if rate is not None and dense_tflops:
            result[f"{mode}_pct_dense"] = 100.0 * rate / dense_tflops


def compare(outputs: tuple, reference: tuple, names: list) -> dict:
    errs = {name: common.rel_err(a, b) for name, a, b in zip(["y", *names], outputs, reference)}
    worst = max(errs.values())
    errs["max"] = worst
    errs["pass"] = bool(math.isfinite(worst) and worst < GATE_REL_ERR)
    return errs


def backend_summary(used: dict) -> dict:
    return {op: sorted(names) for op, names in sorted(used.items())}


def run_case(shape: common.Shape, routing: str, device, opts, dense_tflops, budget: Budget) -> dict:
    case = build_case(shape, routing, device, opts.seed)
    counts = common.expert_counts(case.indices, shape.E).float()
    record = {
        "shape": shape.name, "routing": routing, "shape_info": shape.as_dict(),
        "flops": common.flops(shape), "min_bytes": common.min_bytes(shape),
        "expert_load": {"max": int(counts.max()), "min": int(counts.min()), "mean": float(counts.mean())},
        "results": {}, "correctness": {},
    }
    results, gate = record["results"], record["correctness"]

    # Correctness gate: every whole-block path against the torch reference path, before timing.
    reference = None
    try:
        reference = torch_ref_path(case)[1]()
    except Exception as e:  # recorded, the run goes on
        results["torch_ref"] = describe_error(e)
    paths: list[tuple[str, Callable]] = [("ours", lambda: ours_path(case))]
    paths += [(name, (lambda s=spec: ours_path(case, s))) for name, spec in VARIANTS]
    if not opts.skip_baselines:
        paths += [("torch_ref", lambda: torch_ref_path(case)), ("gemm_only", lambda: gemm_only_path(case)),
                  ("loop", lambda: loop_path(case)), ("nemo", lambda: nemo_path(case))]
    if opts.paths:
        paths = [(n, b) for n, b in paths if n in opts.paths]

    default_backends = None
    for name, build in paths:
        if name in results:  # already failed above
            continue
        if budget.left() <= 0:
            results[name] = {"status": "skipped", "reason": "time budget spent"}
            continue
        try:
            forward, fwd_bwd = build()
            with record_backends() as used:
                outputs = fwd_bwd()
            if name.startswith("ours"):
                record.setdefault("backends", {})[name] = backend_summary(used)
                if name == "ours":
                    default_backends = backend_summary(used)
                elif default_backends and backend_summary(used) == default_backends:
                    results[name] = {"status": "same", "reason": "same backends as ours: not timed"}
                    del outputs
                    continue
            if reference is not None and name != "gemm_only":
                gate[name] = compare(outputs, reference, case.grad_names)
                if name != "torch_ref":
                    ok = "ok" if gate[name]["pass"] else "WRONG"
                    print(f"  gate {name:18s} vs torch_ref: max rel err {gate[name]['max']:.2e} ({ok})", flush=True)
            del outputs
            results[name] = measure(forward, fwd_bwd, case, opts)
        except Exception as e:  # one failing path must not end the run
            results[name] = describe_error(e)
        finally:
            common.free_memory()
        add_rates(results[name], record["flops"], dense_tflops)
        _print_progress(shape, routing, name, results[name])

    del reference
    common.free_memory()
    if not opts.skip_baselines and (not opts.paths or "te" in opts.paths):
        try:
            results["te"] = te_result(case) if budget.left() > 0 else {"status": "skipped", "reason": "time budget spent"}
        except Exception as e:
            results["te"] = describe_error(e)
        add_rates(results["te"], record["flops"], dense_tflops)
        _print_progress(shape, routing, "te", results["te"])
    if opts.lora_ranks:
        record["lora"] = lora_rows(case, opts, budget)
    del case
    common.free_memory()
    return record


def _print_progress(shape, routing, name, r):
    if r.get("status") == "ok" and "fwd_bwd" in r:
        print(f"  {shape.name}/{routing} {name:18s} fwd {r['fwd']['median_ms']:.3f} ms  "
              f"fwd+bwd {r['fwd_bwd']['median_ms']:.3f} ms", flush=True)
    else:
        print(f"  {shape.name}/{routing} {name:18s} {r.get('status')}: {r.get('reason', '')}", flush=True)


# ----------------------------------------------------------------------------- our path's checks
def sync_free_check(fwd_bwd: Callable, device) -> dict:
    fwd_bwd()  # warm: autotuning and compilation may synchronise
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd()
        result = {"pass": True}
    except RuntimeError as e:
        result = {"pass": False, "detail": str(e)[:400]}
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize(device)
    return result


def cuda_graph_check(fwd_bwd: Callable, device, opts) -> dict:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            eager = fwd_bwd()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static = fwd_bwd()
        graph.replay()
        torch.cuda.synchronize(device)
    except RuntimeError as e:
        return {"pass": False, "detail": str(e)[:400]}
    err = max(common.rel_err(a, b) for a, b in zip(static, eager))
    replay = common.time_ms(graph.replay, device, reps=opts.reps, budget_s=opts.budget_s, min_reps=opts.min_reps)
    result = {"pass": bool(math.isfinite(err) and err < GATE_REL_ERR), "replay_vs_eager_rel_err": err,
              "replay": replay}
    del graph, static, eager
    return result


def run_checks(shape, routing, device, opts) -> dict:
    checks = {}
    for name, fn in (("sync_free", sync_free_check), ("cuda_graph", cuda_graph_check)):
        case = None
        try:
            case = build_case(shape, routing, device, opts.seed)
            fwd_bwd = ours_path(case)[1]
            checks[name] = fn(fwd_bwd, device) if name == "sync_free" else fn(fwd_bwd, device, opts)
        except Exception as e:
            checks[name] = {"pass": False, **describe_error(e)}
        finally:
            del case
            common.free_memory()
    return checks


# ----------------------------------------------------------------------------- ceilings
def dense_rate(device, n: int, opts) -> dict:
    g = torch.Generator(device=device).manual_seed(1)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    t = common.time_ms(lambda: a @ b, device, reps=opts.reps, warmup=opts.warmup, budget_s=opts.budget_s,
                       min_reps=opts.min_reps)
    return {"n": n, **t, "tflops": common.tflops(2 * n**3, t["median_ms"])}


def copy_rate(device, nbytes: int, opts) -> dict:
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = common.time_ms(lambda: dst.copy_(src), device, reps=opts.reps, warmup=opts.warmup, budget_s=opts.budget_s,
                       min_reps=opts.min_reps)
    return {"bytes_read_plus_written": 2 * nbytes, **t, "gb_per_s": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9}


# ----------------------------------------------------------------------------- output
def _gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def table(report: dict) -> str:
    dense = report["dense"].get("tflops")
    lines = [
        f"card: {report['env'].get('card')} ({report['env'].get('capability')})  torch {report['env']['torch']}  "
        f"triton {report['env']['triton']}  TE {report['env']['transformer_engine']}  {report['env']['date']}",
        f"dense bf16 {report['dense']['n']}^3: {_fmt(dense, '.0f')} TFLOP/s at start, "
        f"{_fmt(report.get('dense_end', {}).get('tflops'), '.0f')} at end   "
        f"copy: {_fmt(report['copy'].get('gb_per_s'), '.0f')} GB/s (read+write)",
        f"{'case':24s} {'path':18s} {'fwd ms':>8s} {'f+b ms':>8s} {'f+b TF/s':>8s} {'%dense':>6s} {'memGiB':>6s} {'saved':>6s} "
        f"{'ref/x':>6s} {'gemm/x':>6s} {'err':>8s}  note",
    ]
    for case in report["cases"]:
        label = f"{case['shape']}/{case['routing']}"
        res = case["results"]
        ref_ms = (res.get("torch_ref") or {}).get("fwd_bwd", {}).get("median_ms")
        gemm_ms = (res.get("gemm_only") or {}).get("fwd_bwd", {}).get("median_ms")
        for path in report["paths"]:
            r = res.get(path)
            if r is None:
                continue
            err = case["correctness"].get(path, {})
            err_s = _fmt(err.get("max"), ".1e") if path != "torch_ref" else "-"
            if r.get("status") != "ok" or "fwd_bwd" not in r:
                lines.append(f"{label:24s} {path:18s} {r.get('status')}: {r.get('reason', '')}"[:160])
                continue
            fb = r["fwd_bwd"]["median_ms"]
            note = "" if err.get("pass", True) else "WRONG (fails the correctness gate)"
            lines.append(
                f"{label:24s} {path:18s} {r['fwd']['median_ms']:8.3f} {fb:8.3f} {_fmt(r.get('fwd_bwd_tflops'), '8.0f')} "
                f"{_fmt(r.get('fwd_bwd_pct_dense'), '6.0f')} {_gib(r.get('peak_extra_bytes')):>6s} "
                f"{_gib(r.get('saved_bytes')):>6s} "
                f"{_fmt(ref_ms / fb if ref_ms else None, '6.2f')} {_fmt(gemm_ms / fb if gemm_ms else None, '6.2f')} "
                f"{err_s:>8s}  {note}")
        lines += _lora_lines(label, case.get("lora"))
        checks = case.get("checks", {})
        if checks:
            sync, graph = checks.get("sync_free", {}), checks.get("cuda_graph", {})
            replay = graph.get("replay", {}).get("median_ms")
            lines.append(f"{label:24s} checks: no-host-sync {'pass' if sync.get('pass') else 'FAIL'}; "
                         f"cuda-graph {'pass' if graph.get('pass') else 'FAIL'}"
                         + (f" (replay {replay:.3f} ms)" if replay else "")
                         + ("" if sync.get("pass") and graph.get("pass") else
                            f"  [{(sync.get('detail') or sync.get('reason') or graph.get('detail') or graph.get('reason') or '')[:90]}]"))
    lines.append("ref/x, gemm/x: torch_ref (resp. gemm_only) fwd+bwd time over this path's (>1: this path is faster); "
                 "err: max rel err vs torch_ref (y and grads); memGiB: peak extra during fwd+bwd; "
                 "saved: GiB saved for backward (not inputs or parameters)")
    return "\n".join(lines)


def _lora_lines(label: str, lora: Optional[dict]) -> list:
    """``--lora`` rows: time against the frozen-base block, and NeMo's time over ours at the same rank."""
    if not lora:
        return []
    res = lora["results"]
    ms = {n: r["fwd_bwd"]["median_ms"] for n, r in res.items() if r.get("status") == "ok" and "fwd_bwd" in r}
    lines = []
    for name, r in res.items():
        if name not in ms:
            lines.append(f"{label:24s} {name:18s} {r.get('status')}: {r.get('reason', '')}"[:160])
            continue
        vs_frozen = ms[name] / ms["frozen"] if "frozen" in ms else None
        rank = name.rpartition(" ")[2]
        nemo_over_ours = ms.get(f"nemo_lora {rank}", 0) / ms[name] if name.startswith("ours_lora") else None
        err = lora["correctness"].get(name, {})
        lines.append(f"{label:24s} {name:18s} {r['fwd']['median_ms']:8.3f} {ms[name]:8.3f} "
                     f"{_gib(r.get('peak_extra_bytes')):>6s} {_gib(r.get('saved_bytes')):>6s}  x frozen "
                     f"{_fmt(vs_frozen, '.2f')}  nemo/ours {_fmt(nemo_over_ours or None, '.2f')}  "
                     f"err vs nemo {_fmt(err.get('max'), '.1e')}{'' if err.get('pass', True) else ' WRONG'}")
    return lines


def write_json(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)


def default_json_path() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "bench_experts.json" if out else HERE / "results" / "bench_experts.json"


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="all", help=f"comma list of {list(common.SHAPES)} or 'all'")
    p.add_argument("--routing", default="all", help="uniform, zipf or all")
    p.add_argument("--tiny", action="store_true", help="tiny shapes; runs on CPU (host clock) when there is no CUDA")
    p.add_argument("--reps", type=int, default=None, help="fixed repetitions per timing (default: from --budget-s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=0.5, help="seconds of repetitions per timing when --reps is not set")
    p.add_argument("--min-reps", type=int, default=10)
    p.add_argument("--time-budget", type=float, default=300.0,
                   help="seconds for all timings; paths past it are recorded as skipped (checks still run)")
    p.add_argument("--skip-baselines", action="store_true", help="time only our path (+variants); torch_ref still gates")
    p.add_argument("--paths", default=None, help="comma list of path names to keep (default all)")
    p.add_argument("--no-checks", action="store_true", help="skip the no-host-sync and CUDA-graph checks")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="default: $OUT/bench_experts.json or benchmarks/results/")
    p.add_argument("--lora", default="", help="comma list of LoRA ranks (e.g. 16,64): adds the frozen-base block "
                                              "and, per rank, ours and NeMo's GroupedExpertsLoRA (lora_paths.py)")
    opts = p.parse_args(argv)
    opts.lora_ranks = [int(r) for r in opts.lora.split(",") if r]
    table_ = common.TINY_SHAPES if opts.tiny else common.SHAPES
    opts.shape_list = list(table_.values()) if opts.shapes == "all" else [table_[s] for s in opts.shapes.split(",")]
    opts.routing_list = list(common.ROUTINGS) if opts.routing == "all" else opts.routing.split(",")
    for r in opts.routing_list:
        if r not in common.ROUTINGS:
            p.error(f"--routing: expected one of {common.ROUTINGS}, got {r!r}")
    opts.paths = set(opts.paths.split(",")) if opts.paths else None
    if opts.tiny and opts.reps is None:
        opts.reps, opts.warmup = 3, 1
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not opts.tiny:
        print("no CUDA device: the real shapes need a GPU (use --tiny on CPU)", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny shapes: threads only add scheduling noise
    json_path = opts.json or default_json_path()
    import moe_modules  # noqa: F401  (registers the ops and backends before anything is timed)

    all_paths = ["ours", *[n for n, _ in VARIANTS]] + ([] if opts.skip_baselines else BASELINES)
    report = {
        "env": common.environment(device) | {"MOE_OPS_BACKEND": os.environ.get("MOE_OPS_BACKEND")},
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "options": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(opts).items()
                    if k not in ("shape_list", "routing_list", "json")},
        "inputs": "x, expert weights bf16 (normal std 0.02, random biases); routing weights float32 softmax; "
                  "token mask all True",
        "paths": [p for p in all_paths if not opts.paths or p in opts.paths],
        "variants": dict(VARIANTS),
        "gate_rel_err": GATE_REL_ERR,
        "cases": [],
    }
    print(f"# {report['env']['card']}  torch {torch.__version__}  -> {json_path}", flush=True)
    report["dense"] = dense_rate(device, TINY_DENSE_N if opts.tiny else DENSE_N, opts)
    report["copy"] = copy_rate(device, (16 if opts.tiny else 1024) * 2**20, opts)
    dense_tflops = report["dense"]["tflops"]
    print(f"# dense bf16: {dense_tflops:.1f} TFLOP/s; copy {report['copy']['gb_per_s']:.0f} GB/s", flush=True)
    try:
        run_all(report, opts, device, json_path)
    except KeyboardInterrupt:  # the runner's time limit: keep what was measured
        report["interrupted"] = "stopped by SIGINT before the end (time limit?)"
        print(f"# {report['interrupted']}", flush=True)
    write_json(report, json_path)
    print(f"# wrote {json_path}", flush=True)
    print(table(report), flush=True)
    return 130 if report.get("interrupted") else 0


def run_all(report: dict, opts, device, json_path: Path) -> None:
    dense_tflops, copy_gbps = report["dense"]["tflops"], report["copy"]["gb_per_s"]
    budget = Budget(opts.time_budget)
    for shape in opts.shape_list:
        f, b = common.flops(shape), common.min_bytes(shape)
        floor = {m: max(f[m] / (dense_tflops * 1e9), b[m] / (copy_gbps * 1e6)) for m in f}
        print(f"# {shape.name}: R={shape.R} fwd {f['fwd'] / 1e12:.3f} TFLOP, {b['fwd'] / 1e9:.2f} GB; "
              f"fwd+bwd {f['fwd_bwd'] / 1e12:.3f} TFLOP, {b['fwd_bwd'] / 1e9:.2f} GB; floor (this card) "
              f"fwd {floor['fwd']:.3f} ms, fwd+bwd {floor['fwd_bwd']:.3f} ms", flush=True)
        for routing in opts.routing_list:
            record = run_case(shape, routing, device, opts, dense_tflops, budget)
            record["floor_ms"] = floor
            report["cases"].append(record)
            write_json(report, json_path)
    if common.is_cuda(device) and not opts.no_checks:
        for record in report["cases"]:
            shape = next(s for s in opts.shape_list if s.name == record["shape"])
            record["checks"] = run_checks(shape, record["routing"], device, opts)
            write_json(report, json_path)
    # The same dense product again: drift between the two (clocks, heat) bounds what a ratio can mean.
    report["dense_end"] = dense_rate(device, report["dense"]["n"], opts)


if __name__ == "__main__":
    sys.exit(main())
