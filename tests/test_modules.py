"""GroupedExperts and GroupedExpertsDeepEP on one device against the float64 loop reference.

Forward and every gradient (x, routing weights, the four parameters), for each
activation with and without expert bias, in float32 and bfloat16; zero-token
experts, masked tokens, state dicts, init_weights, NaN containment.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import moe_ops

import reference
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig

MODULES = [GroupedExperts, GroupedExpertsDeepEP]
PARAMS = ("gate_and_up_projs", "down_projs", "gate_up_proj_bias", "down_proj_bias")
# ||a - b|| / ||b|| against float64 (issue 2).
MODULE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
D, I = 8, 4

# (activation, extra config): quick_geglu with a low clamp limit (so the clamp is reached with
# these inputs, and the config's alpha/limit must reach the kernel) and without a limit.
ACTIVATIONS = {
    "swiglu": ("swiglu", {}),
    "quick_geglu": ("quick_geglu", dict(activation_alpha=1.5, activation_limit=2.0)),
    "quick_geglu_nolimit": ("quick_geglu", dict(activation_limit=None)),
    "swigluoai": ("swigluoai", dict(activation_alpha=1.5, activation_limit=2.0)),
    "swiglu_clamped": ("swiglu", dict(swiglu_limit=1.0)),
    "geglu": ("geglu", {}),
    "relu2": ("relu2", {}),
}


def make_config(activation="swiglu", bias=True, dtype=torch.float32, E=4, K=2) -> MoEConfig:
    kind, extra = ACTIVATIONS[activation]
    return MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I, expert_activation=kind,
                     expert_bias=bias, dtype=dtype, **extra)


def make_module(cls, config, device):
    """A module with random (not init_weights) parameters, biases included, so every term matters."""
    module = cls(config).to(device)
    with torch.no_grad():
        for name in PARAMS:
            p = getattr(module, name)
            if p is not None:
                p.copy_(torch.randn(p.shape, dtype=torch.float64) * 0.5)
    return module


def make_inputs(routing, dtype, weight_dtype=None, relayout=None, contiguous=True):
    """``(x, token_mask, weights, indices)`` for a routing case; x and weights require grad."""
    x = torch.randn(routing.T, D, dtype=torch.float64).to(dtype)
    weights = (torch.rand(routing.T, routing.K, dtype=torch.float64) + 0.1).to(weight_dtype or dtype)
    x, weights = x.to(routing.indices.device), weights.to(routing.indices.device)
    if not contiguous:
        x, weights = relayout(x, False), relayout(weights, False)
    return x.requires_grad_(), routing.token_mask, weights.requires_grad_(), routing.indices


def reference_run(module, x, token_mask, weights, indices, grad_y):
    """Reference output and gradients (x, weights, then the present parameters) in float64."""
    c = module.config
    leaves = {"x": reference.f64(x), "weights": reference.f64(weights)}
    leaves.update({n: reference.f64(getattr(module, n)) for n in PARAMS if getattr(module, n) is not None})
    for t in leaves.values():
        t.requires_grad_()
    y = reference.expert_block(
        leaves["x"], token_mask.cpu(), leaves["weights"], indices.cpu(), leaves["gate_and_up_projs"],
        leaves["down_projs"], leaves.get("gate_up_proj_bias"), leaves.get("down_proj_bias"),
        c.expert_activation, c.activation_alpha, c.activation_limit, c.activation_linear_offset,
        swiglu_limit=c.swiglu_limit)
    if y.requires_grad:  # with every token masked, nothing depends on any input
        y.backward(reference.f64(grad_y))
    return y.detach(), {n: torch.zeros_like(t) if t.grad is None else t.grad for n, t in leaves.items()}


def module_run(module, x, token_mask, weights, indices, grad_y):
    y = module(x, token_mask, weights, indices)
    y.backward(grad_y)
    grads = {"x": x.grad, "weights": weights.grad}
    grads.update({n: getattr(module, n).grad for n in PARAMS if getattr(module, n) is not None})
    return y, grads


def check_module_against_reference(module, inputs, tol):
    x = inputs[0]
    grad_y = torch.randn(x.shape, dtype=torch.float64).to(x.dtype).to(x.device)
    y, grads = module_run(module, *inputs, grad_y)
    y_ref, grads_ref = reference_run(module, *inputs, grad_y)
    assert y.dtype == x.dtype and y.shape == x.shape
    reference.assert_matches(y, y_ref, tol, "y")
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        assert grad is not None, f"{name}: no gradient"
        reference.assert_matches(grad, grads_ref[name], tol, f"grad of {name}")
    return y, grads


# ---- forward and gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_forward_and_every_gradient_match_reference(cls, activation, bias, dtype, mixed_routing, device):
    module = make_module(cls, make_config(activation, bias, dtype), device)
    check_module_against_reference(module, make_inputs(mixed_routing, dtype), MODULE_TOLERANCE[dtype])


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_every_routing_case_and_layout(cls, routing, contiguous, relayout, device):
    """T=1, K=1, E=1, every token masked, -1 and out-of-range indices, strided x and weights."""
    routing = dataclasses.replace(routing, expert_start=0)  # one device: experts >= E are out of range
    module = make_module(cls, make_config("swiglu", True, torch.float32, E=routing.num_experts, K=routing.K), device)
    inputs = make_inputs(routing, torch.float32, relayout=relayout, contiguous=contiguous)
    check_module_against_reference(module, inputs, MODULE_TOLERANCE[torch.float32])


def test_bfloat16_tokens_with_float32_routing_weights(mixed_routing, device):
    module = make_module(GroupedExperts, make_config("swiglu", True, torch.bfloat16), device)
    inputs = make_inputs(mixed_routing, torch.bfloat16, weight_dtype=torch.float32)
    _, grads = check_module_against_reference(module, inputs, MODULE_TOLERANCE[torch.bfloat16])
    assert grads["weights"].dtype == torch.float32


# ---- zero-token experts and masked tokens ---------------------------------------------------------


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_zero_token_expert_gets_zero_gradient_tensors(cls, mixed_routing, device):
    empty = 3  # the "mixed" routing sends no token to expert 3
    assert not (mixed_routing.indices == empty).any()
    module = make_module(cls, make_config(bias=True), device)
    _, grads = module_run(module, *make_inputs(mixed_routing, torch.float32), torch.ones(mixed_routing.T, D, device=device))
    for name in PARAMS:
        assert isinstance(grads[name], torch.Tensor), f"{name}: gradient is None"
        assert (grads[name][empty] == 0).all(), f"{name}: nonzero gradient for the zero-token expert"
        assert (grads[name][:empty] != 0).any(), f"{name}: the routed experts got no gradient"


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_all_tokens_masked_gives_zeros_and_zero_gradients(cls, mixed_routing, device):
    module = make_module(cls, make_config(bias=True), device)
    routing = dataclasses.replace(mixed_routing, token_mask=torch.zeros_like(mixed_routing.token_mask))
    x, token_mask, weights, indices = make_inputs(routing, torch.float32)
    x_nan = x.detach().clone().fill_(float("nan")).requires_grad_()  # masked tokens are never read
    y, grads = module_run(module, x_nan, token_mask, weights, indices, torch.ones_like(x))
    assert (y == 0).all()
    for name, grad in grads.items():
        assert isinstance(grad, torch.Tensor) and (grad == 0).all(), name


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_masked_tokens_are_exactly_zero_and_never_read(cls, mixed_routing, device):
    module = make_module(cls, make_config(bias=True), device)
    x, token_mask, weights, indices = make_inputs(mixed_routing, torch.float32)
    masked = ~token_mask
    with torch.no_grad():
        x_poisoned = torch.where(masked.unsqueeze(1), float("nan"), x)
        y = module(x_poisoned, token_mask, weights, indices)
        y_clean = module(x, token_mask, weights, indices)
    assert (y[masked] == 0).all()
    assert torch.equal(y, y_clean)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_nan_in_one_token_stays_in_that_token(cls, mixed_routing, device):
    module = make_module(cls, make_config(bias=True), device)
    x, token_mask, weights, indices = make_inputs(mixed_routing, torch.float32)
    bad = 0
    assert token_mask[bad]
    with torch.no_grad():
        x_nan = x.clone()
        x_nan[bad, 1] = float("nan")
        y_nan = module(x_nan, token_mask, weights, indices)
        y = module(x, token_mask, weights, indices)
    assert y_nan[bad].isnan().all()
    others = torch.arange(mixed_routing.T, device=device) != bad
    assert torch.equal(y_nan[others], y[others])


# ---- parameters, state dict, init ------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("activation", list(moe_ops.GATED))
@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_state_dict_keys_and_shapes(cls, activation, bias):
    E, width = 4, (I if activation == "relu2" else 2 * I)
    module = cls(make_config(activation, bias))
    expected = {"gate_and_up_projs": (E, D, width), "down_projs": (E, I, D)}
    if bias:
        expected.update(gate_up_proj_bias=(E, width), down_proj_bias=(E, D))
    else:
        assert module.gate_up_proj_bias is None and module.down_proj_bias is None
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == expected
    assert all(v.dtype == torch.float32 for v in module.state_dict().values())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("source, target", [MODULES, MODULES[::-1]], ids=lambda c: c.__name__)
def test_state_dict_moves_between_modules(source, target, bias, mixed_routing, device):
    config = make_config("quick_geglu", bias)
    src = make_module(source, config, device)
    dst = target(config).to(device)
    dst.load_state_dict(src.state_dict(), strict=True)
    x, token_mask, weights, indices = make_inputs(mixed_routing, torch.float32)
    with torch.no_grad():
        assert torch.equal(dst(x, token_mask, weights, indices), src(x, token_mask, weights, indices))


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_init_weights_normal_weights_and_zero_biases(cls):
    config = MoEConfig(n_routed_experts=4, n_activated_experts=2, dim=32, moe_inter_dim=16, expert_bias=True,
                       dtype=torch.float32)
    module = cls(config)
    with torch.no_grad():
        for name in PARAMS:
            getattr(module, name).fill_(3.0)  # init must overwrite every element
    module.init_weights(buffer_device=torch.device("cpu"), init_std=0.05)
    for name in ("gate_and_up_projs", "down_projs"):
        w = getattr(module, name).detach()
        assert abs(w.mean().item()) < 0.005, name  # 4096 / 2048 samples: std of the mean ~0.001
        assert 0.045 < w.std().item() < 0.055, name
    for name in ("gate_up_proj_bias", "down_proj_bias"):
        assert (getattr(module, name) == 0).all(), name


def test_deepep_and_grouped_experts_agree_exactly(mixed_routing, device):
    """One device, no dispatcher: GroupedExpertsDeepEP is GroupedExperts, bit for bit."""
    config = make_config("relu2", True, torch.bfloat16)
    a = make_module(GroupedExperts, config, device)
    b = GroupedExpertsDeepEP(config).to(device)
    b.load_state_dict(a.state_dict())
    inputs = make_inputs(mixed_routing, torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs))


def test_deepep_apply_bias_adds_per_expert_rows(device):
    value = torch.randn(7, 3, dtype=torch.float64, device=device)
    bias = torch.randn(3, 3, dtype=torch.float64, device=device)
    probs = torch.rand(7, dtype=torch.float64, device=device)
    counts = torch.tensor([2, 0, 4], device=device)  # the last row belongs to no expert
    offsets = [2, 2, 6]
    for p in (None, probs):
        out = GroupedExpertsDeepEP._apply_bias(value, bias, counts, p)
        reference.assert_matches(out, reference.add_expert_bias(value, bias, offsets, p), 1e-12)
    assert GroupedExpertsDeepEP._apply_bias(value, None, counts) is value
    out_host_counts = GroupedExpertsDeepEP._apply_bias(value, bias, [2, 0, 4], probs)
    assert torch.equal(out_host_counts, GroupedExpertsDeepEP._apply_bias(value, bias, counts, probs))


# ---- no host reads: one graph under torch.compile ------------------------------------------------------

# Ops that read tensor data on the host or give a data-dependent size ("item", "aten.nonzero.default", ...).
HOST_READS = re.compile(r"(^|\.)(item|tolist|_local_scalar_dense|nonzero|masked_select|unique\w*|bincount)(\.|$)")


def host_reads(graph_module) -> list:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found = []
    for node in graph_module.graph.nodes:
        if "call" in node.op and HOST_READS.search(str(node.target)):
            found.append(str(node.target))
        value = node.meta.get("val", node.meta.get("example_value"))
        if value is not None and free_unbacked_symbols(value):
            found.append(f"{node.format_node()} (data-dependent value)")
    return found


@pytest.mark.parametrize("cls, activation", [(GroupedExperts, "swiglu"), (GroupedExperts, "quick_geglu"),
                                             (GroupedExperts, "relu2"), (GroupedExpertsDeepEP, "quick_geglu")],
                         ids=lambda v: getattr(v, "__name__", v))
def test_compiles_to_one_graph_without_host_reads(cls, activation, mixed_routing, device):
    """Forward and backward under ``torch.compile(fullgraph=True)`` with the default Dynamo config: one
    graph, no recompile for new values, and no op in the Dynamo, forward or backward graph that reads
    data on the host (fullgraph alone would capture ``.item()`` / ``nonzero`` as unbacked values)."""
    import torch._dynamo
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._dynamo.testing import CompileCounterWithBackend

    aot_graphs = []

    def record(graph_module, example_inputs):
        aot_graphs.append(graph_module)
        return boxed_nop(graph_module, example_inputs)

    torch._dynamo.reset()
    counter = CompileCounterWithBackend(aot_autograd(fw_compiler=record, bw_compiler=record))
    module = make_module(cls, make_config(activation, True), device)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    for _ in range(2):  # new values, same shapes: no recompile
        inputs = make_inputs(mixed_routing, torch.float32)
        grad_y = torch.randn_like(inputs[0])
        module.zero_grad()
        y, grads = module_run(compiled, *inputs, grad_y)
        eager_inputs = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)
        module.zero_grad()
        y_eager, grads_eager = module_run(module, *eager_inputs, grad_y)
        torch.testing.assert_close(y, y_eager)
        for name in grads_eager:
            torch.testing.assert_close(grads[name], grads_eager[name], msg=name)
    torch._dynamo.reset()
    assert counter.frame_count == 1
    assert len(aot_graphs) == 2, "expected one forward and one backward graph"
    for graph_module in [*counter.graphs, *aot_graphs]:
        assert host_reads(graph_module) == []
