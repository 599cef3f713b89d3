"""moe::check_expert_inputs — the expert block's four inputs checked together, on every path.

Eagerly the check is plain Python (:func:`moe_ops._checks.expert_inputs`) and the inputs come back
as they are.  Under torch.compile or torch.export a size relation asserted while tracing becomes an
assumption of the graph: Dynamo turns it into a guard (with unbacked token counts, the README's
recipe, the guard then fails on the frame that made it), a fake that finds it false fails the trace
inside Dynamo's own error, and an exported program asserts it before running.  So a traced call
goes through this op instead.  Its fake checks only what a graph is specialised on (ranks, dtypes,
devices, the model dim) and returns ``token_mask``, ``weights`` and ``indices`` as new tensors
whose token count *is* ``x``'s (and whose K is ``weights``'), so everything after it agrees by
construction and the graph assumes nothing about the callers' sizes.  A call whose token counts or
K differ runs the graph, and the op's kernel raises the eager ``ValueError`` with the actual sizes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from moe_ops import _checks
from moe_ops._library import define

_is_compiling = torch.compiler.is_compiling


def _kernel(x, token_mask, weights, indices, dim=None):
    _checks.expert_sizes(x, token_mask, weights, indices)  # after the op's validate (_checks.expert_tensors)
    # Outputs must not alias inputs: copies (T*K values, once per traced call).  The float output first:
    # opcheck's AOT check sums the outputs into one tensor in place.
    return weights.clone(), token_mask.clone(), indices.clone()


def _fake(x, token_mask, weights, indices, dim=None):
    T, K = x.shape[0], weights.shape[1]
    return weights.new_empty(T, K), token_mask.new_empty(T), indices.new_empty(T, K)


def _backward(ctx, grad_weights, grad_mask, grad_indices):
    return None, None, grad_weights, None, None


_check = define("check_expert_inputs(Tensor x, Tensor token_mask, Tensor weights, Tensor indices, SymInt? dim=None)"
                " -> (Tensor, Tensor, Tensor)", validate=_checks.expert_tensors, fake=_fake, kernel=_kernel,
                backward=_backward)


def check_expert_inputs(x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor,
                        dim: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Check the expert block's inputs and return ``(token_mask, weights, indices)`` to use after it.

    ``x [T, D]`` float (``D == dim`` when given), ``token_mask [T]`` bool, ``weights [T, K]`` float,
    ``indices [T, K]`` int32/int64, on one device; otherwise ``ValueError`` / ``TypeError`` naming the
    argument, the expected and the actual value.  Eagerly the three come back unchanged.  Traced
    (torch.compile, torch.export) they come back bound to ``x``'s token count, and a compiled or
    exported graph called with token counts or K that differ raises the same error when it runs
    (a different model dim, dtype or rank is a different graph: the trace fails, the error in
    Dynamo's chain).
    """
    if _is_compiling():
        weights, token_mask, indices = _check(x, token_mask, weights, indices, dim)
        return token_mask, weights, indices
    _checks.expert_inputs(x, token_mask, weights, indices, dim)
    return token_mask, weights, indices
