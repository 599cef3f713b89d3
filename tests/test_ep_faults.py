"""Expert-parallel faults on gloo, 2 and 4 ranks: one rank (the last) calls with another K, model dim or
dtype, holds no token or many, raises before its exchange (and retries, or leaves) or between its
dispatch and its combine (and leaves), or calls a layer once more than the others.  Every rank ends within the launch's deadline with a clear error — the
same ``ValueError`` on every rank, naming each rank's value, for a mismatch — or the right result.
The scenarios are ``tests/ep_fault_cases.py``; each launch has a hard deadline after which every
rank is killed, and the group's collectives time out before it."""

from __future__ import annotations

import os

import pytest

import ep_fault_cases as cases
from test_distributed import HERE, needs_gloo, run_world

pytestmark = needs_gloo
DEADLINE_S = 150


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """``(name, world size, [each rank's {(scenario, transport): outcome}])`` of one launch (cached per
    world: the tests of one world share it)."""
    name, world_size = request.param
    directory = tmp_path_factory.mktemp(f"faults_{name}_{world_size}")
    os.environ["EP_FAULT_WORLD"] = name
    try:
        return name, world_size, run_world(HERE / "ep_fault_cases.py", world_size, directory, DEADLINE_S)
    finally:
        del os.environ["EP_FAULT_WORLD"]


def outcomes(world, scenario: str) -> dict:
    """``{transport: [outcome of each rank]}`` of ``scenario`` in this world."""
    _, _, ranks = world
    transports = sorted({t for s, t in ranks[0] if s == scenario})
    return {t: [r[(scenario, t)] for r in ranks] for t in transports}


def worlds(*names):
    """Parametrize a test over the launches of these worlds, 2 and 4 ranks each."""
    params = [(name, n) for name in names for n in (2, 4)]
    return pytest.mark.parametrize("world", params, indirect=True, ids=[f"{name}-world{n}" for name, n in params])


def majority(world_size: int) -> str:
    healthy = list(range(world_size - 1))
    return f"rank{'s' if len(healthy) > 1 else ''} {', '.join(map(str, healthy))}"


MISMATCHES = {  # scenario: (field, healthy value, faulty value)
    "K": ("experts per token (K)", str(cases.K), str(cases.K + 1)),
    "D": ("model dim (D)", str(cases.D), str(cases.D + 1)),
    "x_dtype": ("x dtype", "float32", "float64"),
    "weights_dtype": ("weights dtype", "float32", "float64"),
}


@worlds("in_step")
@pytest.mark.parametrize("scenario", list(MISMATCHES))
def test_mismatched_call_raises_the_same_error_on_every_rank(world, scenario):
    _, world_size, _ = world
    field, healthy, faulty = MISMATCHES[scenario]
    for transport, per_rank in outcomes(world, scenario).items():
        assert all(o[:2] == ("error", "ValueError") for o in per_rank), (transport, per_rank)
        messages = {o[2] for o in per_rank}
        assert len(messages) == 1, (transport, messages)
        message = messages.pop()
        want = f"different {field} ({majority(world_size)}: {healthy}; rank {world_size - 1}: {faulty})"
        assert want in message, (transport, message)


@worlds("in_step")
@pytest.mark.parametrize("scenario", ["zero_and_many", "raise_then_retry"])
def test_uneven_or_retried_call_gives_the_unsharded_result(world, scenario):
    for transport, per_rank in outcomes(world, scenario).items():
        assert all(o[0] == "ok" and o[1] < 1e-5 for o in per_rank), (transport, per_rank)


@worlds("in_step", "forward_twice_all_to_all")
def test_rank_calling_a_layer_twice_raises_on_every_rank(world):
    _, world_size, _ = world
    for transport, per_rank in outcomes(world, "forward_twice").items():
        assert all(o[:2] == ("error", "ValueError") for o in per_rank), (transport, per_rank)
        (message,) = {o[2] for o in per_rank}
        assert "different layer" in message and f"rank {world_size - 1}: " in message, message


# The faulty rank's own error, for a fault after which it leaves; the others must name the layer and call.
LEAVING = {"raise_then_exit": ("ValueError", "token_mask: expected number of tokens"),
           "raise_after_dispatch": ("RuntimeError", "injected: the experts failed")}


@worlds(*LEAVING)
def test_rank_that_raises_and_leaves_fails_the_others_with_a_clear_error(world):
    """Before its exchange (raise_then_exit) or between its dispatch and its combine (raise_after_dispatch)."""
    name = world[0]
    (per_rank,) = outcomes(world, name).values()
    error_type, message = LEAVING[name]
    assert per_rank[-1][:2] == ("error", error_type) and message in per_rank[-1][2], per_rank[-1]
    for o in per_rank[:-1]:
        assert o[:2] == ("error", "RuntimeError"), o
        assert "expert parallel, layer" in o[2] and "call 0: the exchange with the other ranks failed" in o[2], o


@worlds("forward_twice_then_stop")
def test_rank_calling_once_more_than_the_others_fails_with_a_clear_error(world):
    (per_rank,) = outcomes(world, "forward_twice_then_stop").values()
    assert all(o == ("ok", "no error") for o in per_rank[:-1]), per_rank
    assert per_rank[-1][:2] == ("error", "RuntimeError"), per_rank[-1]
    assert "call 1: the exchange with the other ranks failed" in per_rank[-1][2], per_rank[-1]
