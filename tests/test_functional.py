"""The seed's functional helpers in ``moe_modules.experts`` against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import reference
from moe_modules import MoEConfig
from moe_modules.experts import (
    geglu,
    geglu_deepep,
    get_expert_activation,
    get_expert_activation_for_deepep,
    is_gated_activation,
    quick_geglu,
    quick_geglu_deepep,
    relu2,
    relu2_deepep,
    swiglu,
    swiglu_clamped,
    swiglu_clamped_deepep,
    swiglu_deepep,
    swigluoai,
    swigluoai_deepep,
)

N, D, I = 5, 6, 4
WHOLE = {"swiglu": swiglu, "quick_geglu": quick_geglu, "swigluoai": swigluoai, "geglu": geglu, "relu2": relu2}
DEEPEP = {"swiglu": swiglu_deepep, "quick_geglu": quick_geglu_deepep, "swigluoai": swigluoai_deepep,
          "geglu": geglu_deepep, "relu2": relu2_deepep}
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def randn(*shape, dtype=torch.float64, scale=1.0, requires_grad=False):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).requires_grad_(requires_grad)


def expert_weights(kind, bias, dtype=torch.float64, requires_grad=False):
    width = I if kind == "relu2" else 2 * I
    weights = dict(gate_and_up_proj=randn(D, width, dtype=dtype, scale=0.8, requires_grad=requires_grad),
                   down_proj=randn(I, D, dtype=dtype, requires_grad=requires_grad))
    if bias:
        weights.update(gate_up_proj_bias=randn(width, dtype=dtype, requires_grad=requires_grad),
                       down_proj_bias=randn(D, dtype=dtype, requires_grad=requires_grad))
    return weights


def reference_whole(kind, x, w, **params):
    return reference.whole_expert(x, w["gate_and_up_proj"], w["down_proj"], w.get("gate_up_proj_bias"),
                                  w.get("down_proj_bias"), kind, **params)


def test_is_gated_activation():
    assert all(is_gated_activation(kind) for kind in ("swiglu", "quick_geglu", "swigluoai", "geglu"))
    assert not is_gated_activation("relu2")


def test_the_geglu_oracle_is_torchs_tanh_gelu():
    """The oracle writes tanh-GELU as ``gate * sigmoid(2k)`` (no cancellation); it is torch's function."""
    h = randn(64, 2 * I, scale=3.0)
    gate, up = h.chunk(2, dim=1)
    torch.testing.assert_close(reference.act(h, "geglu"), torch.nn.functional.gelu(gate, approximate="tanh") * up,
                               rtol=1e-14, atol=1e-15)


# ---- whole-expert forms ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_whole_expert_forms_match_reference(kind, bias, dtype):
    x, w = randn(N, D, dtype=dtype, scale=2.0), expert_weights(kind, bias, dtype)
    out = WHOLE[kind](x, **w)
    assert out.dtype == dtype and out.shape == (N, D)
    reference.assert_matches(out, reference_whole(kind, x, w), TOL[dtype])


@pytest.mark.parametrize("alpha, limit", [(1.0, 0.5), (2.5, None)])
def test_quick_geglu_whole_expert_uses_alpha_and_limit(alpha, limit):
    x, w = randn(N, D, scale=2.0), expert_weights("quick_geglu", True)
    out = quick_geglu(x, **w, alpha=alpha, limit=limit)
    reference.assert_matches(out, reference_whole("quick_geglu", x, w, alpha=alpha, limit=limit), 1e-12)
    assert not torch.allclose(out, quick_geglu(x, **w))  # differs from the defaults


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_whole_expert_forms_gradcheck(kind, bias):
    x = randn(3, D, scale=2.0, requires_grad=True)
    w = expert_weights(kind, bias, requires_grad=True)
    names = list(w)
    assert torch.autograd.gradcheck(lambda x, *ws: WHOLE[kind](x, **dict(zip(names, ws))), (x, *w.values()))


# ---- probability-weighted (DeepEP) forms ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("probs_shape", ["N", "N1"])
@pytest.mark.parametrize("kind", sorted(DEEPEP))
def test_deepep_forms_match_reference(kind, probs_shape, dtype):
    h = randn(N, I if kind == "relu2" else 2 * I, dtype=dtype, scale=4.0)
    probs = torch.rand(N, dtype=torch.float64).to(dtype)
    probs = probs if probs_shape == "N" else probs.unsqueeze(1)
    out = DEEPEP[kind](h, probs)
    assert out.dtype == dtype and out.shape == (N, I)
    reference.assert_matches(out, reference.activation(h, probs, kind), TOL[dtype])


@pytest.mark.parametrize("probs_shape", ["N", "N1"])
@pytest.mark.parametrize("kind", sorted(DEEPEP))
def test_deepep_forms_gradient_includes_probs(kind, probs_shape):
    h = randn(N, I if kind == "relu2" else 2 * I, scale=4.0, requires_grad=True)
    probs = torch.rand(N, dtype=torch.float64)
    probs = (probs if probs_shape == "N" else probs.unsqueeze(1)).requires_grad_()
    assert torch.autograd.gradcheck(DEEPEP[kind], (h, probs))
    # and against the reference gradient: d/dprobs = sum_cols(grad * act(h))
    grad = torch.randn(N, I, dtype=torch.float64)
    grad_h, grad_probs = torch.autograd.grad(DEEPEP[kind](h, probs), (h, probs), grad)
    ref_h, ref_probs = reference.activation_backward(grad, h, probs, kind)
    reference.assert_matches(grad_h, ref_h, 1e-12, "grad of h")
    reference.assert_matches(grad_probs, ref_probs, 1e-12, "grad of probs")
    assert grad_probs.shape == probs.shape


def test_quick_geglu_deepep_uses_alpha_limit_and_offset():
    h, probs = randn(N, 2 * I, scale=4.0), torch.rand(N, dtype=torch.float64)
    out = quick_geglu_deepep(h, probs, alpha=1.2, limit=1.5, linear_offset=0.5)
    expected = reference.activation(h, probs, "quick_geglu", alpha=1.2, limit=1.5, linear_offset=0.5)
    reference.assert_matches(out, expected, 1e-12)


@pytest.mark.parametrize("limit", [0.5, 3.0])
def test_clamped_swiglu_forms(limit):
    """NeMo's clamped SwiGLU: the whole-expert and probability forms, the config lookups and the gradients."""
    x, w = randn(N, D, scale=2.0), expert_weights("swiglu", True)
    h = randn(N, 2 * I, scale=4.0)
    probs = torch.rand(N, dtype=torch.float64)
    rows = reference.f64_keep(x) @ w["gate_and_up_proj"] + w["gate_up_proj_bias"]
    want_whole = reference.act(rows, "swiglu", swiglu_limit=limit) @ w["down_proj"] + w["down_proj_bias"]
    want_deepep = reference.act(h, "swiglu", swiglu_limit=limit) * probs.unsqueeze(1)
    cfg = config("swiglu", swiglu_limit=limit)
    for got in (swiglu_clamped(x, **w, limit=limit), get_expert_activation(cfg)(x, **w)):
        reference.assert_matches(got, want_whole, 1e-12)
    for got in (swiglu_clamped_deepep(h, probs, limit), get_expert_activation_for_deepep(cfg)(h, probs)):
        reference.assert_matches(got, want_deepep, 1e-12)
    assert not torch.allclose(swiglu_clamped_deepep(h, probs, limit), swiglu_deepep(h, probs))  # the clamp is hit
    h.requires_grad_()
    probs.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, p: swiglu_clamped_deepep(h, p, limit), (h, probs))


# ---- lookups bind the config's alpha / limit --------------------------------------------------------------


def config(kind, **kw):
    return MoEConfig(n_routed_experts=2, n_activated_experts=1, dim=D, moe_inter_dim=I, expert_activation=kind, **kw)


@pytest.mark.parametrize("kind", sorted(WHOLE))
def test_get_expert_activation(kind):
    extra = dict(activation_alpha=1.3, activation_limit=0.75) if kind == "quick_geglu" else {}
    fn = get_expert_activation(config(kind, **extra))
    x, w = randn(N, D, scale=2.0), expert_weights(kind, True)
    params = dict(alpha=1.3, limit=0.75) if kind == "quick_geglu" else {}
    reference.assert_matches(fn(x, **w), reference_whole(kind, x, w, **params), 1e-12)


@pytest.mark.parametrize("kind", sorted(DEEPEP))
def test_get_expert_activation_for_deepep(kind):
    extra = dict(activation_alpha=1.3, activation_limit=None, activation_linear_offset=0.25) \
        if kind == "quick_geglu" else {}
    fn = get_expert_activation_for_deepep(config(kind, **extra))
    h, probs = randn(N, I if kind == "relu2" else 2 * I, scale=4.0), torch.rand(N, dtype=torch.float64)
    params = dict(alpha=1.3, limit=None, linear_offset=0.25) if kind == "quick_geglu" else {}
    reference.assert_matches(fn(h, probs), reference.activation(h, probs, kind, **params), 1e-12)


def test_lookups_bind_the_config_not_the_defaults():
    cfg = config("quick_geglu", activation_alpha=3.0, activation_limit=0.5)
    x, w = randn(N, D, scale=2.0), expert_weights("quick_geglu", False)
    assert not torch.allclose(get_expert_activation(cfg)(x, **w), quick_geglu(x, **w))
    h, probs = randn(N, 2 * I, scale=4.0), torch.rand(N, dtype=torch.float64)
    assert not torch.allclose(get_expert_activation_for_deepep(cfg)(h, probs), quick_geglu_deepep(h, probs))
