"""LoRA on the experts: NeMo AutoModel 0.7.0's ``GroupedExpertsLoRA`` / ``GroupedExpertsDeepEPLoRA`` contract.

``GroupedExpertsLoRA(orig_module, lora_dim=8, alpha=32, lora_A_init_method="xavier", lora_dtype=None)``
wraps a ``GroupedExperts`` (``GroupedExpertsDeepEPLoRA`` a ``GroupedExpertsDeepEP``): the base tensors
are the wrapped module's own parameters (shared, not copied) and are frozen (``requires_grad=False``,
biases too); it adds, per expert, ``lora_gate_and_up_A [E, D, r]``, ``lora_gate_and_up_B [E, r, C]``
(``C = 2I`` gated, ``I`` otherwise), ``lora_down_A [E, I, r]`` and ``lora_down_B [E, r, D]``, scaled by
``alpha / r``; A initialised xavier-normal (``"xavier"``) or kaiming-uniform (anything else), B zeros, in
NeMo's order, so a NeMo LoRA state dict loads with ``strict=True`` and equal seeds give equal adapters.

The forward is the fused block with the low-rank paths as ops of their own
(``expert_block._run_low_rank``): ``W + scale * A @ B`` is never formed (only by
:meth:`materialize_effective_weights`, for merging).  Under ``apply_ep`` the adapters are sharded
``Shard(0)`` with their experts.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from moe_modules._params import PARAM_NAMES, local
from moe_modules.config import parse_dtype
from moe_modules.expert_block import LowRank
from moe_modules.grouped_experts import GroupedExperts, GroupedExpertsDeepEP
from moe_modules.te import GroupedExpertsTE

ADAPTER_NAMES = ("lora_gate_and_up_A", "lora_gate_and_up_B", "lora_down_A", "lora_down_B")


class _ExpertsLoRA:
    """What both LoRA modules add to their base class."""

    expert_param_names = PARAM_NAMES + ADAPTER_NAMES

    def _wrap(self, orig_module, lora_dim, alpha, lora_A_init_method, lora_dtype) -> None:
        if not isinstance(lora_dim, int) or isinstance(lora_dim, bool) or lora_dim < 1:
            raise ValueError(f"lora_dim: expected a positive int, got {lora_dim!r}")
        for name in PARAM_NAMES:  # the wrapped module's own parameters, not copies
            setattr(self, name, getattr(orig_module, name))
        self.use_dispatcher(orig_module.token_dispatcher)
        self.lora_dim, self.scale = lora_dim, alpha / lora_dim
        for name in PARAM_NAMES:
            p = getattr(self, name)
            if p is not None:
                p.requires_grad_(False)
        base = self.gate_and_up_projs
        E, D, C = base.shape
        kw = dict(dtype=base.dtype if lora_dtype is None else parse_dtype("lora_dtype", lora_dtype),
                  device=local(base).device)
        shapes = {"lora_gate_and_up_A": (E, D, lora_dim), "lora_gate_and_up_B": (E, lora_dim, C),
                  "lora_down_A": (E, self.config.moe_inter_dim, lora_dim), "lora_down_B": (E, lora_dim, D)}
        mesh = getattr(base, "device_mesh", None)  # the base is already expert parallel: shard alike
        for name in ADAPTER_NAMES:
            t = torch.empty(shapes[name], **kw)
            if mesh is not None:
                from torch.distributed.tensor import Shard, distribute_tensor

                t = distribute_tensor(t, mesh, [Shard(0)])
            setattr(self, name, nn.Parameter(t))
        self.init_lora_weights(lora_A_init_method)

    @torch.no_grad()
    def init_lora_weights(self, init_method: str) -> None:
        """A: xavier-normal for ``"xavier"``, else kaiming-uniform (``a = sqrt(5)``); B: zeros (NeMo's hook
        name and order: the PEFT framework calls it after materialising the module)."""
        for name in ("lora_gate_and_up_A", "lora_down_A"):
            p = getattr(self, name)
            if init_method == "xavier":
                nn.init.xavier_normal_(p)
            else:
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
        nn.init.zeros_(self.lora_gate_and_up_B)
        nn.init.zeros_(self.lora_down_B)

    def materialize_effective_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gate_and_up_projs + scale * A1 @ B1, down_projs + scale * A2 @ B2)``: the merged weights."""
        up = self.gate_and_up_projs + torch.bmm(self.lora_gate_and_up_A, self.lora_gate_and_up_B) * self.scale
        down = self.down_projs + torch.bmm(self.lora_down_A, self.lora_down_B) * self.scale
        return up, down

    def low_rank(self, dtype: torch.dtype) -> LowRank:
        adapters = [local(getattr(self, name)) for name in ADAPTER_NAMES]
        if adapters[0].dtype != dtype:  # as NeMo: the adapters compute in the activations' dtype
            adapters = [a.to(dtype) for a in adapters]
        return LowRank(*adapters, self.scale)


def _base_module(orig_module, cls):
    if isinstance(orig_module, GroupedExpertsTE):
        raise TypeError(
            "GroupedExpertsTE keeps each expert as a separate Transformer Engine weight ([out, in] per expert), "
            "so the fused low-rank paths would need a stacked copy of the base weights every step; wrap a "
            "GroupedExperts / GroupedExpertsDeepEP instead (the same state dict: load it with strict=True)")
    if not isinstance(orig_module, cls):
        raise TypeError(f"orig_module: expected a {cls.__name__}, got {type(orig_module).__name__}")


class GroupedExpertsLoRA(_ExpertsLoRA, GroupedExperts):
    """``GroupedExperts`` with frozen base experts and per-expert LoRA adapters (NeMo's constructor)."""

    def __init__(self, orig_module: GroupedExperts, lora_dim: int = 8, alpha: float = 32,
                 lora_A_init_method: str = "xavier", lora_dtype=None):
        _base_module(orig_module, GroupedExperts)
        with torch.device("meta"):  # no second set of base weights
            GroupedExperts.__init__(self, orig_module.config, orig_module.backend)
        self._wrap(orig_module, lora_dim, alpha, lora_A_init_method, lora_dtype)


class GroupedExpertsDeepEPLoRA(_ExpertsLoRA, GroupedExpertsDeepEP):
    """``GroupedExpertsDeepEP`` with frozen base experts and per-expert LoRA adapters (NeMo's constructor)."""

    def __init__(self, orig_module: GroupedExpertsDeepEP, lora_dim: int = 8, alpha: float = 32,
                 lora_A_init_method: str = "xavier", lora_dtype=None):
        _base_module(orig_module, GroupedExpertsDeepEP)
        with torch.device("meta"):
            GroupedExpertsDeepEP.__init__(self, orig_module.config, orig_module.backend)
        self._wrap(orig_module, lora_dim, alpha, lora_A_init_method, lora_dtype)
