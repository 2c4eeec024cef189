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

import shutil
import subprocess
from pathlib import Path

import pytest
import torch


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="session")
def avx2_lib(tmp_path_factory):
    """The CPU kernels' library built for an AVX2-only CPU (8-lane vectors, no bf16 dot product), loaded
    here: built once per session for every test of that code path."""
    if shutil.which("cc") is None or "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("needs a C compiler and a CPU with AVX2 to run the AVX2 build")
    from expertpool.kernels import cpu_experts
    so = tmp_path_factory.mktemp("avx2") / "avx2.so"
    flags = ["-O3", "-mavx2", "-mfma", "-mno-avx512f", "-fopenmp", "-shared", "-fPIC"]
    r = subprocess.run(cpu_experts.compile_command("cc", flags, so), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return cpu_experts._load(so)
