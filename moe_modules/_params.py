"""Creating, initialising and reading the four stacked expert parameters."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

PARAM_NAMES = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")
_PLAIN = (torch.Tensor, nn.Parameter)


def create_expert_params(module: nn.Module, config, num_experts: Optional[int] = None) -> None:
    """Register ``gate_and_up_projs [E, D, 2I or I]``, ``down_projs [E, I, D]`` and, with
    ``config.expert_bias``, ``gate_up_proj_bias [E, 2I or I]`` and ``down_proj_bias [E, D]`` (else None)."""
    E = num_experts or config.n_routed_experts
    D, I, W = config.expert_dim, config.moe_inter_dim, config.up_width
    kw = dict(dtype=config.dtype)
    module.gate_and_up_projs = nn.Parameter(torch.empty(E, D, W, **kw))
    module.down_projs = nn.Parameter(torch.empty(E, I, D, **kw))
    if config.expert_bias:
        module.gate_up_proj_bias = nn.Parameter(torch.empty(E, W, **kw))
        module.down_proj_bias = nn.Parameter(torch.empty(E, D, **kw))
    else:
        module.register_parameter("gate_up_proj_bias", None)
        module.register_parameter("down_proj_bias", None)


def init_expert_params(module: nn.Module, buffer_device, init_std: float = 0.02) -> None:
    """normal(0, init_std) weights, zero biases (DTensor shards included)."""
    with torch.device(buffer_device), torch.no_grad():
        for name in PARAM_NAMES:
            p = getattr(module, name)
            if p is None:
                continue
            if name.endswith("bias"):
                p.zero_()
            else:
                nn.init.normal_(p, mean=0.0, std=init_std)


def local(t):
    """The local shard of a (possibly DTensor) parameter, keeping autograd to it."""
    if t is None or type(t) in _PLAIN:  # every call's case off expert parallelism: no DTensor import
        return t
    # isinstance, not hasattr(t, "to_local"): under Dynamo that hasattr is False for a DTensor.
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(t, DTensor):
            return t.to_local()
    return t


def local_expert_params(module: nn.Module) -> tuple:
    """``(w1, w2, b1, b2)``: this rank's shards of the four expert parameters (biases may be None)."""
    # A registered parameter (or None) straight from _parameters, skipping nn.Module.__getattr__; anything
    # else (a parametrization's property, a plain tensor attribute) by getattr.
    params = module._parameters
    return tuple(local(params[n] if n in params else getattr(module, n)) for n in PARAM_NAMES)
