"""bench_experts.py's LoRA rows (``--lora 16,64``, issue 19): forward+backward of three blocks on one case.

* ``frozen``: our ``GroupedExperts`` with the case's weights frozen (gradients of x and the routing weights
  only): the block a LoRA run pays for anyway;
* ``ours_lora r``: ``GroupedExpertsLoRA`` over it (gradients of x, the routing weights and the adapters);
* ``nemo_lora r``: NeMo AutoModel 0.7.0's ``GroupedExpertsLoRA`` on its ``torch_mm`` backend, holding the
  same weights and adapters (built by bench_experts.py, which owns the NeMo imports).

B is random (not NeMo's zeros) so the low-rank terms are not all zero; the costs do not depend on it.
Gate: ours against NeMo's (y and every gradient), relative error under the bench's GATE_REL_ERR.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTERS = ("lora_gate_and_up_A", "lora_gate_and_up_B", "lora_down_A", "lora_down_B")


def _frozen_copy(module):
    """A module of the same class holding the same weight storage, frozen (no second copy of the weights)."""
    with torch.device("meta"):  # then the real tensors replace these
        frozen = type(module)(module.config)
    for name, p in module.named_parameters():
        setattr(frozen, name, nn.Parameter(p.detach(), requires_grad=False))
    return frozen


def fwd_bwd_path(module, case, params: list):
    def forward():
        return module(case.x, case.token_mask, case.weights, case.indices)

    def fwd_bwd():
        y = forward()
        return (y, *torch.autograd.grad(y, [case.x, case.weights, *params], case.grad_out))

    return forward, fwd_bwd


def frozen_path(case):
    return fwd_bwd_path(_frozen_copy(case.module), case, [])


def ours_lora(case, rank: int):
    from moe_modules import GroupedExpertsLoRA

    torch.manual_seed(rank)
    module = GroupedExpertsLoRA(_frozen_copy(case.module), lora_dim=rank, alpha=2 * rank)
    with torch.no_grad():
        for name in ("lora_gate_and_up_B", "lora_down_B"):
            getattr(module, name).normal_(0.0, 0.02)
    return module


def lora_path(module, case):
    """Forward+backward of a LoRA module (ours or NeMo's): gradients of x, the routing weights, the adapters."""
    return fwd_bwd_path(module, case, [getattr(module, n) for n in ADAPTERS])
