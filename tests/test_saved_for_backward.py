"""What an expert module keeps for its backward: only the pre-activation ``h`` and the routing.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` over one forward (``benchmarks.common.saved_bytes``,
which bench_experts reports too: distinct storages, leaving out what the caller holds anyway, the
inputs and the parameters).  No gathered copy of ``x``, no activation ``a``: the bytes must stay within 5% of
``h`` plus the routing metadata (``route``'s outputs and the permuted routing weights).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moe_ops
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import saved_bytes  # noqa: E402  (the benchmark counts the same way)

T, K, E, D, I = 64, 4, 8, 40, 16


@pytest.mark.parametrize("module_cls", [GroupedExperts, GroupedExpertsDeepEP], ids=lambda c: c.__name__)
@pytest.mark.parametrize("activation", list(moe_ops.GATED))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_only_h_and_the_routing_are_saved(module_cls, activation, bias):
    config = MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I,
                       expert_activation=activation, expert_bias=bias, dtype=torch.float32)
    module = module_cls(config)
    module.init_weights(torch.device("cpu"))
    x = torch.randn(T, D, requires_grad=True)
    weights = torch.rand(T, K, requires_grad=True)
    indices = torch.randint(0, E, (T, K))
    token_mask = torch.ones(T, dtype=torch.bool)
    token_mask[:3] = False
    held = [x, weights, indices, token_mask, *module.parameters()]
    got, saved = saved_bytes(lambda: module(x, token_mask, weights, indices), held)

    C = I if activation == "relu2" else 2 * I
    h_bytes = T * K * C * 4
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    routing_bytes = sum(t.numel() * t.element_size() for t in (pair_of_row, row_of_pair, offsets))
    routing_bytes += T * K * weights.element_size()  # the permuted routing weights
    assert got <= 1.05 * (h_bytes + routing_bytes), (got, h_bytes, routing_bytes, saved)
    assert any(shape == (T * K, C) for _, shape, _ in saved), f"h was not saved: {saved}"
    rows_of_width = [shape[1] for _, shape, _ in saved if len(shape) == 2 and shape[0] == T * K]
    assert rows_of_width == [C], f"an activation or a gathered copy was saved besides h: {saved}"
