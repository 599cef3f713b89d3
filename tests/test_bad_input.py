"""Bad input raises ValueError / TypeError naming the argument (and, for ops, the expected and the
actual value) — eagerly and from the fake implementation, so compile and export fail the same way.

A device mismatch is simulated with the "meta" device next to the CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map

import moe_ops
from moe_modules import GroupedExperts, GroupedExpertsDeepEP, MoEConfig
from moe_modules.experts import get_expert_activation, get_expert_activation_for_deepep, is_gated_activation

T, K, E, D = 6, 2, 4, 8
CPU = torch.device("cpu")


def t(*shape, dtype=torch.float32, device=CPU):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(device) if dtype.is_floating_point \
        else torch.zeros(shape, dtype=dtype, device=device)


def meta(x):
    return x.to("meta")


def offsets(groups=E, dtype=torch.int32):
    return torch.tensor([2, 2, 7, 10][:groups] + [10] * max(0, groups - 4), dtype=dtype)


def rop(tokens=T, k=K, dtype=torch.int64):
    return torch.arange(tokens * k, dtype=dtype).view(tokens, k)


def indices(tokens=T, dtype=torch.int64):
    return torch.tensor([[0, 1], [2, 3], [1, -1], [3, 0], [2, 2], [0, 1]][:tokens], dtype=dtype)


def mask(tokens=T, dtype=torch.bool):
    return torch.ones(tokens, dtype=dtype)


# (id, op, args, exception, substrings of the message: argument, expected, actual)
OP_CASES = [
    ("route-indices-dims", "route", (indices()[:, 0], mask(), 0, E), ValueError, ["indices", "2-D", "(6,)"]),
    ("route-indices-dtype", "route", (indices().float(), mask(), 0, E), TypeError, ["indices", "int64", "float32"]),
    ("route-mask-dtype", "route", (indices(), mask(dtype=torch.int64), 0, E), TypeError, ["token_mask", "bool", "int64"]),
    ("route-mask-T", "route", (indices(), mask(5), 0, E), ValueError, ["token_mask", "6", "5"]),
    ("route-mask-device", "route", (indices(), meta(mask()), 0, E), ValueError, ["token_mask", "cpu", "meta"]),
    ("route-num-experts", "route", (indices(), mask(), 0, 0), ValueError, ["num_experts", "positive", "0"]),
    ("route-expert-start", "route", (indices(), mask(), -1, E), ValueError, ["expert_start", "non-negative", "-1"]),
    ("gather-x-dims", "gather", (t(T, D, 1), rop(), offsets(), None), ValueError, ["x", "2-D", "(6, 8, 1)"]),
    ("gather-x-dtype", "gather", (t(T, D, dtype=torch.int64), rop(), offsets(), None), TypeError, ["x", "float32", "int64"]),
    ("gather-T", "gather", (t(T - 1, D), rop(), offsets(), None), ValueError, ["row_of_pair", "5", "6"]),
    ("gather-rop-dtype", "gather", (t(T, D), rop(dtype=torch.int32), offsets(), None), TypeError,
     ["row_of_pair", "int64", "int32"]),
    ("gather-offsets-dtype", "gather", (t(T, D), rop(), offsets(dtype=torch.int64), None), TypeError,
     ["offsets", "int32", "int64"]),
    ("gather-weights-K", "gather", (t(T, D), rop(), offsets(), t(T, K + 1)), ValueError, ["weights", "2", "3"]),
    ("gather-weights-T", "gather", (t(T, D), rop(), offsets(), t(T + 1, K)), ValueError, ["weights", "6", "7"]),
    ("gather-weights-device", "gather", (t(T, D), rop(), offsets(), meta(t(T, K))), ValueError, ["weights", "cpu", "meta"]),
    ("gather-offsets-device", "gather", (t(T, D), rop(), meta(offsets()), None), ValueError, ["offsets", "cpu", "meta"]),
    # Fewer than T*K expert-order rows are allowed (expert parallelism sends only the valid ones); more are not.
    ("combine-rows", "combine", (t(T * K + 1, D), rop(), offsets(), None), ValueError, ["rows", "12", "13"]),
    ("pair_dot-rows", "pair_dot", (t(T, D), t(T * K + 1, D), rop(), offsets()), ValueError, ["rows", "12", "13"]),
    ("gather-num_rows", "gather", (t(T, D), rop(), offsets(), None, T * K + 1), ValueError, ["num_rows", "12", "13"]),
    ("gather-num_rows-negative", "gather", (t(T, D), rop(), offsets(), None, -1), ValueError, ["num_rows", "-1"]),
    ("combine-rows-dims", "combine", (t(T * K), rop(), offsets(), None), ValueError, ["rows", "2-D", "(12,)"]),
    ("pair_dot-width", "pair_dot", (t(T, D), t(T * K, D - 1), rop(), offsets()), ValueError, ["rows", "8", "7"]),
    ("pair_dot-T", "pair_dot", (t(T + 1, D), t(T * K, D), rop(), offsets()), ValueError, ["row_of_pair", "7", "6"]),
    ("grouped_mm-a-dims", "grouped_mm", (t(T * K), t(E, D, 3), offsets()), ValueError, ["a", "2-D", "(12,)"]),
    ("grouped_mm-b-dims", "grouped_mm", (t(T * K, D), t(D, 3), offsets()), ValueError, ["b", "3-D", "(8, 3)"]),
    ("grouped_mm-b-dtype", "grouped_mm", (t(T * K, D), t(E, D, 3, dtype=torch.float64), offsets()), TypeError,
     ["b", "float32", "float64"]),
    ("grouped_mm-inner", "grouped_mm", (t(T * K, D), t(E, D - 1, 3), offsets()), ValueError, ["b", "8", "7"]),
    ("grouped_mm-groups", "grouped_mm", (t(T * K, D), t(E, D, 3), offsets(E - 1)), ValueError, ["offsets", "4", "3"]),
    ("grouped_mm-offsets-dims", "grouped_mm", (t(T * K, D), t(E, D, 3), offsets().view(2, 2)), ValueError,
     ["offsets", "1-D", "(2, 2)"]),
    ("grouped_mm-b-device", "grouped_mm", (t(T * K, D), meta(t(E, D, 3)), offsets()), ValueError, ["b", "cpu", "meta"]),
    ("wgrad-rows", "grouped_mm_wgrad", (t(T * K, D), t(T * K - 1, 3), offsets()), ValueError, ["grad", "12", "11"]),
    ("wgrad-dtype", "grouped_mm_wgrad", (t(T * K, D), t(T * K, 3, dtype=torch.bfloat16), offsets()), TypeError,
     ["grad", "float32", "bfloat16"]),
    ("bias-width", "add_expert_bias", (t(T * K, D), t(E, D - 1), offsets(), None), ValueError, ["bias", "8", "7"]),
    ("bias-groups", "add_expert_bias", (t(T * K, D), t(E + 1, D), offsets(), None), ValueError, ["offsets", "5", "4"]),
    ("bias-probs-shape", "add_expert_bias", (t(T * K, D), t(E, D), offsets(), t(T * K, 2)), ValueError,
     ["probs", "[N] or [N, 1]", "(12, 2)"]),
    ("bias-probs-rows", "add_expert_bias", (t(T * K, D), t(E, D), offsets(), t(T * K - 1)), ValueError,
     ["probs", "12", "11"]),
    ("bias-probs-dtype", "add_expert_bias", (t(T * K, D), t(E, D), offsets(), t(T * K, dtype=torch.int64)), TypeError,
     ["probs", "float32", "int64"]),
    ("bias_backward-width", "expert_bias_backward", (t(T * K, D + 1), t(E, D), offsets(), None), ValueError,
     ["bias", "9", "8"]),
    ("activation-kind", "activation", (t(5, 8), None, "gelu", 1.702, 7.0, 1.0), ValueError,
     ["activation", "'gelu'", "swiglu", "quick_geglu", "relu2"]),
    ("activation-odd-width", "activation", (t(5, 7), None, "swiglu", 1.702, 7.0, 1.0), ValueError, ["h", "even", "7"]),
    ("activation-h-dims", "activation", (t(5), None, "relu2", 1.702, 7.0, 1.0), ValueError, ["h", "2-D", "(5,)"]),
    ("activation-probs-rows", "activation", (t(5, 8), t(4), "swiglu", 1.702, 7.0, 1.0), ValueError, ["probs", "5", "4"]),
    ("activation-probs-device", "activation", (t(5, 8), meta(t(5)), "relu2", 1.702, 7.0, 1.0), ValueError,
     ["probs", "cpu", "meta"]),
    ("activation_backward-kind", "activation_backward", (t(5, 4), t(5, 8), None, "gelu", 1.702, 7.0, 1.0),
     ValueError, ["activation", "'gelu'"]),
    ("activation_backward-grad-width", "activation_backward", (t(5, 8), t(5, 8), None, "swiglu", 1.702, 7.0, 1.0),
     ValueError, ["grad", "4", "8"]),
    ("activation_backward-grad-rows", "activation_backward", (t(4, 8), t(5, 8), None, "relu2", 1.702, 7.0, 1.0),
     ValueError, ["grad", "5", "4"]),
    ("activation_backward-grad-dims", "activation_backward", (t(5), t(5, 8), None, "relu2", 1.702, 7.0, 1.0),
     ValueError, ["grad", "2-D", "(5,)"]),
    ("activation_backward-grad-device", "activation_backward", (meta(t(5, 4)), t(5, 8), None, "swiglu", 1.702, 7.0,
                                                                1.0), ValueError, ["grad", "cpu", "meta"]),
]


def fake_args(mode: FakeTensorMode, args):
    return tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, args)


def assert_same_error_eager_and_fake(fn, args, exc_type, needles, allow_real_params=False):
    with pytest.raises(exc_type) as eager:
        fn(*args)
    message = str(eager.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"{missing} not in {message!r}"
    mode = FakeTensorMode(allow_non_fake_inputs=allow_real_params)
    with pytest.raises(exc_type) as fake, mode:
        fn(*fake_args(mode, args))
    assert str(fake.value) == message


@pytest.mark.parametrize("op, args, exc_type, needles", [c[1:] for c in OP_CASES], ids=[c[0] for c in OP_CASES])
def test_op_rejects_bad_input_eagerly_and_in_the_fake(op, args, exc_type, needles):
    assert_same_error_eager_and_fake(getattr(torch.ops.moe, op), args, exc_type, needles)


def test_every_foundation_op_has_bad_input_cases():
    ops = {c[1] for c in OP_CASES}
    assert ops == {"route", "gather", "combine", "pair_dot", "grouped_mm", "grouped_mm_wgrad", "add_expert_bias",
                   "expert_bias_backward", "activation", "activation_backward"}


def exception_chain(err: BaseException) -> list:
    chain = []
    while err is not None:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def test_bad_input_fails_the_same_way_under_torch_compile():
    """Dynamo runs the fake while tracing: the compiled call fails with the eager ValueError (Dynamo
    wraps it in its own TorchRuntimeError, whose chain holds the original with the same message)."""
    args = (t(T * K, D), t(E, D - 1, 3), offsets())
    with pytest.raises(ValueError) as eager:
        moe_ops.grouped_mm(*args)
    torch._dynamo.reset()
    compiled = torch.compile(moe_ops.grouped_mm, fullgraph=True, backend="eager")
    with pytest.raises(Exception) as traced:
        compiled(*args)
    torch._dynamo.reset()
    originals = [e for e in exception_chain(traced.value) if isinstance(e, ValueError)]
    assert [str(e) for e in originals] == [str(eager.value)]


# ---- modules -----------------------------------------------------------------------------------------


def config(**kw):
    return MoEConfig(**{**dict(n_routed_experts=E, n_activated_experts=K, dim=D, moe_inter_dim=4,
                               dtype=torch.float32), **kw})


def forward_inputs(**replace):
    inputs = dict(x=t(T, D), token_mask=mask(), weights=t(T, K), indices=indices())
    inputs.update(replace)
    return tuple(inputs.values())


MODULE_CASES = [
    ("x-dims", dict(x=t(T, D, 1)), ValueError, ["x", "2-D"]),
    ("x-dim", dict(x=t(T, D - 1)), ValueError, ["x", "8", "7"]),
    ("x-dtype", dict(x=t(T, D, dtype=torch.int32)), TypeError, ["x", "int32"]),
    ("mask-dtype", dict(token_mask=mask(dtype=torch.float32)), TypeError, ["token_mask", "bool", "float32"]),
    ("mask-T", dict(token_mask=mask(T - 1)), ValueError, ["token_mask", "6", "5"]),
    ("weights-T", dict(weights=t(T - 1, K)), ValueError, ["weights", "6", "5"]),
    ("weights-dims", dict(weights=t(T)), ValueError, ["weights", "2-D"]),
    ("indices-T", dict(indices=indices(T - 1)), ValueError, ["indices", "6", "5"]),
    ("indices-K", dict(indices=indices()[:, :1]), ValueError, ["indices", "2", "1"]),
    ("indices-dtype", dict(indices=indices().float()), TypeError, ["indices", "float32"]),
    ("weights-device", dict(weights=meta(t(T, K))), ValueError, ["weights", "cpu", "meta"]),
    ("indices-device", dict(indices=meta(indices())), ValueError, ["indices", "cpu", "meta"]),
]


@pytest.mark.parametrize("cls", [GroupedExperts, GroupedExpertsDeepEP], ids=lambda c: c.__name__)
@pytest.mark.parametrize("replace, exc_type, needles", [c[1:] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
def test_module_rejects_bad_input(cls, replace, exc_type, needles):
    module = cls(config())
    module.init_weights(CPU)
    assert_same_error_eager_and_fake(module, forward_inputs(**replace), exc_type, needles, allow_real_params=True)


# ---- configuration and activation names ---------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("n_routed_experts", 0), ("n_activated_experts", 0), ("dim", -8),
                                          ("moe_inter_dim", 0), ("dim", 8.0)])
def test_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=field) as err:
        config(**{field: value})
    assert repr(value) in str(err.value)


def test_config_rejects_more_activated_than_routed_experts():
    with pytest.raises(ValueError, match="n_activated_experts") as err:
        config(n_activated_experts=E + 1)
    assert str(E) in str(err.value) and str(E + 1) in str(err.value)


def test_config_rejects_unknown_dtype_name():
    with pytest.raises(ValueError, match="dtype"):
        config(dtype="fp7")


KNOWN = ("swiglu", "quick_geglu", "relu2")


def assert_names_activation(err):
    message = str(err.value)
    assert "'gelu'" in message and all(name in message for name in KNOWN), message


def test_unknown_activation_in_config():
    with pytest.raises(ValueError) as err:
        config(expert_activation="gelu")
    assert_names_activation(err)


def test_unknown_activation_assigned_after_construction():
    cfg = config()
    with pytest.raises(ValueError) as err:
        cfg.expert_activation = "gelu"
    assert_names_activation(err)
    assert cfg.expert_activation == "swiglu"  # the config keeps its valid value


@pytest.mark.parametrize("value", [["swiglu"], None, 3], ids=["list", "None", "int"])
@pytest.mark.parametrize("when", ["construction", "assignment"])
def test_activation_of_another_type_is_refused(value, when):
    with pytest.raises(TypeError) as err:
        if when == "construction":
            config(expert_activation=value)
        else:
            config().expert_activation = value
    message = str(err.value)
    assert "expert_activation" in message and type(value).__name__ in message and repr(value) in message, message


@pytest.mark.parametrize("dtype, exc_type", [(torch.int32, ValueError), (torch.float8_e4m3fn, ValueError),
                                             (torch.bool, ValueError), (5, TypeError), ("int8", ValueError)],
                         ids=["int32", "float8_e4m3fn", "bool", "int", "int8-name"])
def test_config_rejects_non_floating_dtypes(dtype, exc_type):
    with pytest.raises(exc_type) as err:
        config(dtype=dtype)
    assert "dtype" in str(err.value) and str(dtype).replace("torch.", "") in str(err.value), err.value
    cfg = config()
    with pytest.raises(exc_type):
        cfg.dtype = dtype  # at assignment too
    assert cfg.dtype == torch.float32


def test_config_checks_sizes_at_assignment():
    cfg = config()
    with pytest.raises(ValueError, match="moe_inter_dim"):
        cfg.moe_inter_dim = 0
    with pytest.raises(ValueError, match="n_activated_experts") as err:
        cfg.n_routed_experts = K - 1  # fewer experts than activated
    assert str(K - 1) in str(err.value)
    assert (cfg.moe_inter_dim, cfg.n_routed_experts) == (4, E)


def test_module_activation_of_unknown_kind_is_refused():
    from moe_modules.expert_block import Activation
    with pytest.raises(ValueError) as err:
        Activation("gelu")
    assert_names_activation(err)


@pytest.mark.parametrize("lookup", [get_expert_activation, get_expert_activation_for_deepep,
                                    lambda c: is_gated_activation(c.expert_activation)],
                         ids=["get_expert_activation", "get_expert_activation_for_deepep", "is_gated_activation"])
def test_unknown_activation_at_lookup(lookup):
    import types
    cfg = types.SimpleNamespace(expert_activation="gelu")  # a config-like object that checks nothing itself
    with pytest.raises(ValueError) as err:
        lookup(cfg)
    assert_names_activation(err)


# ---- the functional whole-expert helpers ----------------------------------------------------------------

I = 4
HELPER_CASES = [  # (id, replace, exception, substrings: argument, expected, actual)
    ("x-dims", dict(x=t(T)), ValueError, ["x", "2-D", "(6,)"]),
    ("x-dtype", dict(x=t(T, D, dtype=torch.int64)), TypeError, ["x", "floating", "int64"]),
    ("w1-rows", dict(gate_and_up_proj=t(D - 1, 2 * I)), ValueError, ["gate_and_up_proj", str(D), str(D - 1)]),
    ("w1-odd", dict(gate_and_up_proj=t(D, 2 * I - 1)), ValueError, ["gate_and_up_proj", "even", str(2 * I - 1)]),
    ("w1-dtype", dict(gate_and_up_proj=t(D, 2 * I, dtype=torch.float64)), TypeError,
     ["gate_and_up_proj", "float32", "float64"]),
    ("w2-rows", dict(down_proj=t(I + 1, D)), ValueError, ["down_proj", str(I), str(I + 1)]),
    ("w2-dtype", dict(down_proj=t(I, D, dtype=torch.bfloat16)), TypeError, ["down_proj", "float32", "bfloat16"]),
    ("w2-device", dict(down_proj=meta(t(I, D))), ValueError, ["down_proj", "cpu", "meta"]),
    ("b1-width", dict(gate_up_proj_bias=t(2 * I + 1)), ValueError, ["gate_up_proj_bias", str(2 * I), str(2 * I + 1)]),
    ("b2-width", dict(down_proj_bias=t(D - 1)), ValueError, ["down_proj_bias", str(D), str(D - 1)]),
    ("b2-dims", dict(down_proj_bias=t(1, D)), ValueError, ["down_proj_bias", "1-D", f"(1, {D})"]),
    ("b2-dtype", dict(down_proj_bias=t(D, dtype=torch.float64)), TypeError, ["down_proj_bias", "float32", "float64"]),
]


@pytest.mark.parametrize("helper", ["swiglu", "quick_geglu", "swigluoai", "geglu"])
@pytest.mark.parametrize("replace, exc_type, needles", [c[1:] for c in HELPER_CASES], ids=[c[0] for c in HELPER_CASES])
def test_whole_expert_helper_rejects_bad_input(helper, replace, exc_type, needles):
    from moe_modules import experts
    args = dict(x=t(T, D), gate_and_up_proj=t(D, 2 * I), down_proj=t(I, D), gate_up_proj_bias=t(2 * I),
                down_proj_bias=t(D))
    args.update(replace)
    x = args.pop("x")
    assert_same_error_eager_and_fake(lambda x, kw: getattr(experts, helper)(x, **kw), (x, args), exc_type, needles)


def test_relu2_helper_checks_the_ungated_widths():
    from moe_modules.experts import relu2
    with pytest.raises(ValueError) as err:
        relu2(t(T, D), gate_and_up_proj=t(D, I), down_proj=t(2 * I, D))  # a gated down_proj
    assert all(s in str(err.value) for s in ("down_proj", str(I), str(2 * I))), err.value
