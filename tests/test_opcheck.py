"""Registration and autograd of every ``moe`` op: ``torch.library.opcheck`` and float64 gradcheck.

opcheck runs with gradients enabled and float inputs that require grad: under
``no_grad`` an op without any autograd formula passes (PITFALLS.md), and with
grad its aot_dispatch test differentiates through the op — for the backward ops
that is the double backward.  opcheck checks schema, fake and autograd
registration, not the math: the math of every backward is gradcheck's job.
"""

from __future__ import annotations

import pytest
import torch

from moe_ops import registry

OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
# The backward of another op: gradcheck checks their own (double-backward) formula once; the
# forward ops get gradgradcheck too, which runs these formulas on the ops' real backward graphs.
BACKWARD_OPS = {"expert_bias_backward", "activation_backward"}


def op_of(name: str):
    return getattr(torch.ops.moe, name).default


def float_inputs(args: tuple) -> list:
    return [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]


# Issue 2's op set. Ops added later (the fused expert_up / expert_down) are opchecked by their own
# suites (compile_tests/test_opcheck_dynamic.py).
FOUNDATION_OPS = {"route", "gather", "combine", "pair_dot", "grouped_mm", "grouped_mm_wgrad", "add_expert_bias",
                  "expert_bias_backward", "activation", "activation_backward"}


def test_every_foundation_op_is_registered_and_covered(covered_ops):
    assert FOUNDATION_OPS <= set(registry.OPS)
    assert covered_ops == FOUNDATION_OPS


def run_opcheck(op: str, args: tuple) -> None:
    assert op == "route" or any(a.requires_grad for a in float_inputs(args)), "opcheck needs inputs with grad"
    with torch.enable_grad():
        torch.library.opcheck(op_of(op), args, test_utils=OPCHECK_TESTS)


def run_gradcheck(op: str, args: tuple) -> None:
    """gradcheck (and gradgradcheck for forward ops) with respect to every float input."""
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]

    def f(*floats):
        full = list(args)
        for i, x in zip(positions, floats):
            full[i] = x
        out = op_of(op)(*full)
        # an absent probability gradient is an empty tensor with no dependence on anything
        return tuple(o for o in out if o.numel()) if isinstance(out, tuple) else out

    inputs = tuple(args[i] for i in positions)
    assert torch.autograd.gradcheck(f, inputs)
    if op not in BACKWARD_OPS:
        assert torch.autograd.gradgradcheck(f, inputs)


# ---- opcheck ---------------------------------------------------------------------------------


def test_opcheck_route(routing, contiguous):
    run_opcheck("route", routing.laid_out(contiguous).args())


def test_opcheck_routed_ops(routed_variant, group_pattern, contiguous, op_args):
    op, variant = routed_variant
    make = op_args(group_pattern, torch.float32, torch.float32, contiguous=contiguous, requires_grad=True)
    run_opcheck(op, getattr(make, op)(**variant))


def test_opcheck_routed_ops_bfloat16(routed_variant, mixed_routing, contiguous, op_args):
    op, variant = routed_variant
    make = op_args(mixed_routing, torch.bfloat16, torch.bfloat16, contiguous=contiguous, requires_grad=True)
    run_opcheck(op, getattr(make, op)(**variant))


# One row (a size Dynamo specialises) and a strided layout, without multiplying the two.
ROWS_AND_LAYOUTS = pytest.mark.parametrize("rows, contiguous", [(1, True), (5, True), (5, False)],
                                           ids=["1row", "5rows", "5rows-strided"])


@pytest.mark.parametrize("op", ["activation", "activation_backward"])
@ROWS_AND_LAYOUTS
def test_opcheck_activation_ops(op, activation_variant, rows, contiguous, op_args):
    make = op_args(None, torch.float32, torch.float32, contiguous=contiguous, requires_grad=True)
    run_opcheck(op, getattr(make, op)(rows, **activation_variant))


def test_opcheck_with_float32_probs_on_bfloat16_rows(mixed_routing, op_args):
    """Routing weights often stay float32 while activations are bfloat16."""
    make = op_args(mixed_routing, torch.bfloat16, torch.float32, requires_grad=True)
    for op, args in [("gather", make.gather(weighted=True)), ("combine", make.combine(weighted=True)),
                     ("add_expert_bias", make.add_expert_bias("N")), ("expert_bias_backward", make.expert_bias_backward("N1")),
                     ("activation", make.activation(5, "quick_geglu", probs="N")),
                     ("activation_backward", make.activation_backward(5, "swiglu", probs="N1"))]:
        run_opcheck(op, args)


# ---- gradcheck (float64) ---------------------------------------------------------------------------

# Narrow, odd widths: finite differences cost one evaluation per input element.
GRADCHECK_WIDTHS = (3, 2)


def test_gradcheck_routed_ops(routed_variant, group_pattern, contiguous, op_args):
    op, variant = routed_variant
    make = op_args(group_pattern, torch.float64, torch.float64, contiguous=contiguous, requires_grad=True,
                   widths=GRADCHECK_WIDTHS)
    run_gradcheck(op, getattr(make, op)(**variant))


@pytest.mark.parametrize("op", ["activation", "activation_backward"])
@ROWS_AND_LAYOUTS
def test_gradcheck_activation_ops(op, activation_variant, rows, contiguous, op_args):
    make = op_args(None, torch.float64, torch.float64, contiguous=contiguous, requires_grad=True,
                   widths=GRADCHECK_WIDTHS)
    run_gradcheck(op, getattr(make, op)(rows, **activation_variant))
