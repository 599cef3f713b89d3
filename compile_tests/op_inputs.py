"""Inputs for every ``moe`` op, float inputs requiring grad, for opcheck and gradcheck.

Each routing scenario gives ``indices``, ``token_mask`` and the routed ``row_of_pair`` /
``offsets``; :func:`op_samples` then builds the arguments of every op (and of each optional-
argument variant) on them.
"""

from __future__ import annotations

from typing import Iterator

import torch

import moe_ops
from compile_tests.builders import DEVICE

E, K, C = 3, 2, 8  # groups, slots per token, row width (even: gated activations split it)

# name -> (T, fraction of tokens masked out): a typical batch, one token, nothing routed.
SCENARIOS = {"typical": (5, 0.2), "one_token": (1, 0.0), "all_masked": (3, 1.0)}


def routing(scenario: str, seed: int = 0):
    T, masked = SCENARIOS[scenario]
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(-1, E, (T, K), generator=g).to(DEVICE)
    token_mask = (torch.rand(T, generator=g) >= masked).to(DEVICE)
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    return indices, token_mask, pair_of_row, row_of_pair, offsets


def op_samples(scenario: str, dtype: torch.dtype, seed: int = 0) -> Iterator[tuple[str, object, tuple]]:
    """``(id, op, args)`` for every op and variant."""
    indices, token_mask, pair_of_row, row_of_pair, offsets = routing(scenario, seed)
    T = indices.shape[0]
    R = T * K
    g = torch.Generator().manual_seed(seed + 1)

    def leaf(*shape, positive=False):
        t = torch.rand(*shape, generator=g) if positive else torch.randn(*shape, generator=g)
        return t.to(DEVICE, dtype).requires_grad_()

    ops = torch.ops.moe
    yield ("check_expert_inputs", ops.check_expert_inputs.default,
           (leaf(T, C), token_mask, leaf(T, K, positive=True), indices, C))
    yield "route", ops.route.default, (indices, token_mask, 0, E)
    yield "route-local_slice", ops.route.default, (indices, token_mask, 1, 1)
    yield "gather", ops.gather.default, (leaf(T, C), row_of_pair, offsets, leaf(T, K, positive=True))
    yield "gather-no_weights", ops.gather.default, (leaf(T, C), row_of_pair, offsets, None)
    yield "combine", ops.combine.default, (leaf(R, C), row_of_pair, offsets, leaf(T, K, positive=True))
    yield "combine-no_weights", ops.combine.default, (leaf(R, C), row_of_pair, offsets, None)
    yield "pair_dot", ops.pair_dot.default, (leaf(T, C), leaf(R, C), row_of_pair, offsets)
    yield "grouped_mm", ops.grouped_mm.default, (leaf(R, C), leaf(E, C, C + 2), offsets)
    yield "grouped_mm_wgrad", ops.grouped_mm_wgrad.default, (leaf(R, C), leaf(R, C + 2), offsets)
    for name, probs in (("", leaf(R, positive=True)), ("-probs_column", leaf(R, 1, positive=True)),
                        ("-no_probs", None)):
        yield f"add_expert_bias{name}", ops.add_expert_bias.default, (leaf(R, C), leaf(E, C), offsets, probs)
        yield (f"expert_bias_backward{name}", ops.expert_bias_backward.default,
               (leaf(R, C), leaf(E, C), offsets, probs))
    for kind in moe_ops.GATED:
        width = C // 2 if moe_ops.GATED[kind] else C
        for name, probs in (("", leaf(R, positive=True)), ("-no_probs", None)):
            params = (kind, 1.702, 7.0, 1.0)
            # 3 * randn: some gate/up values pass quick_geglu's clamp at 7.
            h = (3 * leaf(R, C)).detach().requires_grad_()
            yield f"activation-{kind}{name}", ops.activation.default, (h, probs, *params)
            yield (f"activation_backward-{kind}{name}", ops.activation_backward.default,
                   (leaf(R, width), h, probs, *params))
            yield (f"activation_backward_with_output-{kind}{name}", ops.activation_backward_with_output.default,
                   (leaf(R, width), h, probs, *params))
            yield f"activation_mm-{kind}{name}", ops.activation_mm.default, (h, probs, leaf(E, width, 3), offsets, *params)
    # The fused steps (moe_ops/ops/fused.py): x [T, C] -> h [R, up] and h -> y [T, C].
    routed = (pair_of_row, row_of_pair, offsets)
    for name, b1 in (("", leaf(E, 2 * C)), ("-no_bias", None)):
        x, w1 = leaf(T, C), leaf(E, C, 2 * C)
        yield f"expert_up{name}", ops.expert_up.default, (x, *routed, w1, b1)
        yield f"expert_up_backward{name}", ops.expert_up_backward.default, (leaf(R, 2 * C), x, *routed, w1, b1)
    for kind in moe_ops.GATED:
        up = 2 * C if moe_ops.GATED[kind] else C
        width = up // 2 if moe_ops.GATED[kind] else up
        params = (kind, 1.702, 7.0, 1.0)
        for name, b2, probs in (("", leaf(E, C), leaf(R, positive=True)), ("-no_probs", leaf(E, C), None),
                                ("-no_bias", None, leaf(R, positive=True))):
            # 3 * randn: some gate/up values pass quick_geglu's clamp at 7.
            h, w2 = (3 * leaf(R, up)).detach().requires_grad_(), leaf(E, width, C)
            yield f"expert_down-{kind}{name}", ops.expert_down.default, (h, w2, b2, probs, *routed, *params, None)
            yield (f"expert_down-{kind}{name}-float32_out", ops.expert_down.default,
                   (h, w2, b2, probs, *routed, *params, torch.float32))
            yield (f"expert_down_backward-{kind}{name}", ops.expert_down_backward.default,
                   (leaf(T, C), h, w2, b2, probs, *routed, *params))
    yield "clear_tail_", ops.clear_tail_.default, (leaf(R, C).detach(), offsets)  # in place: no autograd
    # Rows from several sources (expert parallelism's peer loads). No autograd formula of their own
    # (the EP transport's ops define it), so their inputs do not require grad.
    sources = [leaf(r, C).detach() for r in (4, T, 2)]
    index = list(torch.randint(0, 2, (3, 3), generator=g).to(DEVICE))
    counts = [torch.tensor([c], device=DEVICE) for c in (3, min(T, 2), 1)]
    yield "gather_from", ops.gather_from.default, (sources, index, counts)
    row = torch.randint(-1, 2, (T, 3), generator=g).to(DEVICE)
    yield "sum_from", ops.sum_from.default, (sources, row, None)
    yield "sum_from-float32_out", ops.sum_from.default, (sources, row, torch.float32)
    yield "put_to", ops.put_to.default, (leaf(6, C).detach(), [torch.zeros(2, C, device=DEVICE, dtype=dtype)
                                                                for _ in range(3)])
