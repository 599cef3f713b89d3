"""Expert parallelism over a 1-D ``DeviceMesh``: one dispatcher protocol, five transports.

* :mod:`~moe_modules.ep.dispatcher`: the protocol (``dispatch -> Received``, ``combine``) and the
  one-device :class:`LocalDispatcher`;
* :mod:`~moe_modules.ep.all_gather`: all-gather the tokens, reduce-scatter the outputs;
* :mod:`~moe_modules.ep.all_to_all`: each token to the ranks that own its experts (exact split sizes);
* :mod:`~moe_modules.ep.deep_ep`: the same through DeepEP's buffers, where ``deep_ep`` is importable;
* :mod:`~moe_modules.ep.peer`: static shapes through GPU peer memory (no host sync).

:func:`apply_ep` shards a module's four expert parameters ``Shard(0)`` and hands it the dispatcher
its options name; every module runs over every transport.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe_modules._params import PARAM_NAMES
from moe_modules.ep.all_gather import AllGatherDispatcher
from moe_modules.ep.all_to_all import AllToAllDispatcher
from moe_modules.ep.deep_ep import DeepEPDispatcher, deep_ep_importable
from moe_modules.ep.dispatcher import Dispatcher, LocalDispatcher, Received, experts_per_rank
from moe_modules.ep.peer import PeerDispatcher

__all__ = ["apply_ep", "make_dispatcher", "TRANSPORTS", "Dispatcher", "Received", "LocalDispatcher",
           "AllGatherDispatcher", "AllToAllDispatcher", "DeepEPDispatcher", "PeerDispatcher", "deep_ep_importable"]

TRANSPORTS = ("all_gather", "all_to_all", "deep_ep", "peer")


def _transport(default: str, transport: Optional[str], max_tokens_per_rank: Optional[int],
               use_deep_ep: Optional[bool]) -> str:
    """The transport the options name (the errors of apply_ep, raised before anything is sharded)."""
    if transport is not None and transport not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {TRANSPORTS} or None, got {transport!r}")
    if max_tokens_per_rank is not None:
        if use_deep_ep:
            raise ValueError("use_deep_ep=True: DeepEP's buffers and max_tokens_per_rank (the peer-memory dispatch) "
                             "are two transports; pick one")
        if transport not in (None, "peer"):
            raise ValueError(f"max_tokens_per_rank: it sizes the peer-memory transport, got transport={transport!r}")
        return "peer"
    if use_deep_ep:
        if transport not in (None, "all_to_all", "deep_ep"):
            raise ValueError(f"use_deep_ep=True: DeepEP moves tokens all-to-all, got transport={transport!r}")
        if not deep_ep_importable():
            raise ValueError("use_deep_ep=True: the deep_ep package is not importable (it is optional: build DeepEP "
                             "from source, or pass use_deep_ep=None)")
        return "deep_ep"
    transport = transport or default
    if transport == "peer":
        raise ValueError("transport='peer': pass max_tokens_per_rank (its static capacity)")
    if transport == "all_to_all" and use_deep_ep is None and deep_ep_importable():
        return "deep_ep"  # where it can (each call still falls back to all-to-all when DeepEP cannot take it)
    return transport


def make_dispatcher(ep_mesh, n_routed_experts: int, *, default: str = "all_to_all",
                    transport: Optional[str] = None, reduce_dtype: Optional[torch.dtype] = torch.float32,
                    max_tokens_per_rank: Optional[int] = None, use_deep_ep: Optional[bool] = None,
                    activation: Optional[str] = None) -> Dispatcher:
    """The dispatcher :func:`apply_ep`'s options name (``default``: the module's own transport);
    ``activation``: the module's, part of the call signature the ranks check (``ep.signature``)."""
    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh: expected a 1-D DeviceMesh (e.g. mesh['ep']), "
                         f"got a {ep_mesh.ndim}-D mesh of shape {tuple(ep_mesh.shape)}")
    experts_per_rank(ep_mesh, n_routed_experts)  # raises when they do not divide
    kind = _transport(default, transport, max_tokens_per_rank, use_deep_ep)
    if kind == "peer":
        return PeerDispatcher(ep_mesh, n_routed_experts, max_tokens_per_rank, reduce_dtype, activation)
    if kind == "deep_ep":
        return DeepEPDispatcher(ep_mesh, n_routed_experts, reduce_dtype, require=bool(use_deep_ep),
                                activation=activation)
    if kind == "all_to_all":
        return AllToAllDispatcher(ep_mesh, n_routed_experts, reduce_dtype, activation)
    return AllGatherDispatcher(ep_mesh, n_routed_experts, reduce_dtype, activation)


def apply_ep(module: nn.Module, ep_mesh, *, transport: Optional[str] = None,
             reduce_dtype: Optional[torch.dtype] = torch.float32, max_tokens_per_rank: Optional[int] = None,
             use_deep_ep: Optional[bool] = None) -> nn.Module:
    """Shard the four expert parameters (and a LoRA module's four adapters: ``module.expert_param_names``)
    ``Shard(0)`` over the 1-D ``ep_mesh`` and hand the module the dispatcher that moves its tokens.

    The state-dict keys stay the same; their values become DTensors whose ``full_tensor()`` is the
    unsharded parameter.  Every rank must hold the same full parameters (they are scattered from
    the mesh's first rank).

    ``transport``: ``"all_gather"`` (all-gather the tokens, reduce-scatter the outputs),
    ``"all_to_all"`` (each token to the ranks that own its experts; exact split sizes, one host read
    of the counts per forward), ``"deep_ep"`` (the same through DeepEP's buffers) or ``"peer"``; None:
    the module's own (``module.default_transport``: all-gather for ``GroupedExperts``, all-to-all for
    ``GroupedExpertsDeepEP`` and ``GroupedExpertsTE``).

    ``reduce_dtype``: dtype of the per-rank partial outputs summed across ranks (float32 by default,
    so a token's output is accumulated in float32 as on one device); ``None``: the input dtype (half
    the bytes; DeepEP's own choice).

    ``max_tokens_per_rank``: an int ``C`` (at least the tokens of any rank in any call) selects the
    static-shape dispatch through GPU peer memory (``moe_modules.ep.peer``): no host sync (the
    forward replays from a CUDA graph), one host of at most 8 GPUs; each receiver holds ``ep_size * C``
    rows.

    ``use_deep_ep`` (all-to-all): move the tokens through DeepEP's own buffers when the optional
    ``deep_ep`` package is importable and supports the call — bfloat16 on CUDA, eager mode, one host,
    and bf16 partial rows (``reduce_dtype=None``, DeepEP's combine dtype); otherwise the all-to-all
    path runs.  ``None`` (default): where it can; ``True``: always, raising the reasons when it cannot;
    ``False``: never.
    """
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    dispatcher = make_dispatcher(ep_mesh, module.config.n_routed_experts, default=module.default_transport,
                                 transport=transport, reduce_dtype=reduce_dtype,
                                 max_tokens_per_rank=max_tokens_per_rank, use_deep_ep=use_deep_ep,
                                 activation=module.config.expert_activation)
    names = getattr(module, "expert_param_names", PARAM_NAMES)  # LoRA modules add their adapters
    for name in names:
        if isinstance(getattr(module, name), DTensor):
            raise ValueError(f"{name}: expected a plain tensor, got a DTensor (apply_ep was already applied)")
    for name in names:
        p = getattr(module, name)
        if p is not None:
            setattr(module, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]), p.requires_grad))
    module.use_dispatcher(dispatcher)
    return module
