"""NeMo AutoModel's ``nemo_automodel.components.moe.experts`` API, built on ``moe`` ops.

Whole-expert forms (``x [N, D]`` and the weights of ONE expert)::

    swiglu(x, gate_and_up_proj=W1, down_proj=W2, gate_up_proj_bias=b1, down_proj_bias=b2)
        = act(x @ W1 + b1) @ W2 + b2

Probability-weighted forms used after token dispatch (``x`` is the first GEMM's
output, ``permuted_probs`` ``[N]`` or ``[N, 1]``): ``act(x) * probs`` in float32,
rounded once; their backward also returns the gradient of ``permuted_probs``.
"""

from __future__ import annotations

import functools
from typing import Optional

from torch import Tensor

import moe_ops
from moe_modules.config import MoEConfig
from moe_modules.expert_block import Activation
from moe_modules.grouped_experts import GroupedExperts, GroupedExpertsDeepEP
from moe_modules.te import GroupedExpertsTE


def is_gated_activation(activation: str) -> bool:
    """True when the activation uses gate and up projections (first GEMM of width 2I)."""
    moe_ops.check_activation(activation)
    return moe_ops.GATED[activation]


def _check_tensor(name: str, t, dim: int, like: Optional[Tensor] = None, like_name: str = "x") -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {tuple(t.shape)}")
    if like is None:
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name}: expected a floating dtype, got {t.dtype}")
        return
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")


def _check_size(name: str, actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise ValueError(f"{name}: expected {what} {expected}, got {actual}")


def _check_whole_expert(kind, x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias) -> None:
    """``x [N, D]``, ``gate_and_up_proj [D, 2I]`` (``[D, I]`` ungated), ``down_proj [I, D_out]``, biases
    ``[2I]`` / ``[D_out]``: one floating dtype and one device, else the error names the argument."""
    _check_tensor("x", x, 2)
    _check_tensor("gate_and_up_proj", gate_and_up_proj, 2, x)
    _check_size("gate_and_up_proj", gate_and_up_proj.shape[0], x.shape[1], "rows (dim 0) equal to x's width")
    up = gate_and_up_proj.shape[1]
    if moe_ops.GATED[kind] and up % 2:
        raise ValueError(f"gate_and_up_proj: expected an even number of columns (gate and up) for {kind}, got {up}")
    _check_tensor("down_proj", down_proj, 2, x)
    inter = up // 2 if moe_ops.GATED[kind] else up
    _check_size("down_proj", down_proj.shape[0], inter,
                f"rows (dim 0) equal to the {kind} output width ({'half ' if moe_ops.GATED[kind] else ''}"
                f"gate_and_up_proj's columns)")
    for name, bias, width in (("gate_up_proj_bias", gate_up_proj_bias, up),
                              ("down_proj_bias", down_proj_bias, down_proj.shape[1])):
        if bias is not None:
            _check_tensor(name, bias, 1, x)
            _check_size(name, bias.shape[0], width, "size")


def _whole_expert(kind, x, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None, **params):
    _check_whole_expert(kind, x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)
    h = x @ gate_and_up_proj
    if gate_up_proj_bias is not None:
        h = h + gate_up_proj_bias
    out = moe_ops.activation(h, None, kind, **params) @ down_proj
    if down_proj_bias is not None:
        out = out + down_proj_bias
    return out


def swiglu(x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None) -> Tensor:
    """``(silu(gate) * up) @ down_proj`` with ``gate, up = (x @ gate_and_up_proj + b1).chunk(2)``."""
    return _whole_expert("swiglu", x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)


def quick_geglu(
    x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None,
    alpha: float = 1.702, limit: Optional[float] = 7.0, linear_offset: float = 1.0,
) -> Tensor:
    """GPT-OSS: interleaved gate/up columns, clamped at ``limit``, ``gate * sigmoid(alpha * gate) * (up + offset)``."""
    return _whole_expert("quick_geglu", x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias,
                         alpha=alpha, limit=limit, linear_offset=linear_offset)


def swigluoai(
    x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None,
    alpha: float = 1.702, limit: Optional[float] = 7.0, linear_offset: float = 1.0,
) -> Tensor:
    """NeMo's ``swigluoai``: quick-GEGLU's clamped math on concatenated gate|up columns."""
    return _whole_expert("swigluoai", x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias,
                         alpha=alpha, limit=limit, linear_offset=linear_offset)


def swiglu_clamped(x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None,
                   limit: float) -> Tensor:
    """NeMo's clamped SwiGLU (``swiglu_limit > 0``, DeepSeek-V4): ``gate = min(gate, limit)``,
    ``up = clamp(up, -limit, limit)``, ``silu(gate) * up`` (``swigluoai`` with alpha 1, offset 0)."""
    act = Activation.clamped_swiglu(limit)
    return _whole_expert(act.kind, x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias, **act.params)


def geglu(x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None) -> Tensor:
    """NeMo's ``geglu`` (Gemma): ``(gelu_tanh(gate) * up) @ down_proj``, gate|up concatenated."""
    return _whole_expert("geglu", x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)


def relu2(x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None, down_proj_bias=None) -> Tensor:
    """ReLU²: ``relu(x @ gate_and_up_proj + b1) ** 2 @ down_proj + b2``; ``gate_and_up_proj`` is ``[D, I]``."""
    return _whole_expert("relu2", x, gate_and_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)


def get_expert_activation(config: MoEConfig):
    """The whole-expert callable ``(x, *, gate_and_up_proj, down_proj, gate_up_proj_bias=None,
    down_proj_bias=None)`` of ``config`` (its activation, alpha/limit/offset and ``swiglu_limit`` bound)."""
    act = Activation.from_config(config)
    return functools.partial(_whole_expert, act.kind, **act.params)


def swiglu_deepep(x: Tensor, permuted_probs: Tensor) -> Tensor:
    """``silu(gate) * up * probs`` on the first GEMM's output ``x`` (``[N, 2I]``)."""
    return moe_ops.activation(x, permuted_probs, "swiglu")


def quick_geglu_deepep(x: Tensor, permuted_probs: Tensor, alpha: float = 1.702, limit: Optional[float] = 7.0,
                       linear_offset: float = 1.0) -> Tensor:
    """GPT-OSS's quick-GEGLU (interleaved gate/up, clamped at ``limit``) times ``probs``."""
    return moe_ops.activation(x, permuted_probs, "quick_geglu", alpha, limit, linear_offset)


def swigluoai_deepep(x: Tensor, permuted_probs: Tensor, alpha: float = 1.702, limit: Optional[float] = 7.0,
                     linear_offset: float = 1.0) -> Tensor:
    """NeMo's ``swigluoai`` (concatenated gate|up, clamped at ``limit``) times ``probs``."""
    return moe_ops.activation(x, permuted_probs, "swigluoai", alpha, limit, linear_offset)


def swiglu_clamped_deepep(x: Tensor, permuted_probs: Tensor, limit: float) -> Tensor:
    """NeMo's clamped SwiGLU (:func:`swiglu_clamped`) times ``probs``."""
    act = Activation.clamped_swiglu(limit)
    return moe_ops.activation(x, permuted_probs, act.kind, **act.params)


def geglu_deepep(x: Tensor, permuted_probs: Tensor) -> Tensor:
    """NeMo's ``geglu`` (``gelu_tanh(gate) * up``, concatenated) times ``probs``."""
    return moe_ops.activation(x, permuted_probs, "geglu")


def relu2_deepep(x: Tensor, permuted_probs: Tensor) -> Tensor:
    """``relu(x) ** 2 * probs`` (``x`` is the up projection's output, ``[N, I]``)."""
    return moe_ops.activation(x, permuted_probs, "relu2")


def get_expert_activation_for_deepep(config: MoEConfig):
    """The ``(h, permuted_probs) -> out`` callable of ``config`` (alpha/limit/offset and ``swiglu_limit`` bound)."""
    act = Activation.from_config(config)
    return functools.partial(moe_ops.activation, kind=act.kind, **act.params)


__all__ = [
    "GroupedExperts", "GroupedExpertsDeepEP", "GroupedExpertsTE", "is_gated_activation",
    "swiglu", "quick_geglu", "swigluoai", "swiglu_clamped", "geglu", "relu2", "get_expert_activation",
    "swiglu_deepep", "quick_geglu_deepep", "swigluoai_deepep", "swiglu_clamped_deepep", "geglu_deepep",
    "relu2_deepep", "get_expert_activation_for_deepep",
]
