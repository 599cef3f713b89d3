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
def test_default_on_cpu_is_the_cpu_backend_for_route(route_args):
    assert registry.choose("route", route_args).name == "cpu"


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


def test_forcing_a_backend_without_the_kernel_raises(route_args, monkeypatch):
    """Forcing an op (or a family) on a backend without its kernel raises ValueError at once, naming both, in
    all three forms; forcing every op applies only to the ops the backend has a kernel for."""
    assert "route" not in registry.get_backend("torch").kernels
    forms = [
        lambda: moe_ops.use_backend(route="torch").__enter__(),
        lambda: moe_ops.set_backend("torch", op="route"),
        lambda: (monkeypatch.setenv(ENV, "route=torch"), registry.forced_backend("route")),
    ]
    for form in forms:
        with pytest.raises(ValueError, match="'torch' has no route kernel") as err:
            form()
        assert "'route'" in str(err.value) and "reference" in str(err.value)  # names the op and who can
        monkeypatch.delenv(ENV, raising=False)
        assert registry.forced_backend("route") is None  # nothing half-applied
    with moe_ops.use_backend("torch"):  # every op: route keeps its default, the GEMMs are forced
        assert registry.forced_backend("route") is None
        assert registry.forced_backend("grouped_mm") == "torch"
        run("route", route_args)
    with moe_ops.use_backend(route="reference"), moe_ops.use_backend("torch"):  # an outer layer still counts
        assert registry.forced_backend("route") == "reference"


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
    if spec == "torch":  # every op the torch backend has a kernel for: route (none) keeps its default
        assert registry.forced_backend("route") is None
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
    act = ("swiglu", 1.702, 7.0, 1.0)
    up = (x, *routing, w1, b1)
    h = registry.get_backend("reference").kernels["expert_up"](*up)
    calls = {
        "expert_up": up,
        "expert_up_backward": (torch.randn_like(h), x, *routing, w1, b1),
        "expert_down": (h, w2, b2, probs, *routing, *act, None),
        "expert_down_backward": (torch.randn(T, D), h, w2, b2, probs, *routing, *act),
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
    name = registry.choose("route", route_args).name  # the default's reasons are the ones asked
    counting = dataclasses.replace(registry.get_backend(name), input_reasons=lambda op, args: asked.append(op) or [])
    monkeypatch.setitem(registry._BACKENDS, name, counting)
    indices, token_mask, start, experts = route_args
    for _ in range(3):  # new values, same kind
        registry.choose("route", (torch.randint(0, experts, indices.shape), token_mask, start, experts))
    assert asked == ["route"]
    registry.choose("route", (indices.int(), token_mask, start, experts))  # another dtype
    assert asked == ["route", "route"]
    with moe_ops.use_backend(name):  # forced (even to the default): another key
        registry.choose("route", route_args)
    assert len(asked) == 3


# ---- reasons read the inputs by name ------------------------------------------------------------------


@pytest.fixture
def clean_forcing():
    """No family key set with set_backend may leak out (the shared fixture resets ops and every op)."""
    yield
    for family in registry.FAMILIES:
        registry.set_backend(None, family)


@pytest.fixture
def register_stub():
    """``register_stub(backend, priority=...)`` registers a backend for one test; the registry is restored after."""
    saved = (dict(registry._BACKENDS), list(registry.PRIORITY), dict(registry._priorities),
             dict(registry._op_priorities), list(registry._states))
    yield registry.register_backend
    backends, priority, priorities, op_priorities, states = saved
    for live, old in ((registry._BACKENDS, backends), (registry._priorities, priorities),
                      (registry._op_priorities, op_priorities)):
        live.clear()
        live.update(old)
    registry.PRIORITY[:], registry._states[:] = priority, states
    registry._order_cache.clear()
    registry.clear_caches()


def test_inputs_record_names_the_arguments_and_fills_trailing_defaults(op_args, mixed_routing):
    args = cpu_args(op_args(mixed_routing, torch.float32, torch.float32), "gather")  # num_rows left out
    assert len(args) == 4
    inputs = registry.Inputs("gather", args)
    assert inputs.op == "gather" and inputs.names == ("x", "row_of_pair", "offsets", "weights", "num_rows")
    assert inputs.x is args[0] and inputs.offsets is args[2] and inputs.weights is None
    assert inputs.num_rows is None and len(inputs.args) == 5  # the schema's default, filled
    assert inputs.get("nope", 7) == 7
    with pytest.raises(AttributeError, match="'nope'.*'offsets'"):
        inputs.nope
    assert [t is a for t, a in zip(inputs.tensors(), args[:3])] == [True] * 3
    sources = [torch.zeros(2, 4), torch.ones(3, 4)]  # lists of tensors are flattened
    row = torch.zeros(5, dtype=torch.int64)
    flat = registry.Inputs("sum_from", (sources, row)).tensors()
    assert len(flat) == 3 and flat[0] is sources[0] and flat[2] is row
    assert registry.Inputs("sum_from", (sources, row)).out_dtype is None
    assert "gather" in repr(inputs) and "num_rows=None" in repr(inputs)


def test_reasons_read_inputs_by_name(op_args, mixed_routing, register_stub):
    """A backend's reasons get the op's inputs by name, trailing defaulted arguments included (the dispatcher
    hands the kernel only the arguments the caller gave)."""
    reference = registry.get_backend("reference")
    seen, ran = [], []

    def reasons(op, inputs):
        if inputs is None:  # the support table
            return []
        seen.append((inputs.op, inputs.x.dtype, inputs.weights is None, inputs.num_rows))
        return ["declines: num_rows is the default"] if inputs.num_rows is None else []

    def kernel(*args):
        ran.append(len(args))
        return reference.kernels["gather"](*args)

    register_stub(registry.Backend("stub", "a test's stub", {"gather": kernel}, lambda: [], reasons), priority=-1)
    make = op_args(mixed_routing, torch.float32, torch.float32)
    args = cpu_args(make, "gather")
    want = run("gather", args)  # the stub declines (num_rows is None); the next backend runs it
    assert seen == [("gather", torch.float32, True, None)] and ran == []
    with moe_ops.use_backend(gather="stub"), pytest.raises(moe_ops.NoBackendError,
                                                          match="stub \\(forced\\): declines: num_rows"):
        run("gather", args)
    rows = args[1].shape[0] * args[1].shape[1]
    torch.testing.assert_close(run("gather", (*args, rows)), want)  # given: the stub takes it
    assert seen[-1] == ("gather", torch.float32, True, rows) and ran == [5]
    assert dict(registry.support_table())["gather"]["stub"] == []  # asked without inputs


def test_backends_reasons_by_name_match_positions(op_args, mixed_routing):
    """The real backends' reasons, given a tuple of positional arguments (converted to Inputs) or the record."""
    args = cpu_args(op_args(mixed_routing, torch.float64, torch.float64), "grouped_mm")
    cpu = registry.get_backend("cpu")
    assert cpu.not_supported_reasons("grouped_mm", args) == ["needs float32, bfloat16 or float16, got float64"]
    assert cpu.not_supported_reasons("grouped_mm", registry.Inputs("grouped_mm", args)) == \
        cpu.not_supported_reasons("grouped_mm", args)
    assert cpu.not_supported_reasons("grouped_mm") == cpu.not_supported_reasons("grouped_mm", ()) == []


# ---- families -------------------------------------------------------------------------------------------


def test_gemm_family_is_one_table():
    assert registry.FAMILIES["gemm"] == ("grouped_mm", "grouped_mm_wgrad", "expert_up", "expert_up_backward",
                                         "expert_down", "expert_down_backward")
    assert set(registry.FAMILIES["gemm"]) <= set(registry.OPS)


def _module_case():
    from moe_modules import GroupedExperts, MoEConfig

    config = MoEConfig(n_routed_experts=4, n_activated_experts=2, dim=16, moe_inter_dim=8,
                       expert_activation="swiglu", expert_bias=True, dtype=torch.float32)
    module = GroupedExperts(config)
    module.init_weights(torch.device("cpu"), init_std=0.5)
    T = 12
    indices = torch.randint(0, 4, (T, 2))
    indices[0, 1] = -1
    return module, torch.randn(T, 16), torch.rand(T) > 0.2, torch.rand(T, 2), indices


def _forward_backward(module, x, token_mask, weights, indices):
    """The output and every gradient, and which backend the registry chose for each op on the way."""
    chosen: dict[str, set] = {}
    original = registry.choose

    def recording(op, args):
        backend = original(op, args)
        chosen.setdefault(op, set()).add(backend.name)
        return backend

    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    module.zero_grad()
    registry.choose = recording  # registry.call looks choose up on every cache miss
    registry.clear_caches()
    try:
        y = module(x, token_mask, weights, indices)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    finally:
        registry.choose = original
    grads = [x.grad, weights.grad] + [p.grad for p in module.parameters()]
    return [y.detach()] + grads, chosen


FUSED = ("expert_up", "expert_up_backward", "expert_down", "expert_down_backward")


@CPU_ONLY_REFERENCE
@pytest.mark.parametrize("form", ["use_backend", "set_backend", "environment"])
def test_gemm_family_reaches_a_module(form, monkeypatch, clean_forcing):
    """``gemm=reference`` (context, API or environment) runs a module's fused ops — forward and backward — on
    the reference backend, with the default's result (the default on the CPU: the cpu backend)."""
    case = _module_case()
    want, default = _forward_backward(*case)
    assert all(default[op] == {"cpu"} for op in FUSED), default
    if form == "use_backend":
        with moe_ops.use_backend(gemm="reference"):
            got, chosen = _forward_backward(*case)
    elif form == "set_backend":
        moe_ops.set_backend("reference", op="gemm")
        got, chosen = _forward_backward(*case)
    else:
        monkeypatch.setenv(ENV, "gemm=reference")
        got, chosen = _forward_backward(*case)
    assert all(chosen[op] == {"reference"} for op in FUSED), chosen
    assert chosen["route"] == default["route"]  # not of the family: its default stays
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_op_key_over_family_over_every_op(clean_forcing):
    with moe_ops.use_backend("reference", gemm="cpu", grouped_mm="triton"):  # one layer: op, family, every op
        assert registry.forced_backend("grouped_mm") == "triton"
        assert registry.forced_backend("expert_up") == "cpu"
        assert registry.forced_backend("route") == "reference"
    moe_ops.set_backend("cpu", op="gemm")
    assert registry.forced_backend("expert_down_backward") == "cpu"
    assert registry.forced_backend("gather") is None
    with moe_ops.use_backend(grouped_mm="reference"):  # the context's op key over the API's family
        assert registry.forced_backend("grouped_mm") == "reference"
        assert registry.forced_backend("expert_up") == "cpu"
    moe_ops.set_backend(None, op="gemm")
    assert registry.forced_backend("expert_up") is None


def test_forcing_a_family_on_a_backend_without_every_kernel_raises(register_stub, clean_forcing, monkeypatch):
    only_mm = registry.Backend("stub", "a test's stub", {"grouped_mm": lambda *a: None}, lambda: [],
                               lambda op, inputs: [])
    register_stub(only_mm, priority=1000)
    for form in (lambda: moe_ops.use_backend(gemm="stub").__enter__(), lambda: moe_ops.set_backend("stub", op="gemm"),
                 lambda: (monkeypatch.setenv(ENV, "gemm=stub"), registry.forced_backend("expert_up"))):
        with pytest.raises(ValueError, match="'stub' has no grouped_mm_wgrad, expert_up.*kernel.*'gemm'"):
            form()
        monkeypatch.delenv(ENV, raising=False)
    assert registry.forced_backend("grouped_mm") is None
    moe_ops.set_backend("stub", op="grouped_mm")  # the one op it has
    assert registry.forced_backend("grouped_mm") == "stub"


def test_unknown_key_names_ops_and_families():
    with pytest.raises(ValueError, match="'gemms'") as err:
        moe_ops.use_backend(gemms="reference").__enter__()
    assert "grouped_mm" in str(err.value) and "'gemm'" in str(err.value)


# ---- forcing every op ------------------------------------------------------------------------------------


@CPU_ONLY_REFERENCE
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_forcing_every_op_runs_a_module(backend):
    """Every op the backend has a kernel for runs on it; the others (route, gather, ... for cpu) keep the default."""
    case = _module_case()
    want, _ = _forward_backward(*case)
    with moe_ops.use_backend(backend):
        got, chosen = _forward_backward(*case)
    kernels = registry.get_backend(backend).kernels
    for op, names in chosen.items():
        assert names == ({backend} if op in kernels else {"reference"}), (op, names)
    assert set(FUSED) <= set(chosen)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


# ---- a context belongs to its thread ---------------------------------------------------------------------


def test_context_manager_belongs_to_its_thread():
    import threading

    seen = {}
    entered, checked = threading.Event(), threading.Event()

    def worker():
        seen["worker, before"] = registry.forced_backend("grouped_mm")  # the main thread's block is open
        with moe_ops.use_backend(gemm="cpu"):
            entered.set()
            checked.wait(30)
            seen["worker, inside"] = registry.forced_backend("grouped_mm")
            seen["worker, route"] = registry.forced_backend("route")  # set_backend: every thread
        seen["worker, after"] = registry.forced_backend("grouped_mm")

    moe_ops.set_backend("reference", op="route")
    with moe_ops.use_backend(grouped_mm="reference"):
        thread = threading.Thread(target=worker)
        thread.start()
        assert entered.wait(30)
        seen["main, while the worker's block is open"] = registry.forced_backend("grouped_mm")
        seen["main, expert_up"] = registry.forced_backend("expert_up")
        checked.set()
        thread.join(30)
    assert seen == {
        "worker, before": None, "worker, inside": "cpu", "worker, route": "reference", "worker, after": None,
        "main, while the worker's block is open": "reference", "main, expert_up": None,
    }
    assert registry.forced_backend("grouped_mm") is None


# ---- the README's example ----------------------------------------------------------------------------------


def test_readme_backend_example_runs(clean_forcing):
    """The code block of README.md's "Backends" section, as written."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Backends\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "use_backend(gemm=" in code and "set_backend(" in code
    namespace: dict = {}
    exec(compile(code, "README.md (Backends)", "exec"), namespace)
    assert registry.forced_backend("grouped_mm") is None and registry.forced_backend("route") is None
