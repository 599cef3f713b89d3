"""The double backward of ``moe::expert_up_backward`` and ``moe::expert_down_backward``.

Each backward op is, exactly, a composition of unfused ops (``fused_composition``), and those ops
are differentiable themselves, so its vector-Jacobian product is autograd over that composition
(``composition_vjp``).  Rare (gradient penalties, Hessian-vector products), so clarity beats fusion:
one mechanism for both ops, no hand-written second-order formulas.
"""

from __future__ import annotations

from moe_ops.ops import fused_composition
from moe_ops.ops.composition_vjp import save_inputs, vjp_of_composition

up_setup = down_setup = save_inputs


def up_double_backward(ctx, *cotangents):
    return vjp_of_composition(fused_composition.expert_up_backward, ctx, cotangents)


def down_double_backward(ctx, *cotangents):
    return vjp_of_composition(fused_composition.expert_down_backward, ctx, cotangents)
