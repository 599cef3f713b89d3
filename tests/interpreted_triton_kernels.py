"""Every Triton kernel against the reference backend, on the CPU in Triton's interpreter.

Run by ``test_triton_interpreter.py`` in a fresh process with ``TRITON_INTERPRET=1`` set
from the start: Triton decides between compiled and interpreted functions when it is first
imported, and anything that imports ``torch._dynamo`` imports Triton, so in a shared test
process the interpreter could not be switched on afterwards.

``TRITON_INTERPRET=1`` is set for each test only (the triton backend then accepts CPU
tensors and is forced per op); the kernels are decorated — as interpreted functions — when
they are first imported, which happens inside these tests.  Every load and store is checked
to stay inside the tensors handed to the kernel (the interpreter itself does not check).

Shapes are tiny (the interpreter runs each program in Python) but keep every structural case:
skewed routing, experts without tokens, masked / -1 / non-local / out-of-range pairs, widths
that are not multiples of the (16-wide, in the interpreter) tiles, every activation, with
and without bias and probabilities, float32 and bfloat16.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

import reference as f64_reference
import moe_ops
from moe_ops import registry, use_backend
from moe_ops.backends import reference as ref_backend

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")

E, D, I = 5, 40, 24  # D, I: 2.5 and 1.5 interpreter tiles (tails, like 2880 with 128-wide tiles)
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def dtype_id(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else None


# ---- the interpreter, with bounds checks ------------------------------------------------------


class _Bounds:
    """Address ranges of the tensors of the running launch; every active pointer must be inside one."""

    ranges: list[tuple[int, int]] = []

    @classmethod
    def check(cls, ptrs, mask, what):
        addresses = ptrs.data[mask.data.astype(bool)] if mask is not None else ptrs.data.ravel()
        if addresses.size == 0:
            return
        size = np.dtype(_np_dtype(ptrs.get_element_ty())).itemsize
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in cls.ranges:
            inside |= (addresses >= lo) & (addresses + size <= hi)
        assert inside.all(), f"out-of-bounds {what} at {int((~inside).sum())} lanes"


def _np_dtype(tt):
    from triton.runtime.interpreter import _get_np_dtype

    return _get_np_dtype(tt)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    common = sys.modules.get("moe_ops.backends.triton_kernels._common")
    if common is not None and not common.INTERPRET:
        pytest.skip("the Triton kernels were compiled for the GPU in this process (tests/gpu/test_triton_gpu.py)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from triton.runtime import interpreter as interp

    init_args = interp.GridExecutor._init_args_hst

    def recording_init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init_args(self, args_dev, kwargs)
        _Bounds.ranges = [
            (t.untyped_storage().data_ptr(), t.untyped_storage().data_ptr() + t.untyped_storage().nbytes())
            for t in [*args_hst, *kwargs_hst.values()] if isinstance(t, torch.Tensor)
        ]
        return args_hst, kwargs_hst

    load, store = interp.InterpreterBuilder.create_masked_load, interp.InterpreterBuilder.create_masked_store

    def checked_load(self, ptrs, mask, *args):
        _Bounds.check(ptrs, mask, "load")
        return load(self, ptrs, mask, *args)

    def checked_store(self, ptrs, value, mask, *args):
        _Bounds.check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *args)

    monkeypatch.setattr(interp.GridExecutor, "_init_args_hst", recording_init_args)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_load", checked_load)
    monkeypatch.setattr(interp.InterpreterBuilder, "create_masked_store", checked_store)
    yield


def triton_and_reference(op: str, *args):
    """``torch.ops.moe.<op>`` forced to the triton backend, and the reference kernel on the same inputs."""
    with use_backend(**{op: "triton"}):
        got = getattr(torch.ops.moe, op)(*args)
    return got, ref_backend.KERNELS[op](*args)


def assert_close(got, want, dtype, what=""):
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, dtype, f"{what}[{i}]")
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    if want.dtype in (torch.int32, torch.int64, torch.bool):
        assert torch.equal(got, want), what
        return
    scale = max(want.detach().abs().max().item(), 1.0) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype], msg=what)


# ---- routing cases ------------------------------------------------------------------------------


def make_routing(case: str, T=13, K=3, experts=E, dtype=torch.int64):
    gen = torch.Generator().manual_seed(7)
    indices = torch.randint(0, experts, (T, K), generator=gen)
    mask = torch.ones(T, dtype=torch.bool)
    start = 0
    if case == "skewed":  # most pairs to expert 1, experts 0 and E-1 empty
        indices = torch.where(torch.rand(T, K, generator=gen) < 0.7, 1, torch.randint(1, experts - 1, (T, K), generator=gen))
    elif case == "mixed":  # masked tokens, -1, out-of-range and negative ids
        indices[0, 0], indices[1, 1], indices[2, 2], indices[3, 0] = -1, experts, -5, 10**6
        mask[4] = mask[7] = False
    elif case == "local_range":  # this rank owns experts 2..4 of 0..7
        indices = torch.randint(0, 8, (T, K), generator=gen)
        start, experts = 2, 3
    elif case == "all_masked":
        mask[:] = False
    return indices.to(dtype), mask, start, experts


ROUTING_CASES = ["uniform", "skewed", "mixed", "local_range", "all_masked"]


def routed(case="skewed", T=13, K=3):
    """Routing computed by the reference (every op is tested on its own inputs)."""
    indices, mask, start, experts = make_routing(case, T, K)
    pair_of_row, row_of_pair, _, offsets = ref_backend.route(indices, mask, start, experts)
    return pair_of_row, row_of_pair, offsets, experts


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype)


# ---- route --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ROUTING_CASES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=dtype_id)
def test_route(case, index_dtype):
    args = make_routing(case, dtype=index_dtype)
    got, want = triton_and_reference("route", *args)
    assert_close(got, want, torch.float32)


def test_route_many_blocks():
    # 230 pairs: 8 interpreter blocks of 32 pairs, 2 steps of the one-program scan
    args = make_routing("mixed", T=77, K=3, experts=6)
    got, want = triton_and_reference("route", *args)
    assert_close(got, want, torch.float32)


# ---- gather / combine / pair_dot ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("case", ["skewed", "mixed"])
def test_gather_combine_pair_dot(dtype, weighted, case):
    _, row_of_pair, offsets, _ = routed(case)
    T, K = row_of_pair.shape
    weights = torch.rand(T, K, dtype=torch.float64).to(dtype) if weighted else None
    x = randn(T, D, dtype=dtype)
    rows = randn(T * K, D, dtype=dtype)
    rows[offsets[-1]:] = float("nan")  # rows of no group must never be read
    assert_close(*triton_and_reference("gather", x, row_of_pair, offsets, weights), dtype, "gather")
    assert_close(*triton_and_reference("combine", rows, row_of_pair, offsets, weights), dtype, "combine")
    assert_close(*triton_and_reference("pair_dot", x, rows, row_of_pair, offsets), dtype, "pair_dot")


@pytest.mark.parametrize("keep", ["valid", "half"])
def test_gather_combine_pair_dot_on_fewer_rows(keep):
    """Expert parallelism's buffers: only the first M rows (pairs past them are not valid)."""
    _, row_of_pair, offsets, _ = routed("mixed")
    T, K = row_of_pair.shape
    M = int(offsets[-1]) if keep == "valid" else int(offsets[-1]) // 2
    weights = torch.rand(T, K, dtype=torch.float64).to(torch.float32)
    x = randn(T, D)
    rows = randn(M, D)
    got, want = triton_and_reference("gather", x, row_of_pair, offsets, weights, M)
    assert got.shape == (M, D)
    assert_close(got, want, torch.float32, "gather")
    assert_close(*triton_and_reference("combine", rows, row_of_pair, offsets, weights), torch.float32, "combine")
    assert_close(*triton_and_reference("pair_dot", x, rows, row_of_pair, offsets), torch.float32, "pair_dot")


@pytest.mark.parametrize("case", ["skewed", "mixed", "all_masked"])
def test_clear_tail(case):
    """Zeroes exactly the rows from offsets[-1] on, in place (here with more rows than T*K too)."""
    _, _, offsets, _ = routed(case)
    rows = randn(int(offsets[-1]) + 21, D)
    want = rows.clone()
    ref_backend.clear_tail_(want, offsets)
    with use_backend(clear_tail_="triton"):
        assert moe_ops.clear_tail_(rows, offsets) is rows
    assert torch.equal(rows, want)
    assert not rows[int(offsets[-1]):].any() and torch.equal(rows[:int(offsets[-1])], want[:int(offsets[-1])])


# ---- rows from several sources (expert parallelism's peer loads) -------------------------------


def peer_sources(dtype, rows=(6, 1, 9)):
    """Three sources of different lengths (each standing in for another GPU's buffer)."""
    return [randn(r, D, dtype=dtype) for r in rows]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gather_from_and_sum_from(dtype):
    gen = torch.Generator().manual_seed(3)
    sources = peer_sources(dtype)
    capacity = 11  # more than a 8-row program block: two blocks per source
    # One index and count tensor per source; some entries outside their source.
    index = [torch.randint(-2, 12, (capacity,), generator=gen) for _ in range(3)]
    counts = [torch.tensor([c]) for c in (4, 0, 11)]
    assert_close(*triton_and_reference("gather_from", sources, index, counts), dtype, "gather_from")
    row = torch.randint(-1, 10, (13, 3), generator=gen)
    for out_dtype in (None, torch.float32):
        assert_close(*triton_and_reference("sum_from", sources, row, out_dtype), dtype, f"sum_from {out_dtype}")


@pytest.mark.parametrize("dests", [3, 8])
def test_put_to(dests):
    """Each block of rows into its own destination, in place (blocks of 11 rows: two program blocks)."""
    rows = randn(dests * 11, D)
    got = [torch.full((11, D), float("nan")) for _ in range(dests)]
    with use_backend(put_to="triton"):
        moe_ops.put_to(rows, got)
    for s, dest in enumerate(got):
        assert torch.equal(dest, rows[s * 11:(s + 1) * 11])


def test_gather_from_and_sum_from_with_eight_sources():
    sources = peer_sources(torch.float32, rows=(3, 5, 2, 7, 1, 4, 6, 2))
    index = list(torch.arange(3 * 8).reshape(8, 3) % 5)
    counts = [torch.tensor([c], dtype=torch.int32) for c in (3, 2, 1, 0, 3, 3, 2, 1)]
    assert_close(*triton_and_reference("gather_from", sources, index, counts), torch.float32, "gather_from")
    row = torch.arange(5 * 8).reshape(5, 8) % 4 - 1
    assert_close(*triton_and_reference("sum_from", sources, row, None), torch.float32, "sum_from")


# ---- grouped GEMMs ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ["skewed", "mixed", "all_masked"])
def test_grouped_mm(dtype, case):
    _, row_of_pair, offsets, experts = routed(case)
    M = row_of_pair.numel()
    a = randn(M, D, dtype=dtype)
    a[offsets[-1]:] = float("nan")
    b = randn(experts, D, I, dtype=dtype, scale=D ** -0.5)
    got, want = triton_and_reference("grouped_mm", a, b, offsets)
    assert_close(got, want, dtype)
    assert (got[offsets[-1]:] == 0).all()
    # the dgrad form: b transposed by strides, read without a copy
    bt = randn(experts, I, D, dtype=dtype).transpose(1, 2)
    assert_close(*triton_and_reference("grouped_mm", a, bt, offsets), dtype, "transposed b")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ["skewed", "mixed"])
def test_grouped_mm_wgrad(dtype, case):
    _, row_of_pair, offsets, experts = routed(case)
    M = row_of_pair.numel()
    a, grad = randn(M, D, dtype=dtype), randn(M, I, dtype=dtype)
    a[offsets[-1]:] = grad[offsets[-1]:] = float("nan")
    got, want = triton_and_reference("grouped_mm_wgrad", a, grad, offsets)
    assert_close(got, want, dtype)
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    assert (got[counts == 0] == 0).all(), "experts without tokens get exactly zero"


# ---- expert bias ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("probs_shape", ["none", "N", "N1"])
def test_expert_bias(dtype, probs_shape):
    _, row_of_pair, offsets, experts = routed("mixed")
    M = row_of_pair.numel()
    h, bias = randn(M, D, dtype=dtype), randn(experts, D, dtype=dtype)
    probs = None if probs_shape == "none" else torch.rand(M, dtype=torch.float64).to(dtype)
    if probs_shape == "N1":
        probs = probs.unsqueeze(1)
    assert_close(*triton_and_reference("add_expert_bias", h, bias, offsets, probs), dtype, "add")
    grad = randn(M, D, dtype=dtype)
    grad[offsets[-1]:] = float("nan")
    assert_close(*triton_and_reference("expert_bias_backward", grad, bias, offsets, probs), dtype, "backward")


# ---- activations -----------------------------------------------------------------------------

ACTIVATIONS = [("swiglu", 7.0), ("quick_geglu", 7.0), ("quick_geglu", None), ("swigluoai", 7.0), ("geglu", None),
               ("relu2", None)]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_probs", [False, True])
@pytest.mark.parametrize("kind,limit", ACTIVATIONS)
def test_activation(kind, limit, with_probs, dtype):
    rows = 19
    width = I if kind == "relu2" else 2 * I
    h = randn(rows, width, dtype=dtype, scale=4.0)  # some quick_geglu inputs beyond the limit 7
    probs = torch.rand(rows, dtype=torch.float64).to(dtype) if with_probs else None
    params = (kind, 1.702, limit, 1.0)
    assert_close(*triton_and_reference("activation", h, probs, *params), dtype, "forward")
    grad = randn(rows, I, dtype=dtype)
    assert_close(*triton_and_reference("activation_backward", grad, h, probs, *params), dtype, "backward")
    assert_close(*triton_and_reference("activation_backward_with_output", grad, h, probs, *params), dtype,
                 "backward with the output")


# ---- the fused expert block ---------------------------------------------------------------------


def run_block(backend, kind: str, bias: bool, dtype, case: str, limit=7.0, out_dtype=None, valid_rows_only=False):
    """route -> expert_up -> expert_down, forward and backward, every op on ``backend`` (a name, or per op);
    ``valid_rows_only``: expert_up's ``num_rows`` is the number of valid pairs (the EP receiver's call)."""
    torch.manual_seed(3)
    indices, mask, start, experts = make_routing(case)
    T, K = indices.shape
    C = I if kind == "relu2" else 2 * I
    x = randn(T, D, dtype=dtype).requires_grad_()
    weights = torch.rand(T, K, dtype=torch.float64).to(dtype).requires_grad_()
    w1 = randn(experts, D, C, dtype=dtype, scale=D ** -0.5).requires_grad_()
    w2 = randn(experts, I, D, dtype=dtype, scale=I ** -0.5).requires_grad_()
    b1 = randn(experts, C, dtype=dtype).requires_grad_() if bias else None
    b2 = randn(experts, D, dtype=dtype).requires_grad_() if bias else None
    with use_backend(**backend) if isinstance(backend, dict) else use_backend(backend):
        pair_of_row, row_of_pair, _, offsets = torch.ops.moe.route(indices, mask, start, experts)
        probs = weights.reshape(-1).gather(0, pair_of_row)
        num_rows = int(offsets[-1]) if valid_rows_only else None
        h = torch.ops.moe.expert_up(x, pair_of_row, row_of_pair, offsets, w1, b1, num_rows)
        y = torch.ops.moe.expert_down(h, w2, b2, probs, pair_of_row, row_of_pair, offsets, kind, 1.702, limit, 1.0,
                                      out_dtype)
        y.backward(randn(*y.shape, dtype=y.dtype))
    leaves = [x, weights, w1, w2] + ([b1, b2] if bias else [])
    return [h.detach(), y.detach()] + [leaf.grad for leaf in leaves]


BLOCK_CASES = [(kind, bias, torch.float32) for kind in moe_ops.GATED for bias in (False, True)]
BLOCK_CASES += [(kind, True, torch.bfloat16) for kind in moe_ops.GATED]


@pytest.mark.parametrize("kind,bias,dtype", BLOCK_CASES, ids=dtype_id)
def test_fused_block(kind, bias, dtype):
    names = ["h", "y", "grad_x", "grad_weights", "grad_w1", "grad_w2", "grad_b1", "grad_b2"]
    got = run_block("triton", kind, bias, dtype, "skewed")
    want = run_block("reference", kind, bias, dtype, "skewed")
    for name, g, w in zip(names, got, want):
        assert_close(g, w, dtype, name)


def test_fused_block_masked_pairs_and_float32_output():
    got = run_block("triton", "quick_geglu", True, torch.bfloat16, "mixed", limit=None, out_dtype=torch.float32)
    want = run_block("reference", "quick_geglu", True, torch.bfloat16, "mixed", limit=None, out_dtype=torch.float32)
    assert got[1].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w, torch.bfloat16)


def test_fused_block_on_the_valid_rows_only():
    """``num_rows`` = the valid pairs: the Triton kernels write only those rows of ``h``, and ``y`` and
    every gradient equal the reference's full call."""
    got = run_block("triton", "swiglu", True, torch.float32, "mixed", valid_rows_only=True)
    want = run_block("reference", "swiglu", True, torch.float32, "mixed")
    n = got[0].shape[0]
    assert n < want[0].shape[0]
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w[:n] if i == 0 else w, torch.float32)


def test_triton_forward_with_another_backends_backward():
    """What the GPU default runs below 16384 rows: the fused forward ops on Triton, their backward ops on
    another backend (CUTLASS there, the reference here), which reads the Triton forward's ``h``, tail rows
    included (masked and unrouted pairs)."""
    mix = {"expert_up": "triton", "expert_down": "triton", "expert_up_backward": "reference",
           "expert_down_backward": "reference"}
    got = run_block(mix, "swiglu", True, torch.float32, "mixed")
    want = run_block("reference", "swiglu", True, torch.float32, "mixed")
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32)


def test_module_matches_float64_reference():
    """GroupedExperts on the triton backend (every op, fused path) against the float64 loop oracle."""
    from moe_modules import GroupedExperts, MoEConfig

    config = MoEConfig(n_routed_experts=E, n_activated_experts=3, dim=D, moe_inter_dim=I,
                       expert_activation="quick_geglu", activation_limit=2.0, expert_bias=True, dtype=torch.float32)
    module = GroupedExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(randn(*p.shape, scale=0.3))
    indices, mask, _, _ = make_routing("mixed")
    x = randn(indices.shape[0], D).requires_grad_()
    weights = torch.rand(indices.shape, dtype=torch.float64).float().requires_grad_()
    with use_backend("triton"):
        y = module(x, mask, weights, indices)
        y.backward(torch.ones_like(y))
    params = [module.gate_and_up_projs, module.down_projs, module.gate_up_proj_bias, module.down_proj_bias]
    x64, w64 = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    y64 = f64_reference.expert_block(x64, mask, w64, indices, *p64, kind="quick_geglu", alpha=1.702, limit=2.0)
    y64.backward(torch.ones_like(y64))
    for got, want in zip([y, x.grad, weights.grad] + [p.grad for p in params], [y64, x64.grad, w64.grad] + [p.grad for p in p64]):
        assert (got.double() - want).norm() <= 1e-5 * want.norm() + 1e-12


def test_lora_module_matches_float64_reference():
    """GroupedExpertsLoRA on the triton backend (its low-rank ops included) against the float64 loop oracle
    with the merged weights W + scale * A @ B."""
    from moe_modules import GroupedExperts, GroupedExpertsLoRA, MoEConfig

    config = MoEConfig(n_routed_experts=E, n_activated_experts=3, dim=D, moe_inter_dim=I,
                       expert_activation="swiglu", expert_bias=True, dtype=torch.float32)
    base = GroupedExperts(config)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(randn(*p.shape, scale=0.3))
    module = GroupedExpertsLoRA(base, lora_dim=4, alpha=8)
    adapters = [module.lora_gate_and_up_A, module.lora_gate_and_up_B, module.lora_down_A, module.lora_down_B]
    with torch.no_grad():
        for p in adapters:
            p.copy_(randn(*p.shape, scale=0.3))
    indices, mask, _, _ = make_routing("mixed")
    x = randn(indices.shape[0], D).requires_grad_()
    weights = torch.rand(indices.shape, dtype=torch.float64).float().requires_grad_()
    with use_backend("triton"):
        y = module(x, mask, weights, indices)
        y.backward(torch.ones_like(y))
    x64, w64 = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    a64 = [p.detach().double().requires_grad_() for p in adapters]
    w1 = base.gate_and_up_projs.double() + module.scale * torch.bmm(a64[0], a64[1])
    w2 = base.down_projs.double() + module.scale * torch.bmm(a64[2], a64[3])
    y64 = f64_reference.expert_block(x64, mask, w64, indices, w1, w2, base.gate_up_proj_bias.double(),
                                     base.down_proj_bias.double(), kind="swiglu")
    y64.backward(torch.ones_like(y64))
    for got, want in zip([y, x.grad, weights.grad] + [p.grad for p in adapters],
                         [y64, x64.grad, w64.grad] + [p.grad for p in a64]):
        assert (got.double() - want).norm() <= 1e-5 * want.norm() + 1e-12


# ---- robustness ---------------------------------------------------------------------------------


def test_garbage_indices_stay_in_bounds():
    """Non-monotone / too large / negative offsets and out-of-range rows: nothing read or written
    out of bounds (the fixture checks every access), and rows the offsets do give are computed."""
    T, K = 6, 2
    M = T * K
    x, rows = randn(T, D), randn(M, D)
    row_of_pair = torch.tensor([[0, 100], [-3, 1], [2, 3], [4, 5], [6, 7], [8, 11]])
    pair_of_row = torch.tensor([0, 3, 5, 7, 9, 10**9, -4, 2, 1, 4, 6, 8])
    w = randn(3, D, I)
    for offsets in ([5, 2, 9], [3, 50, 70], [-4, 6, 12], [12, 12, 12]):
        offsets = torch.tensor(offsets, dtype=torch.int32)
        with use_backend("triton"):
            torch.ops.moe.gather(x, row_of_pair, offsets, None)
            torch.ops.moe.combine(rows, row_of_pair, offsets, None)
            torch.ops.moe.pair_dot(x, rows, row_of_pair, offsets)
            torch.ops.moe.grouped_mm(rows, w, offsets)
            torch.ops.moe.grouped_mm_wgrad(rows, rows, offsets)
            torch.ops.moe.add_expert_bias(rows, randn(3, D), offsets, torch.rand(M))
            torch.ops.moe.expert_bias_backward(rows, randn(3, D), offsets, torch.rand(M))
            h = moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, randn(3, D, 2 * I), None)
            moe_ops.expert_down(h, randn(3, I, D), randn(3, D), torch.rand(M), pair_of_row, row_of_pair, offsets,
                                "swiglu", 1.0, None, 0.0)
            moe_ops.expert_down_backward(x, h, randn(3, I, D), randn(3, D), torch.rand(M),
                                         pair_of_row, row_of_pair, offsets, "swiglu", 1.0, None, 0.0)
    # monotone offsets within range: the GEMM matches the reference exactly as usual
    offsets = torch.tensor([3, 3, 9], dtype=torch.int32)
    assert_close(*triton_and_reference("grouped_mm", rows, w, offsets), torch.float32)


def test_backend_declines_what_it_cannot_run():
    backend = registry.get_backend("triton")
    _, row_of_pair, offsets, _ = routed()
    x64 = torch.randn(row_of_pair.shape[0], D, dtype=torch.float64)
    assert any("float64" in r for r in backend.not_supported_reasons("gather", (x64, row_of_pair, offsets, None)))
    empty = torch.empty(0, D)
    assert backend.not_supported_reasons("grouped_mm", (empty, torch.randn(E, D, I), offsets))
