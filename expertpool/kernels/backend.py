"""The kernel backend choice: picks the Triton FP8 kernels or the torch references per call.

Rules, in order:
1. Weights that are not float8_e4m3fn never use a kernel: ``linear`` is ``F.linear`` (weight
   cast to x's dtype), ``moe_experts`` the torch reference.
2. The requested backend is ``use_backend(...)`` if active (a ContextVar, so it is per thread /
   task), else the environment variable ``EXPERTPOOL_KERNELS`` read on every call, else ``auto``.
3. ``auto`` runs Triton for CUDA tensors on compute capability >= 8.9 (FP8 tensor cores) when
   Triton imports, and torch otherwise. ``triton`` forces the kernels (CUDA, or CPU tensors under
   ``TRITON_INTERPRET=1``) and raises if they cannot run; ``torch`` forces the references.

Each distinct choice is logged once (INFO), with its reason. Numerics differ by path on purpose:
the Triton path quantizes activations to e4m3 1x128 groups (W8A8, DeepSeek-V3's inference
recipe); the torch path dequantizes weights and multiplies in x's dtype (W8A16).

Trade-off: one predictable rule instead of per-shape heuristics; the K % 128 constraint of the
FP8 GEMM is the only shape-based fallback (logged once).
"""

import contextlib
import functools
import logging
import os
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from expertpool.kernels import reference as ref
from expertpool.kernels._triton import interpreting, triton_import_error

logger = logging.getLogger(__name__)

ENV_VAR = "EXPERTPOOL_KERNELS"
BACKENDS = ("auto", "torch", "triton")
MIN_FP8_CAPABILITY = (8, 9)  # Ada / Hopper and newer have e4m3 tensor-core MMA

_backend_override: ContextVar[str | None] = ContextVar("expertpool_kernels_backend", default=None)


def _validate_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force ``auto`` | ``torch`` | ``triton`` inside the block (overrides EXPERTPOOL_KERNELS)."""
    token = _backend_override.set(_validate_backend(name, "use_backend(name)"))
    try:
        yield
    finally:
        _backend_override.reset(token)


def requested_backend() -> str:
    override = _backend_override.get()
    if override is not None:
        return override
    return _validate_backend(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto", ENV_VAR)


def select_backend(device: torch.device) -> tuple[str, str]:
    """(``"torch"`` | ``"triton"``, reason) for FP8 work on tensors on ``device``."""
    requested = requested_backend()
    if requested == "torch":
        return "torch", f"requested by use_backend/{ENV_VAR}"
    if requested != "triton" and device.type != "cuda":
        # decided without importing triton: it would cost ~70 MB of resident memory on CPU hosts
        return "torch", f"tensors on {device.type}; FP8 Triton kernels need CUDA"
    error = triton_import_error()
    if requested == "triton":
        if error is not None:
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({error}); "
                               f"install triton or set {ENV_VAR}=torch")
        if interpreting():
            return "triton", "requested, TRITON_INTERPRET=1"
        if device.type != "cuda":
            raise RuntimeError(f"{ENV_VAR}=triton needs CUDA tensors (got {device}) or "
                               f"TRITON_INTERPRET=1; set {ENV_VAR}=torch or auto")
        cap = torch.cuda.get_device_capability(device)
        if cap < MIN_FP8_CAPABILITY:
            raise RuntimeError(f"{ENV_VAR}=triton needs compute capability >= 8.9 for FP8, "
                               f"{torch.cuda.get_device_name(device)} has {cap}; set "
                               f"{ENV_VAR}=torch or auto")
        return "triton", "requested"
    if error is not None:
        return "torch", f"triton unavailable ({error})"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_FP8_CAPABILITY:
        return "torch", f"compute capability {cap} < 8.9 has no FP8 tensor cores"
    return "triton", f"CUDA compute capability {cap}"


@functools.cache
def _log_once(op: str, backend: str, reason: str) -> None:
    logger.info("expertpool.kernels.%s: using %s (%s)", op, backend, reason)


def _choose(op: str, device: torch.device) -> str:
    backend, reason = select_backend(device)
    _log_once(op, backend, reason)
    return backend


def act_quant(x: torch.Tensor, block_size: int = ref.BLOCK_SIZE, scale_fmt: str | None = None):
    if _choose("act_quant", x.device) == "triton":
        from expertpool.kernels import quant
        return quant.act_quant(x, block_size, scale_fmt)
    return ref.act_quant_ref(x, block_size, scale_fmt)


def weight_quant(w: torch.Tensor, block_size: int = ref.BLOCK_SIZE, scale_fmt: str | None = None):
    if _choose("weight_quant", w.device) == "triton":
        from expertpool.kernels import quant
        return quant.weight_quant(w, block_size, scale_fmt)
    return ref.weight_quant_ref(w, block_size, scale_fmt)


def weight_dequant(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block_size: int = ref.BLOCK_SIZE) -> torch.Tensor:
    if _choose("weight_dequant", w.device) == "triton":
        from expertpool.kernels import quant
        return quant.weight_dequant(w, s, dtype, block_size)
    return ref.weight_dequant_ref(w, s, dtype, block_size)


def linear(x: torch.Tensor, weight: torch.Tensor,
           scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for any weight dtype; FP8 weights carry their 128x128 ``scale``."""
    if weight.dtype != torch.float8_e4m3fn:
        return F.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))
    if scale is None:
        raise ValueError("linear: an float8_e4m3fn weight needs its fp32 scale "
                         "(weight_scale_inv, [ceil(N/128), ceil(K/128)])")
    if _choose("linear", x.device) == "torch":
        return ref.linear_ref(x, weight, scale)
    k = x.shape[-1]
    if k % ref.BLOCK_SIZE:
        _log_once("linear", "torch", f"K={k} is not a multiple of {ref.BLOCK_SIZE}")
        return ref.linear_ref(x, weight, scale)
    from expertpool.kernels import fp8_gemm, quant
    a, a_s = quant.act_quant(x.reshape(-1, k))
    y = fp8_gemm.fp8_gemm(a, a_s, weight, scale, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def moe_experts(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    """Routed SwiGLU experts, weighted and summed per token (see package docstring)."""
    fp8 = w13_E2FD.dtype == torch.float8_e4m3fn and w2_EDF.dtype == torch.float8_e4m3fn
    if not fp8 or _choose("moe_experts", x_TD.device) == "torch":
        torch_path = ref.moe_experts_ref if torch.is_grad_enabled() else ref.moe_experts_inference
        return torch_path(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale)
    if x_TD.shape[-1] % ref.BLOCK_SIZE:
        _log_once("moe_experts", "torch", f"D={x_TD.shape[-1]} is not a multiple of "
                  f"{ref.BLOCK_SIZE}")
        return ref.moe_experts_ref(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale,
                                   w2_EDF, w2_scale)
    from expertpool.kernels import fused_moe
    return fused_moe.fused_moe(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF,
                               w2_scale)
