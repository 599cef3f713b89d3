"""A transformers MoE model with ``experts_implementation="moe_ops"`` against its own ``"grouped_mm"``, one run.

    python benchmarks/bench_hf.py                      # CUDA, bf16: a Qwen3-30B-A3B-shaped model, LAYERS layers
    python benchmarks/bench_hf.py --device cpu --quick # a tiny model, few repetitions (CI smoke test)

The model is ``Qwen3MoeForCausalLM`` built from a config in code (random weights, no download): Qwen3-30B-A3B's
expert shape (hidden 2048, 128 experts, top-8, moe_intermediate 768, 32 heads / 4 KV heads of 128) with
``--layers`` decoder layers and a small vocabulary, so the experts dominate.  For each implementation, switched
on the same model in place (``set_experts_implementation``), interleaved:

* ``train_step_ms``: forward + backward of the causal-LM loss on ``--batch`` x ``--seq`` tokens (median);
* ``generate_tok_s``: greedy ``generate()`` of ``--new-tokens`` tokens for ``--gen-batch`` prompts of 32 tokens,
  tokens per second (one timed call after a warm-up call);
* ``max_logit_err``: the largest |logit difference| against ``grouped_mm`` on the training batch (fp32 logits).

Writes ``$OUT/bench_hf.json`` (benchmarks/results/ without $OUT) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]

from benchmarks import common  # noqa: E402

IMPLEMENTATIONS = ("grouped_mm", "moe_ops")


def model_config(args):
    import transformers

    if args.quick:
        shape = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                     num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    else:
        shape = dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                     num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128)
    return transformers.Qwen3MoeConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, decoder_sparse_step=1,
                                       mlp_only_layers=[], max_position_embeddings=4096, **shape)


def build(args):
    import transformers

    import moe_modules.hf  # noqa: F401  (registers "moe_ops")

    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = transformers.AutoModelForCausalLM.from_config(model_config(args), dtype=dtype).to(args.device)
    return model


def measure(model, implementation: str, args, ids, prompt) -> dict:
    model.set_experts_implementation(implementation)
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    train = common.time_ms(step, args.device, warmup=args.warmup, budget_s=args.budget, min_reps=args.min_reps,
                           max_reps=args.max_reps)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)  # warm-up
        common.synchronize(args.device)
        t0 = time.perf_counter()
        tokens = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        common.synchronize(args.device)
        seconds = time.perf_counter() - t0
    generated = (tokens.shape[1] - prompt.shape[1]) * prompt.shape[0]
    return {"train_step_ms": train, "generate_tok_s": generated / seconds, "logits": logits, "tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="a tiny model, few repetitions (CI)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--gen-batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of training-step repetitions per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-reps", type=int, default=5)
    p.add_argument("--max-reps", type=int, default=50)
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.vocab, args.batch, args.seq, args.gen_batch, args.new_tokens = 2, 128, 2, 16, 2, 4
        args.budget, args.min_reps, args.max_reps = 0.05, 2, 5
    if args.device == "cpu":
        torch.set_num_threads(1)
    model = build(args)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(args.device)
    prompt = torch.randint(0, args.vocab, (args.gen_batch, min(32, args.seq)), generator=g).to(args.device)
    results = {name: measure(model, name, args, ids, prompt) for name in IMPLEMENTATIONS}
    base = results["grouped_mm"]
    report = {"env": common.environment(args.device), "model": model_config(args).to_dict(),
              "batch": args.batch, "seq": args.seq, "gen_batch": args.gen_batch, "new_tokens": args.new_tokens,
              "results": {}}
    for name, r in results.items():
        report["results"][name] = {
            "train_step_ms": r["train_step_ms"], "generate_tok_s": r["generate_tok_s"],
            "max_logit_err": (r["logits"] - base["logits"]).abs().max().item(),
            "same_tokens": bool(torch.equal(r["tokens"], base["tokens"])),
        }
    out_dir = Path(os.environ.get("OUT", HERE / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench_hf.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\ncard: {report['env']['card']}  torch {report['env']['torch']}  -> {path}")
    for name, r in report["results"].items():
        print(f"{name:>10}: train step {r['train_step_ms']['median_ms']:.2f} ms, generate {r['generate_tok_s']:.1f} "
              f"tok/s, max |logit - grouped_mm| {r['max_logit_err']:.2e}, same tokens {r['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
