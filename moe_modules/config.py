"""MoEConfig: the fields of NeMo AutoModel's MoEConfig, with defaults for what the experts do not use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from moe_ops import GATED, check_activation

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, "float64": torch.float64}


@dataclass(kw_only=True)
class MoEConfig:
    """Expert-block configuration; field names follow NeMo AutoModel so configs carry over.

    The expert modules read ``n_routed_experts``, ``n_activated_experts``, ``dim``,
    ``moe_inter_dim``, ``expert_activation``, ``activation_alpha``,
    ``activation_limit``, ``activation_linear_offset``, ``expert_bias`` and ``dtype``;
    the router fields are kept so a NeMo config constructs unchanged.
    """

    n_routed_experts: int
    n_activated_experts: int
    dim: int
    moe_inter_dim: int
    expert_activation: str = "swiglu"
    activation_alpha: float = 1.702
    activation_limit: Optional[float] = 7.0
    activation_linear_offset: float = 1.0
    expert_bias: bool = False
    dtype: Union[str, torch.dtype] = torch.bfloat16
    # Router / shared-expert fields of NeMo's MoEConfig (unused by the expert modules).
    n_shared_experts: int = 0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    train_gate: bool = True
    gate_bias_update_factor: float = 0.0
    aux_loss_coeff: float = 0.0
    score_func: str = "softmax"
    route_scale: float = 1.0
    inter_dim: Optional[int] = None
    norm_topk_prob: bool = False
    router_bias: bool = False
    softmax_before_topk: bool = False
    shared_expert_gate: bool = False
    shared_expert_inter_dim: Optional[int] = None
    shared_expert_activation: str = "swiglu"
    force_e_score_correction_bias: bool = False

    def __post_init__(self):
        if isinstance(self.dtype, str):
            key = self.dtype.replace("torch.", "")
            if key not in _DTYPES:
                raise ValueError(f"dtype: expected a torch.dtype or one of {sorted(_DTYPES)}, got {self.dtype!r}")
            self.dtype = _DTYPES[key]
        check_activation(self.expert_activation)
        for name in ("n_routed_experts", "n_activated_experts", "dim", "moe_inter_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.n_activated_experts > self.n_routed_experts:
            raise ValueError(
                f"n_activated_experts: expected at most n_routed_experts={self.n_routed_experts}, "
                f"got {self.n_activated_experts}"
            )

    @property
    def gated(self) -> bool:
        return GATED[self.expert_activation]

    @property
    def up_width(self) -> int:
        """Width of the first GEMM's output: 2 * moe_inter_dim when gated, else moe_inter_dim."""
        return self.moe_inter_dim * (2 if self.gated else 1)
