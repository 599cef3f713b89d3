"""LoRA on the experts (issue 19), one process: ``GroupedExpertsLoRA`` / ``GroupedExpertsDeepEPLoRA``.

* NeMo AutoModel 0.7.0's contract, against the real package: parameter names and shapes, a state dict
  that loads with ``strict=True`` both ways, the same adapters from the same seed (both init methods),
  and the same output and gradients (x, routing weights, the four adapters) for every activation;
* float64 parity with the merged weights ``W + scale * A @ B`` over the routing cases, float32 and bf16
  within the module tolerances; ``materialize_effective_weights`` into a plain module gives the same
  forward; experts with no token get zero adapter gradients, the shared frozen base none;
* only two ``[M, r]`` low-rank row blocks are kept for the backward beyond the frozen-base block;
* ``torch.compile(fullgraph=True)``, ``torch.export`` and opcheck of ``moe::activation_mm``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import moe_ops
import reference
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, GroupedExpertsDeepEPLoRA, GroupedExpertsLoRA, MoEConfig
from moe_modules.lora import ADAPTER_NAMES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import saved_bytes  # noqa: E402

D, I, R, ALPHA = 8, 6, 3, 6.0
BASE_NAMES = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")
LORA_OF = {GroupedExperts: GroupedExpertsLoRA, GroupedExpertsDeepEP: GroupedExpertsDeepEPLoRA}
MODULE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def config(activation="swiglu", bias=True, dtype=torch.float32, E=4, K=2) -> MoEConfig:
    return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, expert_activation=activation,
                     expert_bias=bias, dtype=dtype)


def lora_module(base_cls=GroupedExperts, cfg=None, seed=0):
    """A LoRA module over random base parameters, with random (nonzero) B too, so every term matters."""
    torch.manual_seed(seed)
    base = base_cls(cfg or config())
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.5)
    module = LORA_OF[base_cls](base, lora_dim=R, alpha=ALPHA)
    with torch.no_grad():
        for name in ("lora_gate_and_up_B", "lora_down_B"):
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.4)
    return base, module


def run(module, x, token_mask, weights, indices, grad_y):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = module(x, token_mask, weights, indices)
    y.backward(grad_y)
    return {"y": y, "x": x.grad, "weights": weights.grad, **{n: getattr(module, n).grad for n in ADAPTER_NAMES}}


def merged_reference(module, x, token_mask, weights, indices, grad_y):
    """Output and gradients in float64 with the merged weights (the adapters as leaves)."""
    leaves = {"x": reference.f64(x), "weights": reference.f64(weights)}
    leaves.update({n: reference.f64(getattr(module, n)) for n in ADAPTER_NAMES})
    for t in leaves.values():
        t.requires_grad_()
    base = {n: reference.f64(getattr(module, n)) for n in BASE_NAMES}
    w1 = base["gate_and_up_projs"] + module.scale * torch.bmm(leaves["lora_gate_and_up_A"], leaves["lora_gate_and_up_B"])
    w2 = base["down_projs"] + module.scale * torch.bmm(leaves["lora_down_A"], leaves["lora_down_B"])
    c = module.config
    y = reference.expert_block(leaves["x"], token_mask.cpu(), leaves["weights"], indices.cpu(), w1, w2,
                               base["gate_up_proj_bias"], base["down_proj_bias"], c.expert_activation,
                               c.activation_alpha, c.activation_limit, c.activation_linear_offset)
    if y.requires_grad:
        y.backward(reference.f64(grad_y))
    return {"y": y.detach(), **{n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}}


def inputs_of(routing, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(routing.T, D, generator=g, dtype=torch.float64).to(dtype)
    weights = (torch.rand(routing.T, routing.K, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    grad_y = torch.randn(routing.T, D, generator=g, dtype=torch.float64).to(dtype)
    return x, routing.token_mask.cpu(), weights, routing.indices.cpu(), grad_y


# ---- the math: float64 parity with the merged weights -------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", list(moe_ops.GATED))
@pytest.mark.parametrize("base_cls", list(LORA_OF), ids=lambda c: c.__name__)
def test_forward_and_gradients_match_the_merged_weights(base_cls, activation, bias, dtype, mixed_routing):
    routing = dataclasses.replace(mixed_routing, expert_start=0)
    _, module = lora_module(base_cls, config(activation, bias, dtype, E=routing.num_experts, K=routing.K))
    args = inputs_of(routing, dtype)
    got, want = run(module, *args), merged_reference(module, *args)
    for name, value in want.items():
        assert got[name] is not None, f"{name}: no gradient"
        reference.assert_matches(got[name], value, MODULE_TOLERANCE[dtype], name)


def test_every_routing_case(routing):
    """T=1, K=1, E=1, every token masked, -1 and out-of-range indices (float64)."""
    routing = dataclasses.replace(routing, expert_start=0)
    _, module = lora_module(cfg=config("quick_geglu", True, torch.float64, E=routing.num_experts, K=routing.K))
    args = inputs_of(routing, torch.float64)
    got, want = run(module, *args), merged_reference(module, *args)
    for name, value in want.items():
        reference.assert_matches(got[name], value, 1e-10, name)


def test_experts_without_tokens_get_zero_adapter_gradients_and_the_base_none(mixed_routing):
    """Expert 3 of the mixed routing gets no token: zeros, not None, for its A and B."""
    _, module = lora_module(cfg=config(E=4, K=2, dtype=torch.float64))
    got = run(module, *inputs_of(mixed_routing, torch.float64))
    for name in ADAPTER_NAMES:
        assert got[name] is not None and torch.all(got[name][3] == 0), name
        assert got[name][:3].abs().sum() > 0, name
    assert all(getattr(module, n).grad is None for n in BASE_NAMES)


def test_materialized_weights_in_a_plain_module_give_the_same_forward(mixed_routing):
    _, module = lora_module(cfg=config("swiglu", True, torch.float64))
    merged = GroupedExperts(module.config)
    up, down = module.materialize_effective_weights()
    merged.load_state_dict({"gate_and_up_projs": up, "down_projs": down, "gate_up_proj_bias": module.gate_up_proj_bias,
                            "down_proj_bias": module.down_proj_bias})
    x, mask, weights, indices, _ = inputs_of(mixed_routing, torch.float64)
    torch.testing.assert_close(module(x, mask, weights, indices), merged(x, mask, weights, indices),
                               rtol=1e-12, atol=1e-12)


def test_the_base_is_shared_and_frozen_the_adapters_train():
    base, module = lora_module(cfg=config(bias=True))
    for name in BASE_NAMES:
        assert getattr(module, name) is getattr(base, name) and not getattr(module, name).requires_grad, name
    assert all(getattr(module, n).requires_grad for n in ADAPTER_NAMES)
    assert module.scale == ALPHA / R and module.lora_dim == R
    assert {n for n, p in module.named_parameters() if p.requires_grad} == set(ADAPTER_NAMES)


def test_shapes_dtype_and_init():
    base = GroupedExperts(config("relu2", False))
    base.init_weights(torch.device("cpu"))
    module = GroupedExpertsLoRA(base, lora_dim=5, alpha=10, lora_dtype="bf16")
    E = base.n_routed_experts
    assert {n: tuple(getattr(module, n).shape) for n in ADAPTER_NAMES} == {
        "lora_gate_and_up_A": (E, D, 5), "lora_gate_and_up_B": (E, 5, I), "lora_down_A": (E, I, 5),
        "lora_down_B": (E, 5, D)}
    assert all(getattr(module, n).dtype == torch.bfloat16 for n in ADAPTER_NAMES)
    assert torch.all(module.lora_gate_and_up_B == 0) and torch.all(module.lora_down_B == 0)
    assert module.lora_gate_and_up_A.abs().sum() > 0
    x = torch.randn(5, D)  # B = 0 at init: the base module's output (adapters cast to x's dtype)
    idx, mask, w = torch.randint(0, E, (5, 2)), torch.ones(5, dtype=torch.bool), torch.rand(5, 2)
    torch.testing.assert_close(module(x, mask, w, idx), base(x, mask, w, idx))


def test_wrong_modules_and_ranks_are_refused():
    from moe_modules import GroupedExpertsTE

    with pytest.raises(TypeError, match="GroupedExpertsTE keeps each expert"):
        GroupedExpertsLoRA(GroupedExpertsTE.__new__(GroupedExpertsTE))
    with pytest.raises(TypeError, match="expected a GroupedExpertsDeepEP, got GroupedExperts"):
        GroupedExpertsDeepEPLoRA(GroupedExperts(config()))
    with pytest.raises(ValueError, match="lora_dim: expected a positive int, got 0"):
        GroupedExpertsLoRA(GroupedExperts(config()), lora_dim=0)


# ---- memory: what is kept for the backward -----------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_only_the_low_rank_rows_are_kept_beyond_the_frozen_block(activation):
    T, K, E = 64, 4, 8
    base, module = lora_module(cfg=config(activation, True, torch.float32, E=E, K=K))
    x = torch.randn(T, D, requires_grad=True)
    weights = torch.rand(T, K, requires_grad=True)
    indices, mask = torch.randint(0, E, (T, K)), torch.ones(T, dtype=torch.bool)
    held = [x, weights, indices, mask, *module.parameters()]
    base_bytes, _ = saved_bytes(lambda: base(x, mask, weights, indices), held)
    lora_bytes, saved = saved_bytes(lambda: module(x, mask, weights, indices), held)
    low_rank_rows = 2 * T * K * R * 4
    assert lora_bytes <= base_bytes + low_rank_rows, (lora_bytes, base_bytes, saved)
    widths = sorted(shape[1] for _, shape, _ in saved if len(shape) == 2 and shape[0] == T * K)
    C = I if activation == "relu2" else 2 * I
    assert widths == sorted([C, R, R]), f"an activation or a gathered copy was saved: {saved}"


# ---- compile, export, opcheck --------------------------------------------------------------------------


def test_compiled_fullgraph_matches_eager(mixed_routing):
    _, module = lora_module(cfg=config("quick_geglu", True))
    args = inputs_of(mixed_routing, torch.float32)
    want = run(module, *args)
    for n in ADAPTER_NAMES:
        getattr(module, n).grad = None
    got = run(torch.compile(module, fullgraph=True, backend="aot_eager"), *args)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6)


def test_export_runs_the_same(mixed_routing):
    _, module = lora_module(cfg=config("swiglu", True))
    x, mask, weights, indices, _ = inputs_of(mixed_routing, torch.float32)
    program = torch.export.export(module, (x, mask, weights, indices))
    assert any("activation_mm" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x, mask, weights, indices), module(x, mask, weights, indices))


@pytest.mark.parametrize("kind", list(moe_ops.GATED))
def test_activation_mm_passes_opcheck(kind):
    g = torch.Generator().manual_seed(0)
    C = I if kind == "relu2" else 2 * I
    h = torch.randn(9, C, generator=g, dtype=torch.float64, requires_grad=True)
    probs = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, I, R, generator=g, dtype=torch.float64, requires_grad=True)
    offsets = torch.tensor([3, 3, 7], dtype=torch.int32)  # an empty group, two tail rows
    torch.library.opcheck(torch.ops.moe.activation_mm.default, (h, probs, w, offsets, kind, 1.702, 2.0, 1.0))
    f = lambda h, p, w: moe_ops.activation_mm(h, p, w, offsets, kind, limit=2.0)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h, probs, w)) and torch.autograd.gradgradcheck(f, (h, probs, w))
    out = f(h, probs, w)
    assert torch.all(out[7:] == 0)  # rows past the last group
    want = reference.activation(h, probs, kind, limit=2.0)[:7]
    torch.testing.assert_close(out[:7], torch.cat([want[:3] @ w[0], want[3:7] @ w[2]]))


# ---- NeMo AutoModel 0.7.0's GroupedExpertsLoRA -----------------------------------------------------------


def nemo():
    lora = pytest.importorskip("nemo_automodel.components._peft.lora_experts",
                               reason="nemo-automodel is not installed (pip install --no-deps nemo-automodel==0.7.0)")
    return lora, pytest.importorskip("nemo_automodel.components.moe.config"), \
        pytest.importorskip("nemo_automodel.components.moe.experts")


def nemo_pair(activation, bias, init="xavier"):
    lora, nemo_config, nemo_experts = nemo()
    cfg = nemo_config.MoEConfig(n_routed_experts=4, n_shared_experts=0, n_activated_experts=2, n_expert_groups=1,
                                n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0,
                                score_func="softmax", route_scale=1.0, dim=D, inter_dim=16, moe_inter_dim=I,
                                norm_topk_prob=False, dtype=torch.float32, expert_activation=activation,
                                expert_bias=bias)
    torch.manual_seed(0)
    nemo_base = nemo_experts.GroupedExperts(cfg)
    with torch.no_grad():
        for p in nemo_base.parameters():
            p.normal_(0.0, 0.4)
    ours_base = GroupedExperts(MoEConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}))
    ours_base.load_state_dict(nemo_base.state_dict())
    torch.manual_seed(1)
    theirs = lora.GroupedExpertsLoRA(nemo_base, lora_dim=R, alpha=ALPHA, lora_A_init_method=init)
    torch.manual_seed(1)
    ours = GroupedExpertsLoRA(ours_base, lora_dim=R, alpha=ALPHA, lora_A_init_method=init)
    return ours, theirs


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_nemo_state_dict_loads_strictly_and_the_same_seed_gives_the_same_adapters(init):
    ours, theirs = nemo_pair("swiglu", True, init)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for name in ADAPTER_NAMES:
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name
    assert ours.scale == theirs.scale
    with torch.no_grad():
        theirs.lora_down_B.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    assert torch.equal(ours.lora_down_B, theirs.lora_down_B)
    for a, b in zip(ours.materialize_effective_weights(), theirs.materialize_effective_weights()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation, bias", [(a, b) for a in moe_ops.GATED for b in (False, True)])
def test_same_outputs_and_gradients_as_nemo(activation, bias):
    ours, theirs = nemo_pair(activation, bias)
    with torch.no_grad():
        for name in ("lora_gate_and_up_B", "lora_down_B"):
            getattr(theirs, name).normal_(0.0, 0.3)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(2)
    T = 11
    args = (torch.randn(T, D, generator=g), torch.rand(T, generator=g) > 0.2, torch.rand(T, 2, generator=g),
            torch.randint(0, 4, (T, 2), generator=g), torch.randn(T, D, generator=g))
    got, want = run(ours, *args), run(theirs, *args)
    for name, value in want.items():
        err = ((got[name] - value).abs().max() / value.abs().max().clamp_min(1e-12)).item()
        assert err <= 1e-5, f"{name}: relative error {err:.2e}"
