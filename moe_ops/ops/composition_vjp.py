"""The autograd formula of an op that is, exactly, a composition of differentiable ``moe::`` ops.

Used for the rare paths (the backward ops' own gradients: gradient penalties, Hessian-vector
products, opcheck): the composition runs again with the ``moe::`` ops as its steps and autograd
differentiates it.  Higher orders work too: with ``create_graph`` the recorded graph is
differentiable again.  ``composition(k, *inputs)`` takes the op's inputs, ``k`` any object with the
ops as attributes (``fused_composition``'s convention).
"""

from __future__ import annotations

import torch


class _Ops:
    """The composition's steps as the differentiable ``moe::`` ops."""

    def __getattr__(self, name):
        return getattr(torch.ops.moe, "grouped_mm" if name == "grouped_mm_any_tail" else name)


_OPS = _Ops()


def save_inputs(ctx, inputs, output):
    """``setup_context``: keep every input (tensors saved, the rest as they are)."""
    tensors = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor)]
    ctx.save_for_backward(*(inputs[i] for i in tensors))
    ctx.tensor_positions = tensors
    ctx.others = [None if isinstance(t, torch.Tensor) else t for t in inputs]


def vjp_of_composition(composition, ctx, cotangents):
    """The gradients of every input (None where not needed) for the outputs' ``cotangents``."""
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
