"""The one backend registry: which kernel runs each ``moe`` op.

Every backend (a module in ``moe_ops.backends``) exposes a :class:`Backend`:
a name, a kernel per op it implements, and ``not_supported_reasons(op, inputs)``
— an empty list when it can take those inputs, else why not.  ``inputs`` is an
:class:`Inputs` record: the op's arguments by their schema names (``inputs.x``,
``inputs.offsets``), or None when asked without inputs (the support table).
Each op's implementation calls :func:`call`, which runs the first backend in
:data:`PRIORITY` that supports the inputs, unless a backend is forced for the
op, for its family (:data:`FAMILIES`: ``gemm`` is every op that runs the expert
GEMMs) or for every op:

* API:          ``set_backend("reference")``, ``set_backend("reference", op="grouped_mm")``,
                ``set_backend("triton", op="gemm")``
* context:      ``with use_backend("reference"):`` / ``with use_backend(grouped_mm="reference"):`` /
                ``with use_backend(gemm="triton"):``
* environment:  ``MOE_OPS_BACKEND=reference``, ``MOE_OPS_BACKEND=gemm=triton`` or
                ``MOE_OPS_BACKEND=grouped_mm=reference,combine=triton``

Precedence: context manager (innermost first; it belongs to its thread or asyncio task, and an op's
backward runs under its forward's), then ``set_backend``, then the environment (both process-wide:
the configuration, seen by autograd's device threads too); within one of them,
the op's own key, then its family, then every op.  Forcing every op applies
only to the ops that backend has a kernel for (the others keep their choice);
forcing an op or family on a backend without its kernel raises ValueError at
once.  A forced backend that cannot take the inputs raises rather than falling
back, and when no backend can, the error lists every backend with its reasons.
The choice is made each time an op runs, so a compiled graph follows the
current setting without recompiling; ``use_backend`` / ``set_backend`` inside a compiled region
raise (under ``fullgraph=True``; with graph breaks allowed Dynamo runs that frame eagerly, where they
hold) rather than hold only while tracing.

The choice is cached (this is every op call's path): the key is the op, the forced backend, each
backend's run-time ``state()`` and :func:`input_key` of the arguments — everything the backends'
reasons may read.  Reasons are computed only on a miss, and again when no backend fits (the error);
only then is the :class:`Inputs` record built.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterator, Mapping, Optional, Sequence, Union

import torch

ENV_VAR = "MOE_OPS_BACKEND"
ALL_OPS = "*"

# Op families: one key forces every op of the family.  "gemm": the ops that run the expert GEMMs — the
# fused ops are what the modules call, so forcing grouped_mm alone does not reach a module.
FAMILIES: dict[str, tuple[str, ...]] = {
    "gemm": ("grouped_mm", "grouped_mm_wgrad", "expert_up", "expert_up_backward", "expert_down",
             "expert_down_backward"),
}
_FAMILY_OF = {op: family for family, ops in FAMILIES.items() for op in ops}


class NoBackendError(RuntimeError):
    """No backend can run an op on the given inputs."""


# Per op: its schema's argument names, in order, and the defaults of those that have one.
_SIGNATURES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
_INPUTS_ATTRIBUTES = frozenset({"op", "args", "names", "get", "tensors"})  # no argument may be named so


class Inputs:
    """One call's arguments by name: ``inputs.x``, ``inputs.offsets`` (the op's schema names), with the
    schema's defaults filled for trailing arguments the caller left out (the dispatcher drops them).

    ``op``: the op; ``args``: every argument in schema order (defaults filled); ``names``: theirs;
    ``tensors()``: every tensor argument, lists flattened.  Built only when the backends' reasons are
    asked (a miss of the choice's cache, or the error), never on the cached path.
    """

    __slots__ = ("op", "args", "_values")

    def __init__(self, op: str, args: Sequence):
        names, defaults = _SIGNATURES.get(op, ((), {}))
        args = tuple(args)
        for name in names[len(args):]:  # trailing arguments the caller left out
            if name not in defaults:
                break
            args += (defaults[name],)
        self.op, self.args = op, args
        self._values = dict(zip(names, args))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._values)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not an argument (and no recursion before _values is set)
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"moe::{self.op} has no argument {name!r}; its arguments: "
                                 f"{list(self._values)}") from None

    def get(self, name: str, default=None):
        return self._values.get(name, default)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor argument, lists of tensors flattened, in schema order."""
        flat = (t for a in self.args for t in (a if isinstance(a, (list, tuple)) else (a,)))
        return [t for t in flat if isinstance(t, torch.Tensor)]

    def __repr__(self) -> str:
        def show(v):
            return f"Tensor{list(v.shape)}[{str(v.dtype).replace('torch.', '')}, {v.device}]" \
                if isinstance(v, torch.Tensor) else repr(v)
        names = list(self._values) + [f"#{i}" for i in range(len(self._values), len(self.args))]
        return f"Inputs(moe::{self.op}: {', '.join(f'{n}={show(v)}' for n, v in zip(names, self.args))})"


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    kernels: Mapping[str, Callable]
    # Why this backend cannot run here at all (missing package, no GPU...): [] when it can.
    unavailable_reasons: Callable[[], list[str]]
    # Why it cannot take these inputs for this op, given that it is available: [] when it can.  Called with
    # the op and its Inputs (arguments by name), or None when asked without inputs (the support table).
    input_reasons: Callable[[str, Optional[Inputs]], list[str]]
    # What its availability depends on that can change while the process runs (part of the cache key).
    state: Optional[Callable[[], Hashable]] = None

    def not_supported_reasons(self, op: str, inputs: Union[Inputs, Sequence, None] = None) -> list[str]:
        """Why this backend cannot run ``op`` on ``inputs`` (an :class:`Inputs`, or the op's positional
        arguments as a tuple; None or ``()``: asked without inputs): [] when it can."""
        if op not in self.kernels:
            return [f"has no {op} kernel"]
        if inputs is not None and not isinstance(inputs, Inputs):
            inputs = Inputs(op, inputs) if len(inputs) else None
        return self.unavailable_reasons() or self.input_reasons(op, inputs)


_BACKENDS: dict[str, Backend] = {}
PRIORITY: list[str] = []  # best first
OPS: list[str] = []  # every op name, in definition order

_priorities: dict[str, int] = {}
_op_priorities: dict[str, dict[str, int]] = {}  # backend -> {op: priority overriding its own}
_api_choice: dict[str, str] = {}  # set_backend: process-wide


# use_backend's open blocks in this context (a thread, an asyncio task), innermost last; each block's layer
# is its own object, removed by identity when the block exits, so blocks may exit in any order.
_layers: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar("moe_ops_use_backend",
                                                                                     default=())
_env_cache: tuple[Optional[str], dict[str, str]] = (None, {})
_order_cache: dict[str, list[str]] = {}
_choice_cache: dict[tuple, Backend] = {}
# By exact metadata (_exact_key), in front of _choice_cache: call's, and call_checked's (validated too).
_call_cache: dict[tuple, Backend] = {}
_checked_cache: dict[tuple, Backend] = {}
_states: list[Callable[[], Hashable]] = []  # the backends' state() functions, for the choice's cache key


def register_backend(backend: Backend, *, priority: int, op_priorities: Optional[Mapping[str, int]] = None) -> None:
    """Add a backend; lower ``priority`` is tried first; ``op_priorities`` overrides it for some ops."""
    _BACKENDS[backend.name] = backend
    _priorities[backend.name] = priority
    _op_priorities[backend.name] = dict(op_priorities or {})
    PRIORITY[:] = sorted(_BACKENDS, key=_priorities.__getitem__)
    _states[:] = [b.state for b in _BACKENDS.values() if b.state is not None]
    _order_cache.clear()
    clear_caches()


def clear_caches() -> None:
    """Forget every cached choice (and cached validation): the next call of each op asks :func:`choose`
    again (what a backend change does; also for code that watches ``choose``, as the benchmarks do)."""
    _choice_cache.clear()
    _call_cache.clear()
    _checked_cache.clear()


def register_op(name: str, arguments: Sequence[str] = (), defaults: Optional[Mapping[str, Any]] = None) -> None:
    """Add an op that runs the registry's choice; ``arguments``: its schema's argument names in order,
    ``defaults``: those with a default value (filled into :class:`Inputs` when the caller left them out)."""
    clash = _INPUTS_ATTRIBUTES.intersection(arguments)
    if clash:
        raise ValueError(f"moe::{name}: argument names {sorted(clash)} are taken by registry.Inputs")
    if name not in OPS:
        OPS.append(name)
    _SIGNATURES[name] = (tuple(arguments), dict(defaults or {}))


def backends(op: Optional[str] = None) -> list[Backend]:
    """Every backend, best first (for ``op``, with its per-op priorities)."""
    if op is None:
        return [_BACKENDS[n] for n in PRIORITY]
    order = _order_cache.get(op)
    if order is None:  # every op call asks: sort once per op (register_backend clears the cache)
        order = _order_cache[op] = sorted(PRIORITY, key=lambda n: _op_priorities[n].get(op, _priorities[n]))
    return [_BACKENDS[n] for n in order]


def get_backend(name: str) -> Backend:
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]


def _parse(spec: str, source: str) -> dict[str, str]:
    """'reference', 'gemm=triton' or 'grouped_mm=reference,combine=triton' -> {op, family or '*': backend}."""
    choice: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, name = item.rpartition("=")
        _check_choice(op or ALL_OPS, name, source)
        choice[op or ALL_OPS] = name
    return choice


def _check_choice(op: str, name: str, source: str) -> None:
    """``op``: an op, a family or '*'; ``name`` must be a backend with a kernel for the op (every op of the family)."""
    if op != ALL_OPS and op not in OPS and op not in FAMILIES:
        raise ValueError(f"{source}: unknown op {op!r}; expected one of {OPS} or a family of {sorted(FAMILIES)}")
    if name not in _BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {list(PRIORITY)}")
    ops = () if op == ALL_OPS else FAMILIES.get(op, (op,))  # every op: only those it has a kernel for
    missing = [o for o in ops if o not in _BACKENDS[name].kernels]
    if missing:
        what = f"the op family {op!r} ({', '.join(ops)})" if op in FAMILIES else f"op {op!r}"
        able = [b for b in PRIORITY if all(o in _BACKENDS[b].kernels for o in ops)]
        raise ValueError(f"{source}: backend {name!r} has no {', '.join(missing)} kernel, so it cannot be forced "
                         f"for {what}; backends that can: {able}")


def _env_choice() -> dict[str, str]:
    global _env_cache
    spec = os.environ.get(ENV_VAR)
    if spec != _env_cache[0]:
        _env_cache = (spec, _parse(spec or "", ENV_VAR))
    return _env_cache[1]


def forced_backend(op: str) -> Optional[str]:
    """The backend forced for ``op`` by context (this thread's), API or environment, if any.

    Per layer (innermost context first, then ``set_backend``, then the environment): the op's own key,
    then its family's, then every op's — that last only where the backend has a kernel for ``op``."""
    env = _env_choice()
    layers = _layers.get()
    if not (layers or _api_choice or env):  # the usual case: nothing forced
        return None
    family = _FAMILY_OF.get(op)
    for layer in (*reversed(layers), _api_choice, env):
        if op in layer:
            return layer[op]
        if family in layer:
            return layer[family]
        name = layer.get(ALL_OPS)
        if name is not None and op in _BACKENDS[name].kernels:
            return name
    return None


def _refuse_under_compile(what: str) -> None:
    """Called only while Dynamo traces: with ``fullgraph=True`` its error carries this message; with graph
    breaks allowed Dynamo runs the frame eagerly, where the override holds."""
    raise RuntimeError(f"{what} cannot run inside a torch.compile region (it would hold only while tracing): "
                       "call it around the compiled call; the ops read it each time they run, without recompiling")


def set_backend(backend: Optional[str], op: Optional[str] = None) -> None:
    """Force ``backend`` for ``op`` — an op, a family of :data:`FAMILIES` (``"gemm"``) or, when None, every op
    the backend has a kernel for — in every thread; ``backend=None`` restores the default for that key."""
    if torch.compiler.is_compiling():
        _refuse_under_compile("moe_ops.set_backend")
    key = op or ALL_OPS
    if backend is None:
        _api_choice.pop(key, None)
        return
    _check_choice(key, backend, "set_backend")
    _api_choice[key] = backend


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force a backend inside the block, in this thread (this context: an asyncio task has its own): for
    every op it has a kernel for (``use_backend("reference")``), per op (``use_backend(grouped_mm="torch")``)
    or per family (``use_backend(gemm="triton")``: every op of ``FAMILIES["gemm"]``).  Blocks may exit in any
    order (each removes its own layer); the backward of an op run inside the block runs under the same
    layers, in whatever thread autograd runs it.  Refused inside a torch.compile region."""
    if torch.compiler.is_compiling():
        _refuse_under_compile("moe_ops.use_backend")
    layer = dict(per_op)
    if backend is not None:
        layer[ALL_OPS] = backend
    for op, name in layer.items():
        _check_choice(op, name, "use_backend")
    _layers.set(_layers.get() + (layer,))
    try:
        yield
    finally:
        _layers.set(tuple(x for x in _layers.get() if x is not layer))


def current_layers() -> tuple:
    """This context's open ``use_backend`` layers (for an op's backward to run under its forward's)."""
    return _layers.get()


@contextlib.contextmanager
def layers_of(layers: tuple) -> Iterator[None]:
    """Run the block under ``layers`` (from :func:`current_layers`) instead of this context's own."""
    token = _layers.set(layers)
    try:
        yield
    finally:
        _layers.reset(token)


def _report(op: str, reasons: Mapping[str, Sequence[str]]) -> str:
    lines = [f"moe::{op}: no backend can run these inputs:"]
    lines += [f"  {name}: {'; '.join(r)}" for name, r in reasons.items()]
    return "\n".join(lines)


_BIG = 2**31
_CACHE_LIMIT = 4096


def _tensor_key(a: torch.Tensor) -> Hashable:
    # Everything a backend's reasons read: device, dtype, the widths, the number of rows to a power of two
    # (a backend may decline below a row count only at a power of two), whether it is empty or has a
    # dimension of 2^31 or more, and the length of a 1-D int32 tensor (offsets: the experts).
    s = a.shape
    if not s:
        return a.device, a.dtype
    rows, dtype = s[0], a.dtype
    if dtype is torch.int32 and len(s) == 1:
        return a.device, dtype, rows
    n = a.numel()
    return a.device, dtype, s[1:], rows.bit_length(), n == 0, n >= _BIG and max(s) >= _BIG


def _key(a) -> Hashable:
    if isinstance(a, torch.Tensor):
        return _tensor_key(a)
    if isinstance(a, (list, tuple)):
        return tuple(map(_key, a))
    return a


def input_key(args: tuple) -> tuple:
    """What of ``args`` the backends' ``not_supported_reasons`` may depend on (the choice's cache key)."""
    return tuple(map(_key, args))


def _choose_uncached(op: str, args: tuple, forced: Optional[str]) -> Backend:
    inputs = Inputs(op, args)  # by name, for the backends' reasons: only here, on a miss
    if forced is not None:
        backend = _BACKENDS[forced]
        reasons = backend.not_supported_reasons(op, inputs)
        if reasons:
            raise NoBackendError(_report(op, {f"{forced} (forced)": reasons}))
        return backend
    all_reasons = {}
    for backend in backends(op):
        reasons = backend.not_supported_reasons(op, inputs)
        if not reasons:
            return backend
        all_reasons[backend.name] = reasons
    raise NoBackendError(_report(op, all_reasons))


def choose(op: str, args: tuple) -> Backend:
    forced = forced_backend(op)
    key = (op, forced, tuple(state() for state in _states), input_key(args))
    backend = _choice_cache.get(key)
    if backend is None or _BACKENDS.get(backend.name) is not backend:  # a miss, or the backend was replaced
        if len(_choice_cache) >= _CACHE_LIMIT:  # keys carry int arguments (row counts): keep it bounded
            _choice_cache.clear()
        backend = _choice_cache[key] = _choose_uncached(op, args, forced)
    return backend


def _meta(a) -> Hashable:
    if isinstance(a, torch.Tensor):
        return a.shape, a.dtype, a.device
    if isinstance(a, (list, tuple)):
        return tuple(map(_meta, a))
    return a


def _exact_key(op: str, args: tuple) -> tuple:
    """The op, the forced backend, the backends' states and the arguments' exact metadata (every tensor's
    shape, dtype and device; every other argument's value): cheaper to build than :func:`input_key`."""
    return op, forced_backend(op), tuple(state() for state in _states), tuple(map(_meta, args))


def _cached_choice(cache: dict, key: tuple, op: str, args: tuple, validate: Optional[Callable]) -> Backend:
    backend = cache.get(key)
    if backend is None or _BACKENDS.get(backend.name) is not backend:  # a miss, or the backend was replaced
        if validate is not None:
            validate(*args)
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        backend = cache[key] = choose(op, args)
    return backend


def call(op: str, *args):
    """Run ``op`` on ``args`` with the chosen backend's kernel (the choice looked up by exact metadata first)."""
    return _cached_choice(_call_cache, _exact_key(op, args), op, args, None).kernels[op](*args)


def call_checked(op: str, validate: Callable, *args):
    """``validate(*args)``, then :func:`call`; both are skipped for arguments whose exact metadata passed
    before under the same forced backends and backend states.  An op's validation reads only that metadata
    (it runs on fake tensors too), so a cached pass is the same pass; inputs that fail are never cached
    and raise every time."""
    return _cached_choice(_checked_cache, _exact_key(op, args), op, args, validate).kernels[op](*args)


def support_table() -> list[tuple[str, dict[str, list[str]]]]:
    """Per op, per backend, the reasons it is unavailable here ([] = available)."""
    return [(op, {b.name: b.not_supported_reasons(op) for b in backends(op)}) for op in OPS]
