"""moe::opaque_forward / moe::opaque_backward — run Python code that torch.compile cannot trace as one op.

Some modules are excluded from Dynamo (Transformer Engine's ``GroupedLinear``
is wrapped in ``no_torch_dynamo``) or need host data (split sizes from
``.tolist()``).  Called directly from a compiled model they break the graph.
Wrapped here, they are one opaque op with a fake, so ``fullgraph=True`` holds.

How autograd works through it, with no recompute:

* ``opaque_forward`` runs the function with autograd re-enabled (an op's
  implementation runs below the Autograd dispatch key, where nothing is
  recorded; :func:`_recording` lifts that), so the function's own backward —
  Transformer Engine's, FP8 scaling state included — is recorded as usual.
  The op returns one extra output, the *graph handle*: a fresh int64 scalar
  (1 when a graph was recorded, else 0, so outputs compare equal across runs),
  and the recorded graph goes to a side table keyed by that tensor's storage.
* ``opaque_backward(graph_handle, grads)`` pops the graph and runs
  ``torch.autograd.grad`` on it, returning a gradient (zeros when unused, never
  None) for every input that required one.  Inputs can be declared in groups
  of equal shape (e.g. the per-expert weights of a GroupedLinear): a group's
  gradients leave the op as one stacked tensor, taken without a copy when they
  already are consecutive slices of one buffer (as Transformer Engine's packed
  weight gradients are).  Op outputs may not alias each other, so returning
  them one by one would force a copy.
  A function can also fix its input gradients before they leave (``OpaqueResult``;
  GroupedExpertsTE zeroes the experts that got no rows).
* A ``weakref.finalize`` on the graph-handle tensor drops the table entry when
  the handle dies, so a forward that never runs backward (inference, an
  exception) leaks nothing.  Without grad mode (or with no input requiring
  grad) nothing is recorded at all.
* Inputs enter the recorded graph through one ``_Attach`` node, whose gradient
  edges are read in the backward: the op keeps alive only what the function
  itself saves for its backward (not, e.g., a bf16 input that FP8 GEMMs saved
  in FP8).

Functions are registered by name (:func:`register_function`); per-instance
state (e.g. one set of TE modules per layer) is found at run time through a
handle *tensor* among the inputs (:class:`ObjectRegistry`), so every layer of a
model shares one compiled graph instead of specialising on an int attribute.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

# The op reads host data and runs host-synchronising code: never capture it in a CUDA graph.
_TAGS = (torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe") else ()


class OpaqueResult(NamedTuple):
    """What ``forward`` may return instead of a plain sequence of outputs.

    ``fix_input_grads(grads)`` runs in the backward on the list of input
    gradients (one per input, None where none is needed) before they leave the
    op; it may change them in place (they belong to the op).
    """

    outputs: Sequence[Tensor]
    fix_input_grads: Optional[Callable[[list], None]] = None


class OpaqueFunction(Protocol):
    """What :func:`register_function` takes.

    ``forward(inputs)`` computes the outputs with ordinary differentiable torch
    code (a sequence of tensors, or an :class:`OpaqueResult`); inputs that need
    a gradient arrive attached to autograd.  ``fake(inputs)`` returns outputs of
    the right shape/dtype/device (``inputs`` are fake tensors: shapes only, no
    data).  Outputs must be float tensors.
    """

    def forward(self, inputs: list[Tensor]) -> "Sequence[Tensor] | OpaqueResult": ...

    def fake(self, inputs: list[Tensor]) -> Sequence[Tensor]: ...


_FUNCTIONS: dict[str, OpaqueFunction] = {}


def register_function(name: str, fn: OpaqueFunction) -> None:
    """Make ``fn`` callable as ``opaque_call(name, ...)`` (re-registering a name replaces it)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    _FUNCTIONS[name] = fn


def _function(name: str) -> OpaqueFunction:
    if name not in _FUNCTIONS:
        raise ValueError(f"name: expected a registered opaque function (one of {sorted(_FUNCTIONS)}), got {name!r}")
    return _FUNCTIONS[name]


class ObjectRegistry:
    """Python objects found from a CPU int64 handle tensor, held weakly.

    The handle travels through the op as data, so compiled code does not
    specialise on which object it is.
    """

    def __init__(self, what: str):
        self.what = what
        self._objects: dict[int, weakref.ref] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, obj) -> Tensor:
        with self._lock:
            key = next(self._ids)
            self._objects[key] = weakref.ref(obj)
        weakref.finalize(obj, self._objects.pop, key, None)
        return torch.tensor(key, dtype=torch.int64)

    def lookup(self, handle: Tensor):
        key = int(handle.item())
        ref = self._objects.get(key)
        obj = None if ref is None else ref()
        if obj is None:
            raise RuntimeError(f"{self.what}: handle {key} names no live object (was it deleted?)")
        return obj

    def __len__(self) -> int:
        return len(self._objects)


# ---- the side table of recorded graphs ----------------------------------------------------------


@dataclass
class _Recorded:
    outputs: list  # GradientEdge of each output that requires grad, else None
    inputs: list  # GradientEdge of each input that needs a gradient
    fix_input_grads: Optional[Callable[[list], None]] = None
    keepalive: object = None  # a C++ node that owns the _Attach node the input edges point at


_GRAPHS: dict[int, _Recorded] = {}  # storage address of the graph handle -> recorded graph


def live_graphs() -> int:
    """How many recorded forward graphs wait for their backward (for leak tests)."""
    return len(_GRAPHS)


_K = torch._C.DispatchKey
_AUTOGRAD_KEYS = (
    torch._C.DispatchKeySet(_K.AutogradFunctionality)
    | torch._C.DispatchKeySet(_K.AutogradOther)
    | torch._C.DispatchKeySet(_K.AutogradNestedTensor)
    | torch._C.DispatchKeySet(_K.ADInplaceOrView)
)


@contextlib.contextmanager
def _recording():
    """Autograd records again inside an op implementation.

    Below the Autograd key the dispatcher excludes the autograd keys for
    everything called from here; take exactly those out of the exclude set
    (autocast and Python keys stay as they are: clearing the whole set would
    switch CPU/CUDA autocast on), and turn grad mode on (a compiled forward
    runs under no_grad).
    """
    include = torch._C._dispatch_tls_local_include_set()
    exclude = torch._C._dispatch_tls_local_exclude_set()
    with torch._C._ForceDispatchKeyGuard(include, exclude - _AUTOGRAD_KEYS), torch.enable_grad():
        yield


class _Attach(torch.autograd.Function):
    """Puts detached inputs into a fresh graph.

    The outputs alias the inputs with an ``_AttachBackward`` node in front, so
    their gradient is read at that node (a ``GradientEdge``) and nothing here
    keeps the inputs alive: only what the function itself saves stays.
    """

    @staticmethod
    def forward(ctx, anchor, *xs):
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        return (None, *[None for _ in grads])


def _storages(tensors: Sequence[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}


def _fresh(t: Tensor, others: set[int]) -> Tensor:
    """``t`` cut from autograd, copied when it shares memory with a storage in ``others``
    (op outputs never alias the op's inputs)."""
    t = t.detach()
    if t.numel() and t.untyped_storage().data_ptr() in others:
        t = t.clone()
    return t


def _graph_handle(recorded: Optional[_Recorded]) -> Tensor:
    """The extra output naming a recorded graph; its death (no backward) drops the graph."""
    handle = torch.tensor(int(recorded is not None), dtype=torch.int64)
    if recorded is not None:
        key = _key(handle)
        _GRAPHS[key] = recorded
        weakref.finalize(handle, _drop, key, recorded)
    return handle


def _drop(key: int, recorded: _Recorded) -> None:
    if _GRAPHS.get(key) is recorded:  # not a newer graph whose handle reuses the address
        del _GRAPHS[key]


def _key(handle: Tensor) -> int:
    return handle.untyped_storage().data_ptr()


# ---- the ops ------------------------------------------------------------------------------------


def _check(name: str, inputs: list[Tensor], requires_grad: list[bool], groups: list[int]) -> None:
    if len(requires_grad) != len(inputs):
        raise ValueError(f"requires_grad: expected one flag per input ({len(inputs)}), got {len(requires_grad)}")
    if sum(groups) != len(inputs) or any(n < 1 for n in groups):
        raise ValueError(f"groups: expected positive sizes summing to the number of inputs ({len(inputs)}), "
                         f"got {groups}")
    for i, (x, rg) in enumerate(zip(inputs, requires_grad)):
        if rg and not x.is_floating_point():
            raise TypeError(f"inputs[{i}]: expected a float tensor to require grad, got dtype {x.dtype}")
    for start, n in _group_spans(groups):
        first = inputs[start]
        for i in range(start + 1, start + n):
            if requires_grad[i] != requires_grad[start]:
                raise ValueError(f"requires_grad: expected one flag for the group of inputs {start}..{start + n - 1}")
            if inputs[i].shape != first.shape or inputs[i].dtype != first.dtype:
                raise ValueError(f"inputs[{i}]: expected shape {tuple(first.shape)} and dtype {first.dtype} like "
                                 f"inputs[{start}] (same group), got {tuple(inputs[i].shape)} and {inputs[i].dtype}")


def _group_spans(groups: Sequence[int]) -> list[tuple[int, int]]:
    starts = itertools.accumulate([0, *groups[:-1]])
    return list(zip(starts, groups))


@torch.library.custom_op("moe::opaque_forward", mutates_args=(), tags=_TAGS)
def _opaque_forward(name: str, inputs: list[Tensor], requires_grad: list[bool], groups: list[int]) -> list[Tensor]:
    _check(name, inputs, requires_grad, groups)
    fn = _function(name)
    if not any(requires_grad):
        with torch.no_grad():
            outputs, _ = _split_result(fn.forward([x.detach() for x in inputs]))
        return [_fresh(o, _storages(inputs)) for o in outputs] + [_graph_handle(None)]

    with _recording():
        anchor = torch.empty(0, requires_grad=True)
        needing = [x.detach() for x, rg in zip(inputs, requires_grad) if rg]
        attached = iter(_Attach.apply(anchor, *needing))
        fn_inputs = [next(attached) if rg else x.detach() for x, rg in zip(inputs, requires_grad)]
        outputs, fix = _split_result(fn.forward(fn_inputs))
        # The attached inputs are outputs 0, 1, ... of one _Attach node: build their edges directly. A
        # Python node does not keep its C++ graph alive by itself: a view of one output does (kept below).
        first = fn_inputs[requires_grad.index(True)]
        keepalive = first.view_as(first).grad_fn
        input_edges = [GradientEdge(first.grad_fn, i) for i in range(len(needing))]
        output_edges = [get_gradient_edge(o) if o.requires_grad else None for o in outputs]
    others = _storages(inputs)
    return [_fresh(o, others) for o in outputs] + [_graph_handle(_Recorded(output_edges, input_edges, fix, keepalive))]


def _split_result(result) -> tuple[list[Tensor], Optional[Callable]]:
    if isinstance(result, OpaqueResult):
        return list(result.outputs), result.fix_input_grads
    return list(result), None


@_opaque_forward.register_fake
def _(name, inputs, requires_grad, groups):
    _check(name, inputs, requires_grad, groups)
    outputs = [torch.empty_like(o) for o in _function(name).fake(list(inputs))]
    return outputs + [torch.empty((), dtype=torch.int64, device="cpu")]


@torch.library.custom_op("moe::opaque_backward", mutates_args=(), tags=_TAGS)
def _opaque_backward(graph: Tensor, grads: list[Tensor], like: list[Tensor], requires_grad: list[bool],
                     groups: list[int]) -> list[Tensor]:
    recorded = _GRAPHS.pop(_key(graph), None) if int(graph.item()) else None
    if recorded is None:
        raise RuntimeError(
            "moe::opaque_backward: the recorded forward graph is gone (backward already ran once; "
            "retain_graph / double backward through an opaque op is not supported)"
        )
    pairs = [(edge, g) for edge, g in zip(recorded.outputs, grads) if edge is not None]
    needed: list[Optional[Tensor]] = [None] * len(recorded.inputs)
    if pairs:
        with _recording():
            needed = list(torch.autograd.grad(
                [e for e, _ in pairs], recorded.inputs, [g for _, g in pairs], allow_unused=True
            ))
    # one entry per input (None where no gradient is needed), owned by this op
    it, others = iter(needed), _storages(grads)
    per_input = [_own(next(it), others) if rg else None for rg in requires_grad]
    if recorded.fix_input_grads is not None:
        recorded.fix_input_grads(per_input)
    out: list[Tensor] = []
    for (start, n), l in zip([span for span in _group_spans(groups) if requires_grad[span[0]]], like):
        members = per_input[start:start + n]
        members = [torch.zeros(l.shape[1:] if n > 1 else l.shape, dtype=l.dtype, device=l.device) if g is None
                   else g.to(l.dtype) for g in members]
        out.append(members[0] if n == 1 else _stacked(members))
    return _no_shared_storage(out)


def _own(g: Optional[Tensor], others: set[int]) -> Optional[Tensor]:
    return None if g is None else _fresh(g, others)


def _stacked(members: list[Tensor]) -> Tensor:
    """``torch.stack(members)``, without a copy when they are consecutive equal slices of one buffer
    (consecutive addresses inside the first member's storage)."""
    first = members[0]
    step, size = first.numel(), first.element_size()
    fits = first.storage_offset() * size + len(members) * step * size <= first.untyped_storage().nbytes()
    if fits and first.is_contiguous() and all(
        m.data_ptr() == first.data_ptr() + i * step * size and m.is_contiguous() and m.shape == first.shape
        and m.dtype == first.dtype and m.device == first.device
        for i, m in enumerate(members)
    ):
        return first.as_strided((len(members), *first.shape), (step, *first.stride()), first.storage_offset())
    return torch.stack(members)


def _no_shared_storage(out: list[Tensor]) -> list[Tensor]:
    """Op outputs may not alias each other: copy any that shares memory with an earlier one."""
    seen: set[int] = set()
    result = []
    for t in out:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t)
    return result


@_opaque_backward.register_fake
def _(graph, grads, like, requires_grad, groups):
    return [torch.empty(l.shape, dtype=l.dtype, device=l.device) for l in like]


def _setup(ctx, inputs, output):
    name, xs, requires_grad, groups = inputs
    ctx.input_requires_grad, ctx.groups = list(requires_grad), list(groups)
    ctx.like = [((n, *xs[start].shape) if n > 1 else xs[start].shape, xs[start].dtype, xs[start].device)
                for start, n in _group_spans(groups) if requires_grad[start]]
    ctx.save_for_backward(output[-1])


def _backward(ctx, grads):
    (graph,) = ctx.saved_tensors
    grads = list(grads[:-1])  # the graph handle has no gradient
    like = [torch.empty((), dtype=dtype, device=device).expand(shape) for shape, dtype, device in ctx.like]
    group_grads = iter(torch.ops.moe.opaque_backward(graph, [g.contiguous() for g in grads], like,
                                                     ctx.input_requires_grad, ctx.groups))
    input_grads: list[Optional[Tensor]] = []
    for start, n in _group_spans(ctx.groups):
        if not ctx.input_requires_grad[start]:
            input_grads += [None] * n
        elif n == 1:
            input_grads.append(next(group_grads))
        else:
            input_grads += list(next(group_grads).unbind(0))
    return None, input_grads, None, None


_opaque_forward.register_autograd(_backward, setup_context=_setup)


def opaque_call(name: str, inputs: Sequence[Tensor], groups: Optional[Sequence[int]] = None) -> list[Tensor]:
    """Run the function registered as ``name`` on ``inputs`` as one opaque op; returns its outputs.

    Autograd flows to every float input that requires grad (when grad mode is
    on): the gradient comes from the function's own backward, recorded during
    the forward, and is zero (not None) for inputs the outputs do not depend on.
    ``groups``: sizes partitioning ``inputs`` into runs of equal shape and dtype
    whose gradients travel stacked (default: every input alone); inputs of one
    group all require grad or none does.
    """
    inputs = list(inputs)
    groups = [1] * len(inputs) if groups is None else [int(n) for n in groups]
    grad_on = torch.is_grad_enabled()
    requires_grad = [bool(grad_on and x.requires_grad) for x in inputs]
    return torch.ops.moe.opaque_forward(name, inputs, requires_grad, groups)[:-1]
