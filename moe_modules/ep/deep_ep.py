"""Expert parallelism through DeepEP's own buffers, when the optional ``deep_ep`` package is importable.

DeepEP (DeepSeek's dispatch/combine kernels over NVLink) moves each token once to every rank that
owns one of its experts — the layout of :mod:`moe_modules.ep.all_to_all` — so only the transport
changes: ``deep_ep.Buffer.dispatch`` hands each rank the received rows, their K routing weights
(float32) and their K expert ids made local (-1: another rank's expert); the module's experts run on
them like on any other :class:`~moe_modules.ep.dispatcher.Received`, and ``Buffer.combine`` sums a
token's per-rank partial rows at home.  Backward is DeepEP's own mirror: the dispatch's gradient is
a combine (of the row and weight gradients), the combine's a dispatch reusing the handle.

What DeepEP supports decides, per call, whether it runs (``deep_ep_not_supported_reasons``); the
call otherwise takes the all-to-all path, or raises the reasons when ``apply_ep(use_deep_ep=True)``:

* bfloat16 tokens on CUDA, and bfloat16 partial rows: DeepEP's combine carries ``x.dtype``, so only
  ``apply_ep(reduce_dtype=None)`` (float32 accumulation of bf16 partials, as the all-to-all path
  does with it) — the default float32 partials keep the all-to-all path and its numerics;
* eager mode: DeepEP's kernels and its host-side handle are opaque to ``torch.compile``, so a traced
  forward takes the functional all-to-all path (the same arithmetic);
* one host, 2, 4 or 8 ranks (DeepEP's intranode kernels): its RDMA and low-latency buffers need NVSHMEM
  and are not used.

DeepEP reads its received-token count on the host, as our all-to-all path does: one sync per forward.
Before it, eagerly, the ranks all-gather their call signatures (:mod:`moe_modules.ep.signature`) and
read them on the host, so that they agree before each picks DeepEP or the fallback: one more small
collective and host read per forward than the fallback has.
The package is imported on first use only (never at import time).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Optional

import torch
from torch import Tensor

from moe_modules.ep.all_to_all import AllToAllDispatcher
from moe_modules.ep.dispatcher import Received
from moe_modules.ep.signature import all_gather_checked

DEEP_EP_DTYPES = (torch.bfloat16,)
DEEP_EP_DEVICE_TYPES = ("cuda",)  # the CPU tests widen this for their gloo stand-in of the package
INTRANODE_RANKS = (2, 4, 8)  # the EP sizes DeepEP's intranode kernels are built for
MAX_TOP_K = 32  # one lane per slot
MAX_LOCAL_EXPERTS = 128  # one notify thread per local expert


def deep_ep_importable() -> bool:
    # sys.modules first: once imported, this per-call check costs no path search.
    return sys.modules.get("deep_ep") is not None or importlib.util.find_spec("deep_ep") is not None


def deep_ep_not_supported_reasons(x: Tensor, top_k: int, reduce_dtype: Optional[torch.dtype], ep_size: int,
                                  experts_per_rank: int) -> list[str]:
    """Why DeepEP's buffers cannot run this call (empty: they can)."""
    if torch.compiler.is_compiling():  # first: nothing below is traced
        return ["torch.compile is tracing: DeepEP's kernels and handle are opaque to it "
                "(the traced forward takes the functional all-to-all path)"]
    reasons = []
    if not deep_ep_importable():
        reasons.append("the deep_ep package is not importable (optional; build DeepEP from source)")
    if x.device.type not in DEEP_EP_DEVICE_TYPES:
        reasons.append(f"tokens on {x.device.type}: DeepEP runs on {', '.join(DEEP_EP_DEVICE_TYPES)}")
    if x.dtype not in DEEP_EP_DTYPES:
        reasons.append(f"tokens in {x.dtype}: DeepEP dispatches {', '.join(map(str, DEEP_EP_DTYPES))}")
    if reduce_dtype is not None and reduce_dtype != x.dtype:
        reasons.append(f"reduce_dtype={reduce_dtype}: DeepEP's combine carries the partial rows in the tokens' "
                       f"dtype; pass apply_ep(reduce_dtype=None)")
    if x.shape[1] * x.element_size() % 16:
        reasons.append(f"rows of {x.shape[1] * x.element_size()} bytes: DeepEP moves rows of a multiple of 16 bytes")
    if top_k > MAX_TOP_K:
        reasons.append(f"top_k={top_k}: DeepEP takes at most {MAX_TOP_K} experts per token")
    if experts_per_rank > MAX_LOCAL_EXPERTS:
        reasons.append(f"{experts_per_rank} experts per rank: DeepEP's intranode kernels take at most "
                       f"{MAX_LOCAL_EXPERTS}")
    if ep_size not in INTRANODE_RANKS:
        reasons.append(f"ep_size={ep_size}: DeepEP's intranode kernels (the only ones used here) take "
                       f"{', '.join(map(str, INTRANODE_RANKS))} ranks")
    return reasons


class _Handle:
    """What the dispatch leaves for the combine and both backwards: DeepEP's buffer and handle."""

    def __init__(self, buffer):
        self.buffer = buffer
        self.handle = None
        self.num_local_pairs = 0


class _DeepEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, topk_idx, num_experts: int, state: _Handle):
        buffer = state.buffer
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
        rows, recv_idx, recv_weights, pairs_per_expert, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights)
        state.handle, state.num_local_pairs = handle, sum(pairs_per_expert)
        ctx.state = state
        ctx.mark_non_differentiable(recv_idx)
        return rows, recv_weights, recv_idx

    @staticmethod
    def backward(ctx, grad_rows, grad_weights, _):
        # Each received row's gradient goes home and is summed over the ranks it went to; so is each
        # slot's weight gradient (zero on the ranks that do not own the slot's expert).
        grad_x, grad_topk_weights, _ = ctx.state.buffer.combine(
            grad_rows.contiguous(), ctx.state.handle, topk_weights=grad_weights.float().contiguous())
        return grad_x, grad_topk_weights, None, None, None


class _DeepEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial_rows, state: _Handle):
        ctx.state = state
        combined, _, _ = state.buffer.combine(partial_rows.contiguous(), state.handle)
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_rows, *_ = ctx.state.buffer.dispatch(grad.contiguous(), handle=ctx.state.handle)
        return grad_rows, None


# (group name, device) -> (deep_ep.Buffer, the row bytes it was sized for); grown when rows get wider.
_BUFFERS: dict = {}


def _buffer_for(group, ep_size: int, hidden_bytes: int, device: torch.device):
    """One DeepEP buffer per EP group and device (DeepEP's advice), large enough for rows of
    ``hidden_bytes``; creating one is collective, and every rank asks for the same size."""
    key = (group.group_name, str(device))
    held = _BUFFERS.get(key)
    if held is not None and held[1] >= hidden_bytes:
        return held[0]
    Buffer = importlib.import_module("deep_ep").Buffer
    need = max(Buffer.get_dispatch_config(ep_size).get_nvl_buffer_size_hint(hidden_bytes, ep_size),
               Buffer.get_combine_config(ep_size).get_nvl_buffer_size_hint(hidden_bytes, ep_size))
    _BUFFERS[key] = (Buffer(group, num_nvl_bytes=need), hidden_bytes)
    return _BUFFERS[key][0]


class DeepEPDispatcher:
    """Dispatch / combine through DeepEP's buffers where they support the call, else the all-to-all
    path (or, with ``require``, an error listing why)."""

    def __init__(self, ep_mesh, n_routed_experts: int, reduce_dtype: Optional[torch.dtype] = torch.float32,
                 require: bool = False, activation: Optional[str] = None):
        importlib.import_module("deep_ep")  # now, not per call: the per-call check then finds it in sys.modules
        self.fallback = AllToAllDispatcher(ep_mesh, n_routed_experts, reduce_dtype, activation)
        self.signature = self.fallback.signature  # one call count, whichever path a call takes
        self.ep_mesh, self.ep_size = ep_mesh, ep_mesh.size()
        self.num_experts, self.reduce_dtype, self.require = n_routed_experts, reduce_dtype, require
        self.experts_per_rank = self.fallback.experts_per_rank

    def dispatch(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Received:
        group = self.ep_mesh.get_group()
        compiling = torch.compiler.is_compiling()
        if not compiling:
            # The ranks must agree before each picks a path (a rank on DeepEP and one on the fallback would
            # wait on each other's collectives): one all-gather of the signatures, one host read.
            all_gather_checked(self.signature, self.signature.next(x, weights, indices), x.device, group)
        reasons = deep_ep_not_supported_reasons(x, indices.shape[1], self.reduce_dtype, self.ep_size,
                                                self.experts_per_rank)
        if reasons:
            if self.require:
                raise NotImplementedError("apply_ep(use_deep_ep=True): DeepEP's buffers cannot run this call:\n"
                                          + "\n".join(f"  - {r}" for r in reasons))
            return self.fallback.dispatch(x, token_mask, weights, indices, signed=False)
        D = x.shape[1]
        state = _Handle(_buffer_for(group, self.ep_size, D * max(x.element_size(), 2), x.device))
        idx = indices.long()
        routed = token_mask.unsqueeze(1) & (idx >= 0) & (idx < self.num_experts)
        topk_idx = torch.where(routed, idx, -1)  # DeepEP: int64, -1 for no selection
        rows, recv_weights, recv_idx = _DeepEPDispatch.apply(x.contiguous(), weights.float(), topk_idx,
                                                             self.num_experts, state)
        everyone = torch.ones(rows.shape[0], dtype=torch.bool, device=x.device)
        return Received(rows, everyone, recv_weights.to(weights.dtype), recv_idx, state.num_local_pairs, x.dtype,
                        state)

    def combine(self, partial: Tensor, received: Received) -> Tensor:
        if not isinstance(received.state, _Handle):  # the dispatch took the all-to-all path
            return self.fallback.combine(partial, received)
        return _DeepEPCombine.apply(partial, received.state)
