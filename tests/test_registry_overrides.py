"""Backend overrides under concurrency and tracing: ``use_backend`` belongs to its thread (its context),
blocks may exit in any order and under exceptions, an op's backward runs under its forward's blocks in
whatever thread autograd runs it, and neither ``use_backend`` nor ``set_backend`` is silently ignored
inside a compiled region."""

from __future__ import annotations

import random
import threading

import pytest
import torch

import moe_ops
from moe_ops import registry

OPS = ("grouped_mm", "route", "expert_up", "combine")
CHOICES = [dict(gemm="reference"), dict(gemm="cpu"), dict(route="reference"), dict(backend="reference"),
           dict(combine="reference")]


def use(choice: dict):
    choice = dict(choice)
    return moe_ops.use_backend(choice.pop("backend", None), **choice)


def expected(blocks: list[dict], op: str):
    """What ``forced_backend(op)`` must say under ``blocks`` (innermost last), by the documented precedence."""
    family = registry._FAMILY_OF.get(op)
    for choice in reversed(blocks):
        if op in choice:
            return choice[op]
        if family in choice:
            return choice[family]
        name = choice.get("backend")
        if name is not None and op in registry.get_backend(name).kernels:
            return name
    return None


def test_blocks_exited_out_of_order_restore_exactly():
    a, b, c = use(dict(gemm="reference")), use(dict(route="reference")), use(dict(gemm="cpu"))
    a.__enter__(), b.__enter__(), c.__enter__()
    assert registry.forced_backend("grouped_mm") == "cpu"
    a.__exit__(None, None, None)  # the outermost first
    assert registry.forced_backend("grouped_mm") == "cpu" and registry.forced_backend("route") == "reference"
    c.__exit__(None, None, None)  # a's gemm=reference must not come back
    assert registry.forced_backend("grouped_mm") is None and registry.forced_backend("route") == "reference"
    b.__exit__(None, None, None)
    assert registry.current_layers() == () and registry.forced_backend("route") is None


def test_block_left_by_an_exception_restores():
    with pytest.raises(KeyError):
        with use(dict(gemm="reference")):
            with use(dict(route="reference")):
                raise KeyError("inside")
    assert registry.current_layers() == ()


def test_threads_nesting_blocks_see_only_their_own():
    """4 threads, each nesting random blocks and exiting them in random order, check every op each step."""
    wrong, observations, start = [], [0], threading.Barrier(4)

    def worker(seed: int):
        rng = random.Random(seed)
        start.wait(30)
        for _ in range(25):
            blocks, managers = [], []
            for _ in range(rng.randint(1, 3)):
                choice = rng.choice(CHOICES)
                manager = use(choice)
                manager.__enter__()
                blocks.append(choice)
                managers.append(manager)
            while managers:
                for op in OPS:
                    got, want = registry.forced_backend(op), expected(blocks, op)
                    observations[0] += 1
                    if got != want:
                        wrong.append((seed, op, got, want))
                i = rng.randrange(len(managers))  # any exit order
                managers.pop(i).__exit__(None, None, None)
                blocks.pop(i)
            if registry.current_layers() != ():
                wrong.append((seed, "left over", registry.current_layers()))

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert observations[0] >= 4 * 25 * len(OPS) and not wrong, wrong[:10]


def _module_case(seed: int):
    from moe_modules import GroupedExperts, MoEConfig

    torch.manual_seed(seed)
    module = GroupedExperts(MoEConfig(n_routed_experts=4, n_activated_experts=2, dim=16, moe_inter_dim=8,
                                      dtype=torch.float32))
    module.init_weights(torch.device("cpu"), init_std=0.5)
    T = 10
    x, weights = torch.randn(T, 16, requires_grad=True), torch.rand(T, 2, requires_grad=True)
    return module, x, torch.ones(T, dtype=torch.bool), weights, torch.randint(0, 4, (T, 2))


@pytest.fixture
def chosen_per_thread(monkeypatch):
    """{thread id: {op: {backend names}}}: what the registry chose, per thread."""
    chosen: dict[int, dict[str, set]] = {}
    lock = threading.Lock()
    original = registry.choose

    def recording(op, args):
        backend = original(op, args)
        with lock:
            chosen.setdefault(threading.get_ident(), {}).setdefault(op, set()).add(backend.name)
        return backend

    monkeypatch.setattr(registry, "choose", recording)
    registry.clear_caches()  # choose() is asked on a cache miss only
    return chosen


def test_two_threads_forwarding_under_different_blocks(chosen_per_thread):
    """Each thread's module runs on its own block's backend, forward and backward; neither fails."""
    errors, idents, start = [], {}, threading.Barrier(2)

    def worker(name: str, choice: dict):
        try:
            module, x, token_mask, weights, indices = _module_case(0)
            idents[name] = threading.get_ident()
            start.wait(30)
            with use(choice):
                for _ in range(10):
                    module(x, token_mask, weights, indices).square().sum().backward()
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append((name, repr(e)))

    threads = [threading.Thread(target=worker, args=("reference", dict(gemm="reference"))),
               threading.Thread(target=worker, args=("cpu", dict(gemm="cpu")))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    for name in ("reference", "cpu"):
        seen = chosen_per_thread[idents[name]]
        for op in ("expert_up", "expert_up_backward", "expert_down", "expert_down_backward"):
            assert seen[op] == {name}, (name, op, seen[op])


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path", ["shortcut", "dispatcher"])
def test_backward_in_another_thread_runs_under_the_forward_blocks(path, chosen_per_thread):
    """Autograd runs a CUDA backward in its device thread: simulated by calling backward from a new thread."""
    module, x, token_mask, weights, indices = _module_case(1)
    with use(dict(gemm="reference")):
        if path == "dispatcher":  # a torch-function mode sends every op through the dispatcher
            with _PassThrough():
                loss = module(x, token_mask, weights, indices).square().sum()
        else:
            loss = module(x, token_mask, weights, indices).square().sum()
    thread = threading.Thread(target=loss.backward)
    thread.start()
    thread.join(60)
    seen = chosen_per_thread[thread.ident]
    assert seen["expert_up_backward"] == {"reference"} and seen["expert_down_backward"] == {"reference"}, seen
    assert x.grad is not None and weights.grad is not None


def test_backward_of_an_unforced_forward_follows_the_backward_block(chosen_per_thread):
    module, x, token_mask, weights, indices = _module_case(2)
    loss = module(x, token_mask, weights, indices).square().sum()
    with use(dict(gemm="reference")):
        loss.backward()
    seen = chosen_per_thread[threading.get_ident()]
    assert seen["expert_up"] == {"cpu"} and seen["expert_up_backward"] == {"reference"}, seen


def _forward_forcing(call: str, module):
    def forward(x, token_mask, weights, indices):
        if call == "use_backend":
            with moe_ops.use_backend(gemm="reference"):
                return module(x, token_mask, weights, indices)
        moe_ops.set_backend("reference", op="gemm")
        return module(x, token_mask, weights, indices)
    return forward


@pytest.mark.parametrize("call", ["use_backend", "set_backend"])
def test_override_inside_a_fullgraph_region_is_refused(call):
    module, x, token_mask, weights, indices = _module_case(3)
    torch._dynamo.reset()
    try:
        with pytest.raises(Exception) as err:
            torch.compile(_forward_forcing(call, module), fullgraph=True, backend="eager")(x, token_mask, weights,
                                                                                           indices)
    finally:
        registry.set_backend(None, "gemm")
        torch._dynamo.reset()
    assert f"moe_ops.{call}" in str(err.value) and "torch.compile region" in str(err.value), err.value
    assert registry.forced_backend("expert_up") is None


@pytest.mark.parametrize("call", ["use_backend", "set_backend"])
def test_override_inside_a_region_with_graph_breaks_is_refused_or_honoured(call, chosen_per_thread):
    """Without fullgraph the refusal is a graph break: Dynamo either runs the refusal eagerly (our error) or
    runs the frame eagerly, where the override holds for the ops after it — never ignored."""
    module, x, token_mask, weights, indices = _module_case(3)
    torch._dynamo.reset()
    try:
        torch.compile(_forward_forcing(call, module), backend="eager")(x, token_mask, weights, indices)
        refused = None
    except RuntimeError as err:
        refused = str(err)
    finally:
        registry.set_backend(None, "gemm")
        torch._dynamo.reset()
    if refused is not None:
        assert f"moe_ops.{call} cannot run inside a torch.compile region" in refused, refused
    else:
        assert chosen_per_thread[threading.get_ident()]["expert_up"] == {"reference"}


def test_block_around_a_compiled_call_is_honoured(chosen_per_thread):
    module, x, token_mask, weights, indices = _module_case(4)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    compiled(x, token_mask, weights, indices).sum().backward()
    chosen_per_thread.clear()
    with use(dict(gemm="reference")):
        compiled(x, token_mask, weights, indices).sum().backward()
    torch._dynamo.reset()
    seen = chosen_per_thread[threading.get_ident()]
    assert seen["expert_up"] == {"reference"} and seen["expert_down_backward"] == {"reference"}, seen
