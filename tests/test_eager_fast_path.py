"""The eager shortcut of ``moe_ops._library.Op``: a plain eager call runs the op's kernel without the
dispatcher; anything that observes or transforms the dispatcher gets the dispatched op.

Spied by wrapping every op's ``OpOverload``: the counts say which path each call took.  Both paths
must give the same values and gradients, bit for bit (the same kernels run).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import moe_ops
from moe_modules import GroupedExperts, MoEConfig
from moe_ops import _library

T, K, E, D, I = 12, 2, 4, 16, 8


@pytest.fixture
def dispatched(monkeypatch):
    """Counts, per op name, the calls that went through the dispatcher (the ``OpOverload``)."""
    counts = collections.Counter()
    for name, op in _library.DEFINED.items():
        def spy(*args, _overload=op.overload, _name=name):
            counts[_name] += 1
            return _overload(*args)
        monkeypatch.setattr(op, "overload", spy)
    return counts


class _PassThroughFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _PassThroughDispatchMode(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _block(activation="swiglu", bias=True, dtype=torch.float32):
    config = MoEConfig(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=I,
                       expert_activation=activation, expert_bias=bias, dtype=dtype)
    torch.manual_seed(0)
    module = GroupedExperts(config)
    module.init_weights(torch.device("cpu"))
    if bias:
        with torch.no_grad():
            module.gate_up_proj_bias.normal_()
            module.down_proj_bias.normal_()
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    weights = torch.rand(T, K, dtype=dtype, requires_grad=True)
    indices = torch.randint(-1, E, (T, K))
    token_mask = torch.rand(T) > 0.2
    return module, (x, token_mask, weights, indices)


def _forward_backward(module, args):
    y = module(*args)
    grads = torch.autograd.grad(y, [args[0], args[2], *module.parameters()], torch.ones_like(y))
    return y.detach(), grads


@pytest.mark.parametrize("activation", list(moe_ops.GATED))
def test_plain_eager_forward_and_backward_skip_the_dispatcher(dispatched, activation):
    module, args = _block(activation)
    with torch.no_grad():
        module(*args)
    _forward_backward(module, args)
    assert sum(dispatched.values()) == 0, dict(dispatched)


@pytest.mark.parametrize("observer", ["function_mode", "dispatch_mode", "profiler", "device_context"])
def test_observed_calls_are_dispatched_and_give_the_same_numbers(dispatched, observer):
    module, args = _block()
    y_fast, grads_fast = _forward_backward(module, args)
    assert sum(dispatched.values()) == 0
    contexts = {
        "function_mode": _PassThroughFunctionMode,
        "dispatch_mode": _PassThroughDispatchMode,
        "profiler": torch.profiler.profile,
        "device_context": lambda: torch.device("cpu"),
    }
    with contexts[observer]():
        y, grads = _forward_backward(module, args)
    assert {"route", "expert_up", "expert_down"} <= set(dispatched)
    if observer in ("dispatch_mode", "profiler"):  # torch-function modes do not reach the autograd engine's calls
        assert {"expert_up_backward", "expert_down_backward"} <= set(dispatched)
    assert torch.equal(y, y_fast)
    for g, g_fast in zip(grads, grads_fast):
        assert torch.equal(g, g_fast)


def test_tracing_sees_the_moe_ops(dispatched):
    module, args = _block()
    graph = torch.fx.experimental.proxy_tensor.make_fx(lambda *a: module(*a))(*args)
    targets = {str(n.target) for n in graph.graph.nodes if n.op == "call_function"}
    assert {"moe.route.default", "moe.expert_up.default", "moe.expert_down.default"} <= targets, targets
    assert dispatched["route"] >= 1


def test_meta_and_subclass_arguments_are_dispatched(dispatched):
    indices = torch.randint(0, E, (T, K), device="meta")
    outputs = moe_ops.route(indices, torch.ones(T, dtype=torch.bool, device="meta"), 0, E)
    assert all(o.is_meta for o in outputs) and dispatched["route"] == 1
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake_indices = mode.from_tensor(torch.randint(0, E, (T, K)))
        moe_ops.route(fake_indices, torch.ones(T, dtype=torch.bool), 0, E)
    assert dispatched["route"] == 2


def test_fast_path_validates_like_the_op():
    module, (x, token_mask, weights, indices) = _block()
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    with pytest.raises(ValueError, match="w1"):
        moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, module.gate_and_up_projs[:, :-1], None)


def test_trailing_defaults_left_out_still_get_their_gradients():
    """expert_up's formula returns a gradient for num_rows too; a call without it gets one per argument."""
    module, (x, token_mask, weights, indices) = _block(bias=False)
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    w1 = module.gate_and_up_projs
    h = _library.DEFINED["expert_up"](x, pair_of_row, row_of_pair, offsets, w1, None)  # no num_rows
    grad_x, grad_w1 = torch.autograd.grad(h.sum(), [x, w1])
    expected = torch.autograd.grad(moe_ops.expert_up(x, pair_of_row, row_of_pair, offsets, w1, None).sum(), [x, w1])
    assert torch.equal(grad_x, expected[0]) and torch.equal(grad_w1, expected[1])


def test_double_backward_on_the_fast_path_matches_the_dispatched_one(dispatched):
    module, args = _block(dtype=torch.float64)

    def second_order():
        y = module(*args)
        (gx,) = torch.autograd.grad(y.square().sum(), [args[0]], create_graph=True)
        return torch.autograd.grad(gx.sum(), [args[2], *module.parameters()])

    fast = second_order()
    assert sum(dispatched.values()) == 0
    with _PassThroughDispatchMode():
        slow = second_order()
    assert dispatched["expert_down_backward"] >= 1
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
