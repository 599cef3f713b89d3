"""The ``cpu`` backend against the reference, kernel by kernel, where its blocking matters: more rows than
two blocks (several blocks of whole groups), empty groups, masked pairs (rows past the last group),
bias and probabilities, every activation; and garbage offsets stay in bounds."""

from __future__ import annotations

import pytest
import torch

import moe_ops
from moe_ops import registry
from moe_ops.backends import cpu

CPU, REF = registry.get_backend("cpu").kernels, registry.get_backend("reference").kernels


def close(got, want, what=""):
    """float32 with another summation order (per group, against the reference's masked full products)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = want.double().norm()
    if scale == 0:
        assert (got == 0).all(), what
    else:
        assert (got.double() - want.double()).norm() / scale < 1e-5, what


def _routing(T, K, E, seed):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, E, (T, K), generator=g)
    indices[indices == 2] = 3  # expert 2 gets nothing
    indices[::7, 0] = -1  # not routed
    token_mask = torch.rand(T, generator=g) > 0.2
    return indices, token_mask, torch.rand(T, K, generator=g)


@pytest.mark.parametrize("kind", list(moe_ops.GATED))
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_kernels_match_reference_over_several_blocks(kind, bias):
    T, K, E, D, I = 700, 2, 6, 16, 8
    C = I if kind == "relu2" else 2 * I
    indices, token_mask, weights = _routing(T, K, E, seed=1)
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    n = int(offsets[-1])
    assert n >= 2 * cpu.BLOCK_ROWS and n < T * K  # several blocks, and a tail
    assert len(cpu._plan(offsets, T * K)[2]) > 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, D, generator=g)
    w1, w2 = torch.randn(E, D, C, generator=g) * 0.3, torch.randn(E, I, D, generator=g) * 0.3
    b1 = torch.randn(E, C, generator=g) if bias else None
    b2 = torch.randn(E, D, generator=g) if bias else None
    probs = weights.reshape(-1)[pair_of_row]
    act = (kind, 1.702, 7.0, 1.0)
    up = (x, pair_of_row, row_of_pair, offsets, w1, b1)
    h = CPU["expert_up"](*up)
    close(h, REF["expert_up"](*up), "expert_up")
    assert (h[n:] == 0).all()
    down = (h, w2, b2, probs, pair_of_row, row_of_pair, offsets, *act, None)
    close(CPU["expert_down"](*down), REF["expert_down"](*down), "expert_down")
    grad_y = torch.randn(T, D, generator=g)
    grad_h = torch.randn_like(h)
    for op, args in (("expert_down_backward", (grad_y, h, w2, b2, probs, pair_of_row, row_of_pair, offsets, *act)),
                     ("expert_up_backward", (grad_h, x, pair_of_row, row_of_pair, offsets, w1, b1))):
        for name, got, want in zip(("grad_rows", "grad_w", "grad_b", "grad_probs"), CPU[op](*args), REF[op](*args)):
            close(got, want, f"{op}: {name}")
    gemm = (torch.randn(T * K, D, generator=g), w1, offsets)
    close(CPU["grouped_mm"](*gemm), REF["grouped_mm"](*gemm), "grouped_mm")
    wgrad = (gemm[0], torch.randn(T * K, C, generator=g), offsets)
    close(CPU["grouped_mm_wgrad"](*wgrad), REF["grouped_mm_wgrad"](*wgrad), "grouped_mm_wgrad")


def test_garbage_offsets_stay_in_bounds():
    """Decreasing, negative and too large offsets: the ends are clamped and made non-decreasing."""
    a, b = torch.randn(10, 16), torch.randn(4, 16, 8)
    for offsets in ([12, 3, -5, 40], [-1, -1, -1, -1], [3, 3, 2, 10]):
        offs = torch.tensor(offsets, dtype=torch.int32)
        n, ends, _ = cpu._plan(offs, 10)
        assert ends.tolist() == sorted(ends.tolist()) and 0 <= n <= 10
        out = CPU["grouped_mm"](a, b, offs)
        assert out.shape == (10, 8) and out.isfinite().all() and (out[n:] == 0).all()
        assert CPU["grouped_mm_wgrad"](a, torch.randn(10, 8), offs).isfinite().all()
