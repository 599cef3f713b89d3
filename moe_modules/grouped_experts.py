"""GroupedExperts and GroupedExpertsDeepEP: the stacked expert parameters and the fused expert block.

The two share everything but their default transport under expert parallelism (all-gather /
reduce-scatter for ``GroupedExperts``, all-to-all dispatch / combine for ``GroupedExpertsDeepEP``,
as in NeMo AutoModel); :func:`moe_modules.apply_ep` runs either over any transport.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import moe_ops
from moe_modules._params import PARAM_NAMES, create_expert_params, init_expert_params, local_expert_params
from moe_modules.config import MoEConfig
from moe_modules.ep import make_dispatcher
from moe_modules.ep.dispatcher import Dispatcher, LocalDispatcher
from moe_modules.expert_block import Activation, LowRank, run_experts


class _StackedExperts(nn.Module):
    """Parameters (x @ W orientation): ``gate_and_up_projs [E, D, 2I]`` (``[E, D, I]`` for relu2),
    ``down_projs [E, I, D]``, and with ``config.expert_bias`` ``gate_up_proj_bias``, ``down_proj_bias``.
    Under expert parallelism (:func:`moe_modules.apply_ep`) they are ``Shard(0)`` DTensors."""

    default_transport = "all_to_all"
    expert_param_names = PARAM_NAMES  # what apply_ep shards Shard(0)

    def __init__(self, config: MoEConfig, backend=None):
        super().__init__()
        self.config = config
        # NeMo's BackendConfig picks NeMo's expert kernels; here the registry does (moe_ops.use_backend /
        # set_backend), so it is kept for reference only.  Transports: apply_ep / init_token_dispatcher.
        self.backend = backend
        self.n_routed_experts = config.n_routed_experts
        self.activation = Activation.from_config(config)
        self.use_dispatcher(LocalDispatcher())
        create_expert_params(self, config)

    def use_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Move tokens with ``dispatcher`` (:func:`moe_modules.apply_ep` builds it)."""
        self.token_dispatcher = dispatcher
        self.ep_mesh = dispatcher.ep_mesh

    def forward(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """``x [T, D]`` (``D = config.expert_dim``), ``token_mask [T]`` bool, ``weights [T, K]``, ``indices
        [T, K]`` -> ``[T, D]`` in ``x.dtype``; parameters of another floating dtype compute in ``x.dtype``."""
        token_mask, weights, indices = moe_ops.check_expert_inputs(x, token_mask, weights, indices,
                                                                    self.config.expert_dim)
        received = self.token_dispatcher.dispatch(x, token_mask, weights, indices)
        params = local_expert_params(self)
        if params[0].dtype != x.dtype:  # as NeMo: parameters of another dtype compute in the activations'
            params = tuple(None if p is None else p.to(x.dtype) for p in params)
        partial = run_experts(received, *params, self.activation, self.low_rank(x.dtype))
        return self.token_dispatcher.combine(partial, received)

    def low_rank(self, dtype: torch.dtype) -> Optional[LowRank]:
        """The adapters of this rank's experts in ``dtype`` (none here; ``moe_modules.lora`` adds them)."""
        return None

    def init_weights(self, buffer_device: torch.device, init_std: float = 0.02) -> None:
        init_expert_params(self, buffer_device, init_std)


class GroupedExperts(_StackedExperts):
    """Sparse MoE experts computed with grouped GEMMs (NeMo AutoModel's ``GroupedExperts`` contract);
    expert parallel by all-gather / reduce-scatter by default."""

    default_transport = "all_gather"


class GroupedExpertsDeepEP(_StackedExperts):
    """NeMo AutoModel's ``GroupedExpertsDeepEP`` contract: expert parallel by all-to-all dispatch /
    combine by default (through DeepEP's buffers where ``deep_ep`` is importable).  On one device
    every expert is local and the result equals :class:`GroupedExperts`."""

    def __init__(self, config: MoEConfig, backend=None, dispatcher_backend: str = "deepep",
                 dispatcher_num_sms: int = 20, dispatcher_share_token_dispatcher: bool = True,
                 dispatcher_async_dispatch: bool = False):
        """NeMo's constructor; the ``dispatcher_*`` options tune NeMo's own dispatchers and are accepted
        and ignored (the transport comes from :meth:`init_token_dispatcher` or ``apply_ep``)."""
        super().__init__(config, backend)

    def init_token_dispatcher(self, ep_mesh, max_tokens_per_rank: Optional[int] = None,
                              use_deep_ep: Optional[bool] = None) -> None:
        """All-to-all dispatch / combine over ``ep_mesh`` (NeMo's entry point; :func:`moe_modules.apply_ep`
        also shards the parameters): the options as for ``apply_ep``."""
        self.use_dispatcher(make_dispatcher(ep_mesh, self.n_routed_experts, max_tokens_per_rank=max_tokens_per_rank,
                                            use_deep_ep=use_deep_ep, activation=self.config.expert_activation))

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
