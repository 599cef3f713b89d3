"""A normalised text of an FX graph for review snapshots.

One line per tensor-valued node: ``name: dtype[shape] = target(args)``, with FX's node names
(deterministic for a given graph, so an inserted node changes few lines).  Symbols are renumbered
by first appearance (``u0``: unbacked, ``s0``: backed), and the symbolic bookkeeping (size
reads, ``ge``/``eq`` on sizes, ``_assert_scalar`` of the torch._check calls, SymInt
placeholders) is left out; a size used as an argument prints as its expression.
"""

from __future__ import annotations

import operator
import re

import torch
from torch import fx

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.bool: "b8"}
_SYMBOL = re.compile(r"\b([su])\d+\b")


class _Symbols:
    def __init__(self):
        self.names: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        def rename(m):
            if m.group(0) not in self.names:
                kind = m.group(1)
                self.names[m.group(0)] = f"{kind}{sum(v[0] == kind for v in self.names.values())}"
            return self.names[m.group(0)]

        return _SYMBOL.sub(rename, text)


def _value(val, symbols: _Symbols) -> str:
    if isinstance(val, torch.Tensor):
        return f"{_DTYPES.get(val.dtype, str(val.dtype))}[{', '.join(symbols(str(s)) for s in val.shape)}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(_value(v, symbols) for v in val) + ")"
    return symbols(str(val))


def _is_tensor_like(val) -> bool:
    return isinstance(val, torch.Tensor) or (isinstance(val, (tuple, list)) and any(_is_tensor_like(v) for v in val))


def graph_text(gm: fx.GraphModule) -> str:
    symbols, names, lines = _Symbols(), {}, []

    def arg(a) -> str:
        if isinstance(a, fx.Node):
            if a in names:
                return names[a]
            return _value(a.meta.get("val"), symbols)  # a size: its expression
        if isinstance(a, (tuple, list)):
            return "[" + ", ".join(arg(x) for x in a) + "]"
        if isinstance(a, torch.dtype):
            return _DTYPES.get(a, str(a))
        return repr(a) if isinstance(a, str) else str(a)

    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "output":
            lines.append(f"return {arg(node.args[0])}")
            continue
        if not _is_tensor_like(val):
            continue  # symbolic bookkeeping
        names[node] = node.name
        if node.op == "placeholder":
            lines.append(f"{names[node]}: {_value(val, symbols)}")
        elif node.target is operator.getitem:
            lines.append(f"{names[node]}: {_value(val, symbols)} = {arg(node.args[0])}[{node.args[1]}]")
        else:
            args = [arg(a) for a in node.args] + [f"{k}={arg(v)}" for k, v in node.kwargs.items()]
            lines.append(f"{names[node]}: {_value(val, symbols)} = {node.target}({', '.join(args)})")
    return "\n".join(lines)
