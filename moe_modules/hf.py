"""``experts_implementation="moe_ops"`` for Hugging Face transformers' MoE models (transformers >= 5.17).

Importing this module registers ``"moe_ops"`` in transformers' experts interface
(``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``), so every experts class decorated with
``@use_experts_implementation`` (Qwen2/3-MoE, Mixtral, DeepSeek-V3, GPT-OSS, Nemotron-H, ...) runs
through the ``moe`` ops::

    import moe_modules.hf  # noqa: F401
    model = AutoModelForCausalLM.from_pretrained(name, experts_implementation="moe_ops")
    # or, on a loaded model: model.set_experts_implementation("moe_ops")

The experts' own tensors are read in place: transformers' ``[E, out, in]`` layout is handed to the
ops as a transposed view (``is_transposed`` classes as they are), concatenated gate|up as ``swiglu``
(SiLU) or ``geglu`` (tanh-approximated GELU: Gemma 4), GPT-OSS's interleaved, clamped gate as ``quick_geglu`` (its ``alpha`` and ``limit``), a class without
gate (``has_gate=False``) with ReLU² as ``relu2``; biases as the decorator declares them.  Indices of
``num_experts`` or more (transformers' expert-parallel sentinels) are not routed.  A class this cannot
map — another activation or gate function, a post-expert norm — runs transformers' ``grouped_mm``
implementation instead, with a warning that says why (once per class).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from moe_modules.ep.dispatcher import Received
from moe_modules.expert_block import Activation, run_experts

try:
    from transformers.integrations import moe as _hf_moe
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError("moe_modules.hf needs transformers >= 5.17 (its experts interface, "
                      "transformers.integrations.moe); pip install 'transformers>=5.17'") from e

NAME = "moe_ops"
_unsupported_warned: set = set()


def _act_name(act_fn) -> str:
    return type(act_fn).__name__.lower()  # transformers' SiLUActivation / ReLUSquaredActivation, torch's SiLU


_SILU = ("silu", "siluactivation")
_GELU_TANH = ("gelutanh", "newgeluactivation", "fastgeluactivation")  # transformers' tanh-approximated GELUs
_RELU2 = ("relusquaredactivation",)


def activation_of(experts: nn.Module) -> tuple[Optional[Activation], str]:
    """The moe-ops activation of a decorated experts module, or ``(None, why not)``."""
    if getattr(experts, "has_post_expert_norm", False):
        return None, "it applies a norm after each expert"
    gate_fn = type(experts)._apply_gate
    act = _act_name(getattr(experts, "act_fn", None))
    if not experts.has_gate:
        if act in _RELU2:
            return Activation("relu2"), ""
        return None, f"its ungated activation {type(experts.act_fn).__name__} is not ReLU²"
    if experts.is_concatenated:
        if gate_fn is _hf_moe._default_apply_gate and act in _SILU:
            return Activation("swiglu"), ""
        if gate_fn is _hf_moe._default_apply_gate and act in _GELU_TANH:  # Gemma 4
            return Activation("geglu"), ""
        return None, f"its gate ({gate_fn.__qualname__} with {act}) is not SwiGLU or tanh-GEGLU"
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if alpha is not None and limit is not None:  # GPT-OSS's interleaved, clamped gate: our quick_geglu
        return Activation("quick_geglu", float(alpha), float(limit), 1.0), ""
    return None, "its interleaved gate has no alpha / limit (GPT-OSS's clamped GEGLU is the one supported)"


def _ours(w: Tensor, transposed: bool) -> Tensor:
    """transformers' ``[E, out, in]`` (or ``[E, in, out]`` when ``is_transposed``) as the ops' ``[E, in, out]``."""
    return w if transposed else w.transpose(1, 2)


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """transformers' experts signature: ``hidden_states [S, D]``, ``top_k_index [S, K]``, ``top_k_weights
    [S, K]`` -> ``[S, D]`` in ``hidden_states.dtype``."""
    act, why = activation_of(self)
    if act is None:
        cls = type(self).__qualname__
        if cls not in _unsupported_warned:
            _unsupported_warned.add(cls)
            warnings.warn(f"experts_implementation={NAME!r}: {cls} runs transformers' grouped_mm instead, because "
                          f"{why}", stacklevel=2)
        return _hf_moe.grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    transposed = self.is_transposed
    if self.has_gate:
        w1, b1 = self.gate_up_proj, (self.gate_up_proj_bias if self.has_bias else None)
    else:
        w1, b1 = self.up_proj, (self.up_proj_bias if self.has_bias else None)
    w2, b2 = self.down_proj, (self.down_proj_bias if self.has_bias else None)
    token_mask = torch.ones(hidden_states.shape[0], dtype=torch.bool, device=hidden_states.device)
    received = Received(hidden_states, token_mask, top_k_weights, top_k_index, None, hidden_states.dtype)
    return run_experts(received, _ours(w1, transposed), _ours(w2, transposed), b1, b2, act)


_hf_moe.ExpertsInterface.register(NAME, experts_forward)
