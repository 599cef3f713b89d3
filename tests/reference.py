"""A float64 oracle for the expert block and for each ``moe`` op, written from SPEC.md §4 and DESIGN.md.

Independent of ``moe_ops``: plain loops over tokens, pairs and rows, so that a
vectorisation or sorting bug in the library cannot hide in the reference too.
Every function takes float tensors of any dtype, computes in float64 and returns
float64 (so autograd through it gives float64 reference gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moe_modules import reference as block_reference


def f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """float64 CPU copy of the data, cut from autograd (the reference always runs on the CPU)."""
    return None if t is None else t.detach().to("cpu", torch.float64)


def f64_keep(t: torch.Tensor) -> torch.Tensor:
    """float64 without detaching (keeps autograd to a float64 leaf)."""
    return t if t.dtype == torch.float64 else t.to(torch.float64)


# ---- activations and the expert block (SPEC §4) -------------------------------------------
# The float64 oracle of the shipped `moe-ops check` (moe_modules/reference.py: plain PyTorch,
# independent of the moe ops); the per-op references below are this file's own.

act = block_reference.activation
expert_block = block_reference.expert_block


def whole_expert(x, w1, w2, b1, b2, kind, alpha=1.702, limit=7.0, linear_offset=1.0):
    """One expert on rows ``x [N, D]``: ``act(x @ W1 + b1) @ W2 + b2`` in float64."""
    h = f64_keep(x) @ f64_keep(w1)
    if b1 is not None:
        h = h + f64_keep(b1)
    out = act(h, kind, alpha, limit, linear_offset) @ f64_keep(w2)
    return out if b2 is None else out + f64_keep(b2)


# ---- routing ----------------------------------------------------------------------------


@dataclass
class RouteRef:
    pair_of_valid_row: list  # pair ids t*K+k of the valid rows, in order
    invalid_pairs: set  # pair ids sorted past the last group (their order is not specified)
    tokens_per_expert: list
    offsets: list  # cumulative ends

    def row_of_pair(self, T: int, K: int) -> torch.Tensor:
        """One valid ``[T, K]`` row assignment: valid pairs as specified, the rest in pair order."""
        order = self.pair_of_valid_row + sorted(self.invalid_pairs)
        rop = torch.empty(T * K, dtype=torch.int64)
        for row, pair in enumerate(order):
            rop[pair] = row
        return rop.view(T, K)


def route(indices, token_mask, expert_start, num_experts) -> RouteRef:
    """Stable token-major bucket sort of the (token, slot) pairs by local expert."""
    T, K = indices.shape
    buckets = [[] for _ in range(num_experts)]
    invalid = set()
    for t in range(T):
        for k in range(K):
            e = int(indices[t, k]) - expert_start
            if bool(token_mask[t]) and 0 <= e < num_experts:
                buckets[e].append(t * K + k)
            else:
                invalid.add(t * K + k)
    counts = [len(b) for b in buckets]
    offsets, end = [], 0
    for c in counts:
        end += c
        offsets.append(end)
    return RouteRef([p for b in buckets for p in b], invalid, counts, offsets)


# ---- row movement: gather / combine / pair_dot ------------------------------------------


def _valid(row: int, offsets) -> bool:
    return row < int(offsets[-1])


def gather(x, row_of_pair, offsets, weights=None, num_rows=None):
    T, K = row_of_pair.shape
    M = T * K if num_rows is None else num_rows
    out = torch.zeros(M, x.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_of_pair[t, k])
            if _valid(r, offsets) and r < M:
                out[r] = f64(x[t]) * (1.0 if weights is None else float(weights[t, k]))
    return out


def combine(rows, row_of_pair, offsets, weights=None):
    T, K = row_of_pair.shape
    out = torch.zeros(T, rows.shape[1], dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_of_pair[t, k])
            if _valid(r, offsets) and r < rows.shape[0]:
                out[t] += f64(rows[r]) * (1.0 if weights is None else float(weights[t, k]))
    return out


def pair_dot(a, rows, row_of_pair, offsets):
    T, K = row_of_pair.shape
    out = torch.zeros(T, K, dtype=torch.float64)
    for t in range(T):
        for k in range(K):
            r = int(row_of_pair[t, k])
            if _valid(r, offsets) and r < rows.shape[0]:
                out[t, k] = torch.dot(f64(a[t]), f64(rows[r]))
    return out


# ---- grouped GEMMs and biases -----------------------------------------------------------


def group_ranges(offsets):
    """``[(g, start, end)]`` from cumulative end offsets."""
    start, ranges = 0, []
    for g, end in enumerate(int(o) for o in offsets):
        ranges.append((g, start, end))
        start = end
    return ranges


def grouped_mm(a, b, offsets):
    out = torch.zeros(a.shape[0], b.shape[2], dtype=torch.float64)
    for g, start, end in group_ranges(offsets):
        for r in range(start, end):
            out[r] = f64(a[r]) @ f64(b[g])
    return out


def grouped_mm_wgrad(a, grad, offsets):
    out = torch.zeros(len(offsets), a.shape[1], grad.shape[1], dtype=torch.float64)
    for g, start, end in group_ranges(offsets):
        for r in range(start, end):
            out[g] += torch.outer(f64(a[r]), f64(grad[r]))
    return out


def _row_prob(probs, r) -> float:
    return 1.0 if probs is None else float(probs.reshape(-1)[r])


def add_expert_bias(h, bias, offsets, probs=None):
    out = f64(h).clone()
    for g, start, end in group_ranges(offsets):
        for r in range(start, end):
            out[r] += _row_prob(probs, r) * f64(bias[g])
    return out


def expert_bias_backward(grad, bias, offsets, probs=None):
    """``(grad_bias, grad_probs)``; ``grad_probs`` is None when ``probs`` is None."""
    grad_bias = torch.zeros(bias.shape, dtype=torch.float64)
    grad_probs = None if probs is None else torch.zeros(probs.shape[0], dtype=torch.float64)
    for g, start, end in group_ranges(offsets):
        for r in range(start, end):
            grad_bias[g] += _row_prob(probs, r) * f64(grad[r])
            if grad_probs is not None:
                grad_probs[r] = torch.dot(f64(grad[r]), f64(bias[g]))
    if grad_probs is not None:
        grad_probs = grad_probs.reshape(probs.shape)
    return grad_bias, grad_probs


# ---- probability-weighted activation ----------------------------------------------------


def activation(h, probs, kind, alpha=1.702, limit=7.0, linear_offset=1.0):
    out = act(f64_keep(h), kind, alpha, limit, linear_offset)
    return out if probs is None else out * f64_keep(probs).reshape(-1, 1)


def activation_backward(grad, h, probs, kind, alpha=1.702, limit=7.0, linear_offset=1.0):
    """``(grad_h, grad_probs)`` by float64 autograd through :func:`activation`; ``grad_probs`` None without probs."""
    h64 = f64(h).requires_grad_()
    p64 = None if probs is None else f64(probs).requires_grad_()
    out = activation(h64, p64, kind, alpha, limit, linear_offset)
    inputs = [h64] if p64 is None else [h64, p64]
    grads = torch.autograd.grad(out, inputs, f64(grad))
    return grads[0], (grads[1] if p64 is not None else None)


# ---- comparing with the reference -------------------------------------------------------

# ||a - b|| / ||b|| bound per result dtype: float64 and float32 results are accumulated in
# float32 or better; a bfloat16 result is rounded once (relative error <= 2**-8 per element).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = f64(actual), f64(expected)
    return float((a - b).norm() / b.norm()) if b.norm() > 0 else float(a.norm())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "result") -> None:
    """Same shape, relative error under ``tol``, and exact zeros wherever the reference is exactly zero
    (rows of invalid pairs, empty groups, masked tokens: structural zeros, never rounding)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = f64(actual)
    b = f64(expected)
    assert not a.isnan().any(), f"{what}: NaN in the result"
    zeros = b == 0
    assert (a[zeros] == 0).all(), f"{what}: nonzero where the reference is exactly 0"
    err = rel_err(a, b)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"
