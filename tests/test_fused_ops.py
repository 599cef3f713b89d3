"""moe::expert_up / moe::expert_down (and their backward ops) on the registry's default backend.

They must equal the unfused composition they stand for — forward and every gradient — pass
opcheck with gradients enabled (for the backward ops that exercises their double backward),
and gradcheck / gradgradcheck in float64.  Kernels of other backends are compared with the
reference in tests/test_triton_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

import moe_ops

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
KINDS = [("swiglu", 7.0), ("quick_geglu", 2.0), ("quick_geglu", None), ("swigluoai", 2.0), ("geglu", None),
         ("relu2", 7.0)]
D, I = 5, 3  # odd widths


def kind_id(value):
    return f"{value[0]}-limit{value[1]}" if isinstance(value, tuple) else str(value)


class Block:
    """Inputs of expert_up / expert_down for one routing case."""

    def __init__(self, routing, kind, limit, bias, probs_shape="N", dtype=torch.float64, requires_grad=True):
        indices, token_mask, start, E = routing.args()
        self.kind, self.limit = kind, limit
        pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, start, E)
        self.routing = (pair_of_row, row_of_pair, offsets)
        T, K = row_of_pair.shape
        C = I if kind == "relu2" else 2 * I

        def rand(*shape, positive=False):
            t = torch.rand(shape, dtype=torch.float64) + 0.1 if positive else torch.randn(shape, dtype=torch.float64)
            return t.to(dtype).to(indices.device).requires_grad_(requires_grad)

        self.x, self.w1, self.w2 = rand(T, D), rand(E, D, C), rand(E, I, D)
        self.b1, self.b2 = (rand(E, C), rand(E, D)) if bias else (None, None)
        self.probs = None if probs_shape == "none" else rand(T * K, positive=True)
        if probs_shape == "N1":
            self.probs = self.probs.detach().unsqueeze(1).requires_grad_(requires_grad)
        self.h, self.grad_h, self.grad_y = rand(T * K, C), rand(T * K, C), rand(T, D)

    def act(self):
        return self.kind, 1.702, self.limit, 1.0

    def up_args(self):
        por, rop, offs = self.routing
        return (self.x, por, rop, offs, self.w1, self.b1)

    def down_args(self, h=None):
        por, rop, offs = self.routing
        return (self.h if h is None else h, self.w2, self.b2, self.probs, por, rop, offs, *self.act(), None)

    def up_backward_args(self):
        por, rop, offs = self.routing
        return (self.grad_h, self.x, por, rop, offs, self.w1, self.b1)

    def down_backward_args(self):
        por, rop, offs = self.routing
        return (self.grad_y, self.h, self.w2, self.b2, self.probs, por, rop, offs, *self.act())


def unfused(block: Block):
    """The composition the fused ops stand for (expert_block.py before the fused path)."""
    por, rop, offs = block.routing
    h = moe_ops.grouped_mm(moe_ops.gather(block.x, rop, offs), block.w1, offs)
    if block.b1 is not None:
        h = moe_ops.add_expert_bias(h, block.b1, offs)
    out = moe_ops.grouped_mm(moe_ops.activation(h, block.probs, *block.act()), block.w2, offs)
    if block.b2 is not None:
        out = moe_ops.add_expert_bias(out, block.b2, offs, block.probs)
    return h, moe_ops.combine(out, rop, offs)


def fused(block: Block, num_rows=None):
    por, rop, offs = block.routing
    h = moe_ops.expert_up(block.x, por, rop, offs, block.w1, block.b1, num_rows)
    return h, moe_ops.expert_down(h, block.w2, block.b2, block.probs, por, rop, offs, *block.act())


def leaves(block: Block):
    return [t for t in (block.x, block.w1, block.w2, block.b1, block.b2, block.probs) if t is not None]


@pytest.mark.parametrize("kind_limit", KINDS, ids=kind_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("probs_shape", ["none", "N", "N1"])
def test_fused_equals_unfused(group_pattern, kind_limit, bias, probs_shape):
    block = Block(group_pattern, *kind_limit, bias, probs_shape, dtype=torch.float32)
    want, got = unfused(block), fused(block)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)
    grad_y = torch.randn_like(want[1])
    want_grads = torch.autograd.grad(want[1], leaves(block), grad_y)
    got_grads = torch.autograd.grad(got[1], leaves(block), grad_y)
    for w, g in zip(want_grads, got_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_expert_down_float32_output(mixed_routing):
    block = Block(mixed_routing, "swiglu", 7.0, True, dtype=torch.bfloat16)
    args = list(block.down_args())
    args[-1] = torch.float32
    y = torch.ops.moe.expert_down(*args)
    assert y.dtype == torch.float32
    por, rop, offs = block.routing
    a = moe_ops.activation(block.h, block.probs, *block.act())
    out = moe_ops.add_expert_bias(moe_ops.grouped_mm(a, block.w2, offs), block.b2, offs, block.probs)
    torch.testing.assert_close(y, moe_ops.combine(out.float(), rop, offs))
    y.sum().backward()  # the float32 gradient comes back in h.dtype
    assert block.h.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("kind_limit", KINDS, ids=kind_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_opcheck(mixed_routing, kind_limit, bias):
    block = Block(mixed_routing, *kind_limit, bias, dtype=torch.float32)
    with torch.enable_grad():
        for op, args in [("expert_up", block.up_args()), ("expert_down", block.down_args()),
                         ("expert_up_backward", block.up_backward_args()),
                         ("expert_down_backward", block.down_backward_args())]:
            torch.library.opcheck(getattr(torch.ops.moe, op).default, args, test_utils=OPCHECK_TESTS)


def float_positions(args):
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad]


def check_gradients(op, args, keep, second_order=True):
    """gradcheck (and gradgradcheck) of ``op`` in every float input; ``keep`` picks the outputs."""
    positions = float_positions(args)

    def f(*floats):
        full = list(args)
        for i, t in zip(positions, floats):
            full[i] = t
        return keep(getattr(torch.ops.moe, op)(*full))

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(f, inputs)
    if second_order:
        assert torch.autograd.gradgradcheck(f, inputs)


def nonempty(outputs):
    return tuple(o for o in outputs if o.numel())


@pytest.mark.parametrize("kind_limit", KINDS, ids=kind_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gradcheck(mixed_routing, kind_limit, bias):
    block = Block(mixed_routing, *kind_limit, bias)
    check_gradients("expert_up", block.up_args(), lambda out: out)
    check_gradients("expert_down", block.down_args(), lambda out: out)
    # the backward ops' own formula (their double backward); gradgradcheck of the forward ops above
    # already runs it on the real backward graph
    check_gradients("expert_up_backward", block.up_backward_args(), nonempty, second_order=False)
    check_gradients("expert_down_backward", block.down_backward_args(), nonempty, second_order=False)


def valid_rows(block: Block) -> int:
    return int(block.routing[2][-1])


@pytest.mark.parametrize("kind_limit", KINDS[:1] + KINDS[-1:], ids=kind_id)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_num_rows_keeps_the_first_rows(mixed_routing, kind_limit, bias):
    """``expert_up(num_rows=n)`` with n the valid pairs (what the expert-parallel receiver passes): ``h``
    has n rows, equal to the first n of the full call; ``y`` and every gradient are equal."""
    block = Block(mixed_routing, *kind_limit, bias, dtype=torch.float32)
    n = valid_rows(block)
    assert 0 < n < block.x.shape[0] * block.routing[1].shape[1]  # masked pairs: fewer rows than T*K
    full, cut = fused(block), fused(block, n)
    assert cut[0].shape[0] == n
    torch.testing.assert_close(cut[0], full[0][:n], atol=0, rtol=0)
    torch.testing.assert_close(cut[1], full[1], atol=1e-6, rtol=1e-6)
    grad_y = torch.randn_like(full[1])
    for w, g in zip(torch.autograd.grad(full[1], leaves(block), grad_y),
                    torch.autograd.grad(cut[1], leaves(block), grad_y)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_num_rows_opcheck_and_gradcheck(mixed_routing):
    block = Block(mixed_routing, "swiglu", 7.0, True)
    n = valid_rows(block)
    up = (*block.up_args(), n)
    with torch.enable_grad():
        torch.library.opcheck(torch.ops.moe.expert_up.default, up, test_utils=OPCHECK_TESTS)
    check_gradients("expert_up", up, lambda out: out)
    check_gradients("expert_down", block.down_args(block.h.detach()[:n].requires_grad_()), lambda out: out)
    with pytest.raises(ValueError, match="num_rows"):
        torch.ops.moe.expert_up(*block.up_args(), block.x.shape[0] * 1000)


def test_bad_inputs_name_the_argument(mixed_routing):
    block = Block(mixed_routing, "swiglu", 7.0, True, dtype=torch.float32, requires_grad=False)
    args = list(block.up_args())
    with pytest.raises(TypeError, match="w1"):
        torch.ops.moe.expert_up(*args[:4], block.w1.double(), *args[5:])
    with pytest.raises(ValueError, match="pair_of_row"):
        torch.ops.moe.expert_up(args[0], args[1][:-1], *args[2:])
    with pytest.raises(ValueError, match="b1"):
        torch.ops.moe.expert_up(*args[:5], block.b1[:, :-1])
    down = list(block.down_args())
    with pytest.raises(ValueError, match="activation"):
        torch.ops.moe.expert_down(*down[:7], "gelu", *down[8:])
    with pytest.raises(ValueError, match="w2"):
        torch.ops.moe.expert_down(down[0], block.w2[:, :-1], *down[2:])
    with pytest.raises(ValueError, match="h"):
        torch.ops.moe.expert_down(down[0][:, :-1], *down[1:])
    with pytest.raises(TypeError, match="out_dtype"):
        torch.ops.moe.expert_down(*down[:-1], torch.int32)
