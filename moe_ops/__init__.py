"""moe-ops: the expert block of Mixture-of-Experts models as ``torch.library`` custom ops.

Every step is an op in the ``moe`` namespace (``torch.ops.moe.*``) with a fake
implementation and an autograd formula; kernels come from the backends in
:mod:`moe_ops.backends`, chosen per op by :mod:`moe_ops.registry`.
"""

from moe_ops.ops.inputs import check_expert_inputs
from moe_ops.ops.routing import route
from moe_ops.ops.permute import gather, combine, pair_dot
from moe_ops.ops.grouped_mm import clear_tail_, grouped_mm, grouped_mm_wgrad
from moe_ops.ops.bias import add_expert_bias, expert_bias_backward
from moe_ops.ops.activation import (
    GATED, activation, activation_backward, activation_backward_with_output, check_activation,
)
from moe_ops.ops.activation_mm import activation_mm
from moe_ops.ops.fused import expert_down, expert_down_backward, expert_up, expert_up_backward
from moe_ops.ops.peer import MAX_SOURCES, gather_from, put_to, sum_from
from moe_ops.ops.exchange import peer_combine, peer_dispatch
from moe_ops.ops.opaque_module import ObjectRegistry, OpaqueResult, opaque_call
from moe_ops.ops.opaque_module import register_function as register_opaque_function
from moe_ops import backends as _backends  # noqa: F401  (registers the backends)
from moe_ops import registry
from moe_ops.registry import NoBackendError, set_backend, use_backend

__all__ = [
    "route",
    "gather",
    "combine",
    "pair_dot",
    "grouped_mm",
    "grouped_mm_wgrad",
    "clear_tail_",
    "add_expert_bias",
    "expert_bias_backward",
    "activation",
    "activation_backward",
    "activation_backward_with_output",
    "activation_mm",
    "expert_up",
    "expert_up_backward",
    "expert_down",
    "expert_down_backward",
    "gather_from",
    "sum_from",
    "put_to",
    "MAX_SOURCES",
    "peer_dispatch",
    "peer_combine",
    "opaque_call",
    "OpaqueResult",
    "ObjectRegistry",
    "register_opaque_function",
    "GATED",
    "check_activation",
    "check_expert_inputs",
    "registry",
    "NoBackendError",
    "set_backend",
    "use_backend",
]
