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

from expertpool.kernels import cpu_attention, cpu_gemm, cpu_w8a8
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


def select_backend(device: torch.device, fp8: bool = True) -> tuple[str, str]:
    """(``"torch"`` | ``"triton"``, reason) for kernel work on tensors on ``device``; ``fp8``: the kernel
    needs FP8 tensor cores (compute capability >= 8.9), else any CUDA GPU runs it. The decision for a
    (request, device) pair is made once and cached: a step asks it hundreds of times."""
    return _decide(requested_backend(), device.type, device.index, interpreting(), fp8)


@functools.cache
def _decide(requested: str, device_type: str, index: int | None, interpret: bool, fp8: bool) -> tuple[str, str]:
    if requested == "torch":
        return "torch", f"requested by use_backend/{ENV_VAR}"
    if requested != "triton" and device_type != "cuda":
        # decided without importing triton: it would cost ~70 MB of resident memory on CPU hosts
        return "torch", f"tensors on {device_type}; Triton kernels need CUDA"
    error = triton_import_error()
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if requested == "triton":
        if error is not None:
            raise RuntimeError(f"{ENV_VAR}=triton but triton cannot be imported ({error}); "
                               f"install triton or set {ENV_VAR}=torch")
        if interpret:
            return "triton", "requested, TRITON_INTERPRET=1"
        if device_type != "cuda":
            raise RuntimeError(f"{ENV_VAR}=triton needs CUDA tensors (got {device}) or "
                               f"TRITON_INTERPRET=1; set {ENV_VAR}=torch or auto")
        cap = torch.cuda.get_device_capability(device)
        if fp8 and cap < MIN_FP8_CAPABILITY:
            raise RuntimeError(f"{ENV_VAR}=triton needs compute capability >= 8.9 for FP8, "
                               f"{torch.cuda.get_device_name(device)} has {cap}; set "
                               f"{ENV_VAR}=torch or auto")
        return "triton", "requested"
    if error is not None:
        return "torch", f"triton unavailable ({error})"
    cap = torch.cuda.get_device_capability(device)
    if fp8 and cap < MIN_FP8_CAPABILITY:
        return "torch", f"compute capability {cap} < 8.9 has no FP8 tensor cores"
    return "triton", f"CUDA compute capability {cap}"


@functools.cache
def _log_once(op: str, backend: str, reason: str) -> None:
    logger.info("expertpool.kernels.%s: using %s (%s)", op, backend, reason)


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning("expertpool.kernels: %s", message)


def _choose(op: str, device: torch.device, fp8: bool = True) -> str:
    backend, reason = select_backend(device, fp8)
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


def linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
           act_scale_fmt: str | None = None) -> torch.Tensor:
    """``x @ W.T`` for any weight format: dense (fp32/bf16), int8 weight-only with per-row ``scale``
    [N], or FP8 with its 128x128 ``scale``. ``act_scale_fmt`` is the activation scale format of the
    W8A8 FP8 path (None or "ue8m0")."""
    if weight.dtype == torch.int8:
        return int8_linear(x, weight, scale)
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
    a, a_s = quant.act_quant(x.reshape(-1, k), scale_fmt=act_scale_fmt)
    y = fp8_gemm.fp8_gemm(a, a_s, weight, scale, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


def int8_linear(x: torch.Tensor, w_NK: torch.Tensor, scale_N: torch.Tensor) -> torch.Tensor:
    """Weight-only int8 (symmetric, one scale per output row): ``x @ (w * scale[:, None]).T``. On CPU
    ``torch._weight_int8pack_mm`` widens the int8 weights in registers and accumulates in fp32, so
    the weights are read once at a quarter of their fp32 bytes; its fast path takes bf16 activations
    (fp32 ones are converted for the call; measured faster than the fp32 variant of the op)."""
    assert scale_N is not None and scale_N.shape == w_NK.shape[:1], "int8 weights need one scale per row"
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32):
        y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), w_NK, scale_N.to(torch.bfloat16))
    else:
        y = F.linear(x2, w_NK.to(x.dtype)) * scale_N.to(x.dtype)
    return y.to(x.dtype).view(*x.shape[:-1], w_NK.shape[0])


def fast_paths() -> bool:
    """Whether the CPU fast paths apply (pre-packed oneDNN weights, the tuned expert loop): always,
    unless the pure-torch references are requested (``use_backend("torch")``, ``EXPERTPOOL_KERNELS=torch``),
    which is how tests run the reference path beside them."""
    return requested_backend() != "torch"


def pack_weight(w_NK: torch.Tensor, w8a8: bool = False) -> torch.Tensor | cpu_gemm.Packed | cpu_w8a8.Packed8 | None:
    """A dense [N, K] CPU weight packed once for ``packed_linear``, None (logged once) where nothing can
    pack it. bf16 where the CPU has the bf16 dot product (AVX512_BF16): ``cpu_gemm``'s layout (the
    kernel reads the weights once per row tile with software prefetch; at 16 rows 0.74-0.99x oneDNN's
    time on bench-mini's projections and head, 0.97-1.01x at 64-512 rows). Otherwise oneDNN's layout
    (fp32: oneDNN is 1.05-1.3x faster than the kernel's fp32 path at 16 rows, 1.4-1.6x at 256). Packing
    once at load instead of inside every call: measured 1.3x (bf16) to 2.4x (fp32) on bench-mini's
    lm_head and attention projections at decode batch sizes. ``w8a8``: int8 weights for the int8 dot
    product (``cpu_w8a8``, ``weight_dtype: w8a8``) where it can take them; else as above, logged once."""
    if w8a8:
        packed8 = cpu_w8a8.pack(w_NK)
        if packed8 is not None:
            return packed8
        why = ("the CPU kernels have no AVX512_VNNI build" if not cpu_w8a8.available() else
               f"a [{w_NK.shape[0]}, {w_NK.shape[-1]}] weight (needs K % 128 == 0 and N % 16 == 0)")
        _warn_once(f"weight_dtype w8a8: {why}; this linear keeps the compute dtype's pack")
    if w_NK.dtype == torch.bfloat16 and w_NK.device.type == "cpu" and w_NK.dim() == 2:
        packed = cpu_gemm.pack(w_NK.detach().t().unsqueeze(0))
        if packed is not None:
            return packed
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w_NK.detach(), None)
    except RuntimeError as e:
        _log_once("pack_weight", "plain F.linear", f"oneDNN cannot pack {w_NK.dtype}: {str(e).splitlines()[0]}")
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor | cpu_gemm.Packed) -> torch.Tensor | None:
    """``x @ W.T`` with W in ``pack_weight``'s layout (CPU, no autograd); None where the layout's kernel
    is switched off (``cpu_gemm.switched_off()``: the caller takes the plain weight). oneDNN's rows are
    padded to a ``row_bucket`` (``reference.pad_rows``) so that oneDNN sees few problem shapes; the
    kernel's rows do not depend on their batch and need no padding."""
    if isinstance(packed, cpu_w8a8.Packed8):
        return cpu_w8a8.linear(x, packed)
    x2 = x.reshape(-1, x.shape[-1])
    if isinstance(packed, cpu_gemm.Packed):
        x3 = x2[:, None]
        if not cpu_gemm.applies(x3, packed):
            return None
        return cpu_gemm.per_head(x3, packed).view(*x.shape[:-1], packed.n)
    x2, n = ref.pad_rows(x2, ref.row_bucket(x2.shape[0]))
    y = torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    return (y[:n] if x2.shape[0] > n else y).view(*x.shape[:-1], y.shape[-1])


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
          scoring: str = "sigmoid", norm_topk_prob: bool = True, scale: float = 1.0, need_scores: bool = True):
    """DeepSeek-V3 expert selection from fp32 router logits: (weights_TK fp32, ids_TK, scores_TE or None).
    The fused Triton router when nothing needs the score matrix or gradients (serving), else the
    reference (``reference.route_ref``)."""
    if not need_scores and not torch.is_grad_enabled() and \
            _choose("route", logits_TE.device, fp8=False) == "triton":
        from expertpool.kernels import router
        if router.supported(logits_TE.shape[1], n_group, top_k):
            w_TK, ids_TK = router.route(logits_TE.contiguous(), bias_E, n_group, topk_group, top_k, scoring,
                                        norm_topk_prob, scale)
            return w_TK, ids_TK, None
        _log_once("route", "torch", f"E={logits_TE.shape[1]}, n_group={n_group}: shapes the fused router "
                  "does not take")
    return ref.route_ref(logits_TE, bias_E, n_group, topk_group, top_k, scoring, norm_topk_prob, scale)


def paged_mla_decode(q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, scale: float, block_size: int,
                     max_len: int, padded=None):
    """Absorbed-MLA decode attention over a paged latent cache (see ``mla_decode``); ``padded()``
    supplies the torch path's (slots_BT, valid_BT) when the caller caches them across layers."""
    if not torch.is_grad_enabled() and fast_paths() and cpu_attention.applies(q_abs_BHC, q_pe_BHR, cache_PX):
        _log_once("paged_mla_decode", "the CPU kernel", f"csrc/mla_decode.c; {cpu_attention.ENV_SWITCH}=0 for torch")
        return cpu_attention.mla_decode(q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, scale, block_size)
    if _choose("paged_mla_decode", q_abs_BHC.device, fp8=False) == "triton":
        from expertpool.kernels import mla_decode
        return mla_decode.paged_mla_decode(q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, scale,
                                           block_size)
    return ref.paged_mla_decode_ref(q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, scale, block_size,
                                    max_len, padded)


def moe_experts(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale, scale_fmt=None):
    """Routed SwiGLU experts, weighted and summed per token (see package docstring). ``scale_fmt``:
    the activation scale format of the W8A8 path (DeepSeek applies the checkpoint's to the experts)."""
    fp8 = w13_E2FD.dtype == torch.float8_e4m3fn and w2_EDF.dtype == torch.float8_e4m3fn
    if not fp8 or _choose("moe_experts", x_TD.device) == "torch":
        fast = not torch.is_grad_enabled() and fast_paths()
        torch_path = ref.moe_experts_inference if fast else ref.moe_experts_ref
        return torch_path(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale)
    if x_TD.shape[-1] % ref.BLOCK_SIZE:
        _log_once("moe_experts", "torch", f"D={x_TD.shape[-1]} is not a multiple of "
                  f"{ref.BLOCK_SIZE}")
        return ref.moe_experts_ref(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale,
                                   w2_EDF, w2_scale)
    from expertpool.kernels import fused_moe
    return fused_moe.fused_moe(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF,
                               w2_scale, scale_fmt=scale_fmt)
