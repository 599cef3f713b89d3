"""The triton backend on a CUDA GPU at real expert shapes.

    python -m pytest tests/gpu/test_triton_gpu.py -q -rs

* every kernel (forced to the triton backend) against the reference backend, or against a
  float32 per-expert loop where the reference's all-groups GEMM would be too slow;
* the fused block at Qwen3-30B-A3B / GPT-OSS-20B / DeepSeek-V3-rank-like shapes, skewed routing;
* int64 pointer math: more than 2^31 elements in the expert-sorted rows (T*K*D > 2^31);
* no host synchronisation over forward + backward (``set_sync_debug_mode("error")``),
  CUDA-graph capture + replay of forward + backward, bitwise determinism, torch.compile.

First run compiles ~40 Triton kernel variants (about a minute).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

import moe_ops  # noqa: E402
import reference  # noqa: E402  (tests/reference.py: the activations in any dtype)
from moe_modules import GroupedExperts, MoEConfig  # noqa: E402
from moe_ops import use_backend  # noqa: E402
from moe_ops.backends import reference as ref_backend  # noqa: E402

CUDA = torch.device("cuda")
BF16_TOL = 2e-2  # ||got - want|| / ||want|| for bf16 against a float32 computation


def rel_err(got, want) -> float:
    got, want = got.detach().double(), want.detach().double()
    return ((got - want).norm() / want.norm().clamp(min=1e-30)).item()


def assert_rel(got, want, tol, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = rel_err(got, want)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ---- routing ----------------------------------------------------------------------------------


def zipf_routing(T, K, E, skew=1.2, masked=0.05, seed=0):
    """Top-K distinct experts per token drawn with Zipf weights (a few hot experts, some cold or
    empty ones), a few masked tokens and -1 slots."""
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    weights = 1.0 / torch.arange(1, E + 1, device=CUDA, dtype=torch.float32) ** skew
    indices = torch.multinomial(weights.expand(T, E).contiguous(), K, replacement=False, generator=gen)
    indices[torch.rand(T, K, device=CUDA, generator=gen) < 0.01] = -1
    mask = torch.rand(T, device=CUDA, generator=gen) > masked
    probs = torch.rand(T, K, device=CUDA, generator=gen) + 0.05
    return indices, mask, probs / probs.sum(1, keepdim=True)


@pytest.mark.parametrize("E,T,K", [(128, 16384, 8), (32, 8192, 4), (256, 4096, 8)])
def test_route(E, T, K):
    indices, mask, _ = zipf_routing(T, K, E)
    with use_backend(route="triton"):
        got = moe_ops.route(indices, mask, 0, E)
    want = ref_backend.route(indices, mask, 0, E)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # expert parallel view: this rank owns experts E/4 .. E/2-1
    with use_backend(route="triton"):
        got = moe_ops.route(indices.int(), mask, E // 4, E // 4)
    for g, w in zip(got, ref_backend.route(indices.int(), mask, E // 4, E // 4)):
        assert torch.equal(g, w)


# ---- the unfused ops ----------------------------------------------------------------------------


def routed(E, T, K, seed=0):
    indices, mask, probs = zipf_routing(T, K, E, seed=seed)
    pair_of_row, row_of_pair, _, offsets = ref_backend.route(indices, mask, 0, E)
    return pair_of_row, row_of_pair, offsets, probs


def loop_grouped_mm(a, b, offsets):
    """float32 per-expert loop (host offsets: fine in a test); rows past the last group are 0."""
    out = torch.zeros(a.shape[0], b.shape[2], device=a.device, dtype=torch.float32)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[start:end] = a[start:end].float() @ b[g].float()
        start = end
    return out


def loop_wgrad(a, grad, offsets):
    out = torch.zeros(offsets.shape[0], a.shape[1], grad.shape[1], device=a.device, dtype=torch.float32)
    start = 0
    for g, end in enumerate(offsets.tolist()):
        out[g] = a[start:end].float().t() @ grad[start:end].float()
        start = end
    return out


GEMM_SHAPES = [  # (E, T, K, D, N): GEMM1 of Qwen3, GEMM2 of GPT-OSS (2880: not a multiple of 128), DeepSeek
    (128, 4096, 8, 2048, 1536),
    (32, 4096, 4, 2880, 2880),
    (32, 2048, 8, 7168, 2048),
]


@pytest.mark.parametrize("E,T,K,D,N", GEMM_SHAPES)
def test_grouped_mm_and_wgrad(E, T, K, D, N):
    _, row_of_pair, offsets, _ = routed(E, T, K)
    M = T * K
    a = torch.randn(M, D, device=CUDA, dtype=torch.bfloat16)
    a[offsets[-1]:] = float("nan")  # rows of no group are never read
    b = (torch.randn(E, D, N, device=CUDA) * D ** -0.5).to(torch.bfloat16)
    with use_backend(grouped_mm="triton", grouped_mm_wgrad="triton"):
        out = moe_ops.grouped_mm(a, b, offsets)
        grad = torch.randn(M, N, device=CUDA, dtype=torch.bfloat16)
        w = moe_ops.grouped_mm_wgrad(a, grad, offsets)
        dgrad = moe_ops.grouped_mm(grad, b.transpose(1, 2), offsets)  # strided b, no copy
    valid = int(offsets[-1])
    assert_rel(out[:valid], loop_grouped_mm(a, b, offsets)[:valid], BF16_TOL, "grouped_mm")
    assert (out[valid:] == 0).all()
    assert_rel(w, loop_wgrad(a, grad, offsets), BF16_TOL, "wgrad")
    assert_rel(dgrad[:valid], loop_grouped_mm(grad, b.transpose(1, 2), offsets)[:valid], BF16_TOL, "dgrad")


def test_grouped_mm_float32_matches_reference():
    _, _, offsets, _ = routed(8, 512, 2)
    a = torch.randn(1024, 200, device=CUDA)
    b = torch.randn(8, 200, 136, device=CUDA)
    grad = torch.randn(1024, 136, device=CUDA)
    with use_backend("triton"):
        out, w = moe_ops.grouped_mm(a, b, offsets), moe_ops.grouped_mm_wgrad(a, grad, offsets)
    torch.testing.assert_close(out, ref_backend.grouped_mm(a, b, offsets), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(w, ref_backend.grouped_mm_wgrad(a, grad, offsets), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("D", [2048, 2880])
def test_row_ops_match_reference(D):
    """gather, combine, pair_dot, bias and activations: the reference is vectorised, so it runs here."""
    E, T, K, I = 32, 4096, 4, 2880 if D == 2880 else 768
    _, row_of_pair, offsets, probs_tk = routed(E, T, K)
    M = T * K
    bf = dict(device=CUDA, dtype=torch.bfloat16)
    x, rows = torch.randn(T, D, **bf), torch.randn(M, D, **bf)
    p = torch.rand(M, device=CUDA) + 0.1
    cases = [
        ("gather", (x, row_of_pair, offsets, probs_tk)),
        ("combine", (rows, row_of_pair, offsets, probs_tk)),
        ("pair_dot", (x, rows, row_of_pair, offsets)),
        ("add_expert_bias", (rows, torch.randn(E, D, **bf), offsets, p)),
        ("expert_bias_backward", (rows, torch.randn(E, D, **bf), offsets, p)),
    ]
    # Rows from several sources (expert parallelism's peer loads), here three local tensors.
    sources = [x, rows, x[:100]]
    index = list(torch.randint(-1, T, (3, 1000), device=CUDA))
    counts = [torch.tensor([c], device=CUDA) for c in (1000, 517, 90)]
    cases.append(("gather_from", (sources, index, counts)))
    cases.append(("sum_from", (sources, torch.randint(-1, 100, (T, 3), device=CUDA), torch.float32)))
    dests = [torch.full((1000, D), float("nan"), **bf) for _ in range(3)]
    with use_backend(put_to="triton"):
        moe_ops.put_to(rows[:3000], dests)
    assert all(torch.equal(d, rows[s * 1000:(s + 1) * 1000]) for s, d in enumerate(dests)), "put_to"
    for kind, limit in (("swiglu", None), ("quick_geglu", 7.0), ("relu2", None)):
        h = torch.randn(M, I if kind == "relu2" else 2 * I, **bf) * 3
        cases.append(("activation", (h, p, kind, 1.702, limit, 1.0)))
        cases.append(("activation_backward", (torch.randn(M, I, **bf), h, p, kind, 1.702, limit, 1.0)))
    for op, args in cases:
        with use_backend(**{op: "triton"}):
            got = getattr(torch.ops.moe, op)(*args)
        want = ref_backend.KERNELS[op](*args)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert_rel(g, w, 1e-2, op)


# ---- the fused block at model shapes -------------------------------------------------------------

MODELS = {  # name: (E, K, D, I, activation, bias, T) — T scaled down from the benchmark shapes
    "qwen3_30b_a3b": (128, 8, 2048, 768, "swiglu", False, 4096),
    "gpt_oss_20b": (32, 4, 2880, 2880, "quick_geglu", True, 2048),
    "deepseek_v3_rank": (32, 8, 7168, 2048, "swiglu", False, 1024),
}


def make_experts(name, dtype=torch.bfloat16):
    E, K, D, I, kind, bias, T = MODELS[name]
    config = MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, expert_activation=kind,
                       expert_bias=bias, dtype=dtype)
    module = GroupedExperts(config).to(CUDA)
    module.init_weights(CUDA, init_std=0.02)
    if bias:
        with torch.no_grad():
            module.gate_up_proj_bias.normal_(0, 0.1)
            module.down_proj_bias.normal_(0, 0.1)
    indices, mask, weights = zipf_routing(T, K, E)
    x = torch.randn(T, D, device=CUDA, dtype=dtype)
    return module, (x, mask, weights.to(dtype), indices)


def loop_block(module, x, mask, weights, indices):
    """float32 per-expert loop with autograd: the NeMo/torchtitan-style computation, unfused."""
    E, cfg = module.config.n_routed_experts, module.config
    params = [p.detach().float().requires_grad_() for p in
              (module.gate_and_up_projs, module.down_projs, module.gate_up_proj_bias, module.down_proj_bias)
              if p is not None]
    w1, w2 = params[0], params[1]
    b1, b2 = (params[2], params[3]) if len(params) == 4 else (None, None)
    x32, wt32 = x.detach().float().requires_grad_(), weights.detach().float().requires_grad_()
    y = torch.zeros_like(x32)
    for e in range(E):
        tok, slot = ((indices == e) & mask[:, None]).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x32[tok] @ w1[e] + (0 if b1 is None else b1[e])
        p = wt32[tok, slot].unsqueeze(1)
        out = (reference.act(h, cfg.expert_activation, cfg.activation_alpha, cfg.activation_limit) * p) @ w2[e]
        y = y.index_add(0, tok, out + (0 if b2 is None else p * b2[e]))
    return y, [x32, wt32, *params]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_block_matches_float32_loop(name):
    module, (x, mask, weights, indices) = make_experts(name)
    x.requires_grad_()
    weights.requires_grad_()
    gy = torch.randn_like(x)
    with use_backend(expert_up="triton", expert_down="triton", expert_up_backward="triton",
                     expert_down_backward="triton", route="triton"):
        y = module(x, mask, weights, indices)
        y.backward(gy)
    y32, leaves = loop_block(module, x, mask, weights, indices)
    y32.backward(gy.float())
    got = [y, x.grad, weights.grad] + [p.grad for p in module.parameters()]
    want = [y32] + [leaf.grad for leaf in leaves]
    names = ["y", "grad_x", "grad_weights"] + [n for n, _ in module.named_parameters()]
    assert len(got) == len(want) == len(names)
    for what, g, w in zip(names, got, want):
        assert_rel(g, w, BF16_TOL, what)


def test_fused_block_is_deterministic():
    module, (x, mask, weights, indices) = make_experts("gpt_oss_20b")
    x.requires_grad_()
    results = []
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        x.grad = None
        y = module(x, mask, weights, indices)
        y.backward(torch.ones_like(y))
        results.append([y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- int64 pointer math ---------------------------------------------------------------------------


def test_more_than_2_31_row_elements():
    """T*K*D = 300k x 7168 = 2.15e9 > 2^31 elements in the expert-sorted rows (4.3 GB in bf16)."""
    E, T, K, D, N = 8, 37500, 8, 7168, 64
    M = T * K
    assert M * D > 2**31
    pair_of_row, row_of_pair, offsets, probs = routed(E, T, K)
    bf = dict(device=CUDA, dtype=torch.bfloat16)
    x = torch.randn(T, D, **bf)
    with use_backend("triton"):
        rows = moe_ops.gather(x, row_of_pair, offsets)
        # every valid pair's row holds its token; check the last rows (their offsets exceed 2^31)
        last = torch.arange(M - 4096, M, device=CUDA)
        tok = pair_of_row[last] // K
        valid = last < offsets[-1]
        assert torch.equal(rows[last][valid], x[tok][valid])
        assert (rows[last][~valid] == 0).all()
        y = moe_ops.combine(rows, row_of_pair, offsets, probs)
        sample = torch.arange(T - 2048, T, device=CUDA)
        want = (rows[row_of_pair[sample]].float() * probs[sample].unsqueeze(-1)
                * (row_of_pair[sample] < offsets[-1]).unsqueeze(-1)).sum(1)
        assert_rel(y[sample], want, 1e-2, "combine")
        b = (torch.randn(E, D, N, device=CUDA) * D ** -0.5).to(torch.bfloat16)
        out = moe_ops.grouped_mm(rows, b, offsets)
        tail_rows = torch.arange(int(offsets[-1]) - 1024, int(offsets[-1]), device=CUDA)
        assert_rel(out[tail_rows], (rows[tail_rows].float() @ b[-1].float()), BF16_TOL, "grouped_mm (last expert)")
        w = moe_ops.grouped_mm_wgrad(rows, out, offsets)
        last_start = int(offsets[-2])
        assert_rel(w[-1], rows[last_start:int(offsets[-1])].float().t() @ out[last_start:int(offsets[-1])].float(),
                   BF16_TOL, "wgrad (last expert)")
    del rows, out


# ---- no host sync, CUDA graphs, compile -------------------------------------------------------------


def test_no_host_sync_in_forward_and_backward():
    module, (x, mask, weights, indices) = make_experts("qwen3_30b_a3b")
    x.requires_grad_()
    y = module(x, mask, weights, indices)  # compile the kernels first
    y.backward(torch.ones_like(y))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = module(x, mask, weights, indices)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_cuda_graph_replays_forward_and_backward():
    module, (x, mask, weights, indices) = make_experts("gpt_oss_20b")
    static_x = x.clone().requires_grad_()
    static_w = weights.clone().requires_grad_()
    gy = torch.randn_like(x)

    def step():
        y = module(static_x, mask, static_w, indices)
        y.backward(gy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, outside capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    module.zero_grad(set_to_none=True)
    static_x.grad = static_w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = step()

    new_x, new_w = torch.randn_like(x), torch.rand_like(weights)
    static_x.data.copy_(new_x)
    static_w.data.copy_(new_w)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [static_y.clone(), static_x.grad.clone(), static_w.grad.clone()] + [p.grad.clone() for p in module.parameters()]

    module.zero_grad(set_to_none=True)
    ex, ew = new_x.clone().requires_grad_(), new_w.clone().requires_grad_()
    y = module(ex, mask, ew, indices)
    y.backward(gy)
    eager = [y, ex.grad, ew.grad] + [p.grad for p in module.parameters()]
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_matches_eager():
    module, (x, mask, weights, indices) = make_experts("qwen3_30b_a3b")
    compiled = torch.compile(module, fullgraph=True)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = module(x1, mask, weights, indices)
    y_eager.sum().backward()
    g_eager = [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    y_comp = compiled(x2, mask, weights, indices)
    y_comp.sum().backward()
    assert torch.equal(y_comp, y_eager)
    assert torch.equal(x2.grad, x1.grad)
    for p, g in zip(module.parameters(), g_eager):
        assert torch.equal(p.grad, g)


def test_moe_ops_pass_opcheck_with_the_triton_backend():
    """The moe:: ops with the triton backend forced pass opcheck on CUDA: the Triton kernels' outputs
    agree with the ops' fakes and schema, eagerly and under AOT dispatch."""
    _, row_of_pair, offsets, probs = routed(8, 256, 2)
    x = torch.randn(256, 136, device=CUDA, dtype=torch.bfloat16)
    w = torch.randn(8, 136, 96, device=CUDA, dtype=torch.bfloat16)
    for op, args in [("gather", (x, row_of_pair, offsets, probs)), ("grouped_mm", (x.repeat(2, 1), w, offsets))]:
        with use_backend(**{op: "triton"}):
            torch.library.opcheck(getattr(torch.ops.moe, op).default, args,
                                  test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
