"""A CPU stand-in for ``deep_ep`` (DeepSeek's DeepEP 1.0.0), restricted to its intranode normal-mode API.

DeepEP cannot be built here, so CPU tests register this module as ``sys.modules["deep_ep"]``
(:func:`install`) and the library's ``deep_ep.Buffer`` path runs over ``torch.distributed``
collectives instead of NVLink kernels (gloo, CPU tensors, spawned processes).  It follows the
contract of DeepEP's ``deep_ep/buffer.py``, the host-side checks of ``csrc/deep_ep.cpp`` and what
the kernels of ``csrc/kernels/intranode.cu`` / ``get_dispatch_layout`` write:

* ``Buffer.get_dispatch_layout(topk_idx, num_experts)``: local, no communication.  Rank ``r`` owns
  experts ``[r * L, (r + 1) * L)`` with ``L = num_experts // num_ranks``; ``-1`` selects nothing;
  ``num_tokens_per_expert`` counts (token, slot) pairs.
* ``Buffer.dispatch``: a token goes to rank ``r`` iff ``is_token_in_rank[t, r]`` (``topk_idx`` does
  not route, it is only rewritten).  Received rows are ordered by source rank, then by source token
  index: the receiver of source ``s`` writes at ``rank_prefix_matrix[s - 1, me]`` plus the channel
  offset, and channels are consecutive token ranges each sent in increasing token order.
  ``recv_topk_idx`` holds the local expert index (``idx - me * L``) where the expert is on this rank
  and ``-1`` elsewhere (``-1`` inputs included); ``recv_topk_weights`` holds the weight where the
  expert is local and ``0.0`` elsewhere.  ``num_recv_tokens_per_expert_list[j]`` is the sum over
  source ranks of *their* ``num_tokens_per_expert[me * L + j]`` (the caller's tensors, as DeepEP
  uses them), rounded up to a multiple of ``expert_alignment``.
* The handle has DeepEP's six intranode fields with DeepEP's meanings
  ``(rank_prefix_matrix [R, R], channel_prefix_matrix [R, C], recv_channel_prefix_matrix [R, C],
  recv_src_idx [N], is_token_in_rank [T, R], send_head [T, R])`` (``int32`` but the bool
  ``is_token_in_rank``; ``C = config.num_sms // 2``), so ``handle[0]`` is the rank prefix matrix as
  in DeepEP's own tests, and a ``combine`` / cached ``dispatch`` with a config of another SM count
  fails as in DeepEP.  Unlike DeepEP, ``combine`` does not rewrite ``send_head`` in place.
* ``Buffer.combine``: every received row goes back to its source token; the rows of one token from
  different ranks are summed in float32 in rank order, starting from zero, and rounded once to
  ``x.dtype``; a token sent nowhere comes back as zeros.  ``topk_weights`` rows are summed the same
  way in float32.

Transport: the per-rank counts (tokens per destination rank, the caller's tokens per expert, the
per-channel prefix sums) are all-gathered first; then one ``all_to_all_single`` carries each row
packed bitwise into ``int32`` (bf16 data, source index, top-k indices and weights), so gloo moves
bf16 exactly.  Every rank of the group must call ``dispatch`` / ``combine`` (and the ``Buffer``
constructor, collective in DeepEP too), with zero tokens as well.

Checks: what ``csrc/deep_ep.cpp`` asserts on the host (shapes, contiguity, ``int32`` / ``bool``
metadata, ``float32`` weights, hidden bytes a multiple of 16, even ``num_sms``, the NVL buffer
being large enough, ``num_experts % num_ranks == 0``) raises ``RuntimeError`` as DeepEP's
``EPException`` does through pybind11; Python-level ``assert``\\ s of ``buffer.py`` raise
``AssertionError``; a non-``int64`` ``topk_idx`` raises ``RuntimeError`` (DeepEP reads it with
``data_ptr<int64_t>()``).  Beyond DeepEP's host checks, this stand-in also raises ``RuntimeError``
for: ``x`` not bfloat16 in ``dispatch`` (documented; DeepEP's dispatch kernel copies raw bytes of
any dtype, its combine accepts bf16 only), more than 32 top-k slots and group sizes other than
2, 4 and 8 (device-side / kernel-dispatch limits in DeepEP), ``num_tokens_per_rank`` disagreeing
with ``is_token_in_rank`` (DeepEP would hang or corrupt memory) and a non-positive
``expert_alignment``.

Not emulated (``NotImplementedError``): low-latency mode, internode (more than 8 ranks), FP8
``(x, x_scales)`` inputs, ``get_local_buffer_tensor``.  Events are stand-ins: everything has finished
when a call returns, ``async_finish=True`` only makes the returned ``EventOverlap`` carry an event.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

IS_STAND_IN = True

# DeepEP 1.0.0 constants (csrc/kernels/configs.cuh).
NUM_MAX_NVL_PEERS = 8
NUM_MAX_LOCAL_EXPERTS = 1024
NUM_BUFFER_ALIGNMENT_BYTES = 128
_INT_MAX = 2 ** 31 - 1
# Limits of the intranode kernels: template instances for 2, 4 and 8 ranks (SWITCH_RANKS), at most
# 32 top-k slots (one lane each), one notify thread per local expert (128 threads).
_KERNEL_RANKS = (2, 4, 8)
_MAX_TOPK = 32
_NOTIFY_THREADS = 128
_SIZEOF_INT4 = 16

__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "install"]


def _host_assert(condition: bool, what: str) -> None:
    """DeepEP's ``EP_HOST_ASSERT``: pybind11 turns its exception into a ``RuntimeError``."""
    if not condition:
        raise RuntimeError(f"deep_ep stand-in: assertion failed: {what}")


def _require_int64(t: torch.Tensor, name: str) -> None:
    if t.dtype != torch.int64:  # DeepEP reads it through data_ptr<int64_t>(), which throws
        raise RuntimeError(f"deep_ep stand-in: {name}: expected scalar type Long but found {t.dtype}")


def _kernel_ranks(num_ranks: int) -> None:
    _host_assert(num_ranks in _KERNEL_RANKS, f"Unsupported ranks ({num_ranks}; the intranode kernels exist for "
                                             f"{_KERNEL_RANKS})")


# ---- events and configs -------------------------------------------------------------------


class EventHandle:
    """Stands in for ``deep_ep_cpp.EventHandle``: on CPU every kernel has finished already."""

    def current_stream_wait(self) -> None:
        pass


class EventOverlap:
    """``deep_ep.EventOverlap``: ``event`` is ``None`` unless the call had ``async_finish=True``."""

    def __init__(self, event: Optional[EventHandle] = None, extra_tensors: Optional[Tuple[torch.Tensor]] = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        assert self.event is not None  # as in DeepEP: only events of async calls can be waited on
        self.event.current_stream_wait()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


class Config:
    """``deep_ep.Config``: the SM count (two SMs per channel) and the NVL/RDMA chunk sizes."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        self.num_sms = int(num_sms)
        self.num_max_nvl_chunked_send_tokens = int(num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = int(num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = int(num_max_rdma_chunked_send_tokens)
        self.num_max_rdma_chunked_recv_tokens = int(num_max_rdma_chunked_recv_tokens)

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl_send={self.num_max_nvl_chunked_send_tokens}, "
                f"nvl_recv={self.num_max_nvl_chunked_recv_tokens}, rdma_send={self.num_max_rdma_chunked_send_tokens}, "
                f"rdma_recv={self.num_max_rdma_chunked_recv_tokens})")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """Bytes of NVL buffer that make this stand-in's own size checks pass for any top-k up to the
        kernels' 32, up to 128 FP8 scales and up to 128 local experts.  Not DeepEP's number (DeepEP
        budgets differently); only meant to be passed back to this stand-in's ``Buffer``."""
        _host_assert(num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        ranks, channels = min(num_ranks, NUM_MAX_NVL_PEERS), self.num_sms // 2
        per_slot = hidden_bytes + 4 + _MAX_TOPK * (8 + 4) + 128 * 4  # data, source index, top-k, scales
        total = ranks * (ranks + _NOTIFY_THREADS) * 4  # count matrices of notify
        total += channels * ranks * 4 * 4  # channel start/end offsets, queue heads and tails
        total += channels * ranks * self.num_max_nvl_chunked_recv_tokens * per_slot
        return -(-total // NUM_BUFFER_ALIGNMENT_BYTES) * NUM_BUFFER_ALIGNMENT_BYTES

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0 within a node (intranode mode uses no RDMA buffer, and this stand-in rejects one).  For
        more ranks a plausible size of this stand-in's own making (internode is not emulated)."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        rdma_ranks, channels = num_ranks // NUM_MAX_NVL_PEERS, self.num_sms // 2
        per_slot = hidden_bytes + 8 + _MAX_TOPK * (8 + 4) + 128 * 4
        total = 2 * channels * rdma_ranks * self.num_max_rdma_chunked_recv_tokens * per_slot + (1 << 20)
        return -(-total // NUM_BUFFER_ALIGNMENT_BYTES) * NUM_BUFFER_ALIGNMENT_BYTES


# ---- helpers --------------------------------------------------------------------------------


def _channel_of_tokens(num_tokens: int, num_channels: int) -> torch.Tensor:
    """Channel of each token: channels are consecutive ranges of ceil(num_tokens / num_channels)."""
    per_channel = -(-num_tokens // num_channels)
    return torch.arange(num_tokens) // max(per_channel, 1)


def _rows_by_destination(is_token_in_rank: torch.Tensor) -> torch.Tensor:
    """Token index of every row sent: destination rank by destination rank, tokens in increasing order."""
    return torch.cat([is_token_in_rank[:, r].nonzero().flatten() for r in range(is_token_in_rank.shape[1])])


def _as_int32_columns(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor's rows reinterpreted bitwise as int32 columns (for one packed all-to-all)."""
    return t.contiguous().view(torch.int32)


def _columns(packed: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``[start, stop)`` of packed int32 rows, reinterpreted as ``dtype`` (fresh storage)."""
    return packed[:, start:stop].clone(memory_format=torch.contiguous_format).view(dtype)


def _all_to_all_rows(packed: torch.Tensor, send_counts: List[int], recv_counts: List[int],
                     group: dist.ProcessGroup) -> torch.Tensor:
    out = packed.new_empty((sum(recv_counts), packed.shape[1]))
    dist.all_to_all_single(out, packed.contiguous(), recv_counts, send_counts, group=group)
    return out


def _event(async_finish: bool) -> EventOverlap:
    return EventOverlap(EventHandle() if async_finish else None)


def _previous(previous_event: Optional[EventOverlap]) -> Optional[EventHandle]:
    return getattr(previous_event, "event", None)


# ---- the buffer -----------------------------------------------------------------------------


class Buffer:
    """``deep_ep.Buffer`` for one node (at most 8 ranks), normal (high-throughput) kernels only.

    ``Buffer.calls`` counts the calls of each public method over all instances ("dispatch" counts
    every dispatch, "cached_dispatch" those given a handle); ``Buffer.reset_calls()`` clears it.
    """

    num_sms: int = 20
    calls: collections.Counter = collections.Counter()

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 1) -> None:
        Buffer.calls["__init__"] += 1
        self.rank = group.rank()
        self.group_size = group.size()
        self.group = group
        self.num_nvl_bytes = num_nvl_bytes
        self.num_rdma_bytes = num_rdma_bytes
        self.low_latency_mode = low_latency_mode
        if low_latency_mode:
            raise NotImplementedError("deep_ep stand-in: the low-latency mode is not emulated")
        _host_assert(num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and
                     (num_nvl_bytes <= _INT_MAX or num_rdma_bytes == 0),
                     "num_nvl_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and (num_nvl_bytes <= INT_MAX or "
                     "num_rdma_bytes == 0)")
        _host_assert(num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and num_rdma_bytes <= _INT_MAX,
                     "num_rdma_bytes % NUM_BUFFER_ALIGNMENT_BYTES == 0 and num_rdma_bytes <= INT_MAX")
        _host_assert(0 <= self.rank < self.group_size, "0 <= rank < num_ranks")
        _host_assert(self.group_size < NUM_MAX_NVL_PEERS or self.group_size % NUM_MAX_NVL_PEERS == 0,
                     "num_ranks < NUM_MAX_NVL_PEERS or num_ranks % NUM_MAX_NVL_PEERS == 0")
        if self.group_size > NUM_MAX_NVL_PEERS:
            raise NotImplementedError(f"deep_ep stand-in: {self.group_size} ranks need DeepEP's internode "
                                      f"kernels, which are not emulated (at most {NUM_MAX_NVL_PEERS} ranks)")
        if num_rdma_bytes > 0:  # within a node DeepEP only takes an RDMA buffer in low-latency mode
            _host_assert(False, "num_ranks > NUM_MAX_NVL_PEERS or low_latency_mode (num_rdma_bytes > 0)")
        # Collective like DeepEP's constructor (it all-gathers device ids and IPC handles).
        peers: list = [None] * self.group_size
        dist.all_gather_object(peers, self.rank, group=group)
        _host_assert(peers == list(range(self.group_size)), "every rank of the group constructs a Buffer")

    @classmethod
    def reset_calls(cls) -> None:
        Buffer.calls.clear()

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        assert new_num_sms % 2 == 0, "The SM count must be even"
        Buffer.num_sms = new_num_sms

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(EventHandle())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return Config(Buffer.num_sms, 6, 256, 6, 128)
        raise NotImplementedError("deep_ep stand-in: internode configs are not emulated")

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return Config(Buffer.num_sms, 6, 256, 6, 128)
        raise NotImplementedError("deep_ep stand-in: internode configs are not emulated")

    @staticmethod
    def get_low_latency_rdma_size_hint(*args, **kwargs) -> int:
        raise NotImplementedError("deep_ep stand-in: the low-latency mode is not emulated")

    def get_local_buffer_tensor(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError("deep_ep stand-in: there is no NVL/RDMA buffer memory to expose")

    def clean_low_latency_buffer(self, *args, **kwargs) -> None:
        raise NotImplementedError("deep_ep stand-in: the low-latency mode is not emulated")

    def low_latency_dispatch(self, *args, **kwargs):
        raise NotImplementedError("deep_ep stand-in: the low-latency mode is not emulated")

    def low_latency_combine(self, *args, **kwargs):
        raise NotImplementedError("deep_ep stand-in: the low-latency mode is not emulated")

    def internode_dispatch(self, *args, **kwargs):
        raise NotImplementedError("deep_ep stand-in: internode kernels are not emulated")

    def internode_combine(self, *args, **kwargs):
        raise NotImplementedError("deep_ep stand-in: internode kernels are not emulated")

    # ---- layout ---------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        Buffer.calls["get_dispatch_layout"] += 1
        _host_assert(topk_idx.dim() == 2, "topk_idx.dim() == 2")
        _host_assert(topk_idx.is_contiguous(), "topk_idx.is_contiguous()")
        _host_assert(num_experts > 0, "num_experts > 0")
        self._check_streams(previous_event, async_finish, allocate_on_comm_stream)
        _require_int64(topk_idx, "topk_idx")
        with torch.no_grad():
            num_ranks, device = self.group_size, topk_idx.device
            idx = topk_idx.detach().to(torch.int64)
            selected = (idx >= 0) & (idx < num_experts)
            num_tokens_per_expert = torch.bincount(idx[selected], minlength=num_experts).to(torch.int32)
            per_rank = num_experts // num_ranks  # DeepEP divides without checking; experts past R * L go nowhere
            is_token_in_rank = torch.zeros(idx.shape[0], num_ranks, dtype=torch.bool, device=device)
            if per_rank > 0:
                for r in range(num_ranks):
                    is_token_in_rank[:, r] = ((idx >= r * per_rank) & (idx < (r + 1) * per_rank)).any(dim=1)
            num_tokens_per_rank = is_token_in_rank.sum(dim=0, dtype=torch.int32)
        return num_tokens_per_rank, None, num_tokens_per_expert, is_token_in_rank, _event(async_finish)

    # ---- dispatch -------------------------------------------------------------------------

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[List[int]],
                  Optional[Tuple], EventOverlap]:
        Buffer.calls["dispatch"] += 1
        config = self.get_dispatch_config(self.group_size) if config is None else config
        if isinstance(x, tuple):
            raise NotImplementedError("deep_ep stand-in: FP8 (x, x_scales) dispatch is not emulated")
        if handle is not None:
            Buffer.calls["cached_dispatch"] += 1
            assert topk_idx is None and topk_weights is None
            rank_prefix_matrix, channel_prefix_matrix, _, recv_src_idx, is_token_in_rank, _ = handle
            recv_x = self._intranode_dispatch(
                x, None, None, None, is_token_in_rank, None, recv_src_idx.size(0), rank_prefix_matrix,
                channel_prefix_matrix, expert_alignment, config, previous_event, async_finish,
                allocate_on_comm_stream)[0]
            return recv_x, None, None, None, None, _event(async_finish)
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, rank_prefix_matrix,
         channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx, send_head) = self._intranode_dispatch(
            x, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, 0, None, None,
            expert_alignment, config, previous_event, async_finish, allocate_on_comm_stream)
        handle = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, send_head)
        return (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
                _event(async_finish))

    def _intranode_dispatch(self, x, topk_idx, topk_weights, num_tokens_per_rank, is_token_in_rank,
                            num_tokens_per_expert, cached_num_recv_tokens, cached_rank_prefix_matrix,
                            cached_channel_prefix_matrix, expert_alignment, config, previous_event, async_finish,
                            allocate_on_comm_stream):
        """The host side of DeepEP's ``Buffer::intranode_dispatch`` (same checks) and the transport."""
        cached = cached_rank_prefix_matrix is not None
        R, me = self.group_size, self.rank
        _host_assert(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        C = config.num_sms // 2
        if cached:
            _host_assert(cached_channel_prefix_matrix is not None, "cached_channel_prefix_matrix.has_value()")
        else:
            _host_assert(num_tokens_per_rank is not None, "num_tokens_per_rank.has_value()")
            _host_assert(num_tokens_per_expert is not None, "num_tokens_per_expert.has_value()")

        _host_assert(is_token_in_rank.dtype == torch.bool, "is_token_in_rank.scalar_type() == torch::kBool")
        if cached:
            _host_assert(cached_rank_prefix_matrix.dtype == torch.int32, "cached_rank_prefix_matrix is int32")
            _host_assert(cached_channel_prefix_matrix.dtype == torch.int32, "cached_channel_prefix_matrix is int32")
        else:
            _host_assert(num_tokens_per_expert.dtype == torch.int32, "num_tokens_per_expert is int32")
            _host_assert(num_tokens_per_rank.dtype == torch.int32, "num_tokens_per_rank is int32")

        _host_assert(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _host_assert((x.size(1) * x.element_size()) % _SIZEOF_INT4 == 0,
                     "(x.size(1) * x.element_size()) % sizeof(int4) == 0")
        _host_assert(is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous(),
                     "is_token_in_rank.dim() == 2 and is_token_in_rank.is_contiguous()")
        _host_assert(is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == R,
                     "is_token_in_rank.size(0) == x.size(0) and is_token_in_rank.size(1) == num_ranks")
        if cached:
            _host_assert(cached_rank_prefix_matrix.dim() == 2 and cached_rank_prefix_matrix.is_contiguous() and
                         tuple(cached_rank_prefix_matrix.shape) == (R, R), "cached_rank_prefix_matrix is [R, R]")
            _host_assert(cached_channel_prefix_matrix.dim() == 2 and cached_channel_prefix_matrix.is_contiguous() and
                         tuple(cached_channel_prefix_matrix.shape) == (R, C),
                         f"cached_channel_prefix_matrix is [num_ranks, num_channels] = [{R}, {C}] "
                         f"(got {list(cached_channel_prefix_matrix.shape)}: another config.num_sms?)")
        else:
            _host_assert(num_tokens_per_expert.dim() == 1 and num_tokens_per_expert.is_contiguous(),
                         "num_tokens_per_expert.dim() == 1 and num_tokens_per_expert.is_contiguous()")
            _host_assert(num_tokens_per_expert.size(0) % R == 0, "num_tokens_per_expert.size(0) % num_ranks == 0")
            _host_assert(num_tokens_per_expert.size(0) // R <= NUM_MAX_LOCAL_EXPERTS,
                         "num_tokens_per_expert.size(0) / num_ranks <= NUM_MAX_LOCAL_EXPERTS")
            _host_assert(num_tokens_per_rank.dim() == 1 and num_tokens_per_rank.is_contiguous() and
                         num_tokens_per_rank.size(0) == R, "num_tokens_per_rank is a contiguous [num_ranks]")

        T, hidden = x.shape
        E = 0 if cached else num_tokens_per_expert.size(0)
        L = E // R
        num_topk = 0
        _host_assert((topk_idx is None) == (topk_weights is None), "topk_idx.has_value() == topk_weights.has_value()")
        if topk_idx is not None:
            num_topk = topk_idx.size(1) if topk_idx.dim() == 2 else 0
            _host_assert(E > 0, "num_experts > 0")
            _host_assert(topk_idx.dim() == 2 and topk_idx.is_contiguous(), "topk_idx.dim() == 2 and contiguous")
            _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(), "topk_weights.dim() == 2 and "
                                                                                   "contiguous")
            _host_assert(topk_idx.size(0) == T and topk_weights.size(0) == T,
                         "num_tokens == topk_idx.size(0) and num_tokens == topk_weights.size(0)")
            _host_assert(topk_weights.size(1) == num_topk, "num_topk == topk_weights.size(1)")
            _host_assert(topk_weights.dtype == torch.float32, "topk_weights.scalar_type() == torch::kFloat32")
            _require_int64(topk_idx, "topk_idx")
            _host_assert(num_topk <= _MAX_TOPK, f"num_topk <= {_MAX_TOPK} (intranode kernels)")
        if x.dtype != torch.bfloat16:
            raise RuntimeError(f"deep_ep stand-in: dispatch takes x as torch.bfloat16 (DeepEP's documented type), "
                               f"got {x.dtype}")
        self._check_streams(previous_event, async_finish, allocate_on_comm_stream)
        if not cached:
            _host_assert(R * (R + L) * 4 <= self.num_nvl_bytes,
                         "num_ranks * (num_ranks + num_local_experts) * sizeof(int) <= num_nvl_bytes")
            _host_assert(E % R == 0, "num_experts % num_ranks == 0")
            _host_assert(L <= _NOTIFY_THREADS and R <= _NOTIFY_THREADS,
                         "num_experts / num_ranks <= 128 and num_ranks <= 128")
            _host_assert(expert_alignment >= 1, "expert_alignment >= 1 (stand-in check)")
        slots = C * R * config.num_max_nvl_chunked_recv_tokens
        _host_assert(R * R * 4 + 4 * C * R * 4 +
                     slots * (hidden * x.element_size() + 4 + num_topk * (8 + 4)) <= self.num_nvl_bytes,
                     f"the dispatch buffers fit in num_nvl_bytes ({self.num_nvl_bytes})")
        self._check_chunks(config)
        _kernel_ranks(R)

        with torch.no_grad():
            is_token_in_rank = is_token_in_rank.detach()
            send_counts_t = is_token_in_rank.sum(dim=0, dtype=torch.int64).cpu()
            channel_of_token = _channel_of_tokens(T, C)
            channel_counts = torch.zeros(R, C, dtype=torch.int64)
            for r in range(R):
                channel_counts[r] = torch.bincount(channel_of_token[is_token_in_rank[:, r].cpu()], minlength=C)
            channel_prefix_matrix = channel_counts.cumsum(dim=1)  # [dst, channel], inclusive

            if cached:
                rank_prefix_matrix = cached_rank_prefix_matrix
                received_by_me = cached_rank_prefix_matrix[:, me].to(torch.int64).cpu()
                recv_counts = torch.diff(received_by_me, prepend=received_by_me.new_zeros(1)).tolist()
                _host_assert(sum(recv_counts) == cached_num_recv_tokens, "handle's rank prefix matrix matches its "
                                                                         "received token count")
            else:
                _host_assert(torch.equal(num_tokens_per_rank.detach().cpu().to(torch.int64), send_counts_t),
                             "num_tokens_per_rank equals is_token_in_rank.sum(0) (stand-in check; DeepEP would "
                             "hang or write out of bounds)")
                # Counts first: to every rank, our tokens per destination rank, the caller's tokens per
                # expert and our per-channel prefix sums.
                mine = torch.cat([send_counts_t, num_tokens_per_expert.detach().cpu().to(torch.int64),
                                  channel_prefix_matrix.flatten()])
                gathered = [torch.empty_like(mine) for _ in range(R)]
                dist.all_gather(gathered, mine, group=self.group)
                counts = torch.stack(gathered)  # [source rank, ...]
                count_matrix = counts[:, :R]  # [source, destination]
                rank_prefix_matrix = count_matrix.cumsum(dim=0).to(torch.int32).to(x.device)
                recv_counts = count_matrix[:, me].tolist()
                per_expert = counts[:, R + me * L:R + (me + 1) * L].sum(dim=0).tolist()
                num_recv_tokens_per_expert_list = [-(-n // expert_alignment) * expert_alignment for n in per_expert]
                sender_channels = counts[:, R + E:].view(R, R, C)[:, me]  # [source, channel], inclusive
                recv_channel_prefix_matrix = torch.cat(
                    [sender_channels.new_zeros(R, 1), sender_channels[:, :-1]], dim=1).to(torch.int32).to(x.device)

            # The rows: destination rank by destination rank, tokens in increasing order (the order
            # each receiver stores them, after the rows of lower source ranks).
            send_rows = _rows_by_destination(is_token_in_rank).to(x.device)
            send_counts = send_counts_t.tolist()
            columns = [_as_int32_columns(x.detach()[send_rows]), send_rows.to(torch.int32).unsqueeze(1)]
            if topk_idx is not None:
                destination = torch.repeat_interleave(torch.arange(R, device=x.device), send_counts_t.to(x.device))
                first_expert = (destination * L).unsqueeze(1)
                sent_idx = topk_idx.detach()[send_rows]
                local = (sent_idx >= first_expert) & (sent_idx < first_expert + L)
                columns.append(_as_int32_columns(torch.where(local, sent_idx - first_expert, -1)))
                columns.append(_as_int32_columns(torch.where(local, topk_weights.detach()[send_rows], 0.0)))
            received = _all_to_all_rows(torch.cat(columns, dim=1), send_counts, recv_counts, self.group)

            words = hidden * x.element_size() // 4
            recv_x = _columns(received, 0, words, x.dtype)
            if cached:
                return (recv_x,)
            recv_src_idx = _columns(received, words, words + 1, torch.int32).flatten()
            recv_topk_idx = recv_topk_weights = None
            if topk_idx is not None:
                start = words + 1
                recv_topk_idx = _columns(received, start, start + 2 * num_topk, torch.int64)
                recv_topk_weights = _columns(received, start + 2 * num_topk, received.shape[1], torch.float32)

            # send_head[t, r]: the token's position in its channel's queue to rank r, -1 if not sent.
            exclusive = torch.cat([channel_prefix_matrix.new_zeros(R, 1), channel_prefix_matrix[:, :-1]], dim=1)
            position = is_token_in_rank.cpu().to(torch.int64).cumsum(dim=0) - 1 - exclusive[:, channel_of_token].T
            send_head = torch.where(is_token_in_rank.cpu(), position, -1).to(torch.int32).to(x.device)
        return (recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, rank_prefix_matrix,
                channel_prefix_matrix.to(torch.int32).to(x.device), recv_channel_prefix_matrix, recv_src_idx,
                send_head)

    # ---- combine --------------------------------------------------------------------------

    def combine(self, x: torch.Tensor, handle: Tuple, topk_weights: Optional[torch.Tensor] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False) -> \
            Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        Buffer.calls["combine"] += 1
        config = self.get_combine_config(self.group_size) if config is None else config
        # As in DeepEP: the receiving side's channel prefix matrix (the third field) is the one used.
        rank_prefix_matrix, _, channel_prefix_matrix, src_idx, is_recv_token_in_rank, send_head = handle
        R, me = self.group_size, self.rank

        _host_assert(x.dim() == 2 and x.is_contiguous(), "x.dim() == 2 and x.is_contiguous()")
        _host_assert(src_idx.dim() == 1 and src_idx.is_contiguous() and src_idx.dtype == torch.int32,
                     "src_idx is a contiguous int32 vector")
        _host_assert(send_head.dim() == 2 and send_head.is_contiguous() and send_head.dtype == torch.int32,
                     "send_head is a contiguous int32 matrix")
        _host_assert(rank_prefix_matrix.dim() == 2 and rank_prefix_matrix.is_contiguous() and
                     rank_prefix_matrix.dtype == torch.int32, "rank_prefix_matrix is a contiguous int32 matrix")
        _host_assert(channel_prefix_matrix.dim() == 2 and channel_prefix_matrix.is_contiguous() and
                     channel_prefix_matrix.dtype == torch.int32, "channel_prefix_matrix is a contiguous int32 matrix")
        _host_assert(config.num_sms % 2 == 0, "config.num_sms % 2 == 0")
        C = config.num_sms // 2
        num_tokens, hidden = x.shape
        num_recv_tokens = send_head.size(0)
        _host_assert(src_idx.size(0) == num_tokens, "src_idx.size(0) == num_tokens (x has one row per received row)")
        _host_assert(send_head.size(1) == R, "send_head.size(1) == num_ranks")
        _host_assert(tuple(rank_prefix_matrix.shape) == (R, R), "rank_prefix_matrix is [num_ranks, num_ranks]")
        _host_assert(tuple(channel_prefix_matrix.shape) == (R, C),
                     f"channel_prefix_matrix is [num_ranks, num_channels] = [{R}, {C}] "
                     f"(got {list(channel_prefix_matrix.shape)}: another config.num_sms than the dispatch's?)")
        _host_assert((hidden * x.element_size()) % _SIZEOF_INT4 == 0, "(hidden * x.element_size()) % sizeof(int4) == 0")
        self._check_streams(previous_event, async_finish, allocate_on_comm_stream)
        num_topk = 0
        if topk_weights is not None:
            _host_assert(topk_weights.dim() == 2 and topk_weights.is_contiguous(), "topk_weights.dim() == 2 and "
                                                                                   "contiguous")
            _host_assert(topk_weights.size(0) == num_tokens, "topk_weights.size(0) == num_tokens")
            _host_assert(topk_weights.dtype == torch.float32, "topk_weights.scalar_type() == torch::kFloat32")
            num_topk = topk_weights.size(1)
            _host_assert(num_topk <= _MAX_TOPK, f"num_topk <= {_MAX_TOPK} (intranode kernels)")
        _host_assert(C * R * 4 * 2 <= self.num_nvl_bytes, "num_channels * num_ranks * sizeof(int) * 2 <= num_nvl_bytes")
        slots = C * R * config.num_max_nvl_chunked_recv_tokens
        _host_assert(C * R * 4 * 2 + slots * (hidden * x.element_size() + 4 + num_topk * 4) <= self.num_nvl_bytes,
                     f"the combine buffers fit in num_nvl_bytes ({self.num_nvl_bytes})")
        self._check_chunks(config)
        _kernel_ranks(R)
        _host_assert(x.dtype == torch.bfloat16, f"Unsupported type ({x.dtype}; combine reduces torch.bfloat16 only)")

        with torch.no_grad():
            # Rows back to their source ranks: rows [prefix[s - 1, me], prefix[s, me]) came from rank s.
            received_by_me = rank_prefix_matrix[:, me].to(torch.int64).cpu()
            send_counts = torch.diff(received_by_me, prepend=received_by_me.new_zeros(1)).tolist()
            is_recv_token_in_rank = is_recv_token_in_rank.detach()
            recv_counts = is_recv_token_in_rank.sum(dim=0, dtype=torch.int64).tolist()
            columns = [_as_int32_columns(x.detach())]
            if topk_weights is not None:
                columns.append(_as_int32_columns(topk_weights.detach()))
            received = _all_to_all_rows(torch.cat(columns, dim=1), send_counts, recv_counts, self.group)

            words = hidden * x.element_size() // 4
            rows_x = _columns(received, 0, words, x.dtype)
            rows_w = _columns(received, words, received.shape[1], torch.float32) if topk_weights is not None else None
            combined = torch.zeros(num_recv_tokens, hidden, dtype=torch.float32, device=x.device)
            combined_w = (torch.zeros(num_recv_tokens, num_topk, dtype=torch.float32, device=x.device)
                          if topk_weights is not None else None)
            start = 0
            for r in range(R):  # rank order, as the kernel's reduction loop
                tokens = is_recv_token_in_rank[:, r].nonzero().flatten()  # increasing, as rank r stored them
                end = start + tokens.numel()
                combined[tokens] += rows_x[start:end].float()
                if combined_w is not None:
                    combined_w[tokens] += rows_w[start:end]
                start = end
        return combined.to(x.dtype), combined_w, _event(async_finish)

    # ---- shared checks ----------------------------------------------------------------------

    @staticmethod
    def _check_streams(previous_event, async_finish: bool, allocate_on_comm_stream: bool) -> None:
        if allocate_on_comm_stream:
            _host_assert(_previous(previous_event) is not None and async_finish,
                         "previous_event.has_value() and async (allocate_on_comm_stream)")

    @staticmethod
    def _check_chunks(config: Config) -> None:
        # The senders wait for room for a whole chunk: a chunk larger than the queue never fits.
        _host_assert(0 < config.num_max_nvl_chunked_send_tokens <= config.num_max_nvl_chunked_recv_tokens,
                     "0 < num_max_nvl_chunked_send_tokens <= num_max_nvl_chunked_recv_tokens (stand-in check; "
                     "DeepEP's kernels would time out)")


# ---- installation ---------------------------------------------------------------------------

_MISSING = object()


class _Installation:
    """This module as ``sys.modules["deep_ep"]`` until :meth:`restore` or the end of a ``with`` block."""

    def __init__(self) -> None:
        self._previous = sys.modules.get("deep_ep", _MISSING)
        self._restored = False
        sys.modules["deep_ep"] = sys.modules[__name__]

    def __enter__(self):
        return sys.modules[__name__]

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.restore()

    def restore(self) -> None:
        if self._restored:
            return
        self._restored = True
        if self._previous is _MISSING:
            sys.modules.pop("deep_ep", None)
        else:
            sys.modules["deep_ep"] = self._previous


def install() -> _Installation:
    """Register this stand-in as ``deep_ep`` now; ``with install(): ...`` or ``install().restore()``
    puts back whatever ``sys.modules["deep_ep"]`` held before (or nothing)."""
    return _Installation()
