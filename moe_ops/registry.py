"""The one backend registry: which kernel runs each ``moe`` op.

Every backend (a module in ``moe_ops.backends``) exposes a :class:`Backend`:
a name, a kernel per op it implements, and ``not_supported_reasons(op, args)``
— an empty list when it can take those inputs, else why not.  Each op's
implementation calls :func:`call`, which runs the first backend in
:data:`PRIORITY` that supports the inputs, unless a backend is forced:

* API:          ``set_backend("reference")`` or ``set_backend("reference", op="grouped_mm")``
* context:      ``with use_backend("reference"):`` / ``with use_backend(grouped_mm="reference"):``
* environment:  ``MOE_OPS_BACKEND=reference`` or ``MOE_OPS_BACKEND=grouped_mm=reference,combine=triton``

Precedence: context manager, then ``set_backend``, then the environment.  A
forced backend that cannot take the inputs raises rather than falling back,
and when no backend can, the error lists every backend with its reasons.
The choice is made each time an op runs, so a compiled graph follows the
current setting without recompiling.

The choice is cached (this is every op call's path): the key is the op, the forced backend, each
backend's run-time ``state()`` and :func:`input_key` of the arguments — everything the backends'
reasons may read.  Reasons are computed only on a miss, and again when no backend fits (the error).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Mapping, Optional, Sequence

import torch

ENV_VAR = "MOE_OPS_BACKEND"
ALL_OPS = "*"


class NoBackendError(RuntimeError):
    """No backend can run an op on the given inputs."""


@dataclass(frozen=True)
class Backend:
    name: str
    description: str
    kernels: Mapping[str, Callable]
    # Why this backend cannot run here at all (missing package, no GPU...): [] when it can.
    unavailable_reasons: Callable[[], list[str]]
    # Why it cannot take these inputs for this op, given that it is available: [] when it can.
    input_reasons: Callable[[str, tuple], list[str]]
    # What its availability depends on that can change while the process runs (part of the cache key).
    state: Optional[Callable[[], Hashable]] = None

    def not_supported_reasons(self, op: str, args: tuple = ()) -> list[str]:
        if op not in self.kernels:
            return [f"has no {op} kernel"]
        return self.unavailable_reasons() or self.input_reasons(op, args)


_BACKENDS: dict[str, Backend] = {}
PRIORITY: list[str] = []  # best first
OPS: list[str] = []  # every op name, in definition order

_priorities: dict[str, int] = {}
_op_priorities: dict[str, dict[str, int]] = {}  # backend -> {op: priority overriding its own}
_api_choice: dict[str, str] = {}
_context_stack: list[dict[str, str]] = []
_env_cache: tuple[Optional[str], dict[str, str]] = (None, {})
_order_cache: dict[str, list[str]] = {}
_choice_cache: dict[tuple, Backend] = {}
_states: list[Callable[[], Hashable]] = []  # the backends' state() functions, for the choice's cache key


def register_backend(backend: Backend, *, priority: int, op_priorities: Optional[Mapping[str, int]] = None) -> None:
    """Add a backend; lower ``priority`` is tried first; ``op_priorities`` overrides it for some ops."""
    _BACKENDS[backend.name] = backend
    _priorities[backend.name] = priority
    _op_priorities[backend.name] = dict(op_priorities or {})
    PRIORITY[:] = sorted(_BACKENDS, key=_priorities.__getitem__)
    _states[:] = [b.state for b in _BACKENDS.values() if b.state is not None]
    _order_cache.clear()
    _choice_cache.clear()


def register_op(name: str) -> None:
    if name not in OPS:
        OPS.append(name)


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
    """'reference' or 'grouped_mm=reference,combine=triton' -> {op or '*': backend}."""
    choice: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        op, _, name = item.rpartition("=")
        _check_choice(op or ALL_OPS, name, source)
        choice[op or ALL_OPS] = name
    return choice


def _check_choice(op: str, name: str, source: str) -> None:
    if op != ALL_OPS and op not in OPS:
        raise ValueError(f"{source}: unknown op {op!r}; expected one of {OPS}")
    if name not in _BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {list(PRIORITY)}")


def _env_choice() -> dict[str, str]:
    global _env_cache
    spec = os.environ.get(ENV_VAR)
    if spec != _env_cache[0]:
        _env_cache = (spec, _parse(spec or "", ENV_VAR))
    return _env_cache[1]


def forced_backend(op: str) -> Optional[str]:
    """The backend forced for ``op`` by context, API or environment, if any."""
    env = _env_choice()
    if not (_context_stack or _api_choice or env):  # the usual case: nothing forced
        return None
    for layer in (*reversed(_context_stack), _api_choice, env):
        for key in (op, ALL_OPS):
            if key in layer:
                return layer[key]
    return None


def set_backend(backend: Optional[str], op: Optional[str] = None) -> None:
    """Force ``backend`` for ``op`` (every op when None); ``backend=None`` restores the default."""
    key = op or ALL_OPS
    if backend is None:
        _api_choice.pop(key, None)
        return
    _check_choice(key, backend, "set_backend")
    _api_choice[key] = backend


@contextlib.contextmanager
def use_backend(backend: Optional[str] = None, **per_op: str) -> Iterator[None]:
    """Force a backend for every op (``use_backend("reference")``) or per op (``use_backend(grouped_mm="torch")``)."""
    layer = dict(per_op)
    if backend is not None:
        layer[ALL_OPS] = backend
    for op, name in layer.items():
        _check_choice(op, name, "use_backend")
    _context_stack.append(layer)
    try:
        yield
    finally:
        _context_stack.pop()


def _report(op: str, reasons: Mapping[str, Sequence[str]]) -> str:
    lines = [f"moe::{op}: no backend can run these inputs:"]
    lines += [f"  {name}: {'; '.join(r)}" for name, r in reasons.items()]
    return "\n".join(lines)


_BIG = 2**31
_CACHE_LIMIT = 4096


def _key(a) -> Hashable:
    if isinstance(a, torch.Tensor):
        s, n = a.shape, a.numel()
        # Everything a backend's reasons read: device, dtype, the widths, the number of rows to a power
        # of two (a backend may decline below a row count only at a power of two), whether it is empty or
        # has a dimension of 2^31 or more, and the length of a 1-D int32 tensor (offsets: the experts).
        rows = s[0].bit_length() if s else -1
        groups = s[0] if a.dtype is torch.int32 and len(s) == 1 else -1
        return (a.device, a.dtype, s[1:], rows, n == 0, n >= _BIG and max(s) >= _BIG, groups)
    if isinstance(a, (list, tuple)):
        return tuple(_key(x) for x in a)
    return a


def input_key(args: tuple) -> tuple:
    """What of ``args`` the backends' ``not_supported_reasons`` may depend on (the choice's cache key)."""
    return tuple(_key(a) for a in args)


def _choose_uncached(op: str, args: tuple, forced: Optional[str]) -> Backend:
    if forced is not None:
        backend = _BACKENDS[forced]
        reasons = backend.not_supported_reasons(op, args)
        if reasons:
            raise NoBackendError(_report(op, {f"{forced} (forced)": reasons}))
        return backend
    all_reasons = {}
    for backend in backends(op):
        reasons = backend.not_supported_reasons(op, args)
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


def call(op: str, *args):
    """Run ``op`` on ``args`` with the chosen backend's kernel."""
    return choose(op, args).kernels[op](*args)


def support_table() -> list[tuple[str, dict[str, list[str]]]]:
    """Per op, per backend, the reasons it is unavailable here ([] = available)."""
    return [(op, {b.name: b.not_supported_reasons(op) for b in backends(op)}) for op in OPS]
