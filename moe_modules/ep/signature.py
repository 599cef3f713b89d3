"""What the ranks of an expert-parallel call must agree on, sent with the counts each transport exchanges.

A rank that calls with another K, model dim or dtype than the others, or that is in another layer or
another call of it, would otherwise send buffers the others do not expect: gloo aborts the process
or every rank waits until the group's timeout, and nothing names the rank or the field.  So each
eager dispatch first exchanges, in a collective whose size never depends on the call, a signature:
the dispatcher's layer number (creation order, the same on every rank that builds the same model),
its call number, K, D, the dtypes of ``x`` and of the routing weights, the activation and the expert
count.  Every rank then holds every rank's signature, so a mismatch raises the same ``ValueError``
on every rank, naming each rank's value of the first field that differs, before any buffer of the
call moves.  A collective that fails (a rank raised before it, exited, or is waiting in another
collective until the group's timeout) is re-raised with the layer and call it was; so is a failed
collective of the combine (eager all-gather / all-to-all transports).

Traced calls (torch.compile) exchange only the counts: the signature's call number would be a
constant of the graph.  The peer-memory transport exchanges nothing on the host (its point: no host
sync, CUDA-graph replay), so it checks the signature without the call number once per new shape
(an all-gather and a host read, never inside a CUDA-graph capture); a rank that later changes shape
alone, or calls a layer more often than the others, stays the caller's contract there.
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch
from torch import Tensor

import moe_ops

FIELDS = ("layer", "call", "experts per token (K)", "model dim (D)", "x dtype", "weights dtype", "activation",
          "routed experts")
SIZE = len(FIELDS)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ACTIVATIONS = (None, *sorted(moe_ops.GATED))
_layer_numbers = itertools.count()


def _dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _show(field: int, value: int) -> str:
    if FIELDS[field].endswith("dtype"):
        return str(_DTYPES[value]).replace("torch.", "") if value < len(_DTYPES) else "another dtype"
    if FIELDS[field] == "activation":
        return str(_ACTIVATIONS[value]) if value < len(_ACTIVATIONS) else "?"
    return str(value)


class CallSignature:
    """One dispatcher's signatures: its layer number, and a call number that counts its eager dispatches."""

    def __init__(self, n_routed_experts: int, activation: Optional[str] = None):
        self.layer = next(_layer_numbers)
        self.calls = 0
        self.experts = n_routed_experts
        self.activation = _ACTIVATIONS.index(activation)

    def next(self, x: Tensor, weights: Tensor, indices: Tensor) -> list[int]:
        """This call's signature (and the call number moves on)."""
        values = self.of_shapes(x, weights, indices)
        values[1] = self.calls
        self.calls += 1
        return values

    def of_shapes(self, x: Tensor, weights: Tensor, indices: Tensor) -> list[int]:
        """The signature without the call number (0): what the peer transport checks once per shape."""
        return [self.layer, 0, indices.shape[1], x.shape[1], _dtype_code(x.dtype), _dtype_code(weights.dtype),
                self.activation, self.experts]

    def failed(self, error: BaseException) -> RuntimeError:
        """The error for a collective of the latest call that failed."""
        call = f" call {self.calls - 1}" if self.calls else ""  # the peer transport counts no calls
        return RuntimeError(f"expert parallel, layer {self.layer}{call}: the exchange with the other "
                            f"ranks failed ({type(error).__name__}: {error}); a rank that raised or exited before "
                            f"it, or that calls this layer more (or fewer) times than the others, leaves the rest "
                            f"waiting")


def all_gather_checked(signature: CallSignature, values: list[int], device: torch.device, group,
                       extra: tuple = ()) -> list[list[int]]:
    """All-gather ``[*extra, *values]`` of every rank (one host read), check the signatures, and return
    every rank's row."""
    mine = torch.tensor([*extra, *values], dtype=torch.int64, device=device)
    gathered = mine.new_empty(group.size() * mine.numel())
    try:  # eager only: a plain c10d all-gather (no AsyncCollectiveTensor), read on the host
        torch.distributed.all_gather_into_tensor(gathered, mine, group=group)
        flat = gathered.tolist()
    except RuntimeError as e:
        raise signature.failed(e) from e
    n = mine.numel()
    rows = [flat[i:i + n] for i in range(0, len(flat), n)]
    check([row[len(extra):] for row in rows])
    return rows


def check(signatures: list[list[int]]) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks' signatures (``[ep][SIZE]``) differ."""
    for field in range(SIZE):
        column = [s[field] for s in signatures]
        if len(set(column)) == 1:
            continue
        by_value: dict[int, list[int]] = {}
        for rank, value in enumerate(column):
            by_value.setdefault(value, []).append(rank)
        seen = "; ".join(f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {_show(field, value)}"
                         for value, ranks in sorted(by_value.items(), key=lambda item: item[1]))
        raise ValueError(f"expert parallel: the ranks of the EP group called with different {FIELDS[field]} "
                         f"({seen}); every rank must call each layer's forward as often as the others, with the "
                         f"same K, model dim, dtypes and configuration")
