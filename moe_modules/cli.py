"""The ``moe-ops`` command.

``moe-ops check`` builds every expert module for every activation (with and
without bias), compares forward and every gradient with the float64 oracle
(:mod:`moe_modules.reference`), compiles it with ``fullgraph=True``, exports
it, runs the export at another token count, and prints a table.
``moe-ops info`` prints the op x backend table with the reasons a backend
cannot run here.  (It lives in ``moe_modules`` because ``check`` builds
modules; ``moe_ops`` never imports ``moe_modules``.)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import moe_ops
from moe_ops import registry  # the public registry module
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, GroupedExpertsTE, MoEConfig
from moe_modules import reference
from moe_modules.te import transformer_engine_available

ACTIVATIONS = tuple(moe_ops.GATED)
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make_inputs(T, config, device, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    E, K = config.n_routed_experts, config.n_activated_experts
    x = torch.randn(T, config.expert_dim, generator=g).to(device, dtype)
    indices = torch.rand(T, E, generator=g).argsort(1)[:, :K]
    indices[torch.rand(T, K, generator=g) < 0.1] = -1  # some slots not routed
    token_mask = torch.rand(T, generator=g) > 0.1
    weights = torch.rand(T, K, generator=g).softmax(1)
    return x, token_mask.to(device), weights.to(device), indices.to(device)


def build(cls, activation, bias, device, dtype, seed=0):
    config = MoEConfig(n_routed_experts=8, n_activated_experts=2, dim=64, moe_inter_dim=32,
                       expert_activation=activation, expert_bias=bias, dtype=dtype)
    torch.manual_seed(seed)
    module = cls(config).to(device)
    module.init_weights(device, init_std=0.1)
    if bias:  # random biases (zeros would hide a wrong bias row), set through the state dict as users do
        state = module.state_dict()
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            state[name] = torch.randn_like(state[name]) * 0.1
        module.load_state_dict(state)
    return module, config


STACKED = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")


def stacked_params(module) -> dict:
    """The expert parameters in the stacked x@W layout (for TE: read through its properties)."""
    return {n: getattr(module, n).detach() for n in STACKED if getattr(module, n) is not None}


def stacked_grads(module) -> list:
    """Gradients of the stacked parameters, after a backward (TE's per-expert ones restacked)."""
    if isinstance(module, GroupedExpertsTE):
        from moe_modules.te import layout as te_layout

        def per_expert(linear, kind):
            grads = [getattr(linear, f"{kind}{i}").grad for i in range(linear.num_gemms)]
            stack = te_layout.stacked_from_te_weights if kind == "weight" else te_layout.stacked_from_te_biases
            return stack(grads)

        grads = [per_expert(module.gate_up_linear, "weight"), per_expert(module.down_linear, "weight")]
        if module.config.expert_bias:
            grads += [per_expert(module.gate_up_linear, "bias"), per_expert(module.down_linear, "bias")]
        return grads
    return [getattr(module, n).grad for n in STACKED if getattr(module, n) is not None]


def forward_backward(fn, module, inputs, grad_out_seed=1):
    x, mask, w, idx = inputs
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    y = fn(x, mask, w, idx)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(y)
    y.backward(g)
    return y.detach(), [x.grad, w.grad, *stacked_grads(module)], g


def check_one(cls, activation, bias, device, dtype, compile_backend, T=48, T_other=33):
    module, config = build(cls, activation, bias, device, dtype)
    inputs = make_inputs(T, config, device, dtype, seed=2)
    y, grads, g = forward_backward(module, module, inputs)

    # float64 oracle on float64 copies of the same inputs and parameters
    x, mask, w, idx = inputs
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    params64 = {n: p.double().requires_grad_() for n, p in stacked_params(module).items()}
    act = module.activation
    y64 = reference.expert_block(x64, mask, w64, idx, params64["gate_and_up_projs"], params64["down_projs"],
                                 params64.get("gate_up_proj_bias"), params64.get("down_proj_bias"),
                                 act.kind, act.alpha, act.limit, act.linear_offset)
    grads64 = torch.autograd.grad(y64, [x64, w64, *params64.values()], g.double())
    fwd_err = rel_err(y, y64)
    grad_err = max(rel_err(a, b) for a, b in zip(grads, grads64))
    ok = fwd_err < TOLERANCE[dtype] and grad_err < TOLERANCE[dtype]

    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend=compile_backend)
    try:
        yc, grads_c, _ = forward_backward(compiled, module, inputs)
        compile_err = max([rel_err(yc, y)] + [rel_err(a, b) for a, b in zip(grads_c, grads)])
        compile_status = f"{compile_err:.1e}"
        ok &= compile_err < TOLERANCE[dtype]
    except Exception as e:  # reported in the table, exit code says failure
        compile_status, ok = f"FAIL {type(e).__name__}", False

    try:
        T_dim = torch.export.Dim("T", min=2)
        dyn = ({0: T_dim}, {0: T_dim}, {0: T_dim}, {0: T_dim})
        exported = torch.export.export(module, inputs, dynamic_shapes=dyn, strict=False)
        other = make_inputs(T_other, config, device, dtype, seed=3)
        with torch.no_grad():
            export_err = rel_err(exported.module()(*other), module(*other))
        export_status = f"{export_err:.1e}"
        ok &= export_err < TOLERANCE[dtype]
    except Exception as e:
        export_status, ok = f"FAIL {type(e).__name__}", False
    return dict(fwd=fwd_err, grad=grad_err, compile=compile_status, export=export_status, ok=ok)


def cmd_check(args) -> int:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    classes = [GroupedExperts, GroupedExpertsDeepEP]
    if device.type == "cuda" and transformer_engine_available():
        classes.append(GroupedExpertsTE)
    print(f"moe-ops check on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.dtype}, torch {torch.__version__}, compile backend {args.compile_backend}; "
          f"tolerance {TOLERANCE[dtype]:.0e} (relative, vs float64)")
    if device.type != "cuda":
        print("GroupedExpertsTE: skipped (needs CUDA and Transformer Engine)")
    header = f"{'module':<22}{'activation':<13}{'bias':<6}{'forward':>10}{'grads':>10}{'compile':>12}{'export':>12}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for cls in classes:
        for activation in ACTIVATIONS:
            for bias in (False, True):
                t0 = time.perf_counter()
                r = check_one(cls, activation, bias, device, dtype, args.compile_backend)
                failures += not r["ok"]
                print(f"{cls.__name__:<22}{activation:<13}{str(bias):<6}{r['fwd']:>10.1e}{r['grad']:>10.1e}"
                      f"{r['compile']:>12}{r['export']:>12}  {'ok' if r['ok'] else 'FAIL'}"
                      f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    print(f"\n{'all checks passed' if not failures else f'{failures} configuration(s) FAILED'}")
    return 1 if failures else 0


def cmd_info(args) -> int:
    print(f"moe-ops: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    forced = {op: registry.forced_backend(op) for op in registry.OPS}
    names = registry.PRIORITY
    print(f"backends in priority order: {', '.join(names)}")
    for b in registry.backends():
        print(f"  {b.name}: {b.description}")
    from moe_modules.ep import deep_ep_importable

    print(f"expert parallelism through DeepEP's buffers (apply_ep(use_deep_ep=...)): "
          f"{'deep_ep importable' if deep_ep_importable() else 'no: the optional deep_ep package is not importable'}")
    print()
    for op, reasons in registry.support_table():
        tag = f"  (forced: {forced[op]})" if forced[op] else ""
        print(f"moe::{op}{tag}")
        for name in names:
            r = reasons[name]
            print(f"    {name:<10} {'available' if not r else 'no: ' + '; '.join(r)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-ops", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check every expert module against float64, compile and export it")
    check.add_argument("--device", default="cpu")
    check.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    check.add_argument("--compile-backend", default="aot_eager", help="torch.compile backend (aot_eager, inductor)")
    sub.add_parser("info", help="print which backend can run each op here, and why not")
    args = parser.parse_args(argv)
    return {"check": cmd_check, "info": cmd_info}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
