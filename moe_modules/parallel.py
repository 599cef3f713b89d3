"""Expert parallelism over a 1-D ``DeviceMesh``: parameter sharding and token movement.

* :func:`apply_ep` shards the four expert parameters ``Shard(0)`` (``E / ep_size`` experts per rank).
* ``GroupedExperts`` moves tokens by all-gather / reduce-scatter (:mod:`moe_modules.ep_all_gather`).
* ``GroupedExpertsDeepEP`` moves them by all-to-all dispatch / combine (:mod:`moe_modules.ep_all_to_all`),
  through DeepEP's own buffers where ``deep_ep`` is importable (:mod:`moe_modules.ep_deep_ep`), or, with
  ``max_tokens_per_rank``, through GPU peer memory with static shapes (:mod:`moe_modules.ep_peer`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe_modules._params import PARAM_NAMES
from moe_modules.deepep import GroupedExpertsDeepEP, check_transport_options
from moe_modules.ep_all_gather import all_gather_experts
from moe_modules.ep_all_to_all import AllToAllDispatcher, experts_per_rank
from moe_modules.ep_deep_ep import DeepEPDispatcher, deep_ep_importable
from moe_modules.ep_peer import PeerDispatcher

__all__ = ["apply_ep", "all_gather_experts", "AllToAllDispatcher", "DeepEPDispatcher", "PeerDispatcher",
           "deep_ep_importable"]


def apply_ep(module: nn.Module, ep_mesh, *, reduce_dtype: Optional[torch.dtype] = torch.float32,
             max_tokens_per_rank: Optional[int] = None, use_deep_ep: Optional[bool] = None) -> nn.Module:
    """Shard the four expert parameters ``Shard(0)`` over the 1-D ``ep_mesh`` and set up token movement.

    The state-dict keys stay the same; their values become DTensors whose ``full_tensor()`` is the
    unsharded parameter.  Every rank must hold the same full parameters (they are scattered from
    the mesh's first rank).  ``reduce_dtype``: dtype of the per-rank partial outputs that are summed
    across ranks (by the reduce-scatter of ``GroupedExperts``, by the combine all-to-all of
    ``GroupedExpertsDeepEP``); ``None``: the input dtype (half the bytes; DeepEP's own choice).

    ``max_tokens_per_rank`` (``GroupedExpertsDeepEP`` only): ``None`` moves tokens by all-to-all with
    exact split sizes (one host read of the counts per forward).  An int ``C`` (at least the tokens
    of any rank in any call) selects the static-shape dispatch through GPU peer memory of
    :mod:`moe_modules.ep_peer`: no host sync (the forward replays from a CUDA graph), one host of at
    most 8 GPUs; each receiver holds ``ep_size * C`` rows.

    ``use_deep_ep`` (``GroupedExpertsDeepEP``, all-to-all path): move the tokens through DeepEP's own
    buffers when the optional ``deep_ep`` package is importable and supports the call — bfloat16 on
    CUDA, eager mode, one host, and bf16 partial rows (``reduce_dtype=None``, DeepEP's combine dtype);
    otherwise the all-to-all path runs.  ``None`` (default): where it can; ``True``: always, raising
    the reasons when it cannot; ``False``: never.
    """
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if ep_mesh.ndim != 1:
        raise ValueError(f"ep_mesh: expected a 1-D DeviceMesh (e.g. mesh['ep']), "
                         f"got a {ep_mesh.ndim}-D mesh of shape {tuple(ep_mesh.shape)}")
    experts_per_rank(ep_mesh, module.config.n_routed_experts)  # raises when they do not divide
    if max_tokens_per_rank is not None and not isinstance(module, GroupedExpertsDeepEP):
        raise ValueError(f"max_tokens_per_rank: only GroupedExpertsDeepEP takes it (the peer-memory dispatch), "
                         f"got {type(module).__name__}")
    if use_deep_ep and not isinstance(module, GroupedExpertsDeepEP):
        raise ValueError(f"use_deep_ep=True: only GroupedExpertsDeepEP moves tokens by dispatch / combine, "
                         f"got {type(module).__name__}")
    if isinstance(module, GroupedExpertsDeepEP):
        check_transport_options(max_tokens_per_rank, use_deep_ep)
    for name in PARAM_NAMES:
        p = getattr(module, name)
        if isinstance(p, DTensor):
            raise ValueError(f"{name}: expected a plain tensor, got a DTensor (apply_ep was already applied)")
    for name in PARAM_NAMES:
        p = getattr(module, name)
        if p is not None:
            setattr(module, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]), p.requires_grad))
    module.ep_reduce_dtype = reduce_dtype
    if isinstance(module, GroupedExpertsDeepEP):
        module.init_token_dispatcher(ep_mesh, max_tokens_per_rank=max_tokens_per_rank, use_deep_ep=use_deep_ep)
    elif hasattr(module, "init_token_dispatcher"):
        module.init_token_dispatcher(ep_mesh)
    else:
        module.ep_mesh = ep_mesh
    return module
