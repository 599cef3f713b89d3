"""A CPU stand-in for ``deep_ep`` (DeepEP 1.2.1), covering only what ``moe_modules``' DeepEP path uses.

CPU tests make this module ``import deep_ep`` (``with install(): ...``); gloo all-to-alls stand in for
NVLink.  It follows DeepEP 1.2.1 (``deep_ep/buffer.py``, ``csrc/``: signatures, results, host checks)
for the arguments the library passes, within one node (2, 4 or 8 ranks, normal kernels):

* ``Buffer.get_dispatch_config`` / ``get_combine_config``, ``Config.get_nvl_buffer_size_hint``: DeepEP's
  numbers (intranode build); dispatch and combine check that their queues fit ``num_nvl_bytes``.
* ``Buffer(group, num_nvl_bytes)``; ``get_dispatch_layout(topk_idx, num_experts)``: rank ``r`` owns
  experts ``[r * L, (r + 1) * L)``, ``L = num_experts // num_ranks``; ``-1`` selects nothing.
* ``dispatch`` of a layout and top-k: rows by source rank, then source token; top-k ids made local
  (``-1``, weight ``0.0``, where the expert is elsewhere); per local expert the sum of the senders'
  ``num_tokens_per_expert``.  ``dispatch(x, handle=h)`` moves new rows the same way.
* ``combine(x, handle, topk_weights=None)``: a token's rows (and weights) summed in float32 in rank
  order from zero, rounded once to bfloat16 (the only dtype it reduces); a token sent nowhere gets 0.

The handle is DeepEP's ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix,
recv_src_idx, is_token_in_rank, send_head)``, which the library only hands back: fields 0, 3, 4 hold
DeepEP's values, the kernels' queue bookkeeping (1, 2, 5) is ``None``.  Calls finish before returning
(events are ``None``).  ``Buffer.calls`` counts calls by name for the tests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
from typing import Optional

import torch
import torch.distributed as dist

# (num_max_nvl_chunked_send_tokens, ..._recv_tokens, num_max_rdma_chunked_send_tokens, ..._recv_tokens)
_DISPATCH_CONFIGS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128)}
_COMBINE_CONFIGS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128)}


def _check(condition: bool, what: str) -> None:
    """DeepEP's ``EP_HOST_ASSERT``, which reaches Python as a ``RuntimeError``."""
    if not condition:
        raise RuntimeError(f"deep_ep stand-in: assertion failed: {what}")


class EventOverlap:
    def __init__(self, event=None, extra_tensors=None):
        self.event, self.extra_tensors = event, extra_tensors


@dataclasses.dataclass
class Config:
    """SMs (two per channel) and the chunk sizes, in tokens, of the NVL and RDMA queues."""
    num_sms: int
    num_max_nvl_chunked_send_tokens: int
    num_max_nvl_chunked_recv_tokens: int
    num_max_rdma_chunked_send_tokens: int
    num_max_rdma_chunked_recv_tokens: int

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Queue heads and tails, and per slot a row, 128 top-k ids and weights and 128 scales."""
        _check(num_ranks in _DISPATCH_CONFIGS, f"intranode ranks (stand-in: {tuple(_DISPATCH_CONFIGS)})")
        slots = self.num_sms // 2 * num_ranks
        total = slots * 5 * 4 + slots * self.num_max_nvl_chunked_recv_tokens * (hidden_bytes + 128 * (8 + 4 + 4))
        return -(-total // 128) * 128


class Buffer:
    num_sms: int = 20
    calls: collections.Counter = collections.Counter()

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0):
        Buffer.calls["__init__"] += 1
        _check(num_nvl_bytes % 128 == 0, "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0")
        self.group, self.rank, self.group_size, self.num_nvl_bytes = group, group.rank(), group.size(), num_nvl_bytes

    @staticmethod
    def reset_calls() -> None:
        Buffer.calls.clear()

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in _DISPATCH_CONFIGS, f"Unsupported number of EP ranks: {num_ranks} (stand-in: intranode)"
        return Config(Buffer.num_sms, *_DISPATCH_CONFIGS[num_ranks])

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in _COMBINE_CONFIGS, f"Unsupported number of EP ranks: {num_ranks} (stand-in: intranode)"
        return Config(Buffer.num_sms, *_COMBINE_CONFIGS[num_ranks])

    def _check_queues(self, config: Config, fixed_bytes: int, slot_bytes: int) -> None:
        """DeepEP's host check that its queues (per channel and rank, a chunk of slots) fit the buffer."""
        _check(self.group_size in _DISPATCH_CONFIGS, f"Unsupported ranks ({self.group_size})")
        slots = config.num_sms // 2 * self.group_size * config.num_max_nvl_chunked_recv_tokens
        _check(fixed_bytes + slots * slot_bytes <= self.num_nvl_bytes, f"the queues fit in {self.num_nvl_bytes} bytes")

    def _all_to_all(self, parts: list, send_counts: list, recv_counts: list) -> list:
        """Rows of each 2-D tensor of ``parts``, ``send_counts[r]`` to rank ``r``, as bytes (gloo has no bf16)."""
        raw = [p.contiguous().view(torch.uint8) for p in parts]
        widths = [r.shape[1] for r in raw]
        out = raw[0].new_empty(sum(recv_counts), sum(widths))
        dist.all_to_all_single(out, torch.cat(raw, dim=1), recv_counts, send_counts, group=self.group)
        return [o.contiguous().view(p.dtype) for o, p in zip(out.split(widths, dim=1), parts)]

    def _counts(self, rank_prefix_matrix: torch.Tensor, is_token_in_rank: torch.Tensor) -> tuple[list, list]:
        """Rows to each rank, and from each rank (rows ``[prefix[s - 1, me], prefix[s, me])`` came from ``s``)."""
        received_by_me = rank_prefix_matrix[:, self.rank].long()
        from_each = torch.diff(received_by_me, prepend=received_by_me.new_zeros(1))
        return is_token_in_rank.sum(dim=0).tolist(), from_each.tolist()

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int):
        Buffer.calls["get_dispatch_layout"] += 1
        _check(topk_idx.dim() == 2 and topk_idx.is_contiguous() and num_experts > 0, "a contiguous [T, K] topk_idx")
        _check(topk_idx.dtype == torch.int64, "topk_idx is int64 (read through data_ptr<int64_t>)")
        R, per_rank = self.group_size, num_experts // self.group_size
        selected = (topk_idx >= 0) & (topk_idx < num_experts)
        num_tokens_per_expert = torch.bincount(topk_idx[selected], minlength=num_experts).int()
        owner = torch.where(selected & (topk_idx < per_rank * R), topk_idx // max(per_rank, 1), -1)
        is_token_in_rank = torch.stack([(owner == r).any(dim=1) for r in range(R)], dim=1)
        num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, EventOverlap()

    def dispatch(self, x: torch.Tensor, handle: Optional[tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None, num_tokens_per_rdma_rank=None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None):
        Buffer.calls["dispatch"] += 1
        R, me, num_topk = self.group_size, self.rank, 0 if topk_idx is None else topk_idx.shape[1]
        _check(x.dim() == 2 and x.is_contiguous() and x.shape[1] * x.element_size() % 16 == 0,
               "x is a contiguous [T, hidden], rows of a multiple of 16 bytes")
        config = self.get_dispatch_config(R)  # fixed: rank prefix matrix, channel offsets, queue heads and tails
        self._check_queues(config, R * R * 4 + config.num_sms // 2 * R * 16,
                           x.shape[1] * x.element_size() + 4 + num_topk * (8 + 4))
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            rank_prefix_matrix, is_token_in_rank = handle[0], handle[4]
        else:
            assert all(t is not None for t in (num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert))
            _check(num_tokens_per_rank.dtype == num_tokens_per_expert.dtype == torch.int32, "int32 counts")
            _check(num_tokens_per_expert.shape[0] % R == 0, "num_experts % num_ranks == 0")
            _check((topk_idx is None) == (topk_weights is None), "topk_idx and topk_weights together")
            _check(topk_idx is None or (topk_idx.dtype == torch.int64 and topk_weights.dtype == torch.float32),
                   "int64 topk_idx and float32 topk_weights")
            _check(is_token_in_rank.dtype == torch.bool and tuple(is_token_in_rank.shape) == (x.shape[0], R),
                   "is_token_in_rank is a bool [T, num_ranks]")
            # Every rank's tokens per destination rank and per expert, all-gathered: [source rank, ...].
            mine = torch.cat([num_tokens_per_rank, num_tokens_per_expert])
            gathered = [torch.empty_like(mine) for _ in range(R)]
            dist.all_gather(gathered, mine, group=self.group)
            counts = torch.stack(gathered)
            rank_prefix_matrix = counts[:, :R].cumsum(dim=0, dtype=torch.int32)
            L = num_tokens_per_expert.shape[0] // R
            num_recv_tokens_per_expert_list = counts[:, R + me * L:R + (me + 1) * L].sum(dim=0).tolist()

        send_counts, recv_counts = self._counts(rank_prefix_matrix, is_token_in_rank)
        dst, token = is_token_in_rank.T.nonzero(as_tuple=True)  # by destination, then token: the order received
        parts = [x[token], token.int().unsqueeze(1)]
        if topk_idx is not None:
            first = (dst * L).unsqueeze(1)
            sent_idx = topk_idx[token]
            local = (sent_idx >= first) & (sent_idx < first + L)
            parts += [torch.where(local, sent_idx - first, -1), torch.where(local, topk_weights[token], 0.0)]
        recv_x, recv_src_idx, *recv_topk = self._all_to_all(parts, send_counts, recv_counts)
        if handle is not None:
            return recv_x, None, None, None, None, EventOverlap()
        recv_topk_idx, recv_topk_weights = recv_topk or (None, None)
        handle = (rank_prefix_matrix, None, None, recv_src_idx.flatten(), is_token_in_rank, None)
        return recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, EventOverlap()

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: Optional[torch.Tensor] = None):
        Buffer.calls["combine"] += 1
        rank_prefix_matrix, recv_src_idx, is_token_in_rank = handle[0], handle[3], handle[4]
        _check(x.dim() == 2 and x.is_contiguous() and x.shape[0] == recv_src_idx.shape[0],
               "x is a contiguous [received rows, hidden]")
        _check(x.dtype == torch.bfloat16, f"Unsupported type ({x.dtype}: combine reduces bfloat16 only)")
        _check(topk_weights is None or (topk_weights.dtype == torch.float32 and topk_weights.shape[0] == x.shape[0]),
               "float32 topk_weights, a row per received row")
        config = self.get_combine_config(self.group_size)  # fixed: queue heads and tails
        self._check_queues(config, config.num_sms // 2 * self.group_size * 8, x.shape[1] * x.element_size() + 4
                           + (0 if topk_weights is None else topk_weights.shape[1]) * 4)

        recv_counts, send_counts = self._counts(rank_prefix_matrix, is_token_in_rank)  # the dispatch's, reversed
        parts = [x] if topk_weights is None else [x, topk_weights]
        back = [rows.split(recv_counts) for rows in self._all_to_all(parts, send_counts, recv_counts)]
        sums = [x.new_zeros(is_token_in_rank.shape[0], p.shape[1], dtype=torch.float32) for p in parts]
        for r in range(self.group_size):  # rank order, as the combine kernel adds them
            for total, rows in zip(sums, back):
                total[is_token_in_rank[:, r]] += rows[r].float()
        return sums[0].to(x.dtype), (sums[1] if topk_weights is not None else None), EventOverlap()


@contextlib.contextmanager
def install():
    """``with install():`` this module is ``import deep_ep``; afterwards whatever was there before (or nothing)."""
    previous = sys.modules.pop("deep_ep", None)
    sys.modules["deep_ep"] = sys.modules[__name__]
    try:
        yield sys.modules[__name__]
    finally:
        sys.modules.pop("deep_ep", None)
        if previous is not None:
            sys.modules["deep_ep"] = previous
