"""GroupedExperts: the expert block on one device, or expert parallel by all-gather / reduce-scatter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_modules._params import create_expert_params, init_expert_params, local_expert_params
from moe_modules.config import MoEConfig
from moe_modules.expert_block import Activation, check_forward_inputs, run_local_experts


class GroupedExperts(nn.Module):
    """Sparse MoE experts computed with grouped GEMMs (NeMo AutoModel's ``GroupedExperts`` contract).

    Parameters (x @ W orientation): ``gate_and_up_projs [E, D, 2I]`` (``[E, D, I]`` for relu2),
    ``down_projs [E, I, D]``, and with ``config.expert_bias`` ``gate_up_proj_bias``, ``down_proj_bias``.
    Under expert parallelism (:func:`moe_modules.apply_ep`) they are ``Shard(0)`` DTensors.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.n_routed_experts = config.n_routed_experts
        self.activation = Activation.from_config(config)
        self.ep_mesh = None
        create_expert_params(self, config)

    def forward(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """``x [T, D]``, ``token_mask [T]`` bool, ``weights [T, K]``, ``indices [T, K]`` -> ``[T, D]`` in ``x.dtype``."""
        check_forward_inputs(x, token_mask, weights, indices, self.config.dim)
        w1, w2, b1, b2 = local_expert_params(self)
        if self.ep_mesh is None:
            return run_local_experts(x, token_mask, weights, indices, w1, w2, b1, b2, self.activation)
        from moe_modules.parallel import all_gather_experts

        return all_gather_experts(self, x, token_mask, weights, indices, w1, w2, b1, b2)

    def init_weights(self, buffer_device: torch.device, init_std: float = 0.02) -> None:
        init_expert_params(self, buffer_device, init_std)
