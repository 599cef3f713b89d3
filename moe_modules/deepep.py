"""GroupedExpertsDeepEP: the expert block with tokens moved by all-to-all dispatch and combine."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import moe_ops
from moe_modules._params import create_expert_params, init_expert_params, local_expert_params
from moe_modules.config import MoEConfig
from moe_modules.ep_deep_ep import deep_ep_importable
from moe_modules.expert_block import Activation, check_forward_inputs, run_local_experts


def check_transport_options(max_tokens_per_rank: Optional[int], use_deep_ep: Optional[bool]) -> None:
    """The errors of ``init_token_dispatcher`` (and of ``apply_ep``, before it shards anything)."""
    if not use_deep_ep:
        return
    if max_tokens_per_rank is not None:
        raise ValueError("use_deep_ep=True: DeepEP's buffers and max_tokens_per_rank (the peer-memory dispatch) "
                         "are two transports; pick one")
    if not deep_ep_importable():
        raise ValueError("use_deep_ep=True: the deep_ep package is not importable (it is optional: build DeepEP "
                         "from source, or pass use_deep_ep=None)")


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

    def init_token_dispatcher(self, ep_mesh, max_tokens_per_rank: Optional[int] = None,
                              use_deep_ep: Optional[bool] = None) -> None:
        """All-to-all dispatch / combine over ``ep_mesh`` with exact split sizes — through DeepEP's own
        buffers where ``deep_ep`` is importable and supports the call (``use_deep_ep``: ``None`` where it
        can, ``True`` always or raise, ``False`` never) — or, given ``max_tokens_per_rank``, the
        static-shape peer-memory dispatch (no host sync)."""
        from moe_modules.parallel import AllToAllDispatcher, DeepEPDispatcher, PeerDispatcher

        check_transport_options(max_tokens_per_rank, use_deep_ep)
        self.ep_mesh = ep_mesh
        E = self.config.n_routed_experts
        if max_tokens_per_rank is not None:
            self.token_dispatcher = PeerDispatcher(ep_mesh, E, max_tokens_per_rank)
        elif use_deep_ep is False or (use_deep_ep is None and not deep_ep_importable()):
            self.token_dispatcher = AllToAllDispatcher(ep_mesh, E)
        else:
            self.token_dispatcher = DeepEPDispatcher(ep_mesh, E, require=bool(use_deep_ep))

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
