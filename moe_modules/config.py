"""MoEConfig: the fields of NeMo AutoModel's MoEConfig, with defaults for what the experts do not use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from moe_ops import GATED, check_activation

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32, "float64": torch.float64}
_FLOAT_DTYPES = tuple(dict.fromkeys(_DTYPES.values()))  # the parameter dtypes, each once


def parse_dtype(name: str, value) -> torch.dtype:
    """A floating ``torch.dtype`` from a dtype or its name (``"bf16"``, ``"torch.float32"``, ...); ``name`` for errors."""
    if isinstance(value, str):
        key = value.replace("torch.", "")
        if key not in _DTYPES:
            raise ValueError(f"{name}: expected a floating torch.dtype or one of {sorted(_DTYPES)}, got {value!r}")
        return _DTYPES[key]
    if not isinstance(value, torch.dtype):
        raise TypeError(f"{name}: expected a torch.dtype or a str, got {type(value).__name__} {value!r}")
    if value not in _FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in _FLOAT_DTYPES)
        raise ValueError(f"{name}: expected a floating dtype for the expert parameters ({names}), got {value}")
    return value


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _activation(name: str, value) -> str:
    check_activation(value, name)
    return value


def _optional(check):
    def optional(name: str, value):
        return None if value is None else check(name, value)
    return optional


def _swiglu_limit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name}: expected a finite non-negative number, got {value!r}")
    return float(value)


def _check_at_most(name: str, value: int, bound_name: str, bound: int) -> None:
    """``value <= bound`` (both already checked positive ints)."""
    if value > bound:
        raise ValueError(f"{name}: expected at most {bound_name}={bound}, got {value}")


_FIELD_CHECKS = {"dtype": parse_dtype, "expert_activation": _activation, "n_routed_experts": _positive,
                 "n_activated_experts": _positive, "dim": _positive, "moe_inter_dim": _positive,
                 "moe_latent_size": _optional(_positive), "swiglu_limit": _swiglu_limit,
                 "gate_dtype": _optional(parse_dtype)}
_ROUTED_PAIR = ("n_routed_experts", "n_activated_experts")


@dataclass(kw_only=True)
class MoEConfig:
    """Expert-block configuration; field names follow NeMo AutoModel so configs carry over.

    Every field of NeMo AutoModel 0.7.0's ``MoEConfig`` is accepted by name (``activation_linear_offset``
    is ours).  The expert modules read ``n_routed_experts``, ``n_activated_experts``, ``dim`` /
    ``moe_latent_size`` (:attr:`expert_dim`), ``moe_inter_dim``, ``expert_activation``,
    ``activation_alpha``, ``activation_limit``, ``activation_linear_offset``, ``expert_bias``, ``dtype``,
    ``apply_router_weight_after_down`` and ``swiglu_limit``; the router and shared-expert fields are
    kept so a NeMo config constructs unchanged.  Those the experts read are
    checked whenever they are set (construction or assignment): positive sizes, at most
    ``n_routed_experts`` activated, a known activation name, a floating ``dtype`` (or its name).
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
    # NeMo's: the routing weight multiplies each expert's down output, bias included, instead of entering
    # the activation.  Both are p * (act(h) @ W2 + b2): the expert modules give the same result either way
    # (they round once, in float32).
    apply_router_weight_after_down: bool = False
    # NeMo's clamped SwiGLU (DeepSeek-V4) when > 0 and expert_activation is "swiglu": gate clamped at
    # max=swiglu_limit, up at +-swiglu_limit, then silu(gate) * up, in float32.
    swiglu_limit: float = 0.0
    # The experts' width when set (NeMo's latent MoE): gate_and_up_projs [E, L, 2I], down_projs [E, I, L],
    # and x [T, L]; the projections to and from it belong to the MoE layer, not the experts.
    moe_latent_size: Optional[int] = None
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
    router_weights_fp32: bool = False
    router_weight_uses_score_correction_bias: bool = False
    gate_dtype: Optional[Union[str, torch.dtype]] = None
    enable_routing_replay: bool = False

    def __setattr__(self, name, value):
        """The expert fields are checked (and a dtype name resolved) when set, at construction and after."""
        check = _FIELD_CHECKS.get(name)
        if check is not None:
            value = check(name, value)
            if name in _ROUTED_PAIR and all(hasattr(self, n) for n in _ROUTED_PAIR if n != name):  # the other is set
                pair = {n: getattr(self, n) for n in _ROUTED_PAIR if n != name} | {name: value}
                _check_at_most("n_activated_experts", pair["n_activated_experts"], "n_routed_experts",
                               pair["n_routed_experts"])
        object.__setattr__(self, name, value)

    @property
    def expert_dim(self) -> int:
        """The experts' width: ``moe_latent_size`` when set, else ``dim`` (NeMo's property)."""
        return self.moe_latent_size if self.moe_latent_size is not None else self.dim

    @property
    def gated(self) -> bool:
        return GATED[self.expert_activation]

    @property
    def up_width(self) -> int:
        """Width of the first GEMM's output: 2 * moe_inter_dim when gated, else moe_inter_dim."""
        return self.moe_inter_dim * (2 if self.gated else 1)
