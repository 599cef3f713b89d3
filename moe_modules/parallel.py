"""Expert parallelism over a 1-D ``DeviceMesh``: parameter sharding and token movement."""

from __future__ import annotations

from torch import nn

from moe_modules._params import PARAM_NAMES


def apply_ep(module: nn.Module, ep_mesh) -> nn.Module:
    """Shard the four expert parameters ``Shard(0)`` over ``ep_mesh`` and set up the module's token movement."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_size = ep_mesh.size()
    E = module.config.n_routed_experts
    if E % ep_size:
        raise ValueError(f"ep_mesh: n_routed_experts={E} must be divisible by the EP size, got ep_size={ep_size}")
    for name in PARAM_NAMES:
        p = getattr(module, name)
        if p is not None:
            setattr(module, name, nn.Parameter(distribute_tensor(p.data, ep_mesh, [Shard(0)]), p.requires_grad))
    if hasattr(module, "init_token_dispatcher"):
        module.init_token_dispatcher(ep_mesh)
    else:
        module.ep_mesh = ep_mesh
    return module
