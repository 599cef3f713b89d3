"""Stacked x@W layout <-> Transformer Engine's per-expert [out, in] weights and [out] biases (CPU).

The conversions must round-trip exactly and give GroupedExperts' numbers when the per-expert
tensors are used the way GroupedLinear uses them (``F.linear(x, weight{e}, bias{e})``).
Also: without Transformer Engine, GroupedExpertsTE raises the install hint.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import moe_ops

from moe_modules import GroupedExperts, MoEConfig
from moe_modules.te import layout as te_layout
from moe_modules import te as te_module
from moe_ops import activation as moe_activation

E, K, D, I = 4, 2, 8, 6
ACTIVATIONS = tuple(moe_ops.GATED)


def config(activation="swiglu", bias=True) -> MoEConfig:
    return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I,
                     expert_activation=activation, expert_bias=bias, dtype=torch.float64)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_dims_and_shapes(activation):
    cfg = config(activation)
    W = I if activation == "relu2" else 2 * I
    gate_up, down = te_layout.te_linear_dims(cfg)
    assert gate_up == (D, W) and down == (I, D)
    assert te_layout.stacked_shapes(cfg, 3) == {
        "gate_and_up_projs": (3, D, W), "down_projs": (3, I, D), "gate_up_proj_bias": (3, W), "down_proj_bias": (3, D)}


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_weights_round_trip(activation):
    W = I if activation == "relu2" else 2 * I
    stacked = torch.randn(E, D, W, dtype=torch.float64)
    per_expert = te_layout.te_weights_from_stacked(stacked)
    assert len(per_expert) == E
    for e, w in enumerate(per_expert):
        assert w.shape == (W, D) and w.is_contiguous()
        assert torch.equal(w, stacked[e].T)
        assert w.untyped_storage().data_ptr() != stacked.untyped_storage().data_ptr()  # new memory
    assert torch.equal(te_layout.stacked_from_te_weights(per_expert), stacked)


def test_biases_round_trip():
    stacked = torch.randn(E, 2 * I, dtype=torch.float64)
    per_expert = te_layout.te_biases_from_stacked(stacked)
    assert [b.shape for b in per_expert] == [(2 * I,)] * E
    assert torch.equal(te_layout.stacked_from_te_biases(per_expert), stacked)


def test_stacking_is_differentiable():
    weights = [torch.randn(2 * I, D, requires_grad=True) for _ in range(E)]
    stacked = te_layout.stacked_from_te_weights(weights)
    (stacked * torch.arange(E, dtype=stacked.dtype)[:, None, None]).sum().backward()
    for e, w in enumerate(weights):
        assert torch.equal(w.grad, torch.full_like(w, float(e)))


def test_x_at_stacked_equals_linear_of_te_weight():
    x = torch.randn(5, D, dtype=torch.float64)
    stacked = torch.randn(E, D, 2 * I, dtype=torch.float64)
    bias = torch.randn(E, 2 * I, dtype=torch.float64)
    for e, (w, b) in enumerate(zip(te_layout.te_weights_from_stacked(stacked), te_layout.te_biases_from_stacked(bias))):
        torch.testing.assert_close(F.linear(x, w, b), x @ stacked[e] + bias[e])


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_per_expert_tensors_reproduce_grouped_experts(activation, bias):
    """A loop over experts with F.linear on the converted tensors gives GroupedExperts' output:
    the column order (concatenated or interleaved gate/up) survives the conversion."""
    cfg = config(activation, bias)
    torch.manual_seed(0)
    module = GroupedExperts(cfg)
    module.init_weights("cpu", init_std=0.3)
    if bias:
        with torch.no_grad():
            module.gate_up_proj_bias.normal_(0, 0.3)
            module.down_proj_bias.normal_(0, 0.3)
    T = 6
    x = torch.randn(T, D, dtype=torch.float64)
    indices = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    weights = torch.rand(T, K, dtype=torch.float64)
    token_mask = torch.ones(T, dtype=torch.bool)
    with torch.no_grad():
        want = module(x, token_mask, weights, indices)
        w1 = te_layout.te_weights_from_stacked(module.gate_and_up_projs)
        w2 = te_layout.te_weights_from_stacked(module.down_projs)
        b1 = te_layout.te_biases_from_stacked(module.gate_up_proj_bias) if bias else [None] * E
        b2 = te_layout.te_biases_from_stacked(module.down_proj_bias) if bias else [None] * E
        got = torch.zeros_like(x)
        for t in range(T):
            for k in range(K):
                e = int(indices[t, k])
                h = F.linear(x[t:t + 1], w1[e], b1[e])
                a = moe_activation(h, None, activation, cfg.activation_alpha, cfg.activation_limit,
                                   cfg.activation_linear_offset)
                got[t] += weights[t, k] * F.linear(a, w2[e], b2[e])[0]
    torch.testing.assert_close(got, want)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match=r"stacked: expected a 3-D \[E, in, out\] tensor"):
        te_layout.te_weights_from_stacked(torch.zeros(D, I))
    with pytest.raises(ValueError, match=r"stacked: expected a 2-D \[E, out\] tensor"):
        te_layout.te_biases_from_stacked(torch.zeros(E, D, I))
    with pytest.raises(ValueError, match=r"weights\[1\]: expected a 2-D tensor of shape \(12, 8\)"):
        te_layout.stacked_from_te_weights([torch.zeros(12, 8), torch.zeros(12, 9)])
    with pytest.raises(ValueError, match="biases: expected at least one tensor"):
        te_layout.stacked_from_te_biases([])
    with pytest.raises(ValueError, match=r"down_projs: expected shape \(4, 6, 8\), got \(4, 8, 6\)"):
        te_layout.check_stacked("down_projs", torch.zeros(E, D, I), (E, I, D))
    with pytest.raises(TypeError, match="down_projs: expected a torch.Tensor, got list"):
        te_layout.check_stacked("down_projs", [], (E, I, D))


def test_local_experts():
    full = torch.arange(8.0)[:, None].expand(8, 3)
    assert torch.equal(te_layout.local_experts(full, 1, 4)[:, 0], torch.tensor([4.0, 5, 6, 7]))
    with pytest.raises(ValueError, match="value: expected 3 experts per rank"):
        te_layout.local_experts(full, 0, 3)


def test_without_transformer_engine_construction_raises_the_install_hint():
    if te_module.transformer_engine_available():
        pytest.skip("Transformer Engine is installed here: the hint cannot show")
    with pytest.raises(ImportError) as info:
        te_module.GroupedExpertsTE(config())
    message = str(info.value)
    # From this checkout: the package index's "moe-ops" is someone else's project.
    assert "pip install -e '.[te]'" in message and "CUDA machine" in message and "unrelated" in message
