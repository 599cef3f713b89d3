"""State-dict converters between the stacked expert layout (ours, NeMo AutoModel's) and Hugging Face's.

Ours: ``gate_and_up_projs [E, D, 2I]`` (``x @ W``; gate|up concatenated, interleaved for quick_geglu;
``[E, D, I]`` ungated), ``down_projs [E, I, D]``, and with biases ``gate_up_proj_bias [E, 2I]``,
``down_proj_bias [E, D]``.  Hugging Face's, keys relative to the experts module
(``model.layers.{l}.mlp.experts.``):

* ``"per_expert"``: ``{e}.gate_proj.weight [I, D]``, ``{e}.up_proj.weight [I, D]``,
  ``{e}.down_proj.weight [D, I]`` — Qwen2/3-MoE and DeepSeek-V3 checkpoints;
* ``"mixtral"``: ``{e}.w1.weight`` (gate), ``{e}.w3.weight`` (up), ``{e}.w2.weight`` (down) — Mixtral
  checkpoints (under ``block_sparse_moe.experts``);
* ``"packed"``: ``gate_up_proj [E, 2I, D]``, ``down_proj [E, D, I]`` — transformers 5's experts modules
  (what it builds from the two above when loading);
* ``"packed_ungated"``: ``up_proj [E, I, D]``, ``down_proj [E, D, I]`` — Nemotron-H's;
* ``"gpt_oss"``: ``gate_up_proj [E, D, 2I]`` (interleaved), ``gate_up_proj_bias``, ``down_proj [E, I, D]``,
  ``down_proj_bias`` — our layout under other names.

Each direction is exact (transposes, concatenations, no arithmetic) and returns new contiguous tensors.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

LAYOUTS = ("per_expert", "mixtral", "packed", "packed_ungated", "gpt_oss")
_PER_EXPERT_NAMES = {"per_expert": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


_BIASES = ("gate_up_proj_bias", "down_proj_bias")  # the same names in both layouts (gpt_oss only)


def _t(w: Tensor) -> Tensor:
    """``[.., out, in]`` <-> ``[.., in, out]``, a new contiguous tensor."""
    return w.transpose(-2, -1).contiguous()


def _num_experts(state: Mapping[str, Tensor], name: str) -> int:
    ids = {int(k.split(".", 1)[0]) for k in state if k.endswith(f".{name}.weight") and k.split(".", 1)[0].isdigit()}
    if not ids or ids != set(range(len(ids))):
        raise ValueError(f"state: expected keys '{{e}}.{name}.weight' for experts 0 .. E-1, got experts {sorted(ids)}")
    return len(ids)


def from_hf(state: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Hugging Face's experts state (keys relative to the experts module) -> our four keys."""
    _check_layout(layout)
    if layout in _PER_EXPERT_NAMES:
        gate, up, down = _PER_EXPERT_NAMES[layout]
        E = _num_experts(state, gate)
        w1 = torch.stack([torch.cat([state[f"{e}.{gate}.weight"], state[f"{e}.{up}.weight"]], 0) for e in range(E)])
        w2 = torch.stack([state[f"{e}.{down}.weight"] for e in range(E)])
        return {"gate_and_up_projs": _t(w1), "down_projs": _t(w2)}
    if layout == "packed":
        return {"gate_and_up_projs": _t(state["gate_up_proj"]), "down_projs": _t(state["down_proj"])}
    if layout == "packed_ungated":
        return {"gate_and_up_projs": _t(state["up_proj"]), "down_projs": _t(state["down_proj"])}
    out = {"gate_and_up_projs": state["gate_up_proj"].contiguous(), "down_projs": state["down_proj"].contiguous()}
    return out | {name: state[name].contiguous() for name in _BIASES if name in state}


def to_hf(stacked: Mapping[str, Tensor], layout: str) -> dict[str, Tensor]:
    """Our four keys -> Hugging Face's experts state in ``layout`` (keys relative to the experts module)."""
    _check_layout(layout)
    w1, w2 = stacked["gate_and_up_projs"], stacked["down_projs"]
    if layout != "gpt_oss" and any(stacked.get(n) is not None for n in _BIASES):
        raise ValueError(f"layout {layout!r} has no expert biases; only 'gpt_oss' does")
    if layout in _PER_EXPERT_NAMES:
        gate, up, down = _PER_EXPERT_NAMES[layout]
        if w1.shape[2] % 2:
            raise ValueError(f"gate_and_up_projs: expected an even width (gate and up) for {layout!r}, got {w1.shape[2]}")
        state = {}
        for e in range(w1.shape[0]):
            g, u = w1[e].t().chunk(2, 0)
            state[f"{e}.{gate}.weight"], state[f"{e}.{up}.weight"] = g.contiguous(), u.contiguous()
            state[f"{e}.{down}.weight"] = w2[e].t().contiguous()
        return state
    if layout == "packed":
        return {"gate_up_proj": _t(w1), "down_proj": _t(w2)}
    if layout == "packed_ungated":
        return {"up_proj": _t(w1), "down_proj": _t(w2)}
    out = {"gate_up_proj": w1.contiguous(), "down_proj": w2.contiguous()}
    return out | {name: stacked[name].contiguous() for name in _BIASES if stacked.get(name) is not None}
