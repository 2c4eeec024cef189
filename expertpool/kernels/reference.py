"""Pure-torch references for the FP8 kernels (the CPU path and the ground truth of kernel tests).

Formats follow DeepSeek-V3: e4m3 weights in 128x128 blocks with an fp32 dequant multiplier per
block (``weight_scale_inv``; edges not a multiple of 128 are zero-padded before the amax), and
activations in 1x128 groups. Quantization arithmetic here is fp32 with IEEE division, which the
Triton kernels reproduce bit for bit.

Contract of the CPU path: ``linear_ref`` and ``moe_experts_ref`` dequantize FP8 weights to the
activation dtype and matmul (W8A16); they never quantize activations. ``moe_experts_ref`` loops
over *experts that have tokens* (never over tokens) and dequantizes only those experts. It is also
the training path of the routed experts (autograd through it; ``jobs.esft`` hands it per-expert
weight rows, some of them trainable copies).

ue8m0 scales are rounded up to a power of two with ``frexp`` (exact), not ``exp2(ceil(log2 s))``:
``log2`` of a value just above a power of two can round to the integer and give a scale below
amax/448. Both agree everywhere else.

Shape legend: T tokens, K_top routing slots per token, E local experts, F expert intermediate,
D hidden.
"""

import functools

import torch
import torch.nn.functional as F

FP8_E4M3_MAX = 448.0
BLOCK_SIZE = 128
AMAX_FLOOR = 1e-4  # keeps all-zero groups finite (the upstream NaN bug)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, for positive normal fp32 s (exact, via the exponent)."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def act_quant_ref(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[..., K] -> (e4m3 [..., K], fp32 scales [..., K/block]). K must be a multiple of block."""
    assert x.shape[-1] % block_size == 0, f"last dim {x.shape[-1]} is not a multiple of {block_size}"
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    s = xf.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    y = (xf / s.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return y.reshape(x.shape), s


def weight_quant_ref(w: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[N, K] -> (e4m3 [N, K], fp32 [ceil(N/b), ceil(K/b)])."""
    assert w.dim() == 2, f"weight must be 2-D, got {tuple(w.shape)}"
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    wp = torch.zeros(nb * block_size, kb * block_size, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    blocks = wp.view(nb, block_size, kb, block_size)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * block_size, kb * block_size)
    return q[:n, :k].contiguous(), s


@functools.cache
def _e4m3_table(device: str) -> torch.Tensor:
    """The 256 e4m3 values as fp32, one per byte pattern: [256, 1] for F.embedding."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().view(256, 1).to(device)


def fp8_to_float(w: torch.Tensor) -> torch.Tensor:
    """Exact e4m3 -> fp32. On CPU a 256-entry table lookup (F.embedding) is ~7x faster than
    ``w.float()``, whose per-element conversion dominated FP8-resident decoding."""
    if w.device.type != "cpu":
        return w.float()
    return F.embedding(w.view(torch.uint8).int(), _e4m3_table(str(w.device))).view(w.shape)


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                       block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Exact: w.float() * s broadcast over 128x128 blocks, cast to ``dtype``."""
    n, k = w.shape
    wf = fp8_to_float(w) if w.dtype == torch.float8_e4m3fn else w.float()
    if n % block_size == 0 and k % block_size == 0:  # broadcast a view, no full-size scale copy
        blocks = wf.view(n // block_size, block_size, k // block_size, block_size)
        return (blocks * s[:, None, :, None]).view(n, k).to(dtype)
    s_full = s.repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return (wf * s_full).to(dtype)


def fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.float32, compute_dtype=torch.float32):
    """Dequantize both operands exactly and matmul in ``compute_dtype`` (float64 in tests)."""
    a_full = a.to(compute_dtype) * a_s.to(compute_dtype).repeat_interleave(BLOCK_SIZE, dim=-1)
    b_full = weight_dequant_ref(b, b_s, torch.float32).to(compute_dtype)
    return (a_full @ b_full.T).to(out_dtype)


def _weight_as(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if w.dtype == torch.float8_e4m3fn:
        assert scale is not None, "an fp8 weight needs its weight_scale_inv"
        return weight_dequant_ref(w, scale, dtype)
    return w if w.dtype == dtype else w.to(dtype)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, _weight_as(weight, scale, x.dtype))


def dequant_w13_ref(w13: torch.Tensor, s13: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One expert's fused [2F, D] gate/up weight, halves quantized separately."""
    if w13.dtype != torch.float8_e4m3fn:
        return w13 if w13.dtype == dtype else w13.to(dtype)
    f = w13.shape[0] // 2
    fb = -(-f // BLOCK_SIZE)
    return torch.cat([weight_dequant_ref(w13[:f], s13[:fb], dtype),
                      weight_dequant_ref(w13[f:], s13[fb:], dtype)])


def _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, n_experts: int):
    """The valid (token, slot) pairs sorted by expert (stable): per-expert counts (host list), the
    token of each pair, its input row and its routing weight in x's dtype; None if no slot is valid
    (-1 = routed to another rank)."""
    flat_ids = topk_ids_TK.reshape(-1)
    pair_idx = torch.nonzero(flat_ids >= 0, as_tuple=True)[0]
    if pair_idx.numel() == 0:
        return None
    ids = flat_ids[pair_idx]
    pair_idx = pair_idx[torch.argsort(ids, stable=True)]
    counts = torch.bincount(ids, minlength=n_experts).tolist()
    tok = pair_idx // topk_ids_TK.shape[1]
    return counts, tok, x_TD[tok], topk_weights_TK.reshape(-1)[pair_idx].to(x_TD.dtype)


def moe_experts_ref(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    """Grouped SwiGLU experts: sort (token, slot) pairs by expert, one matmul pair per active expert.

    Loops over experts with at least one token (a host sync for the counts, fine on CPU); experts
    without tokens are neither dequantized nor multiplied. ``w13_E2FD`` / ``w2_EDF`` are stacked
    tensors or sequences of per-expert rows. Built for autograd: per-expert outputs are concatenated
    (no in-place slice writes, whose backward copies the whole buffer once per expert), and when no
    slot is valid the output of an ``x_TD`` that requires grad stays connected to it, so the backward
    still reaches whatever produced ``x_TD``: with expert parallelism that is an all-to-all, and every
    rank must run the same collectives in backward.
    """
    out_TD = torch.zeros_like(x_TD)
    grouped = _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, len(w13_E2FD))
    if grouped is None:
        return x_TD * 0 if x_TD.requires_grad else out_TD
    counts, tok, x_sorted, w_sorted = grouped
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = x_sorted[start:start + n]
        w13 = dequant_w13_ref(w13_E2FD[e], None if w13_scale is None else w13_scale[e], x_TD.dtype)
        w2 = _weight_as(w2_EDF[e], None if w2_scale is None else w2_scale[e], x_TD.dtype)
        gate, up = F.linear(xe, w13).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w2))
        start += n
    y_sorted = torch.cat(outs)
    out_TD.index_add_(0, tok, y_sorted * w_sorted[:, None])
    return out_TD


def moe_experts_inference(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    """``moe_experts_ref`` for no-grad use, with less work per expert: each expert's two matmuls write
    straight into shared buffers (no per-expert output tensors, no cat) and SwiGLU runs once over all
    rows. Decode steps touch most experts with one or two rows each, so the per-expert op count is
    what costs. Same kernels and order of operations as the reference: results are identical."""
    out_TD = torch.zeros_like(x_TD)
    grouped = _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD.shape[0])
    if grouped is None:
        return out_TD
    counts, tok, x_sorted, w_sorted = grouped
    (P, D), F2 = x_sorted.shape, w13_E2FD.shape[1]
    h_P2F = x_TD.new_empty(P, F2)
    y_PD = x_TD.new_empty(P, D)
    active, start = [], 0
    for e, n in enumerate(counts):
        if n:
            w13 = dequant_w13_ref(w13_E2FD[e], None if w13_scale is None else w13_scale[e], x_TD.dtype)
            torch.mm(x_sorted[start:start + n], w13.t(), out=h_P2F[start:start + n])
            active.append((e, start, n))
            start += n
    gate, up = h_P2F.chunk(2, dim=-1)
    a_PF = F.silu(gate) * up
    for e, s0, n in active:
        w2 = _weight_as(w2_EDF[e], None if w2_scale is None else w2_scale[e], x_TD.dtype)
        torch.mm(a_PF[s0:s0 + n], w2.t(), out=y_PD[s0:s0 + n])
    y_PD.mul_(w_sorted[:, None])
    return out_TD.index_add_(0, tok, y_PD)
