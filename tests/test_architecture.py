"""Architecture rules of ``moe_ops`` / ``moe_modules``, checked on the source (AST): robust to moves.

* No import cycle, lazy imports included: the layering stays a DAG and every module imports alone.
* ``moe_ops`` never imports ``moe_modules``: the ops library stands alone; modules build on it.
* Backends never import each other: each is optional and chosen per op by the registry, so one
  backend's imports, bugs or absence never reach another (shared code: private ``backends/_*.py``;
  ``triton_kernels/`` belongs to the triton backend).
* ``moe_modules`` uses only ``moe_ops.__all__``: the rest of moe_ops can move without breaking it.
* No underscore name of the other top-level package is used: private means private.
* No ``triton`` / ``transformer_engine`` / ``deep_ep`` import at import time: they are optional, so
  ``import moe_ops, moe_modules`` works without them (``triton_kernels/`` is exempt: the triton
  backend imports it lazily, when a kernel first runs).
* ``import moe_ops`` alone registers every ``moe::`` op the code defines or calls, and ``moe`` is the
  only namespace: a compiled or exported graph calling ``torch.ops.moe.*`` runs after ``import moe_ops``.
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moe_ops", "moe_modules")
ACCELERATORS = ("triton", "transformer_engine", "deep_ep")
LAZY_PACKAGE = "moe_ops.backends.triton_kernels"  # imported by the triton backend on first use
BACKENDS = "moe_ops.backends."  # every backend is a module or subpackage of it
OP_MAKERS = ("custom_op", "triton_op", "Library", "define")


# `import base` / `from base import name` (base made absolute) at "path:line"; target: the project
# module imported (None: outside the tree, or missing); lazy: in a function or under `if TYPE_CHECKING`.
Import = namedtuple("Import", "where base name target lazy")
# aliases: local name -> the project module bound to it; attributes: (where, dotted value or None,
# attr) of every `value.attr`; op_makers: (where, maker, its first argument if a string, else None).
Module = namedtuple("Module", "name imports aliases attributes op_makers")


def _dotted(node) -> Optional[str]:
    if isinstance(node, ast.Attribute):
        value = _dotted(node.value)
        return value and f"{value}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else None


def _walk(node, lazy=False):
    """Every node below ``node``, with whether it runs lazily (in a function, under TYPE_CHECKING)."""
    for child in ast.iter_child_nodes(node):
        child_lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
            isinstance(node, ast.If) and child in node.body and (_dotted(node.test) or "").endswith("TYPE_CHECKING"))
        yield child, child_lazy
        yield from _walk(child, child_lazy)


@functools.lru_cache(maxsize=None)
def modules() -> dict:
    """Every module of the tree by dotted name (a package is its ``__init__``), from one AST walk each."""
    paths = {p: ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
             for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}
    names, result = set(paths.values()), {}
    for path, name in paths.items():
        tree = ast.parse(path.read_text(), str(path))
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
        mod = result[name] = Module(name, [], {}, [], [])
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, lazy in _walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                for a in node.names:
                    mod.imports.append(Import(where, a.name, None, a.name if a.name in names else None, lazy))
                    bound, module = (a.asname, a.name) if a.asname else (a.name.split(".")[0],) * 2
                    if module in names:
                        mod.aliases[bound] = module
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = f"{package.rsplit('.', node.level - 1)[0]}.{base}".rstrip(".")
                for a in node.names:
                    sub = f"{base}.{a.name}"  # a submodule, else a name of the module `base`
                    mod.imports.append(Import(where, base, a.name, sub if sub in names else
                                              base if base in names else None, lazy))
                    if sub in names:
                        mod.aliases[a.asname or a.name] = sub
            elif isinstance(node, ast.Attribute):
                mod.attributes.append((where, _dotted(node.value), node.attr))
            elif isinstance(node, ast.Call) and (maker := (_dotted(node.func) or "").rpartition(".")[2]) in OP_MAKERS:
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.JoinedStr):  # f"ns::{name}": its constant prefix
                    arg = arg.values[0] if arg.values else None
                text = arg.value if isinstance(arg, ast.Constant) else constants.get(getattr(arg, "id", None))
                mod.op_makers.append((where, maker, text if isinstance(text, str) else None))
    return result


def _stmt(i: Import) -> str:
    return f"{i.where}: " + (f"from {i.base} import {i.name}" if i.name else f"import {i.base}")


def _in(package: str) -> list:
    return [m for m in modules().values() if m.name.split(".")[0] == package]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _fail_if(offenders, what: str):
    assert not offenders, f"{what}:\n  " + "\n  ".join(sorted(set(offenders)))


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_no_import_cycle():
    edges = {}  # (importer, imported) -> where (its first import)
    for m in modules().values():
        edges.update({(m.name, i.target): i.where for i in reversed(m.imports) if i.target not in (None, m.name)})
    graph = {a: {b for a2, b in edges if a2 == a} for a, _ in edges}

    def reach(start):  # iterative DFS
        seen, stack = set(), [start]
        while stack:
            for nxt in graph.get(stack.pop(), set()) - seen:
                seen.add(nxt)
                stack.append(nxt)
        return seen

    reachable = {m: reach(m) for m in modules()}  # strongly connected: each reaches the other
    cycles = {frozenset(n for n in reachable[m] if m in reachable[n]) for m in modules() if m in reachable[m]}
    _fail_if([" <-> ".join(sorted(c)) + "".join(f"\n      {a} -> {b}  ({w})" for (a, b), w in sorted(edges.items())
                                           if a in c and b in c) for c in cycles if len(c) > 1], "import cycles")


def test_moe_ops_never_imports_moe_modules():
    _fail_if([_stmt(i) for m in _in("moe_ops") for i in m.imports
              if i.base.split(".")[0] == "moe_modules"], "moe_ops imports moe_modules")


def test_backends_never_import_each_other():
    def backend(name):  # None: no backend module (the package, shared `_` helpers, elsewhere)
        part = name[len(BACKENDS):].split(".")[0] if name.startswith(BACKENDS) else "_"
        return None if part.startswith("_") else {"triton_kernels": "triton_backend"}.get(part, part)

    _fail_if([f"{i.where}: {m.name} imports {i.target}" for m in modules().values() for i in m.imports
              if backend(m.name) and backend(i.target or "") not in (None, backend(m.name))],
             "backends importing another backend")


def test_moe_modules_uses_only_public_moe_ops_names():
    import moe_ops

    public = set(moe_ops.__all__)
    bad = [_stmt(i) for m in _in("moe_modules") for i in m.imports  # `import moe_ops.x`, `from moe_ops.x import`
           if i.base.startswith("moe_ops.") or (i.base == "moe_ops" and i.name and i.name not in public)]
    bad += [f"{w}: {v}.{attr}" for m in _in("moe_modules") for w, v, attr in m.attributes
            if m.aliases.get(v) == "moe_ops" and attr not in public]
    _fail_if(bad, "moe_modules uses moe_ops names outside moe_ops.__all__")


def test_no_private_names_across_packages():
    bad = []
    for m in modules().values():
        top = m.name.split(".")[0]
        for i in m.imports:
            parts = i.base.split(".") + [i.name or ""]
            if parts[0] in PACKAGES and parts[0] != top and any(map(_private, parts[1:])):
                bad.append(_stmt(i))
        for where, value, attr in m.attributes:  # `alias.sub._x`, alias bound to a module of the other package
            head, _, rest = (value or "").partition(".")
            module = f"{m.aliases.get(head)}.{rest}".rstrip(".")
            if _private(attr) and module in modules() and module.split(".")[0] != top:
                bad.append(f"{where}: {value}.{attr}")
    _fail_if(bad, "private names used across moe_ops / moe_modules")


def test_no_third_party_accelerator_imports_at_import_time():
    _fail_if([_stmt(i) for m in modules().values() for i in m.imports
              if not i.lazy and i.base.split(".")[0] in ACCELERATORS
              and not (m.name + ".").startswith(LAZY_PACKAGE + ".")], "accelerator imports at import time")
    _run("import moe_ops, moe_modules, sys; "
         f"assert not any(m.split('.')[0] in {ACCELERATORS!r} for m in sys.modules), sorted(sys.modules)")


def test_import_moe_ops_alone_registers_every_op():
    used, foreign = {}, []  # moe op name -> where it is defined or called
    for m in modules().values():
        used.update({attr: w for w, v, attr in m.attributes if v == "torch.ops.moe"})
        for where, maker, text in m.op_makers:
            if text is None:
                if maker != "define":  # define(schema) in the define() helper passes a schema through
                    foreign.append(f"{where}: {maker}(...) whose namespace is no string constant")
                continue
            ns, _, name = text.split("(")[0].rpartition("::")
            if maker == "Library":
                ns, name = text, None
            elif not ns and (maker != "define" or m.name.split(".")[0] != "moe_ops"):
                continue  # no op schema
            if (ns or "moe") != "moe":
                foreign.append(f"{where}: {maker}({text!r}...): namespace {ns!r}, not 'moe'")
            elif name:
                used[name] = where
    registered = set(json.loads(_run(
        "import json, moe_ops, torch; print(json.dumps([n[len('moe::'):].split('.')[0] "
        "for n in torch._C._dispatch_get_all_op_names() if n.startswith('moe::')]))")))
    _fail_if([f"{w}: moe::{n} is not registered by `import moe_ops`" for n, w in used.items() if n not in registered]
             + foreign, "ops outside what `import moe_ops` registers")
