"""Guarded Triton import: ``import expertpool.kernels`` and the torch path work without Triton.

``triton_import_error()`` is ``None`` when ``triton`` and ``triton.language`` import, else the
reason (``backend`` logs it once and uses the torch references). Kernel modules (``quant``,
``fp8_gemm``, ``fused_moe``) import Triton at their top and are themselves imported only when
the Triton path runs, or by tests that skip without Triton.

``TRITON_INTERPRET=1`` must be in the environment *before the process imports triton*: Triton
decides compile-or-interpret for its own ``tl.max``/``tl.cdiv``... at import time, so the CPU
interpreter tests run in a subprocess (``tests/kernels/test_kernels_interpreter.py``).
"""

import contextlib
import functools
import os
from contextvars import ContextVar


@functools.cache
def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # a broken install raises ImportError, OSError, RuntimeError, ...
        return f"{type(exc).__name__}: {exc}"
    return None


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (CPU tensors are then accepted)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Observers of Triton launches (``counting.OpCounter``): callables kernel -> context manager, wrapped
# around each launch, innermost last (nested counters all see it). A ContextVar, so it is scoped to the
# counting block and costs one lookup otherwise.
_launch_observers: ContextVar[tuple] = ContextVar("expertpool_launch_observers", default=())


@contextlib.contextmanager
def observe_launches(observer):
    token = _launch_observers.set(_launch_observers.get() + (observer,))
    try:
        yield
    finally:
        _launch_observers.reset(token)


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``: every Triton launch of ``expertpool.kernels`` goes through here."""
    observers = _launch_observers.get()
    if not observers:
        return kernel[grid](*args, **kwargs)
    with contextlib.ExitStack() as stack:
        for observe in observers:
            stack.enter_context(observe(kernel))
        return kernel[grid](*args, **kwargs)
