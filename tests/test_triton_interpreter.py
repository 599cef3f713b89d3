"""Runs the Triton kernel checks (``interpreted_triton_kernels.py``) in Triton's interpreter on the CPU.

A fresh process with ``TRITON_INTERPRET=1`` from the start (see that file's docstring for why).
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (pip install triton)")
def test_every_triton_kernel_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(HERE / "interpreted_triton_kernels.py")]
    proc = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1200)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"interpreted Triton kernel checks failed:\n{tail}"
    assert " passed" in proc.stdout and "no tests ran" not in proc.stdout, tail
