"""NeMo AutoModel 0.7.0's expert modules swap for ours unchanged: its ``MoEConfig`` field for field, its
constructors (``backend=``, the DeepEP dispatcher options), its latent width, its parameter-dtype cast
and ``apply_router_weight_after_down`` — checked against the real ``nemo-automodel`` package
(installed with ``--no-deps``, README), float32 on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import types

import pytest
import torch

from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig

nemo_config = pytest.importorskip(
    "nemo_automodel.components.moe.config",
    reason="the nemo-automodel package is not installed (pip install --no-deps nemo-automodel==0.7.0, README)")
nemo_experts = pytest.importorskip("nemo_automodel.components.moe.experts",
                                   reason="nemo-automodel's experts module does not import here")

E, K, D, I, T = 4, 2, 8, 6, 11


def nemo_cfg(**kw) -> "nemo_config.MoEConfig":
    fields = dict(n_routed_experts=E, n_shared_experts=0, n_activated_experts=K, n_expert_groups=1,
                  n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0, aux_loss_coeff=0.0,
                  score_func="softmax", route_scale=1.0, dim=D, inter_dim=16, moe_inter_dim=I, norm_topk_prob=False,
                  dtype=torch.float32)
    fields.update(kw)
    return nemo_config.MoEConfig(**fields)


def ours_from(cfg) -> MoEConfig:
    """Ours from NeMo's, field for field."""
    return MoEConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def test_every_field_of_nemo_config_is_accepted_and_kept():
    cfg = nemo_cfg(expert_bias=True, apply_router_weight_after_down=True, moe_latent_size=5, gate_dtype="float32",
                   router_weights_fp32=True, enable_routing_replay=True)
    ours = ours_from(cfg)
    for f in dataclasses.fields(cfg):
        assert getattr(ours, f.name) == getattr(cfg, f.name), f.name
    assert ours.expert_dim == cfg.expert_dim == 5


@pytest.mark.parametrize("limit", [-1.0, float("nan"), float("inf"), True, "7"])
def test_a_bad_swiglu_limit_is_refused(limit):
    with pytest.raises(ValueError, match="swiglu_limit"):
        MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, swiglu_limit=limit)


def test_constructors_take_nemos_arguments():
    cfg = ours_from(nemo_cfg())
    backend = types.SimpleNamespace(experts="torch_mm", dispatcher="deepep")  # a BackendConfig's fields
    assert GroupedExperts(cfg, backend).backend is backend
    assert GroupedExpertsDeepEP(cfg, backend, dispatcher_backend="deepep", dispatcher_num_sms=24,
                                dispatcher_share_token_dispatcher=False, dispatcher_async_dispatch=True).backend is backend


def inputs(width: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, width, generator=g).to(dtype)
    token_mask = torch.rand(T, generator=g) > 0.2
    weights = torch.rand(T, K, generator=g)
    indices = torch.randint(0, E, (T, K), generator=g)
    return x, token_mask, weights, indices


def pair(cfg, ours_cls, nemo_cls):
    """NeMo's module with random parameters, and ours loaded from its state dict (strict, both ways)."""
    torch.manual_seed(0)
    theirs = nemo_cls(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.4)
    ours = ours_cls(ours_from(cfg))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    return ours, theirs


def forward_backward(module, x, token_mask, weights, indices):
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = module(x, token_mask, weights, indices)
    y.float().square().sum().backward()
    return [y, x.grad, weights.grad] + [p.grad for p in module.parameters()]


def assert_close(ours, theirs, rtol):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        b = torch.zeros_like(a) if b is None else b  # NeMo leaves some untouched gradients None; ours are 0
        err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)
        assert err <= rtol, f"output {i}: relative error {err:.2e}"


# (expert_activation, expert_bias, moe_latent_size, other NeMo config fields)
CASES = [("swiglu", False, None, {}), ("swiglu", True, None, {}), ("quick_geglu", True, None, {}),
         ("swigluoai", False, None, {}), ("swigluoai", True, None, {}), ("relu2", False, None, {}),
         ("geglu", False, None, {}), ("geglu", True, None, {}), ("swiglu", True, 5, {}), ("relu2", True, 5, {}),
         ("swiglu", True, None, dict(swiglu_limit=0.5)),  # clamped SwiGLU (DeepSeek-V4)
         ("swigluoai", True, None, dict(activation_limit=0.0))]  # NeMo clamps swigluoai only for a positive limit
CASE_IDS = [f"{a}-bias{b}-latent{l}" + "".join(f"-{k}{v}" for k, v in kw.items()) for a, b, l, kw in CASES]


@pytest.mark.parametrize("module", ["GroupedExperts", "GroupedExpertsDeepEP"])
@pytest.mark.parametrize("activation, bias, latent, fields", CASES, ids=CASE_IDS)
def test_same_outputs_and_gradients_as_nemo(module, activation, bias, latent, fields):
    cfg = nemo_cfg(expert_activation=activation, expert_bias=bias, moe_latent_size=latent, **fields)
    ours, theirs = pair(cfg, GroupedExperts if module == "GroupedExperts" else GroupedExpertsDeepEP,
                        nemo_experts.GroupedExperts)
    args = inputs(cfg.expert_dim)
    assert ours.gate_and_up_projs.shape[1] == cfg.expert_dim
    assert_close(forward_backward(ours, *args), forward_backward(theirs, *args), 1e-5)


def test_the_clamp_of_clamped_swiglu_is_reached():
    """The clamped-SwiGLU case above is not vacuous: its limit changes the result."""
    cfg = nemo_cfg(expert_bias=True)
    ours, _ = pair(cfg, GroupedExperts, nemo_experts.GroupedExperts)
    clamped = GroupedExperts(ours_from(nemo_cfg(expert_bias=True, swiglu_limit=0.5)))
    clamped.load_state_dict(ours.state_dict())
    args = inputs(D)
    assert (ours(*args) - clamped(*args)).abs().max() > 1e-2


@pytest.mark.parametrize("activation, fields", [("swiglu", dict(swiglu_limit=0.5)), ("geglu", {}),
                                                ("swigluoai", dict(activation_limit=0.0))])
def test_functional_helpers_match_nemos(activation, fields):
    from moe_modules import experts as ours_experts
    cfg = nemo_cfg(expert_activation=activation, **fields)
    g = torch.Generator().manual_seed(3)
    h, probs = torch.randn(T, 2 * I, generator=g) * 2, torch.rand(T, 1, generator=g)
    want = nemo_experts.get_expert_activation_for_deepep(cfg)(h, probs)
    got = ours_experts.get_expert_activation_for_deepep(ours_from(cfg))(h, probs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    named = {"swiglu": functools.partial(ours_experts.swiglu_clamped_deepep, limit=0.5),
             "geglu": ours_experts.geglu_deepep,
             "swigluoai": functools.partial(ours_experts.swigluoai_deepep, limit=None)}[activation]
    torch.testing.assert_close(named(h, probs), want, rtol=1e-5, atol=1e-6)


def test_router_weight_after_down_gives_nemos_result():
    cfg = nemo_cfg(expert_bias=True, apply_router_weight_after_down=True)
    ours, theirs = pair(cfg, GroupedExperts, nemo_experts.GroupedExperts)
    args = inputs(D)
    assert_close(forward_backward(ours, *args), forward_backward(theirs, *args), 1e-5)


def test_float32_parameters_compute_in_the_activations_dtype_as_nemo():
    cfg = nemo_cfg(expert_bias=True)
    ours, theirs = pair(cfg, GroupedExperts, nemo_experts.GroupedExperts)
    args = inputs(D, torch.bfloat16)
    got, want = forward_backward(ours, *args), forward_backward(theirs, *args)
    assert got[0].dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in ours.parameters())
    assert_close(got, want, 2e-2)
