"""RMSNorm on CPU in one call: ``csrc/rms_norm.c``, in the library ``cpu_experts`` builds.

``layers.RMSNorm`` is eight torch ops; a bench-mini decode step runs 17 norms of 16 rows, and each op
costs more to dispatch than to compute (a step with the norms cut to one op each ran ~0.8 ms faster of
~18-20). The kernel computes the same expression in the same roundings (fp32, rounded to the input's
dtype after the scaling and after the weight); only the order of the sum of squares is its own. It
runs outside autograd with the fast paths on; ``switched_off()`` or ``EXPERTPOOL_CPU_NORM_KERNEL=0``
keeps the torch ops.
"""

from __future__ import annotations

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_NORM_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "RMSNorm runs as torch ops")
switched_off = SWITCH.off  # the torch ops inside the block (tests and A/B benchmarks)


def applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``rms_norm`` serves this call: CPU, fp32 or bf16 rows with unit stride along the last dim
    and a uniform row stride, the weight of that length, no autograd, not switched off, library built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 1
            and x.stride(-1) == 1 and w.device.type == "cpu" and w.shape == (x.shape[-1],)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and _rows_stride(x) is not None and SWITCH.on() and cpu_experts.library() is not None)


def _rows_stride(x: torch.Tensor) -> int | None:
    """The stride between consecutive rows when x's leading dims flatten to rows of one stride."""
    if x.dim() == 1:
        return x.shape[0]
    stride = x.stride(-2)
    expect = stride
    for size, st in zip(reversed(x.shape[:-1]), reversed(x.stride()[:-1])):
        if size != 1 and st != expect:
            return None
        expect *= size
    return stride


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, lib=None) -> torch.Tensor:
    """``w * x / sqrt(mean(x^2) + eps)`` over the last dim, in x's dtype (see the module docstring); w is
    taken in x's dtype."""
    lib = lib or cpu_experts.library()
    D = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype)
    rows = out.numel() // D if D else 0
    if rows == 0:
        return out
    w = w.to(x.dtype).contiguous()
    lib.rms_norm(x.data_ptr(), _rows_stride(x), int(x.dtype == torch.bfloat16), w.data_ptr(), rows, D,
                 float(eps), out.data_ptr())
    return out
