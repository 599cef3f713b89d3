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

Callers use the returned ``OpOverload`` (``torch.ops.moe.<name>.default``): an
``OpOverloadPacket`` call resolves the overload again on every call.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from moe_ops import registry

NAMESPACE = "moe"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")


def define(
    schema: str,
    *,
    validate: Callable,
    fake: Callable,
    backward: Optional[Callable] = None,
    setup_context: Optional[Callable] = None,
    tags: tuple = (),
    kernel: Optional[Callable] = None,
) -> torch._ops.OpOverload:
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

        def impl(*args):
            validate(*args)
            return registry.call(name, *args)
    else:
        def impl(*args):
            validate(*args)
            return kernel(*args)

    def fake_kernel(*args):
        validate(*args)
        return fake(*args)

    impl.__name__ = fake_kernel.__name__ = name
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    qualname = f"{NAMESPACE}::{name}"
    torch.library.register_fake(qualname, fake_kernel, lib=LIB)
    if backward is not None:
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=LIB)
    return getattr(getattr(torch.ops, NAMESPACE), name).default
