"""GroupedExpertsTE: the two expert GEMMs as Transformer Engine ``GroupedLinear`` modules.

Same contract and math as :class:`~moe_modules.GroupedExperts` (SPEC §4)::

    route -> gather -> [ GroupedLinear(W1, +b1) -> activation * prob -> GroupedLinear(W2) + prob * b2 ] -> combine

The bracket runs as one opaque ``moe::opaque_forward`` op (``moe_ops.opaque_call``; its body is
:mod:`moe_modules.te.experts`):
``GroupedLinear`` is excluded from Dynamo and wants host split sizes, so inside the op the
per-expert counts are read with ``.tolist()`` (one device->host sync per forward), rows are
padded per expert to the FP8 alignment when a Transformer Engine FP8 autocast is active, and
Transformer Engine's own backward is recorded (FP8 scaling state included) and replayed by
``moe::opaque_backward``: a model using this module compiles with ``fullgraph=True``.

The down bias is kept out of Transformer Engine's GEMM (``return_bias=True``) and added as
``prob * b2`` by ``moe::add_expert_bias``, in float32 with one rounding like every other
module; the gate/up bias is unweighted, so Transformer Engine adds it in its GEMM epilogue.

Parameters live in the two ``GroupedLinear`` modules (``weight{e} [out, in]``, ``bias{e}``,
E / ep_size local experts); ``gate_and_up_projs``, ``down_projs``, ``gate_up_proj_bias`` and
``down_proj_bias`` read and write them in the stacked x@W layout (:mod:`moe_modules.te.layout`),
and ``state_dict()`` / ``load_state_dict()`` speak exactly those four keys (``Shard(0)`` DTensors
on the EP mesh under expert parallelism).  Transformer Engine's FP8 metadata (``_extra_state``)
is not part of the state dict, so checkpoints stay interchangeable with the other modules.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

import moe_ops
from moe_modules._params import PARAM_NAMES
from moe_modules.config import MoEConfig
from moe_modules.ep import make_dispatcher
from moe_modules.ep.dispatcher import Dispatcher, LocalDispatcher, Received
from moe_modules.expert_block import Activation, permuted_probs
from moe_modules.te import engine, layout as te_layout
from moe_modules.te.experts import LAYERS, LEADING_INPUTS, OPAQUE_NAME


def _is_dtensor(value) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _default_device() -> torch.device:
    default = torch.get_default_device()
    if default.type != "cpu":
        return default  # e.g. under `with torch.device("meta")` or a CUDA default
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else default


# ---- the module ------------------------------------------------------------------------------------


class GroupedExpertsTE(nn.Module):
    """NeMo AutoModel's ``GroupedExpertsTE`` contract on Transformer Engine's ``GroupedLinear``.

    Args:
        config: the :class:`~moe_modules.MoEConfig`.
        backend, dispatcher_*: NeMo's constructor arguments, accepted and ignored (as for
            :class:`~moe_modules.GroupedExpertsDeepEP`).
        device: (keyword) where the parameters live (default: the default device when it is not the CPU,
            else the current CUDA device).

    Attributes:
        gate_up_linear: ``GroupedLinear(D -> 2I)`` (``I`` for relu2), one GEMM per local expert.
        down_linear: ``GroupedLinear(I -> D)``, its bias (if any) added outside as ``prob * b2``.

    Under FP8: run the forward inside ``transformer_engine.pytorch.autocast`` (``fp8_autocast``
    on older Transformer Engine) placed *outside* any ``torch.compile``d region; the op reads the
    FP8 state when it runs.

    The four stacked properties return new tensors (stacked from ``weight{e}``): write them by
    assignment (``module.down_projs = value``) or ``load_state_dict``; an in-place op on a value
    read from them (``module.down_projs.normal_()``) changes nothing, as in NeMo AutoModel.
    """

    default_transport = "all_to_all"  # apply_ep's transport unless told otherwise

    def __init__(self, config: MoEConfig, backend=None, dispatcher_backend: str = "deepep",
                 dispatcher_num_sms: int = 20, dispatcher_share_token_dispatcher: bool = True,
                 dispatcher_async_dispatch: bool = False, *, device=None):
        engine.require_transformer_engine()
        super().__init__()
        self.config = config
        self.backend = backend  # NeMo's; kept for reference (see GroupedExperts)
        self.n_routed_experts = config.n_routed_experts
        self.expert_bias = config.expert_bias
        self.activation = Activation.from_config(config)
        self.ep_mesh = None
        self.moe_mesh = None
        self.ep_rank = 0
        self.token_dispatcher = LocalDispatcher()
        self._device = torch.device(device) if device is not None else _default_device()
        self._te = engine.load()
        self._build(config.n_routed_experts)
        # The layer travels into the op as data (a CPU int64 tensor, not a buffer: .to() leaves it):
        # every layer of a model shares one compiled graph.
        self._handle = LAYERS.register(self)

    def __setstate__(self, state):  # copies and unpickled modules get their own handle
        super().__setstate__(state)
        self._handle = LAYERS.register(self)

    def _build(self, num_local: int, device=None) -> None:
        engine = self._te
        gate_up, down = te_layout.te_linear_dims(self.config)
        common = dict(params_dtype=self.config.dtype, device=device or self._device)
        self.num_local_experts = num_local
        self.gate_up_linear = engine.grouped_linear(num_local, *gate_up, bias=self.expert_bias, return_bias=False,
                                                    **common)
        self.down_linear = engine.grouped_linear(num_local, *down, bias=self.expert_bias,
                                                 return_bias=self.expert_bias, **common)

    # -- per-expert parameters -------------------------------------------------------------------

    def _weights(self, linear) -> list[Tensor]:
        return [getattr(linear, f"weight{i}") for i in range(self.num_local_experts)]

    def _biases(self, linear) -> list[Tensor]:
        return [getattr(linear, f"bias{i}") for i in range(self.num_local_experts)] if self.expert_bias else []

    def _te_params(self) -> list[Tensor]:
        """Every parameter, in the order the opaque op takes them: W1, b1, W2, b2."""
        g, d = self.gate_up_linear, self.down_linear
        return [*self._weights(g), *self._biases(g), *self._weights(d), *self._biases(d)]

    def _linear_of(self, name: str):
        return self.gate_up_linear if name in ("gate_and_up_projs", "gate_up_proj_bias") else self.down_linear

    # -- the stacked x@W view ----------------------------------------------------------------------

    def _stacked(self, name: str) -> Optional[Tensor]:
        linear = self._linear_of(name)
        if name.endswith("bias"):
            if not self.expert_bias:
                return None
            local = te_layout.stacked_from_te_biases(self._biases(linear))
        else:
            local = te_layout.stacked_from_te_weights(self._weights(linear))
        return self._to_ep_dtensor(local)

    def _to_ep_dtensor(self, local: Tensor) -> Tensor:
        if self.ep_mesh is None:
            return local
        from torch.distributed.tensor import DTensor, Shard

        return DTensor.from_local(local, self.ep_mesh, [Shard(0)], run_check=False)

    def _set_stacked(self, name: str, value, assign: bool = False) -> None:
        if value is None:
            if name.endswith("bias") and not self.expert_bias:
                return
            raise ValueError(f"{name}: expected a tensor, got None")
        if name.endswith("bias") and not self.expert_bias:
            raise ValueError(f"{name}: this module has no expert biases (config.expert_bias=False), got a tensor")
        local = self._local_part(value)
        te_layout.check_stacked(name, local, te_layout.stacked_shapes(self.config, self.num_local_experts)[name])
        linear = self._linear_of(name)
        if name.endswith("bias"):
            pieces, kind = te_layout.te_biases_from_stacked(local.detach()), "bias"
        else:
            pieces, kind = te_layout.te_weights_from_stacked(local.detach()), "weight"
        with torch.no_grad():
            for i, piece in enumerate(pieces):
                current = getattr(linear, f"{kind}{i}")
                if assign:
                    linear._parameters[f"{kind}{i}"] = nn.Parameter(piece.to(current.dtype), current.requires_grad)
                else:
                    current.copy_(piece)

    def _local_part(self, value: Tensor) -> Tensor:
        """This rank's experts of a stacked value: a ``Shard(0)`` DTensor on the EP mesh gives its
        local shard (sharding this module over that mesh first if it is not yet sharded), any other
        DTensor its full tensor; a full ``[E, ...]`` tensor is sliced to the local experts."""
        if _is_dtensor(value):
            from torch.distributed.tensor import Shard

            sharded = tuple(value.placements) == (Shard(0),) and value.device_mesh.ndim == 1
            if sharded and self.ep_mesh is None:
                self._shard_to(value.device_mesh)  # apply_ep assigns DTensors before init_token_dispatcher
            if sharded and value.device_mesh == self.ep_mesh:
                return value.to_local()
            value = value.full_tensor()
        if self.ep_mesh is not None and value.shape[0] == self.n_routed_experts != self.num_local_experts:
            return te_layout.local_experts(value, self.ep_rank, self.num_local_experts)
        return value

    def __setattr__(self, name, value):
        if name in PARAM_NAMES:  # the stacked properties, also for nn.Parameter values (apply_ep)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def gate_and_up_projs(self) -> Tensor:
        """``[E, D, 2I]`` (``[E, D, I]`` for relu2) stacked from ``gate_up_linear.weight{e}.T``."""
        return self._stacked("gate_and_up_projs")

    @gate_and_up_projs.setter
    def gate_and_up_projs(self, value) -> None:
        self._set_stacked("gate_and_up_projs", value)

    @property
    def down_projs(self) -> Tensor:
        """``[E, I, D]`` stacked from ``down_linear.weight{e}.T``."""
        return self._stacked("down_projs")

    @down_projs.setter
    def down_projs(self, value) -> None:
        self._set_stacked("down_projs", value)

    @property
    def gate_up_proj_bias(self) -> Optional[Tensor]:
        """``[E, 2I]`` (``[E, I]``) from ``gate_up_linear.bias{e}``; None without ``config.expert_bias``."""
        return self._stacked("gate_up_proj_bias")

    @gate_up_proj_bias.setter
    def gate_up_proj_bias(self, value) -> None:
        self._set_stacked("gate_up_proj_bias", value)

    @property
    def down_proj_bias(self) -> Optional[Tensor]:
        """``[E, D]`` from ``down_linear.bias{e}``; None without ``config.expert_bias``."""
        return self._stacked("down_proj_bias")

    @down_proj_bias.setter
    def down_proj_bias(self, value) -> None:
        self._set_stacked("down_proj_bias", value)

    # -- state dict: exactly the four stacked keys --------------------------------------------------

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        """The four stacked keys (``Shard(0)`` DTensors under EP); no ``weight{e}``/``bias{e}``/``_extra_state``."""
        if args:  # the deprecated positional form (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (list(args) + [destination, prefix, keep_vars][len(args):])[:3]
        destination = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        child_prefixes = tuple(f"{prefix}{child}." for child in self._modules)
        for key in [k for k in destination if k.startswith(child_prefixes)]:
            del destination[key]
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None:
            for key in [k for k in metadata if (k + ".").startswith(child_prefixes)]:
                del metadata[key]
        for name in PARAM_NAMES:
            value = self._stacked(name)
            if value is not None:
                destination[prefix + name] = value if keep_vars else value.detach()
        return destination

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        for name in PARAM_NAMES:
            key = prefix + name
            expected = name in ("gate_and_up_projs", "down_projs") or self.expert_bias
            if key not in state_dict:
                if expected:
                    missing_keys.append(key)
                continue
            value = state_dict.pop(key)
            if not expected:
                unexpected_keys.append(key)
                continue
            try:
                self._set_stacked(name, value, assign=assign)
            except (ValueError, TypeError, RuntimeError) as e:
                error_msgs.append(f"While copying the parameter named \"{key}\": {e}")
        # The GroupedLinears are loaded next by nn.Module's recursion: hand them their current tensors,
        # so that they neither report missing keys nor overwrite what was just loaded.
        for child_name, child in self._modules.items():
            child_prefix = f"{prefix}{child_name}."
            for pname, p in child._parameters.items():
                if p is not None:
                    state_dict.setdefault(child_prefix + pname, p)
            if type(child).get_extra_state is not nn.Module.get_extra_state:
                state_dict.setdefault(child_prefix + "_extra_state", child.get_extra_state())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- expert parallelism -----------------------------------------------------------------------

    def _shard_to(self, ep_mesh) -> None:
        """Keep only this rank's ``E / ep_size`` experts: rebuild the GroupedLinears with that many GEMMs
        and copy this rank's slice of the current (full) parameters into them."""
        if ep_mesh.ndim != 1:
            raise ValueError(f"ep_mesh: expected a 1-D DeviceMesh, got a {ep_mesh.ndim}-D mesh")
        if self.ep_mesh is not None:
            if ep_mesh == self.ep_mesh:
                return
            raise ValueError("ep_mesh: this module is already sharded over a different EP mesh")
        ep_size = ep_mesh.size()
        E = self.n_routed_experts
        if E % ep_size:
            raise ValueError(f"ep_mesh: n_routed_experts={E} must be divisible by the EP size, got ep_size={ep_size}")
        num_local, rank = E // ep_size, ep_mesh.get_local_rank()
        full = {name: self._stacked(name) for name in PARAM_NAMES}
        requires_grad = self.gate_up_linear.weight0.requires_grad
        self._build(num_local, device=self.gate_up_linear.weight0.device)
        self.ep_mesh, self.ep_rank = ep_mesh, rank
        for name, value in full.items():
            if value is not None:
                self._set_stacked(name, te_layout.local_experts(value.detach(), rank, num_local))
        self.requires_grad_(requires_grad)

    def init_token_dispatcher(self, ep_mesh, moe_mesh=None) -> None:
        """Expert parallelism over the 1-D ``ep_mesh``: this rank keeps experts
        ``rank * E/ep_size ...`` and tokens move by all-to-all dispatch / combine."""
        self._shard_to(ep_mesh)
        self.use_dispatcher(make_dispatcher(ep_mesh, self.n_routed_experts, activation=self.config.expert_activation))
        if moe_mesh is not None:
            self.moe_mesh = moe_mesh

    def use_dispatcher(self, dispatcher: Dispatcher) -> None:
        """Move tokens with ``dispatcher`` (:func:`moe_modules.apply_ep` builds it, after sharding the
        parameters over its mesh)."""
        if dispatcher.ep_mesh is not None:
            self._shard_to(dispatcher.ep_mesh)
        self.token_dispatcher = dispatcher

    def set_moe_mesh(self, moe_mesh) -> None:
        """Record the MoE mesh (e.g. ``("ep", "ep_shard")``).  If the module is not sharded yet and the
        mesh has an ``"ep"`` dimension (or is 1-D), shard over that: ``E / ep_size`` local experts."""
        self.moe_mesh = moe_mesh
        if moe_mesh is None or self.ep_mesh is not None:
            return
        names = getattr(moe_mesh, "mesh_dim_names", None) or ()
        if "ep" in names:
            self.init_token_dispatcher(moe_mesh["ep"], moe_mesh)
        elif moe_mesh.ndim == 1:
            self.init_token_dispatcher(moe_mesh, moe_mesh)

    # -- forward -------------------------------------------------------------------------------------

    def forward(self, x: Tensor, token_mask: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        """``x [T, D]``, ``token_mask [T]`` bool, ``weights [T, K]``, ``indices [T, K]`` -> ``[T, D]``
        in ``x.dtype``."""
        token_mask, weights, indices = moe_ops.check_expert_inputs(x, token_mask, weights, indices,
                                                                    self.config.expert_dim)
        received = self.token_dispatcher.dispatch(x, token_mask, weights, indices)
        return self.token_dispatcher.combine(self._experts(received), received)

    def _experts(self, received: Received) -> Tensor:
        """The expert block over the local experts ``0 .. E_local - 1`` on what the dispatcher received:
        ``[N, D]`` partial outputs in ``received.out_dtype``."""
        rows_in, token_mask, weights, indices, num_pairs, out_dtype, _ = received
        pair_of_row, row_of_pair, tokens_per_expert, offsets = moe_ops.route(indices, token_mask, 0,
                                                                             self.num_local_experts)
        probs = permuted_probs(weights, pair_of_row)
        rows = moe_ops.gather(rows_in, row_of_pair, offsets, None, num_pairs)
        params = self._te_params()
        groups = [1] * LEADING_INPUTS + [self.num_local_experts] * (len(params) // self.num_local_experts)
        (out,) = moe_ops.opaque_call(OPAQUE_NAME, [self._handle, rows, probs, tokens_per_expert, *params], groups)
        return moe_ops.combine(out.to(out_dtype), row_of_pair, offsets)

    def init_weights(self, buffer_device: torch.device, init_std: float = 0.02) -> None:
        """normal(0, init_std) weights, zero biases (in place, on every local expert)."""
        with torch.device(buffer_device), torch.no_grad():
            for linear in (self.gate_up_linear, self.down_linear):
                for w in self._weights(linear):
                    nn.init.normal_(w, mean=0.0, std=init_std)
                for b in self._biases(linear):
                    b.zero_()
