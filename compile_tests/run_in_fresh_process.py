"""Load saved programs in a fresh Python process that imports only ``moe_ops`` and run them.

``python run_in_fresh_process.py JOBS OUT``: ``JOBS`` is a ``torch.save``d list of
``{"name", "kind": "export" | "aoti", "path", "inputs": {T: (x, token_mask, weights, indices)}}``;
``OUT`` receives ``{"moe_modules_imported": bool, "outputs": {name: {T: y}}}``.
Run by compile_tests/test_export.py and test_aoti.py; not a test itself.
"""

from __future__ import annotations

import sys

import torch

import moe_ops  # noqa: F401  (registers torch.ops.moe.*: loading a program needs it, nothing else)


def load(kind: str, path: str):
    if kind == "export":
        return torch.export.load(path).module()
    if kind == "aoti":
        return torch._inductor.aoti_load_package(path)
    raise ValueError(f"kind: expected 'export' or 'aoti', got {kind!r}")


def main(jobs_path: str, out_path: str) -> None:
    outputs = {}
    for job in torch.load(jobs_path):
        program = load(job["kind"], job["path"])
        with torch.no_grad():
            outputs[job["name"]] = {T: program(*inputs) for T, inputs in job["inputs"].items()}
    torch.save({"moe_modules_imported": "moe_modules" in sys.modules, "outputs": outputs}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
