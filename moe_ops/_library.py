"""How every ``moe::`` op is defined: ``torch.library.Library`` (schema + kernel + fake + autograd).

``torch.library.custom_op`` wraps each call in Python layers (argument binding against the
signature, a Dynamo-disable wrapper, its own autograd plumbing): 100-200 us of host time per
eager call on the H200 host, several times the kernels' time at decode sizes.  An op defined with
``Library.define`` and one ``CompositeExplicitAutograd`` kernel goes from the C++ dispatcher
straight to that kernel; ``torch.library.register_fake`` / ``register_autograd`` give it the same
fake and autograd formula as before, so torch.compile, torch.export and opcheck see the same op.

Two rules come with the lower-level API:

* The dispatcher hands the kernel only the arguments the caller passed (trailing defaulted
  arguments left out), so a kernel, its fake and the backends' kernels repeat the schema's
  defaults as Python defaults.  The backends' reasons need not: ``define`` hands the registry
  the schema's argument names and defaults, and their ``registry.Inputs`` has them filled.
* Outputs must never alias inputs (nothing checks it eagerly; under the ``CI`` variable
  torch.compile raises, elsewhere it warns).

Callers use the returned :class:`Op`.  It calls the ``OpOverload`` (``torch.ops.moe.<name>.default``;
an ``OpOverloadPacket`` call resolves the overload again on every call) whenever anything observes
or transforms the dispatcher: torch.compile / torch.export tracing, a torch-function or dispatch
mode (FakeTensor, FlopCounterMode, ``torch.device`` as a context), the autograd profiler, torch.func
transforms, the JIT tracer, or a tensor subclass (DTensor, FakeTensor) among the arguments.  When
nothing does — a plain eager call — it runs the op's kernel directly (the same validation and the
same registry choice), with the op's own autograd formula as a ``torch.autograd.Function`` when a
gradient is needed: the C++ dispatcher's round trip into Python and ``register_autograd``'s Python
wrapper are most of an eager call's host time at decode sizes (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch._C import _functorch

from moe_ops import registry

NAMESPACE = "moe"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
DEFINED: dict[str, "Op"] = {}  # every op defined here, by name


_C = torch._C
_is_compiling = torch.compiler.is_compiling
_profiling = _C._autograd._profiler_enabled
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _observed() -> bool:
    """Whether anything observes or transforms the dispatcher right now (then an op must be dispatched)."""
    return bool(_is_compiling() or _C._is_torch_function_mode_enabled() or _C._len_torch_dispatch_stack()
                or _profiling() or _functorch.peek_interpreter_stack() is not None or _C._get_tracing_state())


def _plain(args: tuple) -> bool:
    """Every tensor argument (lists included) is a plain ``Tensor`` or ``Parameter``, not on ``meta``."""
    for a in args:
        t = type(a)
        if t in _PLAIN:
            if a.is_meta:
                return False
        elif t is list or t is tuple:
            if not _plain(a):
                return False
        elif isinstance(a, torch.Tensor):  # a subclass
            return False
    return True


def _needs_grad(args: tuple) -> bool:
    for a in args:
        t = type(a)
        if t in _PLAIN:
            if a.requires_grad:
                return True
        elif (t is list or t is tuple) and _needs_grad(a):
            return True
    return False


class Op:
    """A ``moe::`` op for Python callers: the ``OpOverload`` (``overload``), or, for a plain eager call,
    its kernel directly (see the module docstring)."""

    __slots__ = ("overload", "_run", "_run_unchecked", "_function", "__name__")

    def __init__(self, overload: torch._ops.OpOverload, run: Callable, run_unchecked: Callable,
                 function: Optional[type]):
        self.overload, self._run, self._run_unchecked, self._function = overload, run, run_unchecked, function
        self.__name__ = overload._opname

    def __call__(self, *args):
        return self._call(self._run, args)

    def unchecked(self, *args):
        """The op, without its validation on the eager shortcut: for the ops' own autograd formulas, whose
        inputs are what the forward validated and saved, and gradients autograd checked against its outputs."""
        return self._call(self._run_unchecked, args)

    def _call(self, run: Callable, args: tuple):
        if _observed() or not _plain(args):
            return self.overload(*args)
        if self._function is not None and _C.is_grad_enabled() and _needs_grad(args):
            return self._function.apply(*args)
        return run(*args)

    def __repr__(self) -> str:
        return f"moe_ops.Op({self.overload})"


def _autograd_function(name: str, run: Callable, backward: Callable, setup_context: Optional[Callable]) -> type:
    """The op's autograd formula (as given to ``register_autograd``) as a ``torch.autograd.Function``.

    Its ``forward`` takes ``ctx`` and calls ``setup_context`` itself: a Function with a separate
    ``setup_context`` binds every call's arguments to its signature with ``inspect`` first (~10 us)."""

    def forward(ctx, *args):
        output = run(*args)
        ctx.moe_num_inputs = len(args)
        if setup_context is not None:
            setup_context(ctx, args, output)
        return output

    def grads(ctx, *grad_outputs):
        result = backward(ctx, *grad_outputs)  # under the forward's use_backend layers (see _with_layers)
        result = result if isinstance(result, tuple) else (result,)
        n = ctx.moe_num_inputs  # one gradient per argument passed (the formula may cover defaulted ones too)
        return result[:n] + (None,) * (n - len(result))

    return type(f"{name}_function", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(grads)})


def _with_layers(setup_context: Optional[Callable], backward: Callable) -> tuple[Callable, Callable]:
    """The autograd formula with the forward's ``use_backend`` layers kept on ``ctx`` and in force for its
    backward, which autograd may run in another thread (a CUDA device's); a forward with none leaves the
    backward to the layers of the thread running it."""

    def setup(ctx, inputs, output):
        ctx.moe_layers = registry.current_layers()
        if setup_context is not None:
            setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        if not ctx.moe_layers:
            return backward(ctx, *grads)
        with registry.layers_of(ctx.moe_layers):
            return backward(ctx, *grads)

    return setup, run_backward


def define(
    schema: str,
    *,
    validate: Callable,
    fake: Callable,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
    tags: tuple = (),
    kernel: Optional[Callable] = None,
) -> Op:
    """Define ``moe::<schema>``; its kernel validates the inputs and runs the registry's choice of backend.

    ``validate(*args)`` raises on bad inputs (eager and fake alike); ``fake(*args)`` returns outputs
    of the right shapes; ``backward`` / ``setup_context`` as for ``torch.library.register_autograd``.
    ``kernel``: the op's one implementation, for an op that is no backend's choice (the peer exchange,
    which moves rows between ranks and runs its own steps through the registry).
    """
    name = schema.split("(", 1)[0]
    LIB.define(schema, tags=tags)
    if kernel is None:
        # The argument names and defaults, for the backends' reasons (registry.Inputs: inputs.x, inputs.offsets).
        arguments = torch._C.parse_schema(f"{NAMESPACE}::{schema}").arguments
        registry.register_op(name, [a.name for a in arguments],
                             {a.name: a.default_value for a in arguments if a.has_default_value()})

        run = functools.partial(registry.call, name)
        # The eager shortcut's: validation and the backend's choice once per distinct metadata.
        eager = functools.partial(registry.call_checked, name, validate)
    else:
        run = kernel

    def impl(*args):
        validate(*args)
        return run(*args)

    if kernel is not None:
        eager = impl

    def fake_kernel(*args):
        validate(*args)
        return fake(*args)

    impl.__name__ = fake_kernel.__name__ = name
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake_kernel, lib=LIB)
    function = None
    if backward is not None:
        setup_context, backward = _with_layers(setup_context, backward)
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIB)
        function = _autograd_function(name, eager, backward, setup_context)
    op = DEFINED[name] = Op(getattr(getattr(torch.ops, NAMESPACE), name).default, eager, run, function)
    return op
