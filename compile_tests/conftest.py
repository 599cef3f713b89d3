"""Fixtures shared by compile_tests/ (builders live in compile_tests/builders.py)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_cpu_thread():
    """One intra-op thread: the shapes here are tiny, and on a loaded 2-core CI runner a second
    OpenMP thread only adds spin-waiting (single tiny ops were seen taking 100 ms instead of 0.1 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts from empty Dynamo caches, so no compiled frame or recompile budget leaks
    between tests (the modules share their forward's code object)."""
    torch._dynamo.reset()
    yield
