"""Input checks shared by every op's fake and real implementation.

Each check names the argument, what was expected and what came, and raises
``ValueError`` (shapes, values) or ``TypeError`` (dtypes) — from the fake too,
so eager, torch.compile and torch.export fail the same way.  Size comparisons go
through ``torch._check_value`` so they also hold for symbolic sizes.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def tensor(
    name: str,
    t,
    *,
    dim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor, got shape {_shape(t)}")
    if dtypes is not None:
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def _value(n):
    """A size for a message: a symbolic size by the value it has in this trace, where it has one."""
    hint = getattr(getattr(n, "node", None), "hint", None)
    return n if hint is None else hint


def size(name: str, actual, expected, what: str = "size") -> None:
    if type(actual) is int and type(expected) is int and not torch.compiler.is_dynamo_compiling():
        # eager with plain ints: the cheap check (Dynamo sees a symbolic size as an int here)
        if actual != expected:
            raise ValueError(f"{name}: expected {what} {expected}, got {actual}")
        return
    if torch.compiler.is_dynamo_compiling():
        # torch 2.11's Dynamo cannot trace a message closure at all, so under Dynamo the check
        # carries none; the ops' fakes, traced next, report the values.
        torch._check(actual == expected)
    else:
        torch._check_value(actual == expected,
                           lambda: f"{name}: expected {what} {_value(expected)}, got {_value(actual)}")


def between(name: str, actual, low, high, what: str = "size") -> None:
    """``low <= actual <= high``, for plain or symbolic ints."""
    if type(actual) is int and type(low) is int and type(high) is int and not torch.compiler.is_dynamo_compiling():
        if not low <= actual <= high:
            raise ValueError(f"{name}: expected {what} from {low} to {high}, got {actual}")
        return
    if torch.compiler.is_dynamo_compiling():
        torch._check(actual >= low)
        torch._check(actual <= high)
    else:
        message = lambda: f"{name}: expected {what} from {_value(low)} to {_value(high)}, got {_value(actual)}"  # noqa: E731
        torch._check_value(actual >= low, message)
        torch._check_value(actual <= high, message)


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for n, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{n}: expected device {first.device} (the device of {first_name}), got {t.device}")


def same_dtype(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (the dtype of {like_name}), got {t.dtype}")


def positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


def offsets(name: str, offs: torch.Tensor, groups: Optional[int] = None) -> None:
    tensor(name, offs, dim=1, dtypes=(torch.int32,))
    if groups is not None:
        size(name, offs.shape[0], groups, "number of groups")
    if offs.shape[0] < 1:
        raise ValueError(f"{name}: expected at least one group, got shape {_shape(offs)}")


def row_of_pair(name: str, rop: torch.Tensor, tokens=None) -> None:
    tensor(name, rop, dim=2, dtypes=(torch.int64,))
    if tokens is not None:
        size(name, rop.shape[0], tokens, "number of tokens (dim 0)")


def pair_weights(name: str, w: Optional[torch.Tensor], rop: torch.Tensor) -> None:
    if w is None:
        return
    tensor(name, w, dim=2, dtypes=FLOAT_DTYPES)
    size(name, w.shape[0], rop.shape[0], "number of tokens (dim 0)")
    size(name, w.shape[1], rop.shape[1], "experts per token (dim 1)")


def row_probs(name: str, probs: Optional[torch.Tensor], rows) -> None:
    """Per-row probabilities: shape [N] or [N, 1]."""
    if probs is None:
        return
    tensor(name, probs, dtypes=FLOAT_DTYPES)
    if probs.dim() not in (1, 2) or (probs.dim() == 2 and probs.shape[1] != 1):
        raise ValueError(f"{name}: expected shape [N] or [N, 1], got {_shape(probs)}")
    size(name, probs.shape[0], rows, "number of rows (dim 0)")


def expert_tensors(x: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                   dim: Optional[int] = None) -> None:
    """The expert block's inputs without the relations of their sizes: ``x`` 2-D float (width ``dim`` when
    given), ``token_mask`` 1-D bool, ``weights`` 2-D float, ``indices`` 2-D int32/int64, on one device."""
    tensor("x", x, dim=2, dtypes=FLOAT_DTYPES)
    if dim is not None:
        size("x", x.shape[1], dim, "width (dim 1) equal to the experts' (config.expert_dim)")
    tensor("token_mask", token_mask, dim=1, dtypes=(torch.bool,))
    tensor("weights", weights, dim=2, dtypes=FLOAT_DTYPES)
    tensor("indices", indices, dim=2, dtypes=INDEX_DTYPES)
    same_device(x=x, token_mask=token_mask, weights=weights, indices=indices)


def expert_sizes(x: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> None:
    """The relations of their sizes: ``x [T, D]``, ``token_mask [T]``, ``weights [T, K]``, ``indices [T, K]``."""
    T = x.shape[0]
    size("token_mask", token_mask.shape[0], T, "number of tokens (dim 0 of x)")
    size("weights", weights.shape[0], T, "number of tokens (dim 0 of x)")
    size("indices", indices.shape[0], T, "number of tokens (dim 0 of x)")
    size("indices", indices.shape[1], weights.shape[1], "experts per token (dim 1 of weights)")


def expert_inputs(x: torch.Tensor, token_mask: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  dim: Optional[int] = None) -> None:
    """The expert block's inputs: :func:`expert_tensors` and :func:`expert_sizes`."""
    expert_tensors(x, token_mask, weights, indices, dim)
    expert_sizes(x, token_mask, weights, indices)
