"""The ``deep_ep`` stand-in (``tests/deep_ep_stand_in.py``) against an independent reference, on gloo.

One launch per world size (2 and 4) runs ``python tests/test_deep_ep_stand_in.py --rank R ...`` once
per rank (``test_distributed.launch``: a deadline after which every rank is killed; gloo times out
before it).  Each rank makes its own tokens (bf16 small integers, uneven counts, one rank with none,
a layout where no rank has any), its own ``topk_idx`` (some ``-1``, one token routed nowhere) and
weights, all-gathers everyone's, and checks the stand-in's ``get_dispatch_layout`` / ``dispatch`` /
cached ``dispatch`` / ``combine`` against plain Python loops over the gathered inputs.  The ranks
save the mismatches they found; the tests here require none.  The constructor's rejections, the
size hints and ``install()`` are checked in this process.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import deep_ep_stand_in
import ep_cases
from test_distributed import needs_gloo, run_world

pytestmark = needs_gloo  # the reason is in test_distributed.needs_gloo

HERE = Path(__file__).resolve().parent
LAUNCH_DEADLINE_S = 120
HIDDEN, TOP_K, EXPERTS_PER_RANK = 16, 3, 4
LAYOUTS = {  # tokens per rank
    2: {"empty_rank": (0, 9), "uneven": (23, 40), "all_empty": (0, 0)},
    4: {"empty_rank": (6, 0, 3, 5), "uneven": (17, 0, 31, 8), "all_empty": (0, 0, 0, 0)},
}
# (layout, expert_alignment, num_sms of an explicit Config or None for the default config)
CASES = [("empty_rank", 1, None), ("empty_rank", 4, 4), ("uneven", 4, 6), ("uneven", 1, None),
         ("all_empty", 4, None)]


# ---- the reference (plain Python over every rank's inputs) ------------------------------------


def make_inputs(layout: str, world_size: int, rank: int) -> dict:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}-{world_size}-{rank}".encode()))
    T, E = LAYOUTS[world_size][layout][rank], EXPERTS_PER_RANK * world_size
    topk_idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :TOP_K].contiguous()
    topk_idx[torch.rand(T, TOP_K, generator=gen) < 0.25] = -1
    if T > 1:
        topk_idx[1] = -1  # a token routed nowhere
    return {
        "x": torch.randint(-4, 5, (T, HIDDEN), generator=gen).to(torch.bfloat16),
        "topk_idx": topk_idx,
        "topk_weights": torch.rand(T, TOP_K, generator=gen) + 0.1,
        # what this rank sends back through combine for its received rows (test of the float32 reduction)
        "y_seed": zlib.crc32(f"y-{layout}-{world_size}-{rank}".encode()),
    }


def token_ranks(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> list[list[int]]:
    per_rank = num_experts // world_size
    return [sorted({e // per_rank for e in row if 0 <= e < per_rank * world_size}) for row in topk_idx.tolist()]


def channel_ranges(num_tokens: int, num_channels: int) -> list[tuple[int, int]]:
    per = -(-num_tokens // num_channels)
    ranges = []
    for c in range(num_channels):
        start = min(per * c, num_tokens)
        ranges.append((start, min(start + per, num_tokens)))
    return ranges


def reference(inputs: list[dict], rank: int, world_size: int, alignment: int, num_channels: int) -> dict:
    """What ``rank`` should get, computed token by token from all ranks' inputs."""
    E = EXPERTS_PER_RANK * world_size
    lo, hi = rank * EXPERTS_PER_RANK, (rank + 1) * EXPERTS_PER_RANK
    routes = [token_ranks(inp["topk_idx"], E, world_size) for inp in inputs]
    mine = inputs[rank]
    T = mine["x"].shape[0]

    rows = [(s, t) for s in range(world_size) for t in range(len(routes[s])) if rank in routes[s][t]]
    recv_idx, recv_w = [], []
    for s, t in rows:
        idx, w = inputs[s]["topk_idx"][t].tolist(), inputs[s]["topk_weights"][t].tolist()
        recv_idx.append([e - lo if lo <= e < hi else -1 for e in idx])
        recv_w.append([wk if lo <= e < hi else 0.0 for e, wk in zip(idx, w)])
    per_expert = [sum(int((inp["topk_idx"] == lo + j).sum()) for inp in inputs) for j in range(EXPERTS_PER_RANK)]

    counts = [[sum(1 for r in routes[s] if d in r) for d in range(world_size)] for s in range(world_size)]
    prefix = [[sum(counts[i][d] for i in range(s + 1)) for d in range(world_size)] for s in range(world_size)]

    def sent_before(s: int, d: int, end: int) -> int:
        return sum(1 for t in range(end) if d in routes[s][t])

    channel_prefix = [[sent_before(rank, d, end) for _, end in channel_ranges(T, num_channels)]
                      for d in range(world_size)]
    recv_channel_prefix = [[sent_before(s, rank, start) for start, _ in channel_ranges(len(routes[s]), num_channels)]
                           for s in range(world_size)]
    send_head = [[-1] * world_size for _ in range(T)]
    for d in range(world_size):
        for start, end in channel_ranges(T, num_channels):
            position = 0
            for t in range(start, end):
                if d in routes[rank][t]:
                    send_head[t][d] = position
                    position += 1

    n_ranks = torch.tensor([len(r) for r in routes[rank]], dtype=torch.float32)
    valid = mine["topk_idx"] >= 0
    return {
        "num_tokens_per_rank": torch.tensor([sum(1 for r in routes[rank] if d in r) for d in range(world_size)],
                                            dtype=torch.int32),
        "num_tokens_per_expert": torch.tensor([int((mine["topk_idx"] == e).sum()) for e in range(E)],
                                              dtype=torch.int32),
        "is_token_in_rank": torch.tensor([[d in r for d in range(world_size)] for r in routes[rank]],
                                         dtype=torch.bool).reshape(T, world_size),
        "rows": rows,
        "recv_x": (torch.stack([inputs[s]["x"][t] for s, t in rows]) if rows
                   else torch.empty(0, HIDDEN, dtype=torch.bfloat16)),
        "recv_src_idx": torch.tensor([t for _, t in rows], dtype=torch.int32),
        "recv_topk_idx": torch.tensor(recv_idx, dtype=torch.int64).reshape(len(rows), TOP_K),
        "recv_topk_weights": torch.tensor(recv_w, dtype=torch.float32).reshape(len(rows), TOP_K),
        "unaligned_per_expert": per_expert,
        "num_recv_tokens_per_expert_list": [-(-n // alignment) * alignment for n in per_expert],
        "rank_prefix_matrix": torch.tensor(prefix, dtype=torch.int32),
        "channel_prefix_matrix": torch.tensor(channel_prefix, dtype=torch.int32).reshape(world_size, num_channels),
        "recv_channel_prefix_matrix": torch.tensor(recv_channel_prefix, dtype=torch.int32),
        "send_head": torch.tensor(send_head, dtype=torch.int32).reshape(T, world_size),
        # combine(dispatch(x)): each copy comes back, summed (exact: small integers in bf16)
        "combined_x": (mine["x"].float() * n_ranks.unsqueeze(1)).to(torch.bfloat16),
        "combined_topk_weights": torch.where(valid, mine["topk_weights"], 0.0),
        "routes": routes,
    }


def reference_combine(ys: list[torch.Tensor], refs_rows: list[list], rank: int, routes: list, world_size: int):
    """combine of arbitrary rows ``ys[r]`` (rank r's received rows): float32 sum in rank order, one rounding.
    Also the result of rounding to bf16 after every addition, to show the test tells them apart."""
    T = len(routes[rank])
    once = torch.zeros(T, HIDDEN, dtype=torch.float32)
    stepwise = torch.zeros(T, HIDDEN, dtype=torch.bfloat16)
    for t in range(T):
        for r in range(world_size):
            if r in routes[rank][t]:
                row = ys[r][refs_rows[r].index((rank, t))]
                once[t] += row.float()
                stepwise[t] = stepwise[t] + row
    return once.to(torch.bfloat16), stepwise


# ---- the worker -------------------------------------------------------------------------------


class Checker:
    def __init__(self, rank: int):
        self.rank, self.failures = rank, []

    def equal(self, where: str, got, want) -> None:
        if isinstance(want, torch.Tensor):
            ok = (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
                  and torch.equal(got, want))
            if not ok:
                desc = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else repr(got)
                self.failures.append(f"rank {self.rank} {where}: got {desc} {got!r}, expected {want.dtype} "
                                     f"{list(want.shape)} {want!r}")
        elif got != want:
            self.failures.append(f"rank {self.rank} {where}: got {got!r}, expected {want!r}")

    def raises(self, where: str, error: type, fn) -> None:
        try:
            fn()
        except error:
            return
        except Exception as e:  # noqa: BLE001 - reported as a failure
            self.failures.append(f"rank {self.rank} {where}: raised {type(e).__name__}: {e}, expected {error.__name__}")
            return
        self.failures.append(f"rank {self.rank} {where}: did not raise {error.__name__}")


def run_case(deep_ep, buffer, group, rank: int, world_size: int, case: tuple, check: Checker, stats: dict) -> None:
    layout, alignment, num_sms = case
    where = f"{layout}/align{alignment}/sms{num_sms}"
    config = None if num_sms is None else deep_ep.Config(num_sms, 6, 256, 6, 128)
    num_channels = (num_sms or deep_ep.Buffer.num_sms) // 2
    mine = make_inputs(layout, world_size, rank)
    inputs: list = [None] * world_size
    dist.all_gather_object(inputs, mine, group=group)
    ref = reference(inputs, rank, world_size, alignment, num_channels)
    E = EXPERTS_PER_RANK * world_size
    x, topk_idx, topk_weights = mine["x"], mine["topk_idx"], mine["topk_weights"]

    num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
        buffer.get_dispatch_layout(topk_idx, E)
    check.equal(f"{where} layout num_tokens_per_rank", num_tokens_per_rank, ref["num_tokens_per_rank"])
    check.equal(f"{where} layout num_tokens_per_rdma_rank", num_tokens_per_rdma_rank, None)
    check.equal(f"{where} layout num_tokens_per_expert", num_tokens_per_expert, ref["num_tokens_per_expert"])
    check.equal(f"{where} layout is_token_in_rank", is_token_in_rank, ref["is_token_in_rank"])
    check.equal(f"{where} layout event", event.event, None)

    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
        expert_alignment=alignment, config=config, async_finish=True)
    event.current_stream_wait()
    check.equal(f"{where} recv_x", recv_x, ref["recv_x"])
    check.equal(f"{where} recv_topk_idx", recv_topk_idx, ref["recv_topk_idx"])
    check.equal(f"{where} recv_topk_weights", recv_topk_weights, ref["recv_topk_weights"])
    check.equal(f"{where} num_recv_tokens_per_expert_list", per_expert, ref["num_recv_tokens_per_expert_list"])
    check.equal(f"{where} recv_topk_idx counts", [int(recv_topk_idx.eq(j).sum()) for j in range(EXPERTS_PER_RANK)],
                ref["unaligned_per_expert"])
    fields = ("rank_prefix_matrix", "channel_prefix_matrix", "recv_channel_prefix_matrix", "recv_src_idx",
              "is_token_in_rank", "send_head")
    check.equal(f"{where} handle length", len(handle), len(fields))
    for name, value in zip(fields, handle):
        check.equal(f"{where} handle {name}", value, ref[name])
    stats["received_rows"].append(recv_x.shape[0])

    # Without top-k: the same rows, no top-k outputs, the same per-expert list (from num_tokens_per_expert).
    plain = buffer.dispatch(x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                            num_tokens_per_expert=num_tokens_per_expert, expert_alignment=alignment, config=config)
    check.equal(f"{where} no-topk recv_x", plain[0], ref["recv_x"])
    check.equal(f"{where} no-topk top-k outputs", (type(plain[1]), type(plain[2])), (type(None), type(None)))
    check.equal(f"{where} no-topk per-expert list", plain[3], ref["num_recv_tokens_per_expert_list"])
    check.equal(f"{where} no-topk event", plain[5].event, None)

    # Cached: the layout of the handle, new data.
    cached = buffer.dispatch(x, handle=handle, config=config)
    check.equal(f"{where} cached recv_x", cached[0], recv_x)
    check.equal(f"{where} cached rest", [type(v) for v in cached[1:5]], [type(None)] * 4)
    doubled = buffer.dispatch(x * 2, handle=handle, config=config)[0]
    check.equal(f"{where} cached recv_x of 2x", doubled, ref["recv_x"] * 2)

    # combine(dispatch(x)): x times the number of ranks each token went to; the weights of the slots.
    combined_x, combined_w, event = buffer.combine(recv_x, handle, recv_topk_weights, config=config)
    check.equal(f"{where} combined_x", combined_x, ref["combined_x"])
    check.equal(f"{where} combined_topk_weights", combined_w, ref["combined_topk_weights"])
    check.equal(f"{where} combine event", event.event, None)
    combined_plain = buffer.combine(recv_x, handle, config=config)
    check.equal(f"{where} combine without weights", combined_plain[0], combined_x)
    check.equal(f"{where} combine without weights: no weights", combined_plain[1], None)

    # combine of arbitrary rows: float32 sum in rank order, rounded once.
    gen = torch.Generator().manual_seed(mine["y_seed"])
    y = (torch.randn(recv_x.shape[0], HIDDEN, generator=gen) * 37).to(torch.bfloat16)
    ys: list = [None] * world_size
    dist.all_gather_object(ys, y, group=group)
    rows_of: list = [None] * world_size
    dist.all_gather_object(rows_of, ref["rows"], group=group)
    once, stepwise = reference_combine(ys, rows_of, rank, ref["routes"], world_size)
    got = buffer.combine(y, handle, config=config)[0]
    check.equal(f"{where} combine of random rows (float32 sum, one rounding)", got, once)
    stats["stepwise_differs"] |= not torch.equal(once, stepwise)

    if layout == "empty_rank":
        check_errors(deep_ep, buffer, group, rank, world_size, where, check, x, topk_idx, topk_weights, E,
                     num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, recv_x, handle, config)


def check_errors(deep_ep, buffer, group, rank, world_size, where, check, x, topk_idx, topk_weights, E,
                 num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, recv_x, handle, config) -> None:
    """DeepEP's documented dtypes and host checks (each raises before any collective, on every rank)."""
    args = dict(num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
                num_tokens_per_expert=num_tokens_per_expert, config=config)
    check.raises(f"{where} layout int32 topk_idx", RuntimeError, lambda: buffer.get_dispatch_layout(topk_idx.int(), E))
    check.raises(f"{where} layout 1-D topk_idx", RuntimeError, lambda: buffer.get_dispatch_layout(topk_idx[:, 0], E))
    check.raises(f"{where} dispatch float32 x", RuntimeError, lambda: buffer.dispatch(x.float(), **args))
    check.raises(f"{where} dispatch int32 topk_idx", RuntimeError, lambda: buffer.dispatch(
        x, topk_idx=topk_idx.int(), topk_weights=topk_weights, **args))
    check.raises(f"{where} dispatch float64 topk_weights", RuntimeError, lambda: buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights.double(), **args))
    check.raises(f"{where} dispatch top-k idx without weights", RuntimeError, lambda: buffer.dispatch(
        x, topk_idx=topk_idx, **args))
    check.raises(f"{where} dispatch int64 num_tokens_per_rank", RuntimeError, lambda: buffer.dispatch(
        x, **{**args, "num_tokens_per_rank": num_tokens_per_rank.long()}))
    check.raises(f"{where} dispatch wrong num_tokens_per_rank", RuntimeError, lambda: buffer.dispatch(
        x, **{**args, "num_tokens_per_rank": num_tokens_per_rank + 1}))
    check.raises(f"{where} dispatch FP8 tuple", NotImplementedError, lambda: buffer.dispatch(
        (x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], 1)), **args))
    check.raises(f"{where} cached dispatch with topk_idx", AssertionError, lambda: buffer.dispatch(
        x, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights))
    check.raises(f"{where} dispatch without layout", AssertionError, lambda: buffer.dispatch(x))
    check.raises(f"{where} allocate_on_comm_stream without event", RuntimeError, lambda: buffer.dispatch(
        x, async_finish=True, allocate_on_comm_stream=True, **args))
    check.raises(f"{where} combine float32 x", RuntimeError, lambda: buffer.combine(recv_x.float(), handle))
    check.raises(f"{where} combine float64 weights", RuntimeError, lambda: buffer.combine(
        recv_x, handle, torch.zeros(recv_x.shape[0], TOP_K, dtype=torch.float64), config=config))
    other_sms = 2 * ((config.num_sms if config else deep_ep.Buffer.num_sms) // 2 + 1)
    check.raises(f"{where} combine with another SM count", RuntimeError, lambda: buffer.combine(
        recv_x, handle, config=deep_ep.Config(other_sms, 6, 256, 6, 128)))
    check.raises(f"{where} non-event current_stream_wait", AssertionError,
                 lambda: deep_ep.EventOverlap().current_stream_wait())
    small = deep_ep.Buffer(group, num_nvl_bytes=1024)  # collective: every rank
    check.raises(f"{where} dispatch with a too small NVL buffer", RuntimeError, lambda: small.dispatch(x, **args))


def worker(rank: int, world_size: int, directory: str) -> None:
    ep_cases.join_gloo(rank, world_size, directory)
    group = dist.new_group(list(range(world_size)))
    check, stats = Checker(rank), {"received_rows": [], "stepwise_differs": False}
    with deep_ep_stand_in.install():
        import deep_ep

        deep_ep.Buffer.reset_calls()
        hidden_bytes = HIDDEN * 2
        num_nvl_bytes = 0
        for cfg in (deep_ep.Buffer.get_dispatch_config(world_size), deep_ep.Buffer.get_combine_config(world_size),
                    deep_ep.Config(4, 6, 256, 6, 128), deep_ep.Config(6, 6, 256, 6, 128)):
            num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, world_size), num_nvl_bytes)
        rdma = deep_ep.Buffer.get_dispatch_config(world_size).get_rdma_buffer_size_hint(hidden_bytes, world_size)
        buffer = deep_ep.Buffer(group, num_nvl_bytes, rdma)
        check.equal("buffer rank", (buffer.rank, buffer.group_size, buffer.group), (rank, world_size, group))
        for case in CASES:
            run_case(deep_ep, buffer, group, rank, world_size, case, check, stats)
        calls = dict(deep_ep.Buffer.calls)
    ep_cases.save_and_exit({"failures": check.failures, "stats": stats, "calls": calls}, rank, directory)


# ---- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def stand_in_run(request, tmp_path_factory):
    world_size = request.param
    directory = tmp_path_factory.mktemp(f"deep_ep_world{world_size}")
    return world_size, run_world(Path(__file__).resolve(), world_size, directory, LAUNCH_DEADLINE_S)


def test_dispatch_and_combine_match_the_reference(stand_in_run):
    world_size, ranks = stand_in_run
    failures = [f for result in ranks for f in result["failures"]]
    assert not failures, f"{len(failures)} mismatches, first ones:\n" + "\n".join(failures[:20])
    # The layouts did what they are for: a rank with no token, ranks that received nothing and some rows.
    received = [result["stats"]["received_rows"] for result in ranks]
    assert any(0 in r for r in received) and sum(map(sum, received)) > 0
    if world_size == 4:  # tokens reduced from 3+ ranks: rounding once differs from rounding per addition
        assert any(result["stats"]["stepwise_differs"] for result in ranks)


def test_the_stand_in_was_called(stand_in_run):
    _, ranks = stand_in_run
    for result in ranks:
        calls = result["calls"]
        assert calls["get_dispatch_layout"] >= len(CASES) and calls["combine"] >= 3 * len(CASES), calls
        assert calls["dispatch"] >= 4 * len(CASES) and calls["cached_dispatch"] >= 2 * len(CASES), calls
        assert calls["__init__"] >= 2, calls


class FakeGroup:
    """Rank and size only: the constructor must reject these before its collective."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


@pytest.mark.parametrize("kwargs, size, error", [
    ({"low_latency_mode": True}, 2, NotImplementedError),
    ({"num_rdma_bytes": 1 << 20}, 4, RuntimeError),  # intranode takes no RDMA buffer
    ({}, 16, NotImplementedError),  # internode
    ({}, 12, RuntimeError),  # neither within a node nor whole nodes
    ({"num_nvl_bytes": 1000}, 2, RuntimeError),  # not a multiple of 128
])
def test_buffer_rejects_what_is_not_emulated_or_invalid(kwargs, size, error):
    deep_ep_stand_in.Buffer.reset_calls()
    with pytest.raises(error):
        deep_ep_stand_in.Buffer(FakeGroup(0, size), **kwargs)
    assert deep_ep_stand_in.Buffer.calls["__init__"] == 1


def test_configs_and_size_hints():
    Buffer, Config = deep_ep_stand_in.Buffer, deep_ep_stand_in.Config
    saved = Buffer.num_sms
    try:
        Buffer.set_num_sms(24)
        assert Buffer.get_dispatch_config(8).num_sms == 24 and Buffer.get_combine_config(2).num_sms == 24
        with pytest.raises(AssertionError):
            Buffer.set_num_sms(23)
    finally:
        Buffer.num_sms = saved
    config = Config(20, 6, 256, 6, 128)
    for ranks in (2, 4, 8):
        nvl = config.get_nvl_buffer_size_hint(7168 * 2, ranks)
        assert isinstance(nvl, int) and nvl > 0 and nvl % 128 == 0
        assert config.get_rdma_buffer_size_hint(7168 * 2, ranks) == 0
    assert config.get_rdma_buffer_size_hint(7168 * 2, 16) > 0


def test_install_registers_and_restores():
    before = sys.modules.get("deep_ep")
    with deep_ep_stand_in.install() as module:
        import deep_ep

        assert deep_ep is module is deep_ep_stand_in and deep_ep.IS_STAND_IN
        from deep_ep import Buffer, Config, EventOverlap  # noqa: F401 - the names a caller imports
    assert sys.modules.get("deep_ep") is before
    sentinel = object()
    sys.modules["deep_ep"] = sentinel
    try:
        installation = deep_ep_stand_in.install()
        assert sys.modules["deep_ep"] is deep_ep_stand_in
        installation.restore()
        assert sys.modules["deep_ep"] is sentinel
    finally:
        if before is None:
            sys.modules.pop("deep_ep", None)
        else:
            sys.modules["deep_ep"] = before


if __name__ == "__main__":
    ep_cases.main(worker)
