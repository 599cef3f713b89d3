"""Every ``moe`` op passes ``torch.library.opcheck`` (schema, autograd registration, fake tensor,
and ``test_aot_dispatch_dynamic``: the op traced by AOTAutograd with symbolic sizes, forward
and backward, against eager), with gradients enabled and float inputs requiring grad (under
no_grad an op without autograd would pass).  Run on a typical batch, a single token (a size
that must not specialise) and a batch with nothing routed (every group empty).
tests/test_opcheck.py covers layouts and devices; this file is about the dynamic/AOT angle.
The ops checked are every op ``moe_ops`` defines but the peer exchange's (``peer_dispatch`` /
``peer_combine`` need a process group: tests/test_distributed.py opchecks them); ``moe::opaque_forward``
/ ``opaque_backward`` (the wrapper of untraceable modules such as Transformer Engine's) need a
registered function and are opchecked by tests/test_opaque_module.py.
"""

from __future__ import annotations

import pytest
import torch

from moe_ops import _library
from compile_tests.op_inputs import SCENARIOS, op_samples

UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
PEER_OPS = {"peer_dispatch", "peer_combine"}
PARAMS = [(s, torch.float32) for s in SCENARIOS] + [("typical", torch.bfloat16)]


def params_id(param) -> str:
    scenario, dtype = param
    return f"{scenario}-{str(dtype).replace('torch.', '')}"


@pytest.mark.parametrize("param", PARAMS, ids=params_id)
def test_every_op_passes_opcheck(param):
    scenario, dtype = param
    checked, failures = set(), []
    with torch.enable_grad():
        for name, op, args in op_samples(scenario, dtype):
            checked.add(op.name())
            result = torch.library.opcheck(op, args, test_utils=UTILS, raise_exception=False)
            failures += [f"{name}: {util}: {outcome}" for util, outcome in result.items() if outcome != "SUCCESS"]
    assert not failures, "\n".join(failures)
    registered = {f"moe::{op}" for op in _library.DEFINED if op not in PEER_OPS}
    assert checked == registered, f"ops without an opcheck sample: {sorted(registered - checked)}"
