"""Counting what a piece of torch code costs the host: kernel ops and host reads (device syncs).

``OpCounter`` is a context manager (a ``TorchDispatchMode`` plus a ``TorchFunctionMode``) used by the
tests and the benchmarks alike, so every number quoted for "ops per decode step" comes from one
definition:

- **op**: every aten op that would launch a kernel, plus every Triton launch made through
  ``expertpool.kernels`` (``_triton.launch``). Views and aliases (``view``, ``split``, ``transpose``,
  a slice) and allocations (``empty*``) launch nothing and are not counted. What the Triton CPU
  interpreter does inside a launch (numpy round trips) is not counted either: one launch is one op.
- **host read**: the host needs a device value before it can go on, which on CUDA is a sync:
  reading values (``tolist``, ``numpy``, ``item``, ``bool``/``int``/``float`` of a tensor), copies to
  the CPU of a tensor on another device, and ops whose output *size* depends on the data (``nonzero``,
  ``bincount``, ``masked_select``, ``unique``, boolean-mask indexing, ``repeat_interleave`` without
  ``output_size``): CUDA computes the size on the device and copies it back.

Everything is counted on CPU tensors as well: the counts are structural (which ops the code issues),
so a CPU run of the GPU code path (Triton kernels under ``TRITON_INTERPRET=1``) counts what a GPU
run would launch and sync. Per-op names are kept (``ops_by_name``, ``reads_by_name``) so a test
failure says what to cut.

Trade-off: counting is by op, not by measured launch; a fused aten op that runs two kernels counts
once, and a host read that CUDA would overlap with other work counts in full.
"""

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from expertpool.kernels import _triton

# allocations and autograd/metadata-only ops: no kernel runs
_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
              "detach_", "alias", "_unsafe_view"}
_SIZE_SYNCS = {"nonzero", "bincount", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
               "argwhere", "nonzero_static"}


def _is_view(func) -> bool:
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


def _reads_host(func, args, kwargs, out) -> bool:
    name = func._schema.name.split("::")[-1]
    if name == "_local_scalar_dense":
        return True
    if name in _SIZE_SYNCS:
        return True
    if name == "repeat_interleave" and kwargs.get("output_size") is None and len(args) < 3:
        return True
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices)
    if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
        src = args[1] if name == "copy_" else args[0]
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and out.device.type == "cpu"
    return False


class OpCounter:
    """``with OpCounter() as c: ...``, then ``c.ops``, ``c.host_reads`` and the per-name counters."""

    def __init__(self):
        self.ops = 0
        self.host_reads = 0
        self.launches = 0
        self.ops_by_name: collections.Counter = collections.Counter()
        self.reads_by_name: collections.Counter = collections.Counter()
        self._in_launch = 0
        self._stack = contextlib.ExitStack()

    # -- what the modes report
    def _op(self, func, args, kwargs, out) -> None:
        if self._in_launch:
            return
        name = func._schema.name.split("::")[-1]
        if _reads_host(func, args, kwargs, out):
            self.host_reads += 1
            self.reads_by_name[name] += 1
        if name in _NO_KERNEL or _is_view(func):
            return
        self.ops += 1
        self.ops_by_name[name] += 1

    def _read(self, name: str) -> None:
        if not self._in_launch:
            self.host_reads += 1
            self.reads_by_name[name] += 1

    @contextlib.contextmanager
    def _launch(self, kernel):
        if not self._in_launch:
            self.ops += 1
            self.launches += 1
            self.ops_by_name[f"triton:{getattr(kernel, '__name__', kernel)}"] += 1
        self._in_launch += 1
        try:
            yield
        finally:
            self._in_launch -= 1

    # -- context manager
    def __enter__(self) -> "OpCounter":
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                counter._op(func, args, kwargs, out)
                return out

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in ("tolist", "numpy"):  # no aten op on CPU tensors; a sync on CUDA ones
                    counter._read(name)
                return func(*args, **(kwargs or {}))

        self._stack.enter_context(_triton.observe_launches(self._launch))
        self._stack.enter_context(_Function())
        self._stack.enter_context(_Dispatch())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def summary(self, top: int = 12) -> str:
        ops = ", ".join(f"{n} {c}" for n, c in self.ops_by_name.most_common(top))
        reads = ", ".join(f"{n} {c}" for n, c in self.reads_by_name.most_common())
        return f"{self.ops} ops ({ops}); {self.host_reads} host reads ({reads or 'none'})"

