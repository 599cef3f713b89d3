"""The ``deep_ep`` stand-in (``tests/deep_ep_stand_in.py``) against plain Python loops, on gloo.

One launch per world size (2 and 4: uneven token counts, a rank with no token, a token routed
nowhere, ``-1`` slots) runs ``python tests/test_deep_ep_stand_in.py --rank R ...`` on every rank.  Each
rank rebuilds every rank's inputs from their seeds, computes what DeepEP 1.2.1 gives it token by
token, and records where the stand-in's ``get_dispatch_layout`` / ``dispatch`` / cached ``dispatch`` /
``combine`` (with and without top-k weights) differ; the tests require no difference.  The host
checks, a size hint and ``install()`` are checked in this process.
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
HIDDEN, TOP_K, L = 8, 3, 4  # L experts per rank; rows of 16 bytes
TOKENS = {2: (0, 13), 4: (7, 0, 19, 4)}  # per rank


def seeded(world: int, rank: int, what: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{world}-{rank}-{what}".encode()))


def inputs(world: int, rank: int) -> dict:
    gen, T = seeded(world, rank, "x"), TOKENS[world][rank]
    idx = torch.rand(T, L * world, generator=gen).argsort(dim=1)[:, :TOP_K].contiguous()
    idx[torch.rand(T, TOP_K, generator=gen) < 0.25] = -1
    idx[1:2] = -1  # a token routed nowhere
    return {"x": torch.randn(T, HIDDEN, generator=gen).to(torch.bfloat16), "idx": idx,
            "w": torch.rand(T, TOP_K, generator=gen)}


def returned(world: int, rank: int, rows: int) -> tuple:
    """What ``rank`` hands to combine for its ``rows`` received rows: bf16 rows and float32 weights."""
    gen = seeded(world, rank, "returned")
    return (torch.randn(rows, HIDDEN, generator=gen) * 37).to(torch.bfloat16), torch.randn(rows, TOP_K, generator=gen)


def reference(world: int, me: int) -> dict:
    ins = [inputs(world, r) for r in range(world)]
    ids = [inp["idx"].tolist() for inp in ins]
    goes = [[{e // L for e in token if e >= 0} for token in ids[s]] for s in range(world)]  # ranks of each token
    rows = [[(s, t) for s in range(world) for t in range(len(ids[s])) if d in goes[s][t]] for d in range(world)]
    out = {"num_tokens_per_rank": [sum(d in g for g in goes[me]) for d in range(world)],
           "num_tokens_per_expert": [sum(token.count(e) for token in ids[me]) for e in range(L * world)],
           "is_token_in_rank": [[d in g for d in range(world)] for g in goes[me]],
           "recv_x": [ins[s]["x"][t].tolist() for s, t in rows[me]],
           "recv_topk_idx": [[e - me * L if e >= 0 and e // L == me else -1 for e in ids[s][t]] for s, t in rows[me]],
           "recv_topk_weights": [[w if e >= 0 and e // L == me else 0.0
                                  for e, w in zip(ids[s][t], ins[s]["w"][t].tolist())] for s, t in rows[me]],
           "per_expert": [sum(token.count(me * L + j) for s in range(world) for token in ids[s]) for j in range(L)],
           "rank_prefix_matrix": [[sum(d in g for i in range(s + 1) for g in goes[i]) for d in range(world)]
                                  for s in range(world)],
           "recv_src_idx": [t for _, t in rows[me]]}
    back = [returned(world, r, len(rows[r])) for r in range(world)]
    x_sums, w_sums, stepwise = [], [], []
    for t in range(len(ids[me])):  # float32 sums over the ranks in rank order, one rounding to bf16
        x_sum, w_sum, step = torch.zeros(HIDDEN), torch.zeros(TOP_K), torch.zeros(HIDDEN, dtype=torch.bfloat16)
        for r in sorted(goes[me][t]):
            i = rows[r].index((me, t))
            x_sum, w_sum, step = x_sum + back[r][0][i].float(), w_sum + back[r][1][i], step + back[r][0][i]
        x_sums.append(x_sum.to(torch.bfloat16).tolist())
        w_sums.append(w_sum.tolist())
        stepwise.append(step.tolist())
    out.update(combined_x=x_sums, combined_topk_weights=w_sums, rounds_once_matters=x_sums != stepwise,
               returned=back[me], cached_x=[(ins[s]["x"][t] * 2).tolist() for s, t in rows[me]])
    return out


def worker(rank: int, world: int, directory: str) -> None:
    ep_cases.join_gloo(rank, world, directory)
    ref, mine, failures = reference(world, rank), inputs(world, rank), []

    def check(name, got, dtype):
        want = ref[name]
        if not (isinstance(got, torch.Tensor) and got.dtype == dtype and got.tolist() == want):
            failures.append(f"rank {rank} {name}: got {got!r}, expected {dtype} {want!r}")

    with deep_ep_stand_in.install():
        import deep_ep

        Buffer = deep_ep.Buffer
        hint = max(Buffer.get_dispatch_config(world).get_nvl_buffer_size_hint(HIDDEN * 2, world),
                   Buffer.get_combine_config(world).get_nvl_buffer_size_hint(HIDDEN * 2, world))
        buffer = Buffer(dist.group.WORLD, num_nvl_bytes=hint)
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(mine["idx"], L * world)
        check("num_tokens_per_rank", per_rank, torch.int32), check("num_tokens_per_expert", per_expert, torch.int32)
        check("is_token_in_rank", in_rank, torch.bool)
        recv_x, recv_idx, recv_w, recv_per_expert, handle, _ = buffer.dispatch(
            mine["x"], num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=mine["idx"], topk_weights=mine["w"])
        check("recv_x", recv_x, torch.bfloat16), check("recv_topk_idx", recv_idx, torch.int64)
        check("recv_topk_weights", recv_w, torch.float32), check("rank_prefix_matrix", handle[0], torch.int32)
        check("recv_src_idx", handle[3], torch.int32)
        if recv_per_expert != ref["per_expert"] or len(handle) != 6 or handle[4] is not in_rank or per_rdma_rank:
            failures.append(f"rank {rank}: per-expert {recv_per_expert} (expected {ref['per_expert']}), a handle "
                            f"of {len(handle)} fields or without is_token_in_rank, or an RDMA count")
        cached = buffer.dispatch(mine["x"] * 2, handle=handle)
        check("cached_x", cached[0], torch.bfloat16)
        if any(v is not None for v in cached[1:5]):
            failures.append(f"rank {rank}: cached dispatch returned {cached[1:5]}")
        y, y_weights = ref["returned"]
        combined, combined_w, _ = buffer.combine(y, handle, topk_weights=y_weights)
        check("combined_x", combined, torch.bfloat16), check("combined_topk_weights", combined_w, torch.float32)
        combined, combined_w, _ = buffer.combine(y, handle)
        check("combined_x", combined, torch.bfloat16)
        if combined_w is not None:
            failures.append(f"rank {rank}: combine without weights returned weights")
    ep_cases.save_and_exit({"failures": failures, "received": recv_x.shape[0],
                            "rounds_once_matters": ref["rounds_once_matters"]}, rank, directory)


@pytest.mark.parametrize("world", [2, 4])
def test_the_stand_in_matches_plain_loops(world, tmp_path):
    ranks = run_world(Path(__file__).resolve(), world, tmp_path, 120)
    failures = [f for out in ranks for f in out["failures"]]
    assert not failures, "\n".join(failures[:20])
    assert sum(out["received"] for out in ranks) > 0
    if world == 4:  # tokens summed from 3+ ranks: rounding once differs from rounding every addition
        assert any(out["rounds_once_matters"] for out in ranks)


class FakeGroup:  # no collective runs before these checks
    def rank(self) -> int:
        return 0

    def size(self) -> int:
        return 2


def test_host_checks_raise_before_communicating():
    Buffer = deep_ep_stand_in.Buffer
    buffer = Buffer(FakeGroup(), Buffer.get_dispatch_config(2).get_nvl_buffer_size_hint(HIDDEN * 2, 2))
    x, idx = torch.zeros(1, HIDDEN, dtype=torch.bfloat16), torch.tensor([[0, 5, -1]])
    with pytest.raises(RuntimeError, match="int64"):
        buffer.get_dispatch_layout(idx.int(), 2 * L)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 2 * L)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    with pytest.raises(RuntimeError, match="float32 topk_weights"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=torch.ones(1, TOP_K, dtype=torch.float64), **layout)
    with pytest.raises(RuntimeError, match="fit"):
        Buffer(FakeGroup(), 1024).dispatch(x, **layout)
    with pytest.raises(RuntimeError, match="bfloat16 only"):
        buffer.combine(x[:0].float(), (None, None, None, torch.zeros(0, dtype=torch.int32), in_rank, None))


def test_size_hint_is_deep_eps():
    # Config::get_nvl_buffer_size_hint, 8 ranks, 7168 bf16: 10 channels * 8 ranks * (5 ints + 256 slots
    # * (14336 + 128 * (8 + 4 + 4)) bytes) = 335545920 bytes, rounded up to a multiple of 128.
    assert deep_ep_stand_in.Buffer.get_dispatch_config(8).get_nvl_buffer_size_hint(7168 * 2, 8) == 335545984


def test_install_registers_and_restores():
    before, sentinel = sys.modules.get("deep_ep"), object()
    sys.modules["deep_ep"] = sentinel
    try:
        with deep_ep_stand_in.install() as module:
            import deep_ep

            assert deep_ep is module is deep_ep_stand_in
        assert sys.modules["deep_ep"] is sentinel
    finally:
        sys.modules.pop("deep_ep")
        if before is not None:
            sys.modules["deep_ep"] = before


if __name__ == "__main__":
    ep_cases.main(worker)
