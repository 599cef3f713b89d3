"""GroupedExpertsTE (Transformer Engine GroupedLinear) timings: the "te" row of bench_experts.py.

    python benchmarks/bench_te.py                    # Qwen3-30B-A3B experts: E=128, K=8, D=2048, I=768, T=16384
    python benchmarks/bench_te.py --fp8 current      # also under a TE FP8 autocast (current / delayed scaling)

``time_grouped_experts_te(config, T, routing)`` builds ``GroupedExpertsTE`` from the config on the
current CUDA device with the same inputs as bench_experts.py (bf16 x, normal(0, 0.02) weights,
random biases, float32 softmax routing weights from ``common.make_routing``, every token kept)
and returns median milliseconds of the training forward ("fwd": autograd recording) and of
forward + ``torch.autograd.grad`` with respect to x, the routing weights and every parameter
("fwd_bwd"), and the peak memory above the inputs during one forward+backward.  Extra keys:
the same for ``torch.compile(fullgraph=True)`` of the module, for the two bare ``GroupedLinear``
calls + activation on pre-sorted rows (what Transformer Engine itself costs, without routing,
the opaque op or the host sync), and the forward's relative error against ``GroupedExperts``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402

try:
    from benchmarks import common  # noqa: E402
except ImportError:  # run as a script from benchmarks/
    import common  # type: ignore  # noqa: E402

QWEN3 = dict(E=128, K=8, D=2048, I=768, T=16384)


def _fp8_context(fp8: Optional[str]):
    """A zero-argument factory of the TE FP8 autocast for "current" / "delayed" (None: no FP8)."""
    if fp8 is None:
        return contextlib.nullcontext
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    recipe = (te_recipe.DelayedScaling if fp8 == "delayed" else te_recipe.Float8CurrentScaling)(
        fp8_format=te_recipe.Format.HYBRID)
    if hasattr(te, "autocast"):
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _shape(config, T: int) -> common.Shape:
    return common.Shape("te", E=config.n_routed_experts, K=config.n_activated_experts, D=config.dim,
                        I=config.moe_inter_dim, T=T, activation=config.expert_activation, bias=config.expert_bias)


def _timed(forward, fwd_bwd, device, timing: dict) -> dict:
    return {"fwd": common.time_ms(forward, device, **timing), "fwd_bwd": common.time_ms(fwd_bwd, device, **timing),
            "peak_extra_bytes": common.peak_extra_bytes(fwd_bwd, device)}


def time_grouped_experts_te(config, T: int, routing: str = "uniform", *, fp8: Optional[str] = None,
                            compiled: bool = False, gemm_only: bool = False, seed: int = 0,
                            timing: Optional[dict] = None) -> dict:
    """Time ``GroupedExpertsTE`` on ``T`` tokens: ``fwd``/``fwd_bwd`` ({"median_ms", ...}), ``fwd_ms``,
    ``fwd_bwd_ms``, ``peak_extra_bytes``, ``rel_err_vs_grouped_experts``; with ``compiled`` / ``gemm_only``
    (off by default: compiling costs tens of seconds) the same timings under those keys."""
    from moe_modules import GroupedExperts, GroupedExpertsTE
    from moe_ops.ops import opaque_module

    if not torch.cuda.is_available():
        raise RuntimeError("GroupedExpertsTE benchmark needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    timing = dict(timing or {})
    shape = _shape(config, T)
    torch.manual_seed(seed)
    module = GroupedExpertsTE(config, device=device)
    module.init_weights(device, init_std=0.02)
    with torch.no_grad():  # random biases, as bench_experts.py
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            if getattr(module, name) is not None:
                setattr(module, name, torch.randn_like(getattr(module, name)) * 0.02)
    indices, weights, token_mask = common.make_routing(shape, routing, device, seed)
    x = torch.randn(T, config.dim, device=device, dtype=torch.bfloat16).requires_grad_()
    weights = weights.requires_grad_()
    grad_out = torch.randn_like(x)
    params = list(module.parameters())
    fp8_context = _fp8_context(fp8)

    def make(fn):
        def forward():
            with fp8_context():
                return fn(x, token_mask, weights, indices)

        def fwd_bwd():
            y = forward()
            return (y, *torch.autograd.grad(y, [x, weights, *params], grad_out))

        return forward, fwd_bwd

    result = {"status": "ok", "fp8": fp8, "routing": routing, "shape": shape.as_dict(),
              "device": torch.cuda.get_device_name(device)}
    result |= _timed(*make(module), device, timing)
    result["fwd_ms"], result["fwd_bwd_ms"] = result["fwd"]["median_ms"], result["fwd_bwd"]["median_ms"]

    with torch.no_grad():  # correctness of what was timed, against the library's own module
        with torch.device(device):
            ref = GroupedExperts(config)
        ref.load_state_dict(module.state_dict())
        with fp8_context():
            y = module(x, token_mask, weights, indices)
        result["rel_err_vs_grouped_experts"] = common.rel_err(y, ref(x, token_mask, weights, indices))
        del ref, y
    common.free_memory()

    if compiled:
        try:
            torch._dynamo.reset()
            result["compiled"] = _timed(*make(torch.compile(module, fullgraph=True)), device, timing)
        except Exception as e:  # report, do not lose the eager numbers
            result["compiled"] = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
        common.free_memory()
    if gemm_only:
        result["gemm_only"] = _gemm_only(module, shape, indices, device, fp8_context, timing)
        common.free_memory()
    result["live_graphs_after"] = opaque_module.live_graphs()
    return result


def _gemm_only(module, shape, indices, device, fp8_context, timing) -> dict:
    """The two GroupedLinear calls + activation on rows already sorted by expert (host counts given)."""
    import moe_ops

    counts = common.expert_counts(indices, shape.E)
    splits = counts.tolist()
    if fp8_context is not contextlib.nullcontext:
        splits = [-(-c // 16) * 16 for c in splits]
    rows = torch.randn(sum(splits), shape.D, device=device, dtype=torch.bfloat16).requires_grad_()
    grad_rows = torch.randn_like(rows)
    probs = torch.rand(rows.shape[0], device=device)
    act = module.activation
    params = list(module.parameters())

    def forward():
        with fp8_context():
            h = module.gate_up_linear(rows, splits)
            a = moe_ops.activation(h, probs, act.kind, act.alpha, act.limit, act.linear_offset)
            out = module.down_linear(a, splits)
        return out[0] if isinstance(out, tuple) else out

    def fwd_bwd():
        y = forward()
        return (y, *torch.autograd.grad(y, [rows, *params], grad_rows, allow_unused=True))

    return _timed(forward, fwd_bwd, device, timing)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--routing", default="uniform", choices=common.ROUTINGS)
    parser.add_argument("--fp8", default=None, choices=["current", "delayed"], help="also time under this FP8 recipe")
    parser.add_argument("--T", type=int, default=QWEN3["T"])
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    from moe_modules import MoEConfig

    config = MoEConfig(n_routed_experts=QWEN3["E"], n_activated_experts=QWEN3["K"], dim=QWEN3["D"],
                       moe_inter_dim=QWEN3["I"], expert_activation="swiglu", dtype=torch.bfloat16)
    extras = dict(compiled=not args.no_compile, gemm_only=True)
    runs = {"bf16": time_grouped_experts_te(config, args.T, args.routing, **extras)}
    if args.fp8:
        runs[f"fp8_{args.fp8}"] = time_grouped_experts_te(config, args.T, args.routing, fp8=args.fp8, **extras)
    print(f"GroupedExpertsTE, Qwen3-30B-A3B experts (E=128, K=8, D=2048, I=768), T={args.T}, {args.routing} routing, "
          f"{runs['bf16']['device']}")
    print(f"{'precision':<14}{'path':<12}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak GiB':>10}")
    for name, r in runs.items():
        rows = [("module", r), ("compiled", r.get("compiled")), ("gemm_only", r.get("gemm_only"))]
        for path, t in rows:
            if not t or "fwd" not in t:
                if t:
                    print(f"{name:<14}{path:<12}{t.get('status')}: {t.get('reason')}")
                continue
            peak = t.get("peak_extra_bytes")
            print(f"{name:<14}{path:<12}{t['fwd']['median_ms']:>10.3f}{t['fwd_bwd']['median_ms']:>12.3f}"
                  f"{(peak or 0) / 2**30:>10.2f}")
        print(f"{name:<14}rel. error of the forward vs GroupedExperts: {r['rel_err_vs_grouped_experts']:.2e}")
    out_dir = Path(os.environ.get("OUT", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_te.json").write_text(json.dumps(runs, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
