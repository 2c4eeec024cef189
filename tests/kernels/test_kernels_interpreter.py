"""Runs every ``interp_*.py`` module under ``TRITON_INTERPRET=1`` (see conftest.py).

All modules run in one subprocess (one import of torch and Triton instead of one per module: 48 s
instead of 110 s for the eight modules on the 2-core CI machine), which writes a JUnit report; there
is still one test per module, which fails with that module's failures and the child's output. The
child is pinned to the CPU (``CUDA_VISIBLE_DEVICES=""``) and to the automatic backend choice.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.kernels.kernel_oracles import requires_triton

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
MODULES = sorted(p.name for p in HERE.glob("interp_*.py"))
CHILD_TIMEOUT_S = 900


def test_interpreter_modules_exist():
    expected = {"interp_quant.py", "interp_gemm.py", "interp_moe.py", "interp_backend.py"}
    assert expected <= set(MODULES)


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    """One child pytest over every module: (its output, {module: [(test, outcome, detail)]})."""
    report = tmp_path_factory.mktemp("interp") / "report.xml"
    env = {k: v for k, v in os.environ.items() if k != "EXPERTPOOL_KERNELS"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", f"--junitxml={report}",
         *(str(HERE / m) for m in MODULES)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert report.exists(), f"the interpreter run wrote no report (exit {proc.returncode}):\n{out}"
    results: dict[str, list[tuple[str, str, str]]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1] + ".py"
        outcome, detail = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome, detail = tag, (el.get("message") or "") + "\n" + (el.text or "")
                break
        results.setdefault(module, []).append((case.get("name"), outcome, detail))
    return out, results


@requires_triton
@pytest.mark.parametrize("module", MODULES)
def test_interpreter_module(module, interpreter_run):
    out, results = interpreter_run
    cases = results.get(module)
    assert cases, f"{module} ran nothing under TRITON_INTERPRET=1:\n{out}"
    bad = [(name, outcome, detail) for name, outcome, detail in cases if outcome != "passed"]
    assert not bad, f"{module} under TRITON_INTERPRET=1: " + "\n\n".join(
        f"{name}: {outcome}\n{detail}" for name, outcome, detail in bad)
