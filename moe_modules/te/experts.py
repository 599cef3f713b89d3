"""The body of GroupedExpertsTE's opaque op: Transformer Engine's two ``GroupedLinear`` GEMMs on the
rows a layer's block sorted by local expert.

``moe::opaque_forward`` (``moe_ops.opaque_call``) runs :class:`_TEExperts` by name, eagerly and with
autograd recording, so Transformer Engine's own backward (FP8 scaling state included) is replayed
by ``moe::opaque_backward``; the layer is found through a handle tensor among the inputs
(:data:`LAYERS`), so every layer of a model shares one compiled graph.  Inside: the per-expert
counts are read on the host (TE wants host split sizes), rows are padded per expert to the FP8
alignment when a TE FP8 autocast is active, and experts without rows get exact zero gradients.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import moe_ops

LAYERS = moe_ops.ObjectRegistry("GroupedExpertsTE")
OPAQUE_NAME = "moe_modules.te.GroupedExpertsTE"


class _TEExperts:
    """The opaque function: ``[layer handle, rows [N, D], probs [N], tokens_per_expert [E_local],
    *W1, *b1, *W2, *b2] -> (out [N, D],)`` with rows sorted by local expert (rows past the counts
    are ignored and give 0)."""

    def forward(self, inputs: list[Tensor]) -> moe_ops.OpaqueResult:
        handle, rows, probs, tokens_per_expert, *params = inputs
        check_rows(rows, params)
        return experts_on_sorted_rows(LAYERS.lookup(handle), rows, probs, tokens_per_expert, params)

    def fake(self, inputs: list[Tensor]) -> tuple[Tensor]:
        rows = inputs[1]
        check_rows(rows, inputs[LEADING_INPUTS:])
        return (torch.empty_like(rows, memory_format=torch.contiguous_format),)


def check_rows(rows: Tensor, params: Sequence[Tensor]) -> None:
    """The module's input (its rows, in ``x``'s dtype) against its parameters, in the op and its fake
    alike: one device, and one dtype outside ``torch.autocast`` (under it Transformer Engine casts)."""
    w = params[0]
    if rows.device != w.device:
        raise ValueError(f"x: expected device {w.device} (the device of the expert parameters), got {rows.device}")
    if rows.dtype != w.dtype and not torch.is_autocast_enabled(rows.device.type):
        raise TypeError(f"x: expected dtype {w.dtype} (the dtype of the expert parameters, or any under "
                        f"torch.autocast), got {rows.dtype}")


LEADING_INPUTS = 4  # handle, rows, probs, tokens_per_expert


moe_ops.register_opaque_function(OPAQUE_NAME, _TEExperts())


@contextlib.contextmanager
def _swapped_params(linear: nn.Module, weights: Sequence[Tensor], biases: Sequence[Tensor]):
    """Run ``linear`` on the given per-expert tensors (the op's autograd-attached inputs) instead of
    its own parameters; its FP8 metadata and workspaces stay the module's own."""
    params = linear._parameters
    saved = dict(params)
    try:
        for i, w in enumerate(weights):
            params[f"weight{i}"] = w
        for i, b in enumerate(biases):
            params[f"bias{i}"] = b
        yield
    finally:
        for name, value in saved.items():
            params[name] = value


def _pad_groups(x: Tensor, probs: Tensor, counts: list[int], align: int):
    """Pad every expert's rows to a multiple of ``align`` with zero rows (probability 0).

    Returns the padded rows and probs, the padded counts, and ``keep [valid]``: the padded
    position of each original row.  Zero rows add nothing to weight gradients and their
    outputs are dropped, so results equal the unpadded ones.
    """
    padded = [-(-c // align) * align for c in counts]
    starts = itertools.accumulate([0] + counts[:-1])
    padded_starts = itertools.accumulate([0] + padded[:-1])
    shift = [p0 - c0 for p0, c0 in zip(padded_starts, starts)]
    device = x.device
    keep = torch.arange(x.shape[0], device=device) + torch.repeat_interleave(
        torch.tensor(shift, device=device), torch.tensor(counts, device=device), output_size=x.shape[0])
    total = sum(padded)
    x_pad = x.new_zeros(total, x.shape[1]).index_copy(0, keep, x)
    p_pad = probs.new_zeros(total, *probs.shape[1:]).index_copy(0, keep, probs)
    return x_pad, p_pad, padded, keep


def _zero_experts(grads: list, empty: list[int], per_group: int, num_groups: int) -> None:
    """Exact zeros for the parameters of experts with no rows, whatever Transformer Engine left in its
    (uninitialised) weight-gradient buffer for a GEMM with no rows; in place, so packed buffers stay packed."""
    for group in range(num_groups):
        for e in empty:
            i = LEADING_INPUTS + group * per_group + e
            g = grads[i]
            if g is None:
                continue
            if g.is_contiguous():
                g.zero_()
            else:
                grads[i] = torch.zeros_like(g)


def experts_on_sorted_rows(layer, rows: Tensor, probs: Tensor, tokens_per_expert: Tensor,
                           params: Sequence[Tensor]) -> moe_ops.OpaqueResult:
    """Inside the opaque op (eager, autograd recording), for the GroupedExpertsTE ``layer``: rows sorted by
    local expert -> expert outputs, ``[N, D]``, 0 past the valid rows; experts without rows get zero
    parameter gradients."""
    E, nb = layer.num_local_experts, (layer.num_local_experts if layer.expert_bias else 0)
    w1, b1 = params[:E], params[E:E + nb]
    w2, b2 = params[E + nb:2 * E + nb], params[2 * E + nb:]
    counts = [int(c) for c in tokens_per_expert.tolist()]  # the one host sync: TE wants host splits
    valid, N = sum(counts), rows.shape[0]
    x, p = rows[:valid], probs[:valid]
    align = layer._te.row_alignment()
    split, keep = counts, None
    if valid == 0:
        # Still run the GEMMs (on one group of zero rows): every rank calls Transformer Engine the same
        # way, so FP8 amax bookkeeping stays in step; zero rows change no gradient.
        split, keep = [max(align, 1)] + [0] * (E - 1), torch.zeros(0, dtype=torch.int64, device=x.device)
        x, p = x.new_zeros(split[0], x.shape[1]), p.new_zeros(split[0], *p.shape[1:])
    elif align > 1:
        x, p, split, keep = _pad_groups(x, p, counts, align)
    with _swapped_params(layer.gate_up_linear, w1, b1), _swapped_params(layer.down_linear, w2, b2):
        h = layer.gate_up_linear(x, split)
        a = moe_ops.activation(h, p, layer.activation.kind, layer.activation.alpha, layer.activation.limit,
                               layer.activation.linear_offset)
        out = layer.down_linear(a, split)
    if layer.expert_bias:
        out = out[0]  # return_bias=True: TE left the down bias out of its GEMM
        offsets = torch.tensor(list(itertools.accumulate(split)), dtype=torch.int32, device=out.device)
        out = moe_ops.add_expert_bias(out, torch.stack(list(b2)), offsets, p)
    if keep is not None:
        out = out.index_select(0, keep)
    empty = [e for e, count in enumerate(counts) if count == 0]
    fix = functools.partial(_zero_experts, empty=empty, per_group=E, num_groups=len(params) // E) if empty else None
    return moe_ops.OpaqueResult([F.pad(out.to(rows.dtype), (0, 0, 0, N - valid))], fix)
