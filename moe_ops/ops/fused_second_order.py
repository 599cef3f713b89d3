"""The double backward of ``moe::expert_up_backward`` and ``moe::expert_down_backward``.

Each backward op is, exactly, a composition of unfused ops (``fused_composition``), and those ops
are differentiable themselves.  So the vector-Jacobian product of a backward op is the one of its
composition, run with the ``moe::`` ops as the steps and differentiated by autograd (higher orders
work too: with ``create_graph`` the recorded graph is differentiable again).  Rare (gradient
penalties, Hessian-vector products), so clarity beats fusion: one mechanism for both ops.
"""

from __future__ import annotations

import torch

from moe_ops.ops import fused_composition


class _Ops:
    """The composition's steps as the differentiable ``moe::`` ops."""

    def __getattr__(self, name):
        return getattr(torch.ops.moe, "grouped_mm" if name == "grouped_mm_any_tail" else name)


_OPS = _Ops()


def _setup(ctx, inputs, output):
    tensors = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in tensors))
    ctx.tensor_positions = tensors
    ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def _vjp(composition, ctx, cotangents):
    inputs = list(ctx.others)
    for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
        inputs[i] = t
    wanted = [i for i in ctx.tensor_positions if ctx.needs_input_grad[i] and inputs[i].is_floating_point()]
    # Without create_graph the recomputed graph stands alone (detached inputs: nothing of the outer
    # graph is traversed or freed); with it, inputs that carry a graph keep it, for the next order.
    create_graph = torch.is_grad_enabled()
    for i in ctx.tensor_positions:
        if not (create_graph and inputs[i].requires_grad):
            inputs[i] = inputs[i].detach().requires_grad_(i in wanted)
    with torch.enable_grad():
        outputs = composition(_OPS, *inputs)
    pairs = [(out, u) for out, u in zip(outputs, cotangents)
             if u is not None and out.requires_grad and out.numel() > 0]
    grads = [None] * len(inputs)
    if pairs and wanted:
        found = torch.autograd.grad([out for out, _ in pairs], [inputs[i] for i in wanted],
                                    [u.reshape(out.shape) for out, u in pairs], allow_unused=True,
                                    create_graph=create_graph)
        for i, g in zip(wanted, found):
            grads[i] = g
    return tuple(grads)


up_setup = down_setup = _setup


def up_double_backward(ctx, *cotangents):
    return _vjp(fused_composition.expert_up_backward, ctx, cotangents)


def down_double_backward(ctx, *cotangents):
    return _vjp(fused_composition.expert_down_backward, ctx, cotangents)
