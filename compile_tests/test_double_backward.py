"""The double backward of the whole expert block, float64 gradgradcheck.

opcheck's aot_dispatch test (test_opcheck_dynamic.py) differentiates through the backward ops,
which needs their autograd formulas (moe_ops/ops/activation_second_order.py,
fused_double_backward.py, bias.py); opcheck does not check their math, this does.
"""

from __future__ import annotations

import pytest
import torch

import moe_ops

from moe_modules import GroupedExperts, MoEConfig

T, E, K, D, I = 4, 3, 2, 3, 2


@pytest.mark.parametrize("activation", list(moe_ops.GATED))
def test_expert_block_gradgradcheck(activation):
    torch.manual_seed(0)
    config = MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, expert_activation=activation,
                       activation_limit=1.5, expert_bias=True, dtype=torch.float64)
    module = GroupedExperts(config)
    module.init_weights("cpu", init_std=1.0)
    with torch.no_grad():
        module.gate_up_proj_bias.normal_()
        module.down_proj_bias.normal_()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 2], [1, -1], [2, 2], [0, 1]])  # a repeated expert, an unrouted slot
    token_mask = torch.tensor([True, True, True, False])
    names = [n for n, _ in module.named_parameters()]

    def block(x, weights, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x, token_mask, weights, indices))

    params = tuple(p.detach().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradgradcheck(block, (x, weights, *params))
