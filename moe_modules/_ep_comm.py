"""The functional collectives the expert-parallel paths use, with their autograd variants.

``torch.distributed._functional_collectives`` ops are traced by ``torch.compile(fullgraph=True)``
and their ``*_autograd`` variants differentiate to the mirror collective (all-gather <->
reduce-scatter, all-to-all <-> all-to-all with the split sizes swapped).  torch 2.13 renamed
``*_tensor_autograd`` to ``*_single_autograd``; take whichever this torch has (2.11 on the GPU image).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as fc

all_reduce = fc.all_reduce
all_gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
all_gather_autograd = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
reduce_scatter_autograd = getattr(fc, "reduce_scatter_single_autograd", None) or fc.reduce_scatter_tensor_autograd
all_to_all = fc.all_to_all_single
all_to_all_autograd = fc.all_to_all_single_autograd


def host_ints(t) -> list[int]:
    """The values of a small integer tensor on the host: the one device->host sync of an EP forward.

    Under ``torch.compile`` they become unbacked symbolic ints, asserted non-negative here so
    that the shapes built from them are valid."""
    values = t.tolist()
    for v in values:
        torch._check(v >= 0)
    return values
