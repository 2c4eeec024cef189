"""Triton grouped FP8 MoE: gate/up GEMM + SwiGLU, down GEMM + routing weight, for all local experts.

Contract: same as ``moe_experts_ref`` for FP8 weights: ``x_TD`` (bf16/fp16/fp32, D a multiple of
128), ``topk_ids_TK`` local expert ids in [0, E) or -1 (slot owned elsewhere: skipped),
``w13_E2FD`` e4m3 with ``w13_scale [E, 2*ceil(F/128), ceil(D/128)]`` (gate and up halves
block-quantized separately), ``w2_EDF`` e4m3 with ``w2_scale [E, ceil(D/128), ceil(F/128)]``.
Returns ``y_TD`` in x's dtype. Activations are quantized to e4m3 1x128 groups (W8A8), so results
differ from the W8A16 torch reference by e4m3 rounding (~4% relative), not by bugs.

Layout (vllm ``fused_moe`` / DeepGEMM "contiguous"): the P = T*K_top (token, slot) pairs are
sorted by expert and each expert's run is padded to BLOCK_M, so every M-block belongs to exactly
one expert (``block_expert_B``). Experts with zero tokens own no block and are never read.
Buffers are sized by the bound ``P + min(E, P) * (BLOCK_M - 1)`` so nothing syncs with the host;
programs past the real padded length exit at once.

Launches per MoE layer, independent of E and of how many experts are active: the alignment
(``moe_align``, one launch; ``moe_align_block_size`` is its torch reference), ``act_quant(x)``,
gate/up GEMM (SwiGLU fused in the epilogue, two accumulators), ``act_quant(h)``, the down GEMM
(routing weight fused, one row per pair, no atomics), a zero fill of the per-pair output and a
``sum`` over the K_top slots in fp32. Deterministic.

Trade-off: h makes one round trip through memory (written in x's dtype, then quantized) instead
of quantizing in the GEMM epilogue; simpler and exact-rounding-safe, at the cost of
``P * F * (2 + 1)`` bytes of traffic. The per-pair output buffer ``[P, D]`` trades memory for
determinism.

Shape legend: T tokens, K_top slots per token, P = T*K_top pairs, P_pad padded pair rows,
B = P_pad / BLOCK_M blocks, E local experts, F expert intermediate (F_pad = ceil(F/128)*128),
D hidden.
"""

import torch
import triton
import triton.language as tl

from expertpool.kernels import tuned
from expertpool.kernels._triton import launch
from expertpool.kernels.fp8_gemm import check_block_config
from expertpool.kernels.quant import SUPPORTED_FLOAT_INPUTS, act_quant, row_major
from expertpool.kernels.reference import BLOCK_SIZE


@triton.jit
def _fused_moe_kernel(a_ptr, a_s_ptr, b_ptr, b_s_ptr, out_ptr, sorted_pair_ptr, block_expert_ptr,
                      num_padded_ptr, topk_w_ptr, N, K, N_OUT, num_pairs,
                      stride_am, stride_asm, stride_be, stride_bn, stride_bse, stride_bsn,
                      stride_om, up_row_offset, up_scale_row_offset,
                      TOP_K: tl.constexpr, GATED: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """GATED: out[padded row, :N_OUT] = silu(A_tok @ gate.T) * (A_tok @ up.T), A rows gathered by
    token. Not GATED: out[pair, :N] = topk_w[pair] * (A_padded_row @ W.T)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_padded = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_padded:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)

    offs_pad = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_pair_ptr + offs_pad)
    row_valid = pair < num_pairs
    if GATED:
        a_rows = (pair // TOP_K).to(tl.int64)  # gather tokens
    else:
        a_rows = offs_pad.to(tl.int64)  # h is already in padded order
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N

    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]
    a_s_ptrs = a_s_ptr + a_rows * stride_asm
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    b_s_ptrs = b_s_ptr + expert * stride_bse + (pid_n * BLOCK_N // BLOCK_K) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_valid[:, None], other=0.0)
        a_s = tl.load(a_s_ptrs + kb, mask=row_valid, other=0.0)
        b = tl.load(b_ptrs, mask=mask_n[None, :] & k_mask[:, None], other=0.0)
        b_s = tl.load(b_s_ptrs + kb)
        acc += tl.dot(a, b) * a_s[:, None] * b_s
        if GATED:
            b_up = tl.load(b_ptrs + up_row_offset * stride_bn,
                           mask=mask_n[None, :] & k_mask[:, None], other=0.0)
            b_up_s = tl.load(b_s_ptrs + up_scale_row_offset * stride_bsn + kb)
            acc_up += tl.dot(a, b_up) * a_s[:, None] * b_up_s
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if GATED:
        h = acc / (1.0 + tl.exp(-acc)) * acc_up  # silu(gate) * up, zero in pad rows and columns
        out_ptrs = out_ptr + offs_pad[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=(offs_n < N_OUT)[None, :])
    else:
        w = tl.load(topk_w_ptr + pair, mask=row_valid, other=0.0).to(tl.float32)
        out_ptrs = out_ptr + pair[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, (acc * w[:, None]).to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & mask_n[None, :])


@triton.jit
def _align_kernel(ids_ptr, sorted_pair_ptr, block_expert_ptr, num_padded_ptr, P, E, P_PAD_MAX, NUM_BLOCKS,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, TILE: tl.constexpr):
    """One program: ``moe_align_block_size`` (its torch twin below is the reference) in one launch.
    Pass 1 counts pairs per expert, pass 2 fills every padded row with the sentinel P, pass 3 places
    each pair at its expert's run start plus its rank among the expert's earlier pairs (stable: the
    torch version's order), pass 4 labels each block with its expert. Invalid ids (-1, >= E) count
    in the spare bin E and are never placed."""
    e_idx = tl.arange(0, E_PAD)
    t_idx = tl.arange(0, TILE)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, P, TILE):
        p = p0 + t_idx
        ids = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int32)
        key = tl.where((ids >= 0) & (ids < E) & (p < P), ids, E)
        counts += tl.sum((key[:, None] == e_idx[None, :]).to(tl.int32), axis=0)
    padded = tl.where(e_idx < E, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    for r0 in range(0, P_PAD_MAX, TILE):
        r = r0 + t_idx
        tl.store(sorted_pair_ptr + r, tl.full((TILE,), 0, tl.int32) + P, mask=r < P_PAD_MAX)
    tl.debug_barrier()  # the sentinel fill lands before the pairs overwrite it
    running = tl.zeros((E_PAD,), dtype=tl.int32)
    for p0 in range(0, P, TILE):
        p = p0 + t_idx
        ids = tl.load(ids_ptr + p, mask=p < P, other=-1).to(tl.int32)
        key = tl.where((ids >= 0) & (ids < E) & (p < P), ids, E)
        hot = (key[:, None] == e_idx[None, :]).to(tl.int32)                # [TILE, E_PAD]
        before = tl.cumsum(hot, axis=0) - hot                              # earlier pairs of the same expert
        rank = tl.sum(hot * (before + running[None, :] + pad_start[None, :]), axis=1)
        tl.store(sorted_pair_ptr + rank, p.to(tl.int32), mask=key < E)
        running += tl.sum(hot, axis=0)
    last_end = tl.sum(tl.where(e_idx == E - 1, pad_end, 0), axis=0)
    for b0 in range(0, NUM_BLOCKS, TILE):
        b = b0 + t_idx
        start = b * BLOCK_M
        ends = tl.where(e_idx[None, :] < E, pad_end[None, :], last_end + 1)  # searchsorted(pad_end, start, right)
        expert = tl.minimum(tl.sum((ends <= start[:, None]).to(tl.int32), axis=1), E - 1)
        tl.store(block_expert_ptr + b, expert, mask=b < NUM_BLOCKS)


ALIGN_TILE = 32  # pairs per iteration of the align kernel: a TILE x E_PAD one-hot stays in registers


def moe_align(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int):
    """``moe_align_block_size`` in one Triton launch (same outputs; see ``_align_kernel``)."""
    p = topk_ids_TK.numel()
    device = topk_ids_TK.device
    num_blocks = triton.cdiv(p + min(num_experts, p) * (block_m - 1), block_m)
    p_pad = num_blocks * block_m
    sorted_pair_P = torch.empty(p_pad, dtype=torch.int32, device=device)
    block_expert_B = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    launch(_align_kernel, (1,), topk_ids_TK.reshape(-1), sorted_pair_P, block_expert_B, num_padded, p, num_experts,
           p_pad, num_blocks, BLOCK_M=block_m, E_PAD=triton.next_power_of_2(num_experts + 1), TILE=ALIGN_TILE)
    return sorted_pair_P, block_expert_B, num_padded


def moe_align_block_size(topk_ids_TK: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert, pad each expert's run to ``block_m``.

    Returns ``sorted_pair_P`` (int32 pair ids ``t*K_top + k``; ``P`` = T*K_top marks padding),
    ``block_expert_B`` (int32 expert of each M-block) and ``num_padded`` (int32 [1], on device).
    Pure torch, no host sync; the sizes are host-known upper bounds.
    """
    ids_P = topk_ids_TK.reshape(-1).to(torch.int64)
    p = ids_P.numel()
    device = ids_P.device
    # Pairs not owned here (-1, or any id outside [0, E)) get key E and sort last.
    keys_P = torch.where((ids_P >= 0) & (ids_P < num_experts), ids_P, num_experts)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, keys_P, torch.ones_like(keys_P))  # bincount would sync on its max
    padded = (counts + block_m - 1) // block_m * block_m
    padded[num_experts] = 0
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts

    order_P = torch.argsort(keys_P, stable=True)
    sorted_keys = keys_P[order_P]
    rank = torch.arange(p, device=device) - cnt_start[sorted_keys]
    num_blocks = triton.cdiv(p + min(num_experts, p) * (block_m - 1), block_m)
    p_pad = num_blocks * block_m
    # Scatter every pair; non-local ones land in a spare slot past the end (no boolean indexing,
    # which would sync), then sliced off.
    dest = torch.where(sorted_keys < num_experts, pad_start[sorted_keys] + rank, p_pad)
    sorted_pair_P = torch.full((p_pad + 1,), p, dtype=torch.int32, device=device)
    sorted_pair_P.scatter_(0, dest, order_P.to(torch.int32))
    sorted_pair_P = sorted_pair_P[:p_pad]
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert_B = torch.searchsorted(pad_end[:num_experts], block_starts, right=True)
    block_expert_B = block_expert_B.clamp_max(num_experts - 1).to(torch.int32)
    num_padded = pad_end[num_experts - 1:num_experts].to(torch.int32)
    return sorted_pair_P, block_expert_B, num_padded


def _check(cond: bool, exc: type, msg: str) -> None:
    if not cond:
        raise exc(f"fused_moe: {msg}")


def _validate(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    _check(x_TD.dtype in SUPPORTED_FLOAT_INPUTS, TypeError,
           f"x_TD must be one of {SUPPORTED_FLOAT_INPUTS}, got {x_TD.dtype}")
    _check(x_TD.dim() == 2, ValueError, f"x_TD must be [T, D], got {tuple(x_TD.shape)}")
    t, d = x_TD.shape
    _check(d % BLOCK_SIZE == 0, ValueError, f"D={d} must be a multiple of {BLOCK_SIZE}")
    _check(not topk_ids_TK.is_floating_point() and not topk_ids_TK.is_complex(), TypeError,
           f"topk_ids_TK must be an integer tensor, got {topk_ids_TK.dtype}")
    _check(topk_ids_TK.dim() == 2 and topk_ids_TK.shape[0] == t, ValueError,
           f"topk_ids_TK must be [T={t}, K], got {tuple(topk_ids_TK.shape)}")
    _check(topk_weights_TK.shape == topk_ids_TK.shape, ValueError,
           f"topk_weights_TK shape {tuple(topk_weights_TK.shape)} != topk_ids_TK shape "
           f"{tuple(topk_ids_TK.shape)}")
    _check(topk_weights_TK.is_floating_point(), TypeError,
           f"topk_weights_TK must be floating point, got {topk_weights_TK.dtype}")
    for name, w, s in (("w13_E2FD", w13_E2FD, w13_scale), ("w2_EDF", w2_EDF, w2_scale)):
        _check(w.dtype == torch.float8_e4m3fn, TypeError,
               f"{name} must be torch.float8_e4m3fn, got {w.dtype}")
        _check(isinstance(s, torch.Tensor) and s.dtype == torch.float32, TypeError,
               f"the scale of {name} must be a torch.float32 tensor, got "
               f"{s.dtype if isinstance(s, torch.Tensor) else type(s).__name__}")
        _check(w.dim() == 3 and row_major(w) and s.dim() == 3 and row_major(s), ValueError,
               f"{name} and its scale must be 3-D with unit stride in the last dim, got "
               f"{tuple(w.shape)} strides {w.stride()} and scale {tuple(s.shape)}")
    e, two_f, d13 = w13_E2FD.shape
    f = two_f // 2
    fb, db = triton.cdiv(f, BLOCK_SIZE), d // BLOCK_SIZE
    _check(two_f % 2 == 0 and d13 == d, ValueError,
           f"w13_E2FD must be [E, 2F, D={d}], got {tuple(w13_E2FD.shape)}")
    _check(tuple(w13_scale.shape) == (e, 2 * fb, db), ValueError,
           f"w13_scale must be [E, 2*ceil(F/128), ceil(D/128)] = {(e, 2 * fb, db)}, "
           f"got {tuple(w13_scale.shape)}")
    _check(tuple(w2_EDF.shape) == (e, d, f), ValueError,
           f"w2_EDF must be [E, D, F] = {(e, d, f)}, got {tuple(w2_EDF.shape)}")
    _check(tuple(w2_scale.shape) == (e, db, fb), ValueError,
           f"w2_scale must be [E, ceil(D/128), ceil(F/128)] = {(e, db, fb)}, "
           f"got {tuple(w2_scale.shape)}")
    devices = {x.device for x in (x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale,
                                  w2_EDF, w2_scale)}
    _check(len(devices) == 1, ValueError, f"all inputs must share one device, got {devices}")
    return t, d, e, f


def fused_moe(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale,
              config: dict | None = None, scale_fmt: str | None = None) -> torch.Tensor:
    """Grouped FP8 SwiGLU experts for all local experts in a constant number of launches.
    ``scale_fmt``: the activation scale format (x and h), e.g. the checkpoint's "ue8m0"."""
    t, d, e, f = _validate(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF,
                           w2_scale)
    top_k = topk_ids_TK.shape[1]
    p = t * top_k
    if p == 0:
        return torch.zeros_like(x_TD)
    cfg = config or tuned.get_config("fused_moe", tuned.moe_shape_key(e, f, d), t, x_TD.device)
    check_block_config(cfg)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_SIZE, TOP_K=top_k,
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 3))
    f_pad = triton.cdiv(f, BLOCK_SIZE) * BLOCK_SIZE

    sorted_pair_P, block_expert_B, num_padded = moe_align(topk_ids_TK.contiguous(), e, bm)
    p_pad = sorted_pair_P.numel()
    num_blocks = block_expert_B.numel()
    topk_w_P = topk_weights_TK.reshape(-1).contiguous()
    x_q_TD, x_s_TDb = act_quant(x_TD.contiguous(), scale_fmt=scale_fmt)

    # Rows past num_padded are never written (their programs exit): act_quant reads them (bounded by
    # min(E, P) * BLOCK_M extra rows, the price of not syncing the host), and nothing reads its result.
    h_PF = torch.empty((p_pad, f_pad), dtype=x_TD.dtype, device=x_TD.device)
    launch(
        _fused_moe_kernel, (num_blocks, triton.cdiv(f_pad, bn)),
        x_q_TD, x_s_TDb, w13_E2FD, w13_scale, h_PF, sorted_pair_P, block_expert_B, num_padded,
        topk_w_P, f, d, f_pad, p, x_q_TD.stride(0), x_s_TDb.stride(0), w13_E2FD.stride(0),
        w13_E2FD.stride(1), w13_scale.stride(0), w13_scale.stride(1), h_PF.stride(0),
        f, triton.cdiv(f, BLOCK_SIZE), GATED=True, **meta)

    h_q_PF, h_s_PFb = act_quant(h_PF, scale_fmt=scale_fmt)
    out_PD = torch.zeros((p, d), dtype=x_TD.dtype, device=x_TD.device)
    launch(
        _fused_moe_kernel, (num_blocks, triton.cdiv(d, bn)),
        h_q_PF, h_s_PFb, w2_EDF, w2_scale, out_PD, sorted_pair_P, block_expert_B, num_padded,
        topk_w_P, d, f, d, p, h_q_PF.stride(0), h_s_PFb.stride(0), w2_EDF.stride(0),
        w2_EDF.stride(1), w2_scale.stride(0), w2_scale.stride(1), out_PD.stride(0),
        0, 0, GATED=False, **meta)
    return out_PD.view(t, top_k, d).sum(dim=1, dtype=torch.float32).to(x_TD.dtype)
