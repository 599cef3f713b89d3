"""GroupedExpertsDeepEP: the expert block with tokens moved by all-to-all dispatch and combine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import moe_ops
from moe_modules._params import create_expert_params, init_expert_params, local_expert_params
from moe_modules.config import MoEConfig
from moe_modules.expert_block import Activation, check_forward_inputs, run_local_experts


class GroupedExpertsDeepEP(nn.Module):
    """NeMo AutoModel's ``GroupedExpertsDeepEP`` contract.

    Without a token dispatcher (one device) every expert is local and the result
    equals :class:`~moe_modules.GroupedExperts`.  ``init_token_dispatcher(ep_mesh)``
    (called by :func:`moe_modules.apply_ep`) switches to all-to-all dispatch/combine.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.n_routed_experts = config.n_routed_experts
        self.activation = Activation.from_config(config)
        self.ep_mesh = None
        self.token_dispatcher = None
        create_expert_params(self, config)

    def init_token_dispatcher(self, ep_mesh, max_tokens_per_rank: Optional[int] = None) -> None:
        """All-to-all dispatch / combine over ``ep_mesh`` with exact split sizes; or, given
        ``max_tokens_per_rank``, the static-shape peer-memory dispatch (no host sync)."""
        from moe_modules.parallel import AllToAllDispatcher, PeerDispatcher

        self.ep_mesh = ep_mesh
        E = self.config.n_routed_experts
        self.token_dispatcher = (AllToAllDispatcher(ep_mesh, E) if max_tokens_per_rank is None
                                 else PeerDispatcher(ep_mesh, E, max_tokens_per_rank))

    @staticmethod
    def _apply_bias(value: Tensor, bias: Optional[Tensor], tokens_per_expert: Tensor, permuted_probs=None) -> Tensor:
        """Add ``bias[e]`` (times ``permuted_probs`` when given) to the rows of each expert ``e``.

        ``value [N, C]`` rows sorted by expert, ``tokens_per_expert [E]`` (device or host ints).
        """
        if bias is None:
            return value
        counts = torch.as_tensor(tokens_per_expert, device=value.device)
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        return moe_ops.add_expert_bias(value, bias, offsets, permuted_probs)

    def forward(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """``x [T, D]``, ``token_mask [T]`` bool, ``weights [T, K]``, ``indices [T, K]`` -> ``[T, D]`` in ``x.dtype``."""
        check_forward_inputs(x, token_mask, weights, indices, self.config.dim)
        w1, w2, b1, b2 = local_expert_params(self)
        if self.token_dispatcher is None:
            return run_local_experts(x, token_mask, weights, indices, w1, w2, b1, b2, self.activation)
        return self.token_dispatcher.run(x, token_mask, weights, indices, w1, w2, b1, b2, self.activation,
                                         getattr(self, "ep_reduce_dtype", torch.float32))

    def init_weights(self, buffer_device: torch.device, init_std: float = 0.02) -> None:
        init_expert_params(self, buffer_device, init_std)
