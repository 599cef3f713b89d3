"""The backend registry: default choice, forcing per op and for all ops, precedence, errors, support table."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import moe_ops
from moe_ops import registry

ENV = registry.ENV_VAR  # MOE_OPS_BACKEND


@pytest.fixture(autouse=True)
def _no_backend_from_environment(monkeypatch):
    """These tests set the environment themselves; one set by the caller must not leak in."""
    monkeypatch.delenv(ENV, raising=False)


def cpu_args(make, op: str, **variant) -> tuple:
    """The CPU arguments of ``op`` (the registry's choice depends on the inputs' device)."""
    args = getattr(make, op)(**variant)
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.fixture
def gemm_args(op_args, mixed_routing):
    return cpu_args(op_args(mixed_routing, torch.float32, torch.float32), "grouped_mm")


@pytest.fixture
def route_args(mixed_routing):
    return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in mixed_routing.args())


def run(op: str, args: tuple):
    return getattr(torch.ops.moe, op)(*args)


# ---- default choice ----------------------------------------------------------------------------


CPU_ONLY_REFERENCE = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                        reason="TRITON_INTERPRET=1 lets triton run on the CPU")


CPU_BACKEND_OPS = set(registry.get_backend("cpu").kernels)  # the GEMMs and the fused ops


@CPU_ONLY_REFERENCE
def test_default_on_cpu(routed_variant, mixed_routing, op_args):
    """The GEMMs go to the ``cpu`` backend (torch._grouped_mm over the valid rows), the rest to the reference."""
    op, variant = routed_variant
    args = cpu_args(op_args(mixed_routing, torch.bfloat16, torch.bfloat16), op, **variant)
    assert registry.forced_backend(op) is None
    assert registry.choose(op, args).name == ("cpu" if op in CPU_BACKEND_OPS else "reference")


@CPU_ONLY_REFERENCE
def test_cpu_backend_leaves_float64_and_odd_widths_to_the_reference(op_args, mixed_routing):
    for dtype, widths in ((torch.float64, None), (torch.float32, (3, 2))):
        kw = {} if widths is None else {"widths": widths}
        args = cpu_args(op_args(mixed_routing, dtype, dtype, **kw), "grouped_mm")
        assert registry.choose("grouped_mm", args).name == "reference"
        assert registry.get_backend("cpu").not_supported_reasons("grouped_mm", args)


@CPU_ONLY_REFERENCE
@pytest.mark.parametrize("op", ["activation", "activation_backward"])
def test_default_on_cpu_is_reference_for_activations(op, op_args):
    args = cpu_args(op_args(None, torch.bfloat16, torch.bfloat16), op, rows=3, kind="swiglu")
    assert registry.choose(op, args).name == "reference"


@CPU_ONLY_REFERENCE
def test_default_on_cpu_is_reference_for_route(route_args):
    assert registry.choose("route", route_args).name == "reference"


def test_backends_are_registered_best_first():
    assert {"reference", "torch"} <= set(registry.PRIORITY)
    assert registry.PRIORITY[-1] == "reference"  # the oracle is the fallback, never preferred
    assert [b.name for b in registry.backends()] == registry.PRIORITY


# ---- forcing: API, context manager, environment ----------------------------------------------------


def test_forced_backend_runs_its_kernel(gemm_args, monkeypatch):
    calls = []
    kernels = registry.get_backend("reference").kernels
    original = kernels["grouped_mm"]
    monkeypatch.setitem(kernels, "grouped_mm", lambda *a: calls.append("grouped_mm") or original(*a))
    with moe_ops.use_backend(grouped_mm="reference"):
        run("grouped_mm", gemm_args)
    assert calls == ["grouped_mm"]


def test_forcing_torch_on_cpu_raises_no_backend_error_with_its_reasons(gemm_args):
    reasons = registry.get_backend("torch").not_supported_reasons("grouped_mm", gemm_args)
    assert reasons  # torch._grouped_mm's fast path needs CUDA
    moe_ops.set_backend("torch", op="grouped_mm")
    with pytest.raises(moe_ops.NoBackendError) as err:
        run("grouped_mm", gemm_args)
    message = str(err.value)
    assert "grouped_mm" in message and "torch (forced)" in message
    assert all(reason in message for reason in reasons)


def test_forcing_a_backend_without_the_kernel_raises(route_args):
    with moe_ops.use_backend("torch"), pytest.raises(moe_ops.NoBackendError, match="has no route kernel"):
        run("route", route_args)


def test_set_backend_per_op_and_for_all_ops(gemm_args, route_args):
    moe_ops.set_backend("torch", op="grouped_mm")
    assert registry.forced_backend("grouped_mm") == "torch"
    assert registry.forced_backend("route") is None
    run("route", route_args)  # other ops keep their default
    moe_ops.set_backend("reference")  # every op, but the per-op choice is more specific
    assert registry.forced_backend("route") == "reference"
    assert registry.forced_backend("grouped_mm") == "torch"
    moe_ops.set_backend(None, op="grouped_mm")
    assert registry.forced_backend("grouped_mm") == "reference"
    moe_ops.set_backend(None)
    assert registry.forced_backend("grouped_mm") is None
    run("grouped_mm", gemm_args)


def test_context_manager_restores_on_exit_and_on_error(gemm_args):
    with moe_ops.use_backend(grouped_mm="torch"):
        assert registry.forced_backend("grouped_mm") == "torch"
        with moe_ops.use_backend("reference"):  # inner context wins, even for all ops over one op
            assert registry.forced_backend("grouped_mm") == "reference"
        assert registry.forced_backend("grouped_mm") == "torch"
    assert registry.forced_backend("grouped_mm") is None
    with pytest.raises(moe_ops.NoBackendError), moe_ops.use_backend("torch"):
        run("grouped_mm", gemm_args)
    assert registry.forced_backend("grouped_mm") is None


@pytest.mark.parametrize("spec", ["grouped_mm=torch", "torch", " grouped_mm = torch , route=reference "])
def test_environment_variable_forces_backends(spec, gemm_args, route_args, monkeypatch):
    monkeypatch.setenv(ENV, spec.replace(" ", ""))
    assert registry.forced_backend("grouped_mm") == "torch"
    with pytest.raises(moe_ops.NoBackendError, match="torch"):
        run("grouped_mm", gemm_args)
    if spec == "torch":
        with pytest.raises(moe_ops.NoBackendError):
            run("route", route_args)
    else:
        run("route", route_args)


def test_precedence_context_over_api_over_environment(gemm_args, monkeypatch):
    monkeypatch.setenv(ENV, "grouped_mm=torch")
    assert registry.forced_backend("grouped_mm") == "torch"
    moe_ops.set_backend("reference", op="grouped_mm")
    assert registry.forced_backend("grouped_mm") == "reference"  # API over environment
    run("grouped_mm", gemm_args)
    with moe_ops.use_backend(grouped_mm="torch"):  # context over API
        assert registry.forced_backend("grouped_mm") == "torch"
        with pytest.raises(moe_ops.NoBackendError):
            run("grouped_mm", gemm_args)
    moe_ops.set_backend(None, op="grouped_mm")
    assert registry.forced_backend("grouped_mm") == "torch"  # back to the environment


# ---- errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call, needle", [
    (lambda: moe_ops.set_backend("nope"), "'nope'"),
    (lambda: moe_ops.set_backend("reference", op="nope"), "'nope'"),
    (lambda: moe_ops.use_backend("nope").__enter__(), "'nope'"),
    (lambda: moe_ops.use_backend(nope="reference").__enter__(), "'nope'"),
    (lambda: registry.get_backend("nope"), "'nope'"),
], ids=["set_backend-name", "set_backend-op", "use_backend-name", "use_backend-op", "get_backend"])
def test_unknown_names_raise_value_error(call, needle):
    with pytest.raises(ValueError, match=needle) as err:
        call()
    assert "reference" in str(err.value) or "grouped_mm" in str(err.value)  # lists the known names
    assert registry.forced_backend("grouped_mm") is None  # nothing half-applied


@pytest.mark.parametrize("spec", ["nope", "grouped_mm=nope", "nope_op=reference"])
def test_unknown_names_in_environment_raise_value_error(spec, gemm_args, monkeypatch):
    monkeypatch.setenv(ENV, spec)
    with pytest.raises(ValueError, match=ENV) as err:
        run("grouped_mm", gemm_args)
    assert "'nope" in str(err.value)


def test_no_backend_at_all_lists_every_backend_with_reasons(gemm_args, monkeypatch):
    for name in ("cpu", "reference"):  # the two that take CPU float32 GEMMs
        declining = dataclasses.replace(registry.get_backend(name),
                                        input_reasons=lambda op, args: ["declines for this test"])
        monkeypatch.setitem(registry._BACKENDS, name, declining)
    with pytest.raises(moe_ops.NoBackendError) as err:
        run("grouped_mm", gemm_args)
    message = str(err.value)
    assert "declines for this test" in message
    for backend in registry.backends("grouped_mm"):
        assert f"{backend.name}: " in message
        assert all(reason in message for reason in backend.not_supported_reasons("grouped_mm", gemm_args))


def test_no_backend_error_is_a_runtime_error():
    assert issubclass(moe_ops.NoBackendError, RuntimeError)


# ---- support table -------------------------------------------------------------------------------------


def test_support_table_lists_every_op_and_backend():
    table = dict(registry.support_table())
    assert list(table) == registry.OPS
    for op, per_backend in table.items():
        assert set(per_backend) == set(registry.PRIORITY), op
        assert per_backend["reference"] == [], op  # the oracle runs everywhere
        for name, reasons in per_backend.items():
            assert isinstance(reasons, list) and all(isinstance(r, str) and r for r in reasons), (op, name)
    assert table["route"]["torch"] == ["has no route kernel"]


# ---- a backend composes kernels, not ops ---------------------------------------------------------------


def test_torch_backend_composes_kernels_not_ops():
    """The torch backend's fused ops run every step on the kernel the registry picks, never through a nested
    ``moe::`` op (a second dispatch and validation per step).  Its kernels are called here directly on CPU
    float32 tensors (torch._grouped_mm runs there too); nothing under them may be a ``moe::`` op call."""
    from torch.profiler import profile

    torch.manual_seed(0)
    T, K, E, D, I = 16, 2, 4, 16, 8
    indices, token_mask = torch.randint(-1, E, (T, K)), torch.rand(T) > 0.2
    pair_of_row, row_of_pair, _, offsets = moe_ops.route(indices, token_mask, 0, E)
    x, probs = torch.randn(T, D), torch.rand(T * K)
    w1, w2, b1, b2 = torch.randn(E, D, 2 * I), torch.randn(E, I, D), torch.randn(E, 2 * I), torch.randn(E, D)
    routing = (pair_of_row, row_of_pair, offsets)
    up = (x, *routing, w1, b1, probs, "swiglu", 1.702, 7.0, 1.0)
    a, h = registry.get_backend("reference").kernels["expert_up"](*up)
    calls = {
        "expert_up": up,
        "expert_up_backward": (torch.randn_like(a), x, h, *routing, w1, b1, probs, "swiglu", 1.702, 7.0, 1.0),
        "expert_down": (a, w2, b2, probs, *routing, None),
        "expert_down_backward": (torch.randn(T, D), a, w2, b2, probs, *routing),
    }
    kernels = registry.get_backend("torch").kernels
    for op, args in calls.items():
        with profile() as prof:
            got = kernels[op](*args)
        nested = sorted({e.name for e in prof.events() if e.name.startswith("moe::")})
        assert nested == [], (op, nested)
        want = registry.get_backend("reference").kernels[op](*args)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=op)


@CPU_ONLY_REFERENCE
def test_choice_is_cached_by_input_kind(route_args, monkeypatch):
    """Reasons are computed once per kind of input (device, dtype, widths, ...), not on every call; a new
    kind, a forced backend or a replaced backend is a miss."""
    asked = []
    counting = dataclasses.replace(registry.get_backend("reference"),
                                   input_reasons=lambda op, args: asked.append(op) or [])
    monkeypatch.setitem(registry._BACKENDS, "reference", counting)
    indices, token_mask, start, experts = route_args
    for _ in range(3):  # new values, same kind
        registry.choose("route", (torch.randint(0, experts, indices.shape), token_mask, start, experts))
    assert asked == ["route"]
    registry.choose("route", (indices.int(), token_mask, start, experts))  # another dtype
    assert asked == ["route", "route"]
    with moe_ops.use_backend("reference"):  # forced: another key
        registry.choose("route", route_args)
    assert len(asked) == 3
