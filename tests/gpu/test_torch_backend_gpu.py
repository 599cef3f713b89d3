"""The torch backend's reliance on what torch._grouped_mm writes, checked on the card (NaN-poisoned memory).

The backend skips zeroing passes where CUTLASS writes the rows itself: empty groups of the
weight-gradient form come back as exact zeros.  CUTLASS leaves the rows past the last group
unwritten; where they must be zero, ``moe.clear_tail_`` zeroes just those rows
(moe_ops/backends/torch_grouped_mm.py).
"""

import pytest
import torch

import moe_ops

cuda = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() not in ((9, 0), (10, 0)),
                          reason="needs CUDA sm90/sm100 (torch._grouped_mm's fast path)")


def _poison(shape):
    for _ in range(3):  # the caching allocator hands these blocks to the next request of that size
        torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16)


def _offsets(counts):
    return torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)


@cuda
def test_wgrad_of_empty_groups_is_exactly_zero():
    counts = [0, 200, 0, 300, 100, 0, 200, 0]
    a = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16)
    _poison((len(counts), 256, 512))
    with moe_ops.use_backend(grouped_mm_wgrad="torch"):
        w = moe_ops.grouped_mm_wgrad(a, g, _offsets(counts))
    for e, c in enumerate(counts):
        if c == 0:
            assert (w[e] == 0).all(), f"group {e} (no rows) not zero"
    assert w.isfinite().all()


@cuda
def test_grouped_mm_rows_past_the_end_are_zero():
    counts = [0, 200, 0, 300]
    a = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    _poison((1024, 512))
    with moe_ops.use_backend(grouped_mm="torch"):
        out = moe_ops.grouped_mm(a, b, _offsets(counts))
    assert (out[500:] == 0).all() and out[:500].isfinite().all()


@cuda
def test_fused_ops_on_cutlass_match_reference_with_masked_tokens():
    from moe_ops.backends import reference

    torch.manual_seed(0)
    T, K, E, D, I = 4096, 4, 8, 256, 128  # T*K = 16384 rows: the torch backend takes fused ops from there
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    indices = torch.randint(-1, E, (T, K), device="cuda")
    mask = torch.rand(T, device="cuda") > 0.3
    probs_TK = torch.rand(T, K, device="cuda")
    w1 = torch.randn(E, D, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.05
    b1 = torch.randn(E, 2 * I, device="cuda", dtype=torch.bfloat16) * 0.05
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, mask, 0, E)
    probs = probs_TK.reshape(-1)[pair_of_row]
    _poison((T * K, 2 * I))
    with moe_ops.use_backend(expert_up="torch"):
        h = moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1)
    h_ref = reference.KERNELS["expert_up"](x, pair_of_row, row_of_pair, offsets, w1, b1)
    assert h.isfinite().all()
    end = int(offsets[-1])
    assert (h[end:] == 0).all()
    assert ((h.float() - h_ref.float()).norm() / h_ref.float().norm()) < 1e-2
    w2 = torch.randn(E, I, D, device="cuda", dtype=torch.bfloat16) * 0.05
    b2 = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) * 0.05
    down = (h_ref, w2, b2, probs, pair_of_row, row_of_pair, offsets, "swiglu", 1.702, 7.0, 1.0, None)
    with moe_ops.use_backend(expert_down="torch"):
        y = moe_ops.expert_down(*down)
    y_ref = reference.KERNELS["expert_down"](*down)
    assert y.isfinite().all()
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()) < 1e-2


@cuda
def test_mostly_tail_rows_cost_no_gemm_work():
    """The static-shape expert-parallel receiver hands the fused ops mostly tail rows: the GEMM must
    not multiply them (it did when the tail joined the last group), and they must still come back 0."""
    torch.manual_seed(0)
    E, D, N, valid, tail = 8, 2048, 4096, 4096, 12 * 4096
    a = torch.randn(valid + tail, D, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(E, D, N, device="cuda", dtype=torch.bfloat16)
    offsets = _offsets([valid // E] * E)

    def run():
        with moe_ops.use_backend(grouped_mm="torch"):
            return moe_ops.grouped_mm(a, b, offsets)

    def ms(fn, iters=10):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters

    _poison((valid + tail, N))
    out = run()
    assert (out[valid:] == 0).all() and out[:valid].isfinite().all()
    dense = a[:valid]
    all_rows = ms(lambda: torch._grouped_mm(a, b, offs=_offsets([valid // E] * (E - 1) + [valid // E + tail])))
    only_groups = ms(run)
    assert only_groups < 0.5 * all_rows, (only_groups, all_rows)
    assert ((out[:valid].float() - (dense.view(E, valid // E, D).float() @ b.float()).reshape(valid, N)).norm()
            / out[:valid].float().norm()) < 1e-2
