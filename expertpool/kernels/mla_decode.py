"""Triton paged-MLA decode: absorbed attention of one new token per sequence over the paged latent cache.

Contract (reference: ``reference.paged_mla_decode_ref``): ``q_abs [B, H, C]`` (the query with W_UK
folded in) and ``q_pe [B, H, R]`` (its roped part), the cache ``[P, C + R]`` (normalized latent,
then the roped shared key, one row per token slot), ``block_table [B, M]`` int32 and
``seq_lens [B]`` int32 on the device. For each sequence b and head h:
``o[b, h] = sum_t softmax_t((q_abs . c_t + q_pe . k_pe_t) * scale) c_t`` over t < seq_lens[b], with
slot(t) = block_table[b, t // block_size] * block_size + t % block_size. Output [B, H, C] in q's dtype.

The cache is read through the block table (no gather, no padding to the longest context), in
``BLOCK_T`` tokens at a time with an online softmax (running max and sum in fp32), so memory is the
output only and the loop length is each sequence's own. fp32 inputs use IEEE dots (no tf32).
A sequence of length 0 gets zeros. Grid: (B, cdiv(H, BLOCK_H)).

Under ``TRITON_INTERPRET=1`` bf16/fp16 operands are widened to fp32 before the dots (``UPCAST``;
the probabilities still rounded to bf16 as on the GPU): Triton 3.9's interpreter computes bf16
``tl.dot`` wrongly (seen here: errors of 4e10 on a 16x32 product of unit normals; fp16 and fp32
exact), so the interpreter tests the loads, masks and online softmax of the bf16 kernel, and the
bf16 tensor-core dots are checked on a GPU (tests/kernels/test_kernels_gpu.py).

Trade-off: each head block re-reads its sequence's cache (H / BLOCK_H times; the reads of one
sequence's programs coincide, so most come from L2). FlashMLA keeps all heads in one CTA and reads
the cache once, with split-KV for long contexts; neither is done here (no split over the context:
a batch smaller than the SM count with long contexts under-fills the GPU).

Shape legend: B sequences, H heads, C kv_lora_rank, R rope dim, P cache slots, M blocks per row,
T context positions.
"""

import torch
import triton
import triton.language as tl

from expertpool.kernels._triton import interpreting, launch

BLOCK_H = 16   # heads per program (tl.dot needs >= 16 rows)
BLOCK_T = 32   # context tokens per iteration


@triton.jit
def _paged_mla_decode_kernel(q_abs_ptr, q_pe_ptr, cache_ptr, table_ptr, lens_ptr, out_ptr,
                             H, C, R, scale,
                             stride_qb, stride_qh, stride_pb, stride_ph, stride_cache, stride_tb,
                             stride_ob, stride_oh,
                             PAGE: tl.constexpr, C_PAD: tl.constexpr, R_PAD: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, IEEE: tl.constexpr,
                             UPCAST: tl.constexpr):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < H
    offs_c = tl.arange(0, C_PAD)
    offs_r = tl.arange(0, R_PAD)
    c_mask = offs_c < C
    r_mask = offs_r < R
    q_abs = tl.load(q_abs_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_c[None, :],
                    mask=h_mask[:, None] & c_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_r[None, :],
                   mask=h_mask[:, None] & r_mask[None, :], other=0.0)
    seq_len = tl.load(lens_ptr + b)
    if UPCAST:
        q_abs = q_abs.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C_PAD), dtype=tl.float32)
    for t0 in range(0, seq_len, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_mask = t < seq_len
        page = tl.load(table_ptr + b * stride_tb + t // PAGE, mask=t_mask, other=0)
        slot = page.to(tl.int64) * PAGE + t % PAGE
        row = cache_ptr + slot[:, None] * stride_cache
        c_t = tl.load(row + offs_c[None, :], mask=t_mask[:, None] & c_mask[None, :], other=0.0)
        pe_t = tl.load(row + C + offs_r[None, :], mask=t_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            c_t = c_t.to(tl.float32)
            pe_t = pe_t.to(tl.float32)
        if IEEE:
            s = tl.dot(q_abs, tl.trans(c_t), input_precision="ieee")
            s += tl.dot(q_pe, tl.trans(pe_t), input_precision="ieee")
        else:
            s = tl.dot(q_abs, tl.trans(c_t)) + tl.dot(q_pe, tl.trans(pe_t))
        s = tl.where(t_mask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, c_t, input_precision="ieee")
        elif UPCAST:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16).to(tl.float32), c_t, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(c_t.dtype), c_t)
        m_i = m_new
    out = tl.where(l_i[:, None] > 0, acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & c_mask[None, :])


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"paged_mla_decode: {msg}")


def paged_mla_decode(q_abs_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, cache_PX: torch.Tensor,
                     block_table_BM: torch.Tensor, seq_lens_B: torch.Tensor, scale: float,
                     block_size: int) -> torch.Tensor:
    """See the module docstring. Launcher: check -> allocate -> grid -> launch."""
    B, H, C = q_abs_BHC.shape
    R = q_pe_BHR.shape[-1]
    _check(q_pe_BHR.shape[:2] == (B, H), f"q_pe {tuple(q_pe_BHR.shape)} does not match q_abs {(B, H, C)}")
    _check(cache_PX.dim() == 2 and cache_PX.shape[1] == C + R, f"cache {tuple(cache_PX.shape)} is not [P, {C + R}]")
    _check(cache_PX.dtype == q_abs_BHC.dtype == q_pe_BHR.dtype, "q_abs, q_pe and the cache need one dtype")
    _check(block_table_BM.dtype == torch.int32 and seq_lens_B.dtype == torch.int32, "block table and lengths: int32")
    _check(block_table_BM.shape[0] == B and seq_lens_B.shape == (B,), "one block-table row and length per sequence")
    for name, t in (("q_abs", q_abs_BHC), ("q_pe", q_pe_BHR), ("cache", cache_PX), ("block_table", block_table_BM)):
        _check(t.stride(-1) == 1, f"{name} needs unit stride in its last dim")
    out = torch.empty_like(q_abs_BHC)
    if B == 0:
        return out
    launch(_paged_mla_decode_kernel, (B, triton.cdiv(H, BLOCK_H)),
           q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, out, H, C, R, scale,
           q_abs_BHC.stride(0), q_abs_BHC.stride(1), q_pe_BHR.stride(0), q_pe_BHR.stride(1), cache_PX.stride(0),
           block_table_BM.stride(0), out.stride(0), out.stride(1),
           PAGE=block_size, C_PAD=max(16, triton.next_power_of_2(C)), R_PAD=max(16, triton.next_power_of_2(R)),
           BLOCK_H=BLOCK_H, BLOCK_T=BLOCK_T, IEEE=q_abs_BHC.dtype == torch.float32,
           UPCAST=interpreting() and q_abs_BHC.dtype != torch.float32)
    return out
