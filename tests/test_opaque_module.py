"""moe::opaque_forward / moe::opaque_backward on CPU, with a plain module standing in for Transformer Engine.

The stand-in behaves like ``GroupedLinear`` where it matters: host split sizes
(``.tolist()``), excluded from Dynamo, parameters read from the module.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from moe_ops.ops import opaque_module as om
from torch.multiprocessing.reductions import StorageWeakRef


class SplitLinear(nn.Module):
    """Per-group ``x_g @ w * (g + 1) + b``; ``unused`` never enters the output (its gradient must be 0)."""

    def __init__(self, d_in=4, d_out=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(d_out, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(2, dtype=torch.float64))

    @torch._dynamo.disable  # like TE's no_torch_dynamo: Dynamo would break the graph here
    def forward(self, x, counts):
        parts = torch.split(x, counts.tolist())
        return torch.cat([p @ self.w * (g + 1) for g, p in enumerate(parts)]) + self.b


MODULES = om.ObjectRegistry("SplitLinear")


class SplitLinearFunction:
    """inputs: handle, x [N, d_in], counts [G] (CPU int64), w, b, unused -> (y [N, d_out], x * 2)."""

    def forward(self, inputs):
        handle, x, counts, w, b, unused = inputs
        module = MODULES.lookup(handle)
        with torch.nn.utils.stateless._reparametrize_module(module, {"w": w, "b": b, "unused": unused}):
            return module(x, counts), x * 2

    def fake(self, inputs):
        handle, x, counts, w, b, unused = inputs
        return x.new_empty(x.shape[0], w.shape[1]), torch.empty_like(x)


om.register_function("tests.split_linear", SplitLinearFunction())


@pytest.fixture
def setup():
    module = SplitLinear()
    handle = MODULES.register(module)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 3])

    def run(x):
        return om.opaque_call("tests.split_linear", [handle, x, counts, module.w, module.b, module.unused])

    return module, x, counts, run


def _direct(module, x, counts):
    return module(x, counts), x * 2


def test_forward_and_gradients_match_the_module(setup):
    module, x, counts, run = setup
    y, x2 = run(x)
    ref_y, ref_x2 = _direct(module, x, counts)
    torch.testing.assert_close(y, ref_y)
    torch.testing.assert_close(x2, ref_x2)
    gy, gx2 = torch.randn_like(y), torch.randn_like(x2)
    params = [x, module.w, module.b]
    got = torch.autograd.grad((y, x2), params + [module.unused], (gy, gx2))
    want = torch.autograd.grad((ref_y, ref_x2), params, (gy, gx2))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    assert torch.equal(got[-1], torch.zeros_like(module.unused))  # unused input: zeros, not None
    assert om.live_graphs() == 0


def test_one_output_unused_in_the_loss(setup):
    module, x, counts, run = setup
    y, _ = run(x)
    (gx,) = torch.autograd.grad(y.sum(), [x])
    (rx,) = torch.autograd.grad(_direct(module, x, counts)[0].sum(), [x])
    torch.testing.assert_close(gx, rx)
    assert om.live_graphs() == 0


def test_side_table_is_empty_without_backward(setup):
    module, x, counts, run = setup
    with torch.no_grad():
        run(x)
    assert om.live_graphs() == 0
    y, x2 = run(x)  # recorded, then dropped without backward
    assert om.live_graphs() == 1
    del y, x2
    gc.collect()
    assert om.live_graphs() == 0


def test_inputs_not_saved_by_the_function_are_not_kept_alive():
    """Only what the function saves for its backward stays alive: x * 2 does not save x."""
    x = torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    om.register_function("tests.double", _Double())
    x_leaf = x.clone().requires_grad_()
    x_in = x_leaf * 3  # not a leaf: the outer graph does not hold it either
    storage = StorageWeakRef(x_in.untyped_storage())
    (y,) = om.opaque_call("tests.double", [x_in, w])
    del x_in
    gc.collect()
    assert storage.expired()
    y.sum().backward()
    torch.testing.assert_close(x_leaf.grad, torch.full((6, 3), 6.0, dtype=x.dtype) @ w.detach().T)
    assert om.live_graphs() == 0


class _Double:
    def forward(self, inputs):
        x, w = inputs
        return ((x * 2) @ w.detach() + w.sum(),)

    def fake(self, inputs):
        x, w = inputs
        return (x.new_empty(x.shape[0], w.shape[1]),)


def test_second_backward_raises(setup):
    module, x, counts, run = setup
    y, _ = run(x)
    loss = y.sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recorded forward graph is gone"):
        loss.backward()


def test_unknown_function_name_raises():
    with pytest.raises(ValueError, match="name: expected a registered opaque function"):
        om.opaque_call("tests.no_such_function", [torch.randn(2)])


def test_dead_object_handle_raises():
    registry = om.ObjectRegistry("thing")
    module = SplitLinear()
    handle = registry.register(module)
    assert registry.lookup(handle) is module
    del module
    gc.collect()
    assert len(registry) == 0
    with pytest.raises(RuntimeError, match="names no live object"):
        registry.lookup(handle)


def test_opcheck(setup):
    module, x, counts, run = setup
    handle = MODULES.register(module)
    args = ("tests.split_linear", [handle, x, counts, module.w, module.b, module.unused],
            [False, True, False, True, True, True], [1] * 6)
    torch.library.opcheck(torch.ops.moe.opaque_forward, args)
    assert om.live_graphs() == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_one_graph_same_gradients(setup, backend):
    module, x, counts, run = setup
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(run, fullgraph=True, backend=counter)
    y, x2 = compiled(x)
    assert counter.frame_count == 1
    ref_y, ref_x2 = _direct(module, x, counts)
    torch.testing.assert_close(y, ref_y)
    got = torch.autograd.grad((y * y).sum() + x2.sum(), [x, module.w, module.b, module.unused])
    want = torch.autograd.grad((ref_y * ref_y).sum() + ref_x2.sum(), [x, module.w, module.b])
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)
    assert torch.equal(got[-1], torch.zeros_like(module.unused))
    assert om.live_graphs() == 0
    with torch.no_grad():
        compiled(x)
    assert om.live_graphs() == 0


def test_compile_shares_one_graph_across_instances():
    """The instance travels as a handle tensor: a second module does not recompile."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    counts = torch.tensor([2, 3])

    def run(handle, module, x):
        return om.opaque_call("tests.split_linear", [handle, x, counts, module.w, module.b, module.unused])[0]

    compiled = torch.compile(run, fullgraph=True, backend=counter)
    x = torch.randn(5, 4, dtype=torch.float64)
    for _ in range(3):
        module = SplitLinear()
        y = compiled(MODULES.register(module), module, x)
        torch.testing.assert_close(y, module(x, counts))
    assert counter.frame_count == 1


class _MatMul:
    def forward(self, inputs):
        x, w = inputs
        return (x @ w,)

    def fake(self, inputs):
        x, w = inputs
        return (x.new_empty(x.shape[0], w.shape[1]),)


def test_autocast_stays_off_inside_the_op():
    """Re-enabling autograd must not also lift the autocast exclusion (float32 would run in bfloat16 on CPU)."""
    om.register_function("tests.matmul", _MatMul())
    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 8, requires_grad=True)
    (y,) = om.opaque_call("tests.matmul", [x, w])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, x @ w, rtol=1e-6, atol=1e-6)
    gx, gw = torch.autograd.grad(y.sum(), [x, w])
    rx, rw = torch.autograd.grad((x @ w).sum(), [x, w])
    torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-6)


class _Stacked:
    """inputs: x [N, d], w0, w1, w2 [d, c] (one group) -> x @ (w0 + 2 w1 + 3 w2); w1's gradient is fixed to 0."""

    def forward(self, inputs):
        x, *ws = inputs
        stacked = torch.stack(ws)  # backward: unbind views of one buffer, like TE's packed wgrad
        out = x @ (stacked * torch.tensor([1.0, 2.0, 3.0], dtype=x.dtype)[:, None, None]).sum(0)

        def fix(grads):
            grads[2].zero_()

        return om.OpaqueResult([out], fix)

    def fake(self, inputs):
        x, w = inputs[0], inputs[1]
        return [x.new_empty(x.shape[0], w.shape[1])]


def test_grouped_inputs_travel_stacked_without_a_copy():
    om.register_function("tests.stacked", _Stacked())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    (y,) = om.opaque_call("tests.stacked", [x, *ws], groups=[1, 3])
    torch.testing.assert_close(y, x @ (ws[0] + 2 * ws[1] + 3 * ws[2]))
    g = torch.randn_like(y)
    y.backward(g)
    base = x.detach().T @ g
    torch.testing.assert_close(ws[0].grad, base)
    assert torch.equal(ws[1].grad, torch.zeros_like(ws[1]))  # fix_input_grads ran
    torch.testing.assert_close(ws[2].grad, 3 * base)
    # the three gradients are slices of the one buffer stack's backward produced
    ptrs = {w.grad.untyped_storage().data_ptr() for w in ws}
    assert len(ptrs) == 1


def test_groups_are_checked():
    om.register_function("tests.stacked", _Stacked())
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="groups: expected positive sizes"):
        om.opaque_call("tests.stacked", [x, x, x], groups=[2, 2])
    with pytest.raises(ValueError, match=r"inputs\[2\]: expected shape \(4, 3\)"):
        om.opaque_call("tests.stacked", [x, torch.randn(4, 3), torch.randn(4, 2)], groups=[1, 2])
