"""Triton FP8 block quantization: ``act_quant`` (1x128 groups), ``weight_quant`` (128x128 blocks)
and ``weight_dequant``, each beside its torch reference in ``reference.py``.

Contract: bit-exact with ``act_quant_ref`` / ``weight_quant_ref`` (e4m3 codes and fp32 scales),
including ``scale_fmt="ue8m0"`` and all-zero groups (amax floored at ``AMAX_FLOOR``, so scales
are ``1e-4/448`` and codes 0, never NaN). ``weight_dequant`` is exact in fp32.

One kernel serves both quantizers: a program loads a ``BLOCK_R x BLOCK_C`` tile and takes the amax
per row (``PER_ROW``, activations) or over the whole tile (weights; masked edge tiles read as zero,
the reference's zero padding). Scales use IEEE division (``tl.div_rn``) like torch.

Trade-off: values are rounded to e4m3 *explicitly* in fp32 (round to nearest even on the 3-bit
mantissa, via floor and integer bit tricks) and only then cast, so the cast is exact everywhere.
Triton's CPU interpreter does not carry a mantissa overflow into the exponent when it casts
fp32 -> fp8 (124.7 becomes 64, not 128), and the tests run there. The extra ~15 ALU ops per
element are free in a memory-bound kernel. Values saturate at 448 (unreachable: |x|/s <= 448).

Shape legend: R rows (tokens, or weight rows N), C columns (K), G = C / 128 groups.
"""

import torch
import triton
import triton.language as tl

from expertpool.kernels._triton import launch
from expertpool.kernels.reference import AMAX_FLOOR, BLOCK_SIZE, FP8_E4M3_MAX

_FP8_MAX = tl.constexpr(FP8_E4M3_MAX)
_AMAX_FLOOR = tl.constexpr(AMAX_FLOOR)
_E4M3_MANTISSA_BITS = tl.constexpr(3)
_E4M3_MIN_NORMAL_EXP = tl.constexpr(-6)  # below 2**-6 e4m3 is subnormal: fixed step 2**-9
_F32_MANTISSA_BITS = tl.constexpr(23)
_F32_EXP_BIAS = tl.constexpr(127)
_F32_SIGN_MASK = tl.constexpr(-2147483648)  # 0x80000000 as int32
_F32_ABS_MASK = tl.constexpr(0x7FFFFFFF)
_F32_MANTISSA_MASK = tl.constexpr(0x7FFFFF)

ACT_BLOCK_ROWS = 16  # rows per program for act_quant (each row has its own scale)
WEIGHT_TILE_WARPS = 8  # 128x128 fp32 tiles: 64 values per thread instead of 128 with 4 warps
SUPPORTED_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
SCALE_FMTS = (None, "ue8m0")


@triton.jit
def _block_quant_kernel(x_ptr, y_ptr, s_ptr, R, C, stride_xr, stride_yr, stride_sr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                        PER_ROW: tl.constexpr, UE8M0: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xr + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)

    if PER_ROW:
        amax = tl.max(tl.abs(x), axis=1)  # [BLOCK_R]
    else:
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)  # scalar
    s = tl.div_rn(tl.maximum(amax, _AMAX_FLOOR), _FP8_MAX)
    if UE8M0:  # round the scale up to a power of two: bump the exponent if any mantissa bit is set
        s_bits = s.to(tl.int32, bitcast=True)
        s_exp = (s_bits >> _F32_MANTISSA_BITS) + ((s_bits & _F32_MANTISSA_MASK) != 0).to(tl.int32)
        s = (s_exp << _F32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    if PER_ROW:
        v = tl.div_rn(x, s[:, None])
    else:
        v = tl.div_rn(x, s)

    # Round v to the nearest e4m3 value (ties to even) in fp32, so the final cast is exact.
    v_bits = v.to(tl.int32, bitcast=True)
    a_bits = v_bits & _F32_ABS_MASK
    a = a_bits.to(tl.float32, bitcast=True)
    e = tl.maximum((a_bits >> _F32_MANTISSA_BITS) - _F32_EXP_BIAS, _E4M3_MIN_NORMAL_EXP)
    step_exp = e - _E4M3_MANTISSA_BITS  # value of one mantissa step is 2**step_exp
    step = ((step_exp + _F32_EXP_BIAS) << _F32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    inv_step = ((-step_exp + _F32_EXP_BIAS) << _F32_MANTISSA_BITS).to(tl.float32, bitcast=True)
    u = a * inv_step  # exact (power of two), in [0, 16)
    n = tl.floor(u)
    frac = u - n
    odd = (n.to(tl.int32) & 1) == 1
    n = tl.where((frac > 0.5) | ((frac == 0.5) & odd), n + 1.0, n)
    r = tl.minimum(n * step, _FP8_MAX)
    r = ((r.to(tl.int32, bitcast=True) | (v_bits & _F32_SIGN_MASK))).to(tl.float32, bitcast=True)

    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :],
             r.to(y_ptr.dtype.element_ty), mask=mask)
    if PER_ROW:
        tl.store(s_ptr + rows * stride_sr + pid_c, s, mask=rows < R)
    else:
        tl.store(s_ptr + pid_r * stride_sr + pid_c, s)


@triton.jit
def _weight_dequant_kernel(w_ptr, s_ptr, y_ptr, R, C, stride_wr, stride_sr, stride_yr,
                           BLOCK: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK + tl.arange(0, BLOCK)
    cols = pid_c * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_wr + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_r * stride_sr + pid_c)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_yr + cols[None, :],
             (w * s).to(y_ptr.dtype.element_ty), mask=mask)


def row_major(t: torch.Tensor) -> bool:
    """Unit stride in the last dim (strides of empty or size-1 dims do not matter)."""
    return t.numel() == 0 or t.shape[-1] == 1 or t.stride(-1) == 1


def _check_block_size(block_size: int) -> None:
    if block_size <= 0 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a positive power of two, got {block_size}")


def _check_scale_fmt(scale_fmt) -> None:
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def act_quant(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[..., K] float -> (e4m3 [..., K], fp32 scales [..., K/block_size])."""
    if x.dtype not in SUPPORTED_FLOAT_INPUTS:
        raise TypeError(f"act_quant: x must be one of {SUPPORTED_FLOAT_INPUTS}, got {x.dtype}")
    _check_block_size(block_size)
    _check_scale_fmt(scale_fmt)
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(f"act_quant: x's last dim must be a multiple of {block_size}, "
                         f"got shape {tuple(x.shape)}")
    k = x.shape[-1]
    x_RC = x.reshape(-1, k)
    if not row_major(x_RC):
        x_RC = x_RC.contiguous()
    r = x_RC.shape[0]
    y_RC = torch.empty((r, k), dtype=torch.float8_e4m3fn, device=x.device)
    s_RG = torch.empty((r, k // block_size), dtype=torch.float32, device=x.device)
    if r:
        grid = (triton.cdiv(r, ACT_BLOCK_ROWS), k // block_size)
        launch(_block_quant_kernel, grid, x_RC, y_RC, s_RG, r, k, x_RC.stride(0), y_RC.stride(0),
               s_RG.stride(0), BLOCK_R=ACT_BLOCK_ROWS, BLOCK_C=block_size,
               PER_ROW=True, UE8M0=scale_fmt == "ue8m0")
    return y_RC.view(x.shape), s_RG.view(*x.shape[:-1], k // block_size)


def weight_quant(w: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[N, K] float -> (e4m3 [N, K], fp32 [ceil(N/b), ceil(K/b)]); edges need not be multiples."""
    if w.dtype not in SUPPORTED_FLOAT_INPUTS:
        raise TypeError(f"weight_quant: w must be one of {SUPPORTED_FLOAT_INPUTS}, got {w.dtype}")
    if w.dim() != 2:
        raise ValueError(f"weight_quant: w must be 2-D [N, K], got shape {tuple(w.shape)}")
    _check_block_size(block_size)
    _check_scale_fmt(scale_fmt)
    if not row_major(w):
        raise ValueError("weight_quant: w must be row-major (unit stride in its last dim); "
                         "call .contiguous() first")
    n, k = w.shape
    nb, kb = triton.cdiv(n, block_size), triton.cdiv(k, block_size)
    y = torch.empty((n, k), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=w.device)
    if n and k:
        launch(_block_quant_kernel, (nb, kb), w, y, s, n, k, w.stride(0), y.stride(0), s.stride(0),
               BLOCK_R=block_size, BLOCK_C=block_size, PER_ROW=False,
               UE8M0=scale_fmt == "ue8m0", num_warps=WEIGHT_TILE_WARPS)
    return y, s


def weight_dequant(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                   block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """e4m3 [N, K] x fp32 [ceil(N/b), ceil(K/b)] -> ``dtype`` [N, K]."""
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"weight_dequant: w must be torch.float8_e4m3fn, got {w.dtype}")
    if s.dtype != torch.float32:
        raise TypeError(f"weight_dequant: s must be torch.float32, got {s.dtype}")
    if dtype not in SUPPORTED_FLOAT_INPUTS:
        raise TypeError(f"weight_dequant: dtype must be one of {SUPPORTED_FLOAT_INPUTS}, "
                        f"got {dtype}")
    _check_block_size(block_size)
    if w.dim() != 2 or not row_major(w):
        raise ValueError(f"weight_dequant: w must be 2-D row-major [N, K], got shape "
                         f"{tuple(w.shape)} strides {w.stride()}")
    n, k = w.shape
    nb, kb = triton.cdiv(n, block_size), triton.cdiv(k, block_size)
    if tuple(s.shape) != (nb, kb):
        raise ValueError(f"weight_dequant: s must have shape {(nb, kb)} for w {tuple(w.shape)}, "
                         f"got {tuple(s.shape)}")
    if s.device != w.device:
        raise ValueError(f"weight_dequant: s is on {s.device}, w on {w.device}")
    y = torch.empty((n, k), dtype=dtype, device=w.device)
    if n and k:
        launch(_weight_dequant_kernel, (nb, kb), w, s, y, n, k, w.stride(0), s.stride(0), y.stride(0),
               BLOCK=block_size, num_warps=WEIGHT_TILE_WARPS)
    return y
