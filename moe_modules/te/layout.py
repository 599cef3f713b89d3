"""Stacked x@W expert parameters <-> Transformer Engine's per-expert ``GroupedLinear`` parameters.

The stacked layout (SPEC §3), shared by every expert module and NeMo AutoModel:
``gate_and_up_projs [E, D, W]`` (``W = 2I`` gated, ``I`` for relu2), ``down_projs [E, I, D]``,
``gate_up_proj_bias [E, W]``, ``down_proj_bias [E, D]``.

``GroupedLinear`` holds expert ``e`` as ``weight{e} [out, in]`` and ``bias{e} [out]`` and computes
``F.linear(x, weight{e}, bias{e}) = x @ weight{e}.T + bias{e}``, so ``weight{e} = stacked[e].T``
and ``bias{e} = stacked_bias[e]``.  The columns keep their order, so the gate/up split of each
activation (concatenated for swiglu, swigluoai and geglu, interleaved for quick_geglu) carries over unchanged.

Plain functions, no Transformer Engine needed: tested on CPU.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor


class LinearDims(NamedTuple):
    in_features: int
    out_features: int


def te_linear_dims(config) -> tuple[LinearDims, LinearDims]:
    """``(gate_up, down)`` feature sizes of the two GroupedLinears: ``(D -> W)`` and ``(I -> D)``."""
    D = config.expert_dim
    return (LinearDims(D, config.up_width), LinearDims(config.moe_inter_dim, D))


def stacked_shapes(config, num_experts: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of the four stacked parameters for ``num_experts`` experts."""
    D, I, W = config.expert_dim, config.moe_inter_dim, config.up_width
    return {
        "gate_and_up_projs": (num_experts, D, W),
        "down_projs": (num_experts, I, D),
        "gate_up_proj_bias": (num_experts, W),
        "down_proj_bias": (num_experts, D),
    }


def check_stacked(name: str, value: Tensor, shape: Sequence[int]) -> None:
    """``ValueError`` naming ``name`` unless ``value`` is a tensor of exactly ``shape``."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(value.shape)}")


def te_weights_from_stacked(stacked: Tensor) -> list[Tensor]:
    """``[E, in, out]`` -> ``E`` contiguous ``[out, in]`` tensors (new memory: safe to copy into parameters)."""
    if stacked.dim() != 3:
        raise ValueError(f"stacked: expected a 3-D [E, in, out] tensor, got shape {tuple(stacked.shape)}")
    return [w.t().contiguous() for w in stacked.unbind(0)]


def stacked_from_te_weights(weights: Sequence[Tensor]) -> Tensor:
    """``E`` tensors ``[out, in]`` -> ``[E, in, out]``; differentiable (gradients flow back to each weight)."""
    _check_list("weights", weights, dim=2)
    return torch.stack([w.t() for w in weights])


def te_biases_from_stacked(stacked: Tensor) -> list[Tensor]:
    """``[E, out]`` -> ``E`` contiguous ``[out]`` tensors."""
    if stacked.dim() != 2:
        raise ValueError(f"stacked: expected a 2-D [E, out] tensor, got shape {tuple(stacked.shape)}")
    return [b.contiguous() for b in stacked.unbind(0)]


def stacked_from_te_biases(biases: Sequence[Tensor]) -> Tensor:
    """``E`` tensors ``[out]`` -> ``[E, out]``; differentiable."""
    _check_list("biases", biases, dim=1)
    return torch.stack(list(biases))


def _check_list(name: str, tensors: Sequence[Tensor], dim: int) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{name}: expected at least one tensor, got none")
    first = tuple(tensors[0].shape)
    for i, t in enumerate(tensors):
        if t.dim() != dim or tuple(t.shape) != first:
            raise ValueError(f"{name}[{i}]: expected a {dim}-D tensor of shape {first} like {name}[0], "
                             f"got shape {tuple(t.shape)}")


def local_experts(value: Tensor, rank: int, num_local: int) -> Tensor:
    """Rows ``rank * num_local ... (rank + 1) * num_local - 1`` of a full stacked ``[E, ...]`` tensor."""
    if value.shape[0] % num_local or value.shape[0] // num_local <= rank:
        raise ValueError(f"value: expected {num_local} experts per rank with rank {rank} in range, "
                         f"got {value.shape[0]} experts")
    return value[rank * num_local:(rank + 1) * num_local]
