"""Runs every ``interp_*.py`` module in a subprocess under ``TRITON_INTERPRET=1`` (see conftest.py).

One test per module; on failure the child's pytest output is shown. The child is pinned to the
CPU (``CUDA_VISIBLE_DEVICES=""``) and to the automatic backend choice.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.kernel_oracles import requires_triton

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
MODULES = sorted(p.name for p in HERE.glob("interp_*.py"))
CHILD_TIMEOUT_S = 300


def test_interpreter_modules_exist():
    expected = {"interp_quant.py", "interp_gemm.py", "interp_moe.py", "interp_backend.py"}
    assert expected <= set(MODULES)


@requires_triton
@pytest.mark.parametrize("module", MODULES)
def test_interpreter_module(module):
    env = {k: v for k, v in os.environ.items() if k != "EXPERTPOOL_KERNELS"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
         str(HERE / module)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} failed under TRITON_INTERPRET=1:\n{out}"
    assert " passed" in out and "skipped" not in out, f"{module} ran nothing or skipped:\n{out}"
