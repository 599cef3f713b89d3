"""The ``moe`` custom ops, one file per step of the expert block.

Each file defines its op(s) with ``torch.library.custom_op`` (the real
implementation asks the registry for a kernel), the fake right beside it, the
autograd formula, and a short public wrapper with the docstring.
"""
