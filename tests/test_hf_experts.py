"""``experts_implementation="moe_ops"`` in transformers: tiny randomly initialised models built from configs
in code (no download), float32 on CPU (Gemma 4 in float64: see DTYPE).  Logits and every gradient equal transformers' ``"eager"`` experts
within 1e-5, and greedy ``generate()`` gives the same tokens, for Qwen3-MoE, Mixtral, GPT-OSS (interleaved,
clamped, biased), DeepSeek-V3, Gemma 4 (tanh-GEGLU) and Nemotron-H (ungated ReLU²).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.17",
                                   reason="needs transformers >= 5.17 (the test extra installs it)")
import moe_modules.hf  # noqa: E402,F401  (registers "moe_ops")

COMMON = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              head_dim=8, max_position_embeddings=64)


def configs():
    t = transformers
    return {
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**COMMON, intermediate_size=32, moe_intermediate_size=8, num_experts=4,
                                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": lambda: t.MixtralConfig(**COMMON, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2),
        "gpt_oss": lambda: t.GptOssConfig(**COMMON, intermediate_size=8, num_local_experts=4, num_experts_per_tok=2,
                                          layer_types=["full_attention"] * 2),
        "deepseek_v3": lambda: t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 2, "head_dim": 4},
                                                  intermediate_size=32,
                                                  moe_intermediate_size=8, first_k_dense_replace=0, n_routed_experts=4,
                                                  num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                                                  q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4,
                                                  qk_nope_head_dim=4, v_head_dim=8),
        "gemma4": lambda: t.Gemma4TextConfig(**COMMON, intermediate_size=8, enable_moe_block=True, num_experts=4,
                                             top_k_experts=2, moe_intermediate_size=8, vocab_size_per_layer_input=64,
                                             hidden_size_per_layer_input=4, layer_types=["full_attention"] * 2),
        "nemotron_h": lambda: t.NemotronHConfig(**{k: v for k, v in COMMON.items() if k != "num_hidden_layers"},
                                                hybrid_override_pattern="*E", n_routed_experts=4,
                                                num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1,
                                                moe_shared_expert_intermediate_size=8, intermediate_size=8,
                                                n_group=1, topk_group=1),
    }


# Gemma 4's float32 forward+backward is itself ~4e-5 off its float64 one (softcapping, per-layer inputs) with
# either experts, so it is compared in float64, where the two experts paths agree to rounding.
DTYPE = {"gemma4": torch.float64}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def model_of(name: str):
    torch.manual_seed(0)
    config = configs()[name]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=DTYPE.get(name, torch.float32))
    with torch.no_grad():  # random biases too (zero-initialised ones would hide a wrong bias row)
        for pname, p in model.named_parameters():
            if "experts" in pname:
                p.normal_(0.0, 0.3)
    return model.eval()


def logits_and_grads(model, implementation: str, input_ids):
    model.set_experts_implementation(implementation)
    model.zero_grad()
    logits = model(input_ids).logits
    logits.square().mean().backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


NAMES = ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "gemma4", "nemotron_h"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_gradients_equal_the_eager_experts(name, monkeypatch):
    model = model_of(name)
    input_ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    want = logits_and_grads(model, "eager", input_ids)
    calls = []
    run = moe_modules.hf.run_experts
    monkeypatch.setattr(moe_modules.hf, "run_experts", lambda *a: calls.append(1) or run(*a))
    got = logits_and_grads(model, "moe_ops", input_ids)
    layers = sum(1 for m in model.modules() if hasattr(m, "is_transposed"))
    assert len(calls) == layers > 0, "every experts layer ran through the moe ops"
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
        assert err <= TOLERANCE[a.dtype], f"{name}: tensor {i}: relative error {err:.2e}"


@pytest.mark.parametrize("name", NAMES)
def test_generate_gives_the_same_tokens(name):
    model = model_of(name)
    input_ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(2))
    tokens = {}
    for implementation in ("eager", "moe_ops"):
        model.set_experts_implementation(implementation)
        with torch.no_grad():
            tokens[implementation] = model.generate(input_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens["moe_ops"], tokens["eager"])


def test_every_supported_layout_maps_to_an_activation():
    from moe_modules.hf import activation_of

    kinds = {}
    for name in NAMES:
        experts = next(m for m in model_of(name).modules() if hasattr(m, "is_transposed"))
        act, why = activation_of(experts)
        assert act is not None, (name, why)
        kinds[name] = act.kind
    assert kinds == {"qwen3_moe": "swiglu", "mixtral": "swiglu", "gpt_oss": "quick_geglu", "deepseek_v3": "swiglu",
                     "gemma4": "geglu", "nemotron_h": "relu2"}


def test_a_gate_it_cannot_map_falls_back_with_the_reason():
    from moe_modules.hf import activation_of

    experts = next(m for m in model_of("mixtral").modules() if hasattr(m, "is_transposed"))
    experts.act_fn = torch.nn.GELU()
    act, why = activation_of(experts)
    assert act is None and "not SwiGLU or tanh-GEGLU" in why and "gelu" in why
