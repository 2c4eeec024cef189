"""Markers and fixtures for the kernel tests.

The Triton CPU-interpreter tests live in ``interp_*.py`` (a name pytest does not collect on its
own). ``test_kernels_interpreter.py`` runs each of them in a fresh subprocess with
``TRITON_INTERPRET=1`` set before Triton is imported, because Triton fixes compile-or-interpret
for its standard library at import time and other tests in this session (or torch, deepspeed)
may already have imported it. Run one directly with
``TRITON_INTERPRET=1 python -m pytest tests/kernels/interp_quant.py``.

Markers shared by the modules live in ``kernel_oracles.py`` (``from conftest import`` would be
ambiguous: there is a ``conftest`` module per folder).
"""

import pytest
import torch


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
