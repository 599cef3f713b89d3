"""A small MoE transformer block (RMSNorm -> router: linear + softmax top-k -> experts ->
residual), two of them stacked, compiles with fullgraph=True as one graph and trains with SGD
with the same loss as eager at every step, while the batch's token count changes between steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from compile_tests.builders import DEVICE, D, E, K, RTOL, Case, assert_close, mark_tokens_dynamic, relative_error
from moe_modules import GroupedExperts, GroupedExpertsDeepEP

STEP_TOKENS = (24, 9, 1, 24, 40)  # one graph for all of them
LR = 0.1


class MoEBlock(nn.Module):
    def __init__(self, case: Case):
        super().__init__()
        self.norm = nn.RMSNorm(D, eps=1e-6)
        self.router = nn.Linear(D, E, bias=False)
        self.experts = case.build()
        self.experts.init_weights(DEVICE, init_std=0.1)

    def forward(self, x, token_mask):
        h = self.norm(x)
        scores = torch.softmax(self.router(h).float(), dim=-1)
        weights, indices = torch.topk(scores, K, dim=-1)
        return x + self.experts(h, token_mask, weights.to(x.dtype), indices)


class TinyMoEModel(nn.Module):
    def __init__(self, case: Case, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(MoEBlock(case) for _ in range(layers))

    def forward(self, x, token_mask):
        for block in self.blocks:
            x = block(x, token_mask)
        return x


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    T = STEP_TOKENS[step]
    x = torch.randn(T, D, generator=g).to(DEVICE)
    target = torch.randn(T, D, generator=g).to(DEVICE)
    token_mask = (torch.rand(T, generator=g) > 0.1).to(DEVICE)  # padding tokens
    return x, token_mask, target


def train(model: nn.Module, forward, dynamic: bool) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(len(STEP_TOKENS)):
        x, token_mask, target = batch(step)
        if dynamic:
            mark_tokens_dynamic((x, token_mask, target))
        optimizer.zero_grad(set_to_none=True)
        y = forward(x, token_mask)
        loss = ((y - target) ** 2 * token_mask.unsqueeze(1)).sum() / token_mask.sum().clamp(min=1)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize(
    "module, backend",
    [(GroupedExperts, "inductor"), (GroupedExpertsDeepEP, "aot_eager")],
    ids=["GroupedExperts-inductor", "GroupedExpertsDeepEP-aot_eager"],
)
def test_moe_block_trains_like_eager(module, backend):
    case = Case(module, "swiglu", True, torch.float32)
    torch.manual_seed(0)
    eager_model = TinyMoEModel(case).to(DEVICE)
    compiled_model = copy.deepcopy(eager_model)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(compiled_model, backend=counter, fullgraph=True)

    initial = copy.deepcopy(eager_model.state_dict())
    eager_losses = train(eager_model, eager_model, dynamic=False)
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        compiled_losses = train(compiled_model, compiled, dynamic=True)

    assert counter.frame_count == 1, f"{counter.frame_count} graphs for token counts {STEP_TOKENS}"
    # Rounding differences grow a little with every step: allow 10x the single-pass bound.
    rtol = 10 * RTOL[backend, torch.float32]
    for step, (got, expected) in enumerate(zip(compiled_losses, eager_losses)):
        assert relative_error(got, expected) <= rtol, f"step {step}: loss {got.item()} vs eager {expected.item()}"
    params = dict(compiled_model.named_parameters())
    for name, p in eager_model.named_parameters():
        # Every parameter trained (the router through the routing weights), the same way in both.
        assert not torch.equal(p.detach(), initial[name]), f"{name} did not change"
        assert_close([params[name].detach()], [p.detach()], rtol, f"parameter {name} after training")
