"""Triton kernels of the ``triton`` backend, one file per family; importing this package
imports triton and registers every kernel as ``torch.ops.moe_triton.<op>`` (a
``torch.library.triton_op``, so torch.compile sees the kernels and export keeps the node).

Imported lazily by :mod:`moe_ops.backends.triton_backend`, never at ``import moe_ops``.
"""

from moe_ops.backends.triton_kernels import (  # noqa: F401  (registers the ops)
    activation,
    bias,
    fused,
    grouped_gemm,
    peer,
    permute,
    routing,
    wgrad,
)
