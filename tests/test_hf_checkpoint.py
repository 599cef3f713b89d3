"""The Hugging Face state-dict converters (``moe_modules.hf_checkpoint``): exact round trips both ways for
every layout, and, against tiny transformers models (float32, CPU), a converted experts state loaded into
``GroupedExperts`` gives the transformers experts' output.
"""

from __future__ import annotations

import pytest
import torch

from moe_modules import GroupedExperts, MoEConfig
from moe_modules.hf_checkpoint import LAYOUTS, from_hf, to_hf

E, D, I = 3, 8, 5


def stacked(layout: str) -> dict:
    g = torch.Generator().manual_seed(0)
    up = I if layout == "packed_ungated" else 2 * I
    out = {"gate_and_up_projs": torch.randn(E, D, up, generator=g), "down_projs": torch.randn(E, I, D, generator=g)}
    if layout == "gpt_oss":
        out.update(gate_up_proj_bias=torch.randn(E, up, generator=g), down_proj_bias=torch.randn(E, D, generator=g))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trips_are_exact(layout):
    ours = stacked(layout)
    theirs = to_hf(ours, layout)
    back = from_hf(theirs, layout)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) and back[k].is_contiguous() for k in ours)
    again = to_hf(back, layout)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_per_expert_keys_and_shapes():
    theirs = to_hf(stacked("per_expert"), "per_expert")
    assert theirs["2.gate_proj.weight"].shape == (I, D) and theirs["2.down_proj.weight"].shape == (D, I)
    assert set(to_hf(stacked("mixtral"), "mixtral")) == {f"{e}.{n}.weight" for e in range(E) for n in ("w1", "w2", "w3")}
    packed = to_hf(stacked("packed"), "packed")
    # transformers 5 builds gate_up_proj from the per-expert tensors: stack, then gate and up concatenated
    per_expert = to_hf(stacked("packed"), "per_expert")
    want = torch.stack([torch.cat([per_expert[f"{e}.gate_proj.weight"], per_expert[f"{e}.up_proj.weight"]])
                        for e in range(E)])
    assert torch.equal(packed["gate_up_proj"], want)


def test_bad_layouts_and_states_are_refused():
    with pytest.raises(ValueError, match="layout"):
        to_hf(stacked("packed"), "fused")
    with pytest.raises(ValueError, match="no expert biases"):
        to_hf(stacked("gpt_oss"), "packed")
    state = to_hf(stacked("per_expert"), "per_expert")
    del state["1.gate_proj.weight"]
    with pytest.raises(ValueError, match="experts 0 .. E-1"):
        from_hf(state, "per_expert")


MODELS = {  # name: (config, layout, our activation, bias)
    "qwen3_moe": (lambda t: t.Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=I, num_experts=E,
                                                      num_experts_per_tok=2), "packed", "swiglu", False),
    "mixtral": (lambda t: t.MixtralConfig(hidden_size=D, intermediate_size=I, num_local_experts=E,
                                                   num_experts_per_tok=2), "packed", "swiglu", False),
    "gpt_oss": (lambda t: t.GptOssConfig(hidden_size=D, intermediate_size=I, num_local_experts=E,
                                                  num_experts_per_tok=2), "gpt_oss", "quick_geglu", True),
    "nemotron_h": (lambda t: t.NemotronHConfig(hidden_size=D, moe_intermediate_size=I, n_routed_experts=E,
                                                        num_experts_per_tok=2), "packed_ungated", "relu2", False),
}
EXPERTS = {"qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts", "gpt_oss": "GptOssExperts",
           "nemotron_h": "NemotronHExperts"}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_state_gives_the_transformers_experts_output(name):
    transformers = pytest.importorskip("transformers", minversion="5.17",
                                       reason="needs transformers >= 5.17 (the test extra installs it)")
    make_config, layout, activation, bias = MODELS[name]
    config = make_config(transformers)
    module_path = f"transformers.models.{name}.modeling_{name}"
    experts_cls = getattr(__import__(module_path, fromlist=[EXPERTS[name]]), EXPERTS[name])
    torch.manual_seed(0)
    theirs = experts_cls(config).float()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    config._experts_implementation = "eager"
    ours = GroupedExperts(MoEConfig(n_routed_experts=E, n_activated_experts=2, dim=D, moe_inter_dim=I,
                                    expert_activation=activation, expert_bias=bias, dtype=torch.float32,
                                    activation_alpha=getattr(theirs, "alpha", 1.702),
                                    activation_limit=getattr(theirs, "limit", 7.0)))
    ours.load_state_dict(from_hf(theirs.state_dict(), layout), strict=True)
    g = torch.Generator().manual_seed(1)
    x, weights = torch.randn(6, D, generator=g), torch.rand(6, 2, generator=g)
    indices = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(6)])
    want = theirs(x, indices, weights)
    got = ours(x, torch.ones(6, dtype=torch.bool), weights, indices)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    back = to_hf(ours.state_dict(), layout)
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())
