"""The ``moe`` custom ops, one file per step of the expert block.

Each file defines its op(s) with :func:`moe_ops._library.define` (schema, a kernel that validates
and asks the registry for a backend, the fake, the autograd formula) and a short public wrapper
with the docstring.
"""
