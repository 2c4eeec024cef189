"""Triton block-scaled FP8 GEMM: ``C[M, N] = (A * a_s) @ (B * b_s).T`` (DeepSeek-V3 / DeepGEMM NT).

Contract: A e4m3 ``[M, K]`` with 1x128 fp32 scales ``a_s [M, K/128]`` (from ``act_quant``);
B e4m3 ``[N, K]`` with 128x128 fp32 scales ``b_s [ceil(N/128), K/128]`` (HF ``weight_scale_inv``);
C ``[M, N]`` in bf16, fp16 or fp32. K must be a multiple of 128; any M >= 0 (including 1) and any
N (576, ...). Both operands row-major in their last dim. Reference: ``fp8_gemm_ref``.

Numerics: each 128-wide K block is one fp8 ``tl.dot`` with an fp32 result, scaled by
``a_s[m, kb] * b_s[n // 128, kb]`` and added to an fp32 accumulator ("promotion every 128 K",
paper N_C = 128). BLOCK_K is therefore fixed to the scale block; BLOCK_N must divide 128 so a tile
sees one B scale per K block.

Trade-off: masked edges instead of DeepSeek's ``% M`` wrap-around (same cost, no duplicate reads
at N = 576); no split-K or persistent schedule, so decode (M <= 64) on wide-K shapes is latency
bound. Block sizes come from ``configs/fp8_gemm.json``.

Shape legend: M rows of A (tokens), N output features, K input features, KB = K / 128.
"""

import torch
import triton
import triton.language as tl

from expertpool.kernels import tuned
from expertpool.kernels._triton import launch
from expertpool.kernels.quant import row_major
from expertpool.kernels.reference import BLOCK_SIZE, fp8_gemm_ref  # noqa: F401  (the reference)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_s_ptrs = a_s_ptr + offs_m * stride_asm
    b_s_ptrs = b_s_ptr + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + kb, mask=mask_m, other=0.0)
        b_s = tl.load(b_s_ptrs + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def check_block_config(cfg: dict) -> None:
    """Invariants every config (JSON or test override) must meet."""
    for key in ("BLOCK_M", "BLOCK_N"):
        v = cfg[key]
        assert v >= 16 and v & (v - 1) == 0, f"{key}={v} must be a power of two >= 16 (tl.dot)"
    assert BLOCK_SIZE % cfg["BLOCK_N"] == 0, f"BLOCK_N={cfg['BLOCK_N']} must divide {BLOCK_SIZE}"


def _check_fp8_operand(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float8_e4m3fn:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"fp8_gemm: {name} must be a torch.float8_e4m3fn tensor, got {got}")
    if t.dim() != 2:
        raise ValueError(f"fp8_gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
    if not row_major(t):
        raise ValueError(f"fp8_gemm: {name} must be row-major with unit stride in its last dim "
                         f"(got strides {t.stride()}); pass {name}.contiguous()")


def _check_scale(name: str, s: torch.Tensor, shape: tuple[int, int]) -> None:
    if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
        got = s.dtype if isinstance(s, torch.Tensor) else type(s).__name__
        raise TypeError(f"fp8_gemm: {name} must be a torch.float32 tensor, got {got}")
    if tuple(s.shape) != shape or not row_major(s):
        raise ValueError(f"fp8_gemm: {name} must be a row-major {shape} tensor, got shape "
                         f"{tuple(s.shape)} strides {s.stride()}")


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """e4m3 A [M, K] (1x128 scales) x e4m3 B [N, K] (128x128 scales) -> ``out_dtype`` [M, N]."""
    _check_fp8_operand("a", a)
    _check_fp8_operand("b", b)
    (m, k), (n, kb_k) = a.shape, b.shape
    if k != kb_k:
        raise ValueError(f"fp8_gemm: a is [M={m}, K={k}] but b is [N={n}, K={kb_k}]")
    if k % BLOCK_SIZE:
        raise ValueError(f"fp8_gemm: K={k} must be a multiple of {BLOCK_SIZE}")
    kb = k // BLOCK_SIZE
    _check_scale("a_s", a_s, (m, kb))
    _check_scale("b_s", b_s, (triton.cdiv(n, BLOCK_SIZE), kb))
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"fp8_gemm: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    devices = {t.device for t in (a, a_s, b, b_s)}
    if len(devices) != 1:
        raise ValueError(f"fp8_gemm: a, a_s, b, b_s must share one device, got {devices}")

    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    cfg = config or tuned.get_config("fp8_gemm", tuned.gemm_shape_key(n, k), m, a.device)
    check_block_config(cfg)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(n, cfg["BLOCK_N"]))
    launch(_fp8_gemm_kernel, grid, a, b, c, a_s, b_s, m, n, k, a.stride(0), b.stride(0), c.stride(0),
           a_s.stride(0), b_s.stride(0), BLOCK_M=cfg["BLOCK_M"],
           BLOCK_N=cfg["BLOCK_N"], BLOCK_K=BLOCK_SIZE,
           num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    return c

