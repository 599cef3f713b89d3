"""Reviewed snapshots of the forward and backward graphs of the expert block.

One representative configuration (GroupedExperts, swiglu, with bias, float32, token count
dynamic) is compiled with an AOTAutograd backend that records the forward and backward graphs;
compile_tests/graph_text.py prints them normalised (symbols renumbered, the symbolic
bookkeeping left out, shapes and dtypes shown).  Any change to what the graphs contain shows up here in review.

After an intended change (e.g. a fused op in moe_modules/expert_block.py), regenerate the
snapshots in place and review the diff:

    EXPECTTEST_ACCEPT=1 python -m pytest compile_tests/test_graph_snapshots.py -p no:cacheprovider

(expecttest rewrites the string literals below and keeps the old file as test_graph_snapshots.py.bak:
delete that; run once more without the variable to check.)
The graphs also depend on torch's AOTAutograd (what it saves for the backward, in which order):
they are checked on the torch version CI pins (SNAPSHOT_TORCH); after a torch upgrade, change it
and regenerate the same way.
"""

from __future__ import annotations

import functools

import expecttest
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from compile_tests.builders import REPRESENTATIVE, forward_backward, make_inputs
from compile_tests.graph_text import graph_text

SNAPSHOT_TORCH = "2.13"  # the torch version of .ci/run, which the snapshots were recorded with


@functools.lru_cache(maxsize=None)
def captured_graphs() -> dict:
    """Normalised forward and backward graph of REPRESENTATIVE (compiled once, run fwd + bwd)."""
    graphs = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = graph_text(gm)
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=recorder("forward"), bw_compiler=recorder("backward"))
    module = REPRESENTATIVE.build()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    forward_backward(compiled, module, make_inputs(7, REPRESENTATIVE.dtype), tokens_dynamic=True)
    return graphs


@pytest.mark.skipif(not torch.__version__.startswith(SNAPSHOT_TORCH + "."),
                    reason=f"graph snapshots are recorded with torch {SNAPSHOT_TORCH} (AOTAutograd's output differs "
                           f"between versions), this is torch {torch.__version__}")
class TestExpertGraphSnapshots(expecttest.TestCase):
    maxDiff = None  # show the whole graph diff on failure

    def test_forward_graph(self):
        self.assertExpectedInline(captured_graphs()["forward"], """\
primals_2: f32[u0, 16]
primals_4: b8[u1]
primals_6: f32[u0, 2]
primals_8: i64[u2, 2]
primals_9: f32[4, 16, 16]
primals_10: f32[4, 8, 16]
primals_11: f32[4, 16]
primals_12: f32[4, 16]
check_expert_inputs: (f32[u0, 2], b8[u0], i64[u0, 2]) = moe.check_expert_inputs.default(primals_2, primals_4, primals_6, primals_8, 16)
getitem: f32[u0, 2] = check_expert_inputs[0]
getitem_1: b8[u0] = check_expert_inputs[1]
getitem_2: i64[u0, 2] = check_expert_inputs[2]
route: (i64[2*u0], i64[u0, 2], i64[4], i32[4]) = moe.route.default(getitem_2, getitem_1, 0, 4)
getitem_3: i64[2*u0] = route[0]
getitem_4: i64[u0, 2] = route[1]
getitem_6: i32[4] = route[3]
view: f32[2*u0] = aten.view.default(getitem, [-1])
gather: f32[2*u0] = aten.gather.default(view, 0, getitem_3)
expert_up: f32[2*u0, 16] = moe.expert_up.default(primals_2, getitem_3, getitem_4, getitem_6, primals_9, primals_11)
expert_down: f32[u0, 16] = moe.expert_down.default(expert_up, primals_10, primals_12, gather, getitem_3, getitem_4, getitem_6, 'swiglu', 1.702, 7.0, 1.0, f32)
return [expert_down, primals_2, primals_9, primals_10, primals_11, primals_12, getitem_3, getitem_4, getitem_6, gather, expert_up, u0, u1, u0, u2, 2*u0]""")

    def test_backward_graph(self):
        self.assertExpectedInline(captured_graphs()["backward"], """\
primals_2: f32[u0, 16]
primals_9: f32[4, 16, 16]
primals_10: f32[4, 8, 16]
primals_11: f32[4, 16]
primals_12: f32[4, 16]
getitem_3: i64[2*u0]
getitem_4: i64[u0, 2]
getitem_6: i32[4]
gather: f32[2*u0]
expert_up: f32[2*u0, 16]
tangents_1: f32[u0, 16]
expert_down_backward: (f32[2*u0, 16], f32[4, 8, 16], f32[4, 16], f32[2*u0]) = moe.expert_down_backward.default(tangents_1, expert_up, primals_10, primals_12, gather, getitem_3, getitem_4, getitem_6, 'swiglu', 1.702, 7.0, 1.0)
getitem_7: f32[2*u0, 16] = expert_down_backward[0]
getitem_8: f32[4, 8, 16] = expert_down_backward[1]
getitem_9: f32[4, 16] = expert_down_backward[2]
getitem_10: f32[2*u0] = expert_down_backward[3]
expert_up_backward: (f32[u0, 16], f32[4, 16, 16], f32[4, 16]) = moe.expert_up_backward.default(getitem_7, primals_2, getitem_3, getitem_4, getitem_6, primals_9, primals_11)
getitem_11: f32[u0, 16] = expert_up_backward[0]
getitem_12: f32[4, 16, 16] = expert_up_backward[1]
getitem_13: f32[4, 16] = expert_up_backward[2]
new_zeros: f32[2*u0] = aten.new_zeros.default(getitem_10, [2*u0])
scatter_add: f32[2*u0] = aten.scatter_add.default(new_zeros, 0, getitem_3, getitem_10)
view_1: f32[u0, 2] = aten.view.default(scatter_add, [u0, 2])
return [None, getitem_11, None, None, None, view_1, None, None, getitem_12, getitem_8, getitem_13, getitem_9]""")
