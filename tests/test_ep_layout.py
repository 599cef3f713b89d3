"""The all-to-all dispatcher's send layout, without a process group: one row per (token, rank that
owns one of its experts), ranks in order, tokens in order within a rank (``moe.route`` with the ranks
as experts, eager and compiled), against a plain loop."""

from __future__ import annotations

import pytest
import torch

from moe_modules.ep import AllToAllDispatcher


class _Mesh:
    def __init__(self, size: int):
        self._size = size

    def size(self) -> int:
        return self._size


def _routing(T: int, K: int, E: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(T, E, generator=gen).topk(K, 1).indices
    indices[::5, 0] = -1  # not routed
    token_mask = torch.rand(T, generator=gen) > 0.2
    return token_mask, indices


def _expected(token_mask, indices, ep: int, E: int):
    """``({(token, rank): row}, rows per rank)`` in send order, from a plain loop."""
    order, per_rank = {}, [0] * ep
    for r in range(ep):
        for t in range(indices.shape[0]):
            experts = [int(e) for e in indices[t] if 0 <= int(e) < E]
            if bool(token_mask[t]) and any(e // (E // ep) == r for e in experts):
                order[(t, r)] = len(order)
                per_rank[r] += 1
    return order, per_rank


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_send_layout(ep):
    T, K, E = 37, 3, 8
    token_mask, indices = _routing(T, K, E, seed=ep)
    dispatcher = AllToAllDispatcher(_Mesh(ep), E)
    row_of_pair, offsets, pair_of_row, rows_per_rank, pairs_per_rank = dispatcher._send_layout(token_mask, indices)

    order, per_rank = _expected(token_mask, indices, ep, E)
    n_send = len(order)
    assert rows_per_rank.tolist() == per_rank
    assert offsets.dtype == torch.int32 and offsets.tolist() == torch.tensor(per_rank).cumsum(0).tolist()
    for t in range(T):
        for r in range(ep):
            if (t, r) in order:
                assert int(row_of_pair[t, r]) == order[(t, r)]
                assert int(pair_of_row[order[(t, r)]]) == t * ep + r
            else:
                assert int(row_of_pair[t, r]) >= n_send  # past every row sent: not sent
    valid = token_mask.unsqueeze(1) & (indices >= 0) & (indices < E)
    owner = indices // (E // ep)
    assert pairs_per_rank.tolist() == [int((valid & (owner == r)).sum()) for r in range(ep)]


def test_peer_mailbox_regions_are_aligned_and_disjoint():
    """The symmetric-memory mailbox (GPU only) lays its tensors out with this: aligned, in order, no overlap."""
    from moe_ops.ops.mailbox import ALIGN as _ALIGN, regions as _regions

    sizes = [64, 1, 0, 3 * _ALIGN, _ALIGN + 1]
    offsets, end = _regions(sizes)
    assert offsets == [0, _ALIGN, 2 * _ALIGN, 2 * _ALIGN, 5 * _ALIGN]
    assert all(o % _ALIGN == 0 for o in offsets) and end == 7 * _ALIGN
    assert all(o + n <= nxt for o, n, nxt in zip(offsets, sizes, offsets[1:] + [end]))
