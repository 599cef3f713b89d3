"""Every ``moe`` op against the float64 loop reference, over routing cases, dtypes and layouts."""

from __future__ import annotations

import pytest
import torch

import moe_ops
import reference
from reference import TOLERANCE, assert_matches

# Result dtype of each output, from the op's arguments (DESIGN.md: outputs in the input dtype,
# pair_dot in float32 or float64, probability gradients like the probabilities).
ACC = {torch.float64: torch.float64}


def expected_dtypes(op: str, args: tuple) -> list:
    first = args[0].dtype
    if op == "pair_dot":
        return [ACC.get(first, torch.float32)]
    if op == "expert_bias_backward":
        return [args[1].dtype, None if args[3] is None else args[3].dtype]
    if op == "activation_backward":
        return [args[1].dtype, None if args[2] is None else args[2].dtype]
    return [first]


def check_against_reference(op: str, args: tuple) -> None:
    outputs = getattr(torch.ops.moe, op)(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    expected = getattr(reference, op)(*args)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for i, (out, ref, dtype) in enumerate(zip(outputs, expected, expected_dtypes(op, args), strict=True)):
        what = f"{op} output {i}"
        assert out.device == args[0].device, what
        if ref is None:  # a probability gradient without probabilities: an empty float32 tensor
            assert out.shape == (0,) and out.dtype == torch.float32, what
            continue
        assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
        assert out.is_contiguous(), f"{what}: not contiguous (the fakes declare contiguous outputs)"
        assert_matches(out, ref, TOLERANCE[out.dtype], what)


def test_routed_ops_match_reference(routed_variant, routing, dtypes, contiguous, op_args):
    op, variant = routed_variant
    make = op_args(routing, *dtypes, contiguous=contiguous, poison_tail=True)
    check_against_reference(op, getattr(make, op)(**variant))


@pytest.mark.parametrize("rows", [1, 7])
def test_activation_ops_match_reference(activation_variant, rows, dtypes, contiguous, op_args):
    make = op_args(None, *dtypes, contiguous=contiguous)
    for op in ("activation", "activation_backward"):
        check_against_reference(op, getattr(make, op)(rows, **activation_variant))


@pytest.mark.parametrize("rows", [1, 7])
def test_activation_backward_with_output_is_both_ops(activation_variant, rows, dtypes, contiguous, op_args):
    """One pass over h, the same values as activation_backward and activation called apart."""
    args = op_args(None, *dtypes, contiguous=contiguous).activation_backward(rows, **activation_variant)
    grad_h, grad_probs, out = torch.ops.moe.activation_backward_with_output(*args)
    want_h, want_probs = torch.ops.moe.activation_backward(*args)
    torch.testing.assert_close(grad_h, want_h, atol=0, rtol=0)
    torch.testing.assert_close(grad_probs, want_probs, atol=0, rtol=0)
    torch.testing.assert_close(out, torch.ops.moe.activation(*args[1:]), atol=0, rtol=0)


def test_quick_geglu_clamps_and_limit_none_does_not(op_args):
    """The test inputs do reach past the limit, and ``limit=None`` changes the result there."""
    h, probs, kind, alpha, _, offset = op_args(None, torch.float64, torch.float64).activation(64, "quick_geglu")
    assert (h.abs() > 7).any()
    clamped = moe_ops.activation(h, probs, kind, alpha, 7.0, offset)
    unclamped = moe_ops.activation(h, probs, kind, alpha, None, offset)
    assert not torch.equal(clamped, unclamped)


# ---- route ---------------------------------------------------------------------------------


def test_route_is_a_stable_token_major_sort(routing, contiguous):
    r = routing.laid_out(contiguous)
    pair_of_row, row_of_pair, tokens_per_expert, offsets = moe_ops.route(*r.args())
    ref = routing.ref()
    T, K, E = routing.T, routing.K, routing.num_experts

    assert (pair_of_row.shape, pair_of_row.dtype) == ((T * K,), torch.int64)
    assert (row_of_pair.shape, row_of_pair.dtype) == ((T, K), torch.int64)
    assert (tokens_per_expert.shape, tokens_per_expert.dtype) == ((E,), torch.int64)
    assert (offsets.shape, offsets.dtype) == ((E,), torch.int32)
    assert tokens_per_expert.tolist() == ref.tokens_per_expert
    assert offsets.tolist() == ref.offsets
    n_valid = ref.offsets[-1]
    # Valid rows: by expert, then token, then slot (stable); the rest past the last group.
    assert pair_of_row[:n_valid].tolist() == ref.pair_of_valid_row
    assert set(pair_of_row[n_valid:].tolist()) == ref.invalid_pairs
    # row_of_pair is the inverse permutation.
    assert torch.equal(row_of_pair.reshape(-1)[pair_of_row].cpu(), torch.arange(T * K))


def test_route_local_range_keeps_only_local_experts(device):
    indices = torch.tensor([[0, 5], [6, 7], [5, 6]], device=device)
    mask = torch.ones(3, dtype=torch.bool, device=device)
    pair_of_row, _, tokens_per_expert, offsets = moe_ops.route(indices, mask, 5, 2)
    assert tokens_per_expert.tolist() == [2, 2]  # experts 5 and 6; 0 and 7 belong to other ranks
    assert offsets.tolist() == [2, 4]
    assert pair_of_row[:4].tolist() == [1, 4, 2, 5]  # pair t*K+k: (0,1), (2,0) for 5; (1,0), (2,1) for 6


# ---- grouped GEMM edge: rows of no group ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_mm_rows_past_last_offset_are_exactly_zero(routing, dtype, op_args):
    a, b, offsets = op_args(routing, dtype, dtype, poison_tail=True).grouped_mm()
    out = moe_ops.grouped_mm(a, b, offsets)
    end = int(offsets[-1])
    assert a[end:].isnan().all()  # the inputs there are NaN, the outputs must still be 0
    assert (out[end:] == 0).all()
    assert not out[:end].isnan().any()


def test_grouped_mm_wgrad_empty_groups_are_zero(routing, op_args):
    a, grad, offsets = op_args(routing, torch.float32, torch.float32, poison_tail=True).grouped_mm_wgrad()
    out = moe_ops.grouped_mm_wgrad(a, grad, offsets)
    empty = torch.tensor(routing.ref().tokens_per_expert) == 0
    assert (out[empty.to(out.device)] == 0).all()
    assert not out.isnan().any()
