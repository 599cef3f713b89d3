"""GroupedExpertsTE on real Transformer Engine (CUDA): parity with GroupedExperts, FP8, compile, state dict.

Run on the GPU machine after installing Transformer Engine:

    python -m pytest tests/test_te_gpu.py -q -rs

Tolerances (relative Frobenius error ||a - b|| / ||b|| against GroupedExperts holding the same
state dict, both in bf16 on the GPU):
  * bf16: forward and every gradient < 1e-2 (issue 6).
  * FP8 (DelayedScaling and Float8CurrentScaling, HYBRID: E4M3 forward, E5M2 gradients):
    forward < 1e-1, gradients < 1.5e-1.  Issue 6 asked for 5e-2; a float64 emulation of
    per-tensor FP8 on this block (tests/test_te_gpu.py::emulated_fp8_errors documents the
    numbers: forward 5.5-6.5 %, gradients 7-9 % with E5M2) shows 5e-2 is below what FP8
    itself allows for two chained GEMMs, so the bounds are ~1.5x the emulated error.  The
    measured values are printed (-s) so they can be tightened once seen.
"""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch


def _te_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


pytestmark = pytest.mark.skipif(not _te_usable(), reason="needs CUDA and Transformer Engine")

from moe_modules import GroupedExperts, MoEConfig  # noqa: E402
from moe_modules.te import layout as te_layout  # noqa: E402
from moe_ops.ops import opaque_module  # noqa: E402

E, K, D, I, T = 8, 2, 256, 128, 384  # FP8 GEMMs want feature sizes that are multiples of 16
ACTIVATIONS = ("swiglu", "quick_geglu", "relu2")
BF16_TOL = 1e-2
FP8_FWD_TOL, FP8_GRAD_TOL = 1e-1, 1.5e-1
DEVICE = "cuda"

# Relative errors of a float64 emulation of per-tensor FP8 (amax scaling) on this block, N=512,
# D=256, I=128, x ~ N(0, 1), weights ~ N(0, 0.02): for the record behind the FP8 bounds above.
emulated_fp8_errors = {
    "swiglu": {"y": 0.065, "dx": 0.091, "dW1": 0.092, "dW2": 0.079},
    "quick_geglu": {"y": 0.055, "dx": 0.086, "dW1": 0.086, "dW2": 0.071},
    "relu2": {"y": 0.058, "dx": 0.091, "dW1": 0.091, "dW2": 0.073},
}


def config(activation="swiglu", bias=False) -> MoEConfig:
    return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I,
                     expert_activation=activation, expert_bias=bias, dtype=torch.bfloat16)


def grouped_experts(cfg, seed=0) -> GroupedExperts:
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        module = GroupedExperts(cfg)
    module.init_weights(DEVICE, init_std=0.02)
    with torch.no_grad():  # random biases: zeros would hide a wrong bias row
        for p in (module.gate_up_proj_bias, module.down_proj_bias):
            if p is not None:
                p.normal_(0.0, 0.02)
    return module


def te_experts(cfg, state=None):
    from moe_modules import GroupedExpertsTE

    module = GroupedExpertsTE(cfg, device=DEVICE)
    if state is not None:
        module.load_state_dict(state)
    return module


def inputs(seed=1, skip_experts=(), masked=0):
    """bf16 x, float32 softmax routing weights, K distinct experts per token avoiding ``skip_experts``."""
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([e for e in range(E) if e not in skip_experts])
    indices = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:K]] for _ in range(T)])
    token_mask = torch.ones(T, dtype=torch.bool)
    token_mask[:masked] = False
    weights = torch.randn(T, K, generator=gen).softmax(-1)
    x = torch.randn(T, D, generator=gen)
    grad_y = torch.randn(T, D, generator=gen)
    to = dict(device=DEVICE)
    return (x.to(torch.bfloat16).to(**to).requires_grad_(), token_mask.to(**to), weights.to(**to).requires_grad_(),
            indices.to(**to), grad_y.to(torch.bfloat16).to(**to))


def rel_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def stacked_grads(module) -> dict:
    """Parameter gradients in the stacked layout (TE: from weight{e}.grad / bias{e}.grad)."""
    if isinstance(module, GroupedExperts):
        return {n: getattr(module, n).grad for n in ("gate_and_up_projs", "down_projs", "gate_up_proj_bias",
                                                     "down_proj_bias") if getattr(module, n) is not None}
    g, d = module.gate_up_linear, module.down_linear
    n = module.num_local_experts
    out = {"gate_and_up_projs": te_layout.stacked_from_te_weights([getattr(g, f"weight{i}").grad for i in range(n)]),
           "down_projs": te_layout.stacked_from_te_weights([getattr(d, f"weight{i}").grad for i in range(n)])}
    if module.expert_bias:
        out["gate_up_proj_bias"] = te_layout.stacked_from_te_biases([getattr(g, f"bias{i}").grad for i in range(n)])
        out["down_proj_bias"] = te_layout.stacked_from_te_biases([getattr(d, f"bias{i}").grad for i in range(n)])
    return out


def run(module, x, token_mask, weights, indices, grad_y, forward=None, context=contextlib.nullcontext):
    """Forward (inside ``context``), backward outside it; returns y, dx, dweights, stacked parameter grads."""
    x, weights = x.detach().clone().requires_grad_(), weights.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with context():
        y = (forward or module)(x, token_mask, weights, indices)
    y.backward(grad_y)
    return y.detach(), x.grad, weights.grad, stacked_grads(module)


def errors(got, want) -> dict:
    y, dx, dw, params = got
    ry, rdx, rdw, rparams = want
    errs = {"y": rel_err(y, ry), "dx": rel_err(dx, rdx), "dweights": rel_err(dw, rdw)}
    errs |= {f"d{name}": rel_err(params[name], rparams[name]) for name in rparams}
    return errs


def _fp8_unavailable_reason() -> str:
    import transformer_engine.pytorch as te

    if hasattr(te, "is_fp8_available"):  # TE >= 2.8
        ok, reason = te.is_fp8_available(return_reason=True)
    else:
        from transformer_engine.pytorch.fp8 import check_fp8_support

        ok, reason = check_fp8_support()
    return "" if ok else reason or "FP8 not supported here"


def fp8_context(recipe_name: str):
    """A zero-argument factory of the TE FP8 autocast context for ``recipe_name`` ("delayed" / "current")."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    reason = _fp8_unavailable_reason()
    if reason:
        pytest.skip(f"FP8 unavailable: {reason}")

    if recipe_name == "delayed":
        recipe = te_recipe.DelayedScaling(fp8_format=te_recipe.Format.HYBRID)
    else:
        if not hasattr(te_recipe, "Float8CurrentScaling"):
            pytest.skip("this Transformer Engine has no Float8CurrentScaling recipe")
        recipe = te_recipe.Float8CurrentScaling(fp8_format=te_recipe.Format.HYBRID)
    if hasattr(te, "autocast"):  # TE >= 2.8
        return lambda: te.autocast(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


@pytest.fixture(autouse=True)
def _no_leaked_graphs():
    yield
    gc.collect()
    assert opaque_module.live_graphs() == 0


# ---- bf16 parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_matches_grouped_experts(activation, bias):
    cfg = config(activation, bias)
    ref = grouped_experts(cfg)
    te = te_experts(cfg, ref.state_dict())
    data = inputs(masked=5)
    errs = errors(run(te, *data), run(ref, *data))
    print(f"\nbf16 {activation} bias={bias}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < BF16_TOL, errs


# ---- FP8 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["delayed", "current"])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("quick_geglu", True), ("relu2", False)])
def test_fp8_matches_grouped_experts(recipe, activation, bias):
    context = fp8_context(recipe)
    cfg = config(activation, bias)
    ref = grouped_experts(cfg)
    te = te_experts(cfg, ref.state_dict())
    data = inputs(masked=3)  # per-expert counts are not multiples of 16: the op pads them
    for _ in range(2):  # delayed scaling takes its scales from earlier iterations
        run(te, *data, context=context)
    errs = errors(run(te, *data, context=context), run(ref, *data))
    print(f"\nfp8 {recipe} {activation} bias={bias}: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert errs["y"] < FP8_FWD_TOL, errs
    assert max(v for k, v in errs.items() if k != "y") < FP8_GRAD_TOL, errs


# ---- experts without tokens, no tokens at all ------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_experts_without_tokens_get_zero_gradients(precision):
    cfg = config("swiglu", bias=True)
    te = te_experts(cfg, grouped_experts(cfg).state_dict())
    context = fp8_context("current") if precision == "fp8" else contextlib.nullcontext
    run(te, *inputs(skip_experts=(3, 7)), context=context)
    for lin in (te.gate_up_linear, te.down_linear):
        for kind in ("weight", "bias"):
            for e in (3, 7):
                grad = getattr(lin, f"{kind}{e}").grad
                assert grad is not None and torch.equal(grad, torch.zeros_like(grad)), f"{kind}{e}"
            live = getattr(lin, f"{kind}0").grad
            assert torch.isfinite(live).all() and live.abs().sum() > 0


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_all_tokens_masked(precision):
    cfg = config("quick_geglu", bias=True)
    te = te_experts(cfg, grouped_experts(cfg).state_dict())
    context = fp8_context("current") if precision == "fp8" else contextlib.nullcontext
    x, token_mask, weights, indices, grad_y = inputs()
    y, dx, dw, params = run(te, x, torch.zeros_like(token_mask), weights, indices, grad_y, context=context)
    assert torch.equal(y, torch.zeros_like(y)) and torch.equal(dx, torch.zeros_like(dx))
    for p in te.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_inference_without_grad():
    cfg = config("relu2", bias=True)
    ref = grouped_experts(cfg)
    te = te_experts(cfg, ref.state_dict())
    x, token_mask, weights, indices, _ = inputs()
    with torch.no_grad():
        y, y_ref = te(x, token_mask, weights, indices), ref(x, token_mask, weights, indices)
    assert opaque_module.live_graphs() == 0
    assert rel_err(y, y_ref) < BF16_TOL


# ---- torch.compile ------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_compile_fullgraph_one_graph(precision):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cfg = config("swiglu", bias=True)
    ref = grouped_experts(cfg)
    layers = [te_experts(cfg, ref.state_dict()) for _ in range(2)]
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda layer, *args: layer(*args), fullgraph=True, backend=counter)
    # FP8: the autocast sits outside the compiled function; the op reads its state when it runs.
    context = fp8_context("current") if precision == "fp8" else contextlib.nullcontext
    data = inputs(masked=2)
    want = run(layers[0], *data, context=context)
    for layer in layers:  # the second layer reuses the graph
        got = run(layer, *data, forward=lambda *a, layer=layer: compiled(layer, *a), context=context)
        errs = errors(got, want)
        assert max(errs.values()) < (BF16_TOL if precision == "bf16" else 2e-2), errs
    assert counter.frame_count == 1


# ---- the state dict -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_state_dict_round_trip(bias):
    cfg = config("quick_geglu", bias)
    ref = grouped_experts(cfg)
    te = te_experts(cfg, ref.state_dict())
    sd = te.state_dict()
    assert list(sd) == list(ref.state_dict())  # exactly the stacked keys: no weight{i}, bias{i}, _extra_state
    for name, value in ref.state_dict().items():
        assert torch.equal(sd[name], value), name
    # after an FP8 step TE has FP8 metadata: still not in the state dict
    run(te, *inputs(), context=fp8_context("delayed"))
    assert list(te.state_dict()) == list(ref.state_dict())
    back = grouped_experts(cfg, seed=5)
    back.load_state_dict(te.state_dict())
    again = te_experts(cfg, back.state_dict())
    for name, value in te.state_dict().items():
        assert torch.equal(again.state_dict()[name], value)
