"""Triton kernels of the ``triton`` backend, one file per family; importing this package
imports triton and records every op's plain Python body in ``_common.BODIES``, which the
``triton`` backend calls inside the ``moe::`` ops (no custom ops of their own are registered).

Imported lazily by :mod:`moe_ops.backends.triton_backend`, never at ``import moe_ops``.
"""

from moe_ops.backends.triton_kernels import (  # noqa: F401  (fills _common.BODIES)
    activation,
    bias,
    fused,
    grouped_gemm,
    peer,
    permute,
    routing,
    wgrad,
)
