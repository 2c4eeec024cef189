"""Absorbed-MLA decode attention on CPU: ``csrc/mla_decode.c``, in the library ``cpu_experts`` builds.

The torch path (``reference.paged_mla_decode_ref``) gathers every context of the step, padded to the
longest, into a new tensor, then runs two batched GEMMs and the mask, scale and softmax between them.
At a decode batch of bench-mini (16 rows, 8 heads, contexts of ~100) that is ~0.4 ms per layer. The
kernel reads each context row in place through the block table, once for the scores of a group of
heads and once per latent chunk for the weighted sum, keeps scores and probabilities in fp32 (the
torch path rounds bf16 scores before the softmax) and computes each (row, head group) in one fixed
order on one thread: a row's result does not depend on its batch. ``switched_off()`` or
``EXPERTPOOL_CPU_ATTENTION_KERNEL=0`` keeps the torch path (tests, A/B benchmarks).

``prep`` (``csrc/mla_prep.c``) runs the steps between a layer's down-projections and its attention in
one call: RoPE of the queries' RoPE part, the latent's RMSNorm and the shared key's RoPE written to
the cache slots of the step's tokens (~12 torch ops per layer otherwise), in torch's roundings. The
same switch turns it off (``without_prep()`` alone).
"""

from __future__ import annotations

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_ATTENTION_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "decode attention runs through the torch path")
switched_off = SWITCH.off  # the torch path inside the block (tests and A/B benchmarks)
# prep alone off inside a block (tests and A/B benchmarks; the decode attention keeps its kernel)
PREP = cpu_experts.Switch(None, "RoPE, the latent's norm and the cache write run as torch ops")
without_prep = PREP.off


def applies(q_abs_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, cache_PX: torch.Tensor) -> bool:
    """Whether the kernel serves this call: CPU tensors, q fp32 or bf16 (both parts alike), the cache
    fp32 or bf16 and contiguous, not switched off, and the library built."""
    dense = (torch.float32, torch.bfloat16)
    return (q_abs_BHC.device.type == "cpu" and cache_PX.device.type == "cpu"
            and q_abs_BHC.dtype in dense and q_pe_BHR.dtype == q_abs_BHC.dtype and cache_PX.dtype in dense
            and cache_PX.is_contiguous() and SWITCH.on() and cpu_experts.library() is not None)


def mla_decode(q_abs_BHC: torch.Tensor, q_pe_BHR: torch.Tensor, cache_PX: torch.Tensor,
               block_table_BM: torch.Tensor, seq_lens_B: torch.Tensor, scale: float, block_size: int,
               lib=None) -> torch.Tensor:
    """Attention output [B, H, C] in q's dtype (see the module docstring; the contract of
    ``reference.paged_mla_decode_ref``). ``lib``: another build of the library (tests)."""
    lib = lib or cpu_experts.library()
    B, H, C = q_abs_BHC.shape
    R = q_pe_BHR.shape[-1]
    assert q_pe_BHR.shape == (B, H, R) and cache_PX.shape[-1] == C + R, (q_abs_BHC.shape, q_pe_BHR.shape,
                                                                          cache_PX.shape)
    assert seq_lens_B.shape == (B,) and block_table_BM.shape[0] == B
    q_abs, q_pe = q_abs_BHC.contiguous(), q_pe_BHR.contiguous()
    table = block_table_BM.to(torch.int32).contiguous()
    lens = seq_lens_B.to(torch.int32).contiguous()
    out = torch.empty(B, H, C, dtype=q_abs.dtype)
    if B == 0:
        return out
    bf16 = int(q_abs.dtype == torch.bfloat16)
    rc = lib.mla_decode(q_abs.data_ptr(), q_pe.data_ptr(), bf16, cache_PX.data_ptr(),
                        int(cache_PX.dtype == torch.bfloat16), cache_PX.shape[0], table.data_ptr(), table.shape[1],
                        lens.data_ptr(), B, H, C, R, block_size, float(scale), out.data_ptr(), torch.get_num_threads())
    if rc == -2:
        raise IndexError(f"decode attention: a context length outside [1, {table.shape[1] * block_size}] or a "
                         f"block outside the cache's {cache_PX.shape[0] // block_size} (lengths {lens.tolist()})")
    if rc != 0:
        raise MemoryError(f"the CPU decode attention could not allocate its scratch ({H} heads, "
                          f"contexts up to {int(lens.max())})")
    return out


def prep_applies(q_NHD: torch.Tensor, kv_NX: torch.Tensor, cos_NR: torch.Tensor, sin_NR: torch.Tensor,
                 norm_w: torch.Tensor, slots_N: torch.Tensor, cache_PX: torch.Tensor) -> bool:
    """Whether ``prep`` serves this call: CPU tensors, q, kv and the cache in one dtype (fp32 or bf16;
    the norm weight is taken in it), unit stride along the last dims (q's heads may be a strided view), cos / sin
    fp32 [N, R/2] contiguous, the cache contiguous, no autograd, not switched off, library built."""
    dtype = q_NHD.dtype
    return (q_NHD.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and q_NHD.dim() == 3
            and kv_NX.dim() == 2 and kv_NX.dtype == dtype == cache_PX.dtype
            and q_NHD.stride(2) == 1 and kv_NX.stride(1) == 1 and norm_w.dim() == 1
            and cache_PX.is_contiguous() and cache_PX.device.type == "cpu" and kv_NX.device.type == "cpu"
            and cos_NR.dtype == sin_NR.dtype == torch.float32 and cos_NR.is_contiguous() and sin_NR.is_contiguous()
            and cos_NR.shape == sin_NR.shape == (q_NHD.shape[0], (cache_PX.shape[1] - norm_w.shape[0]) // 2)
            and slots_N.device.type == "cpu"
            and not (torch.is_grad_enabled() and (q_NHD.requires_grad or kv_NX.requires_grad or norm_w.requires_grad))
            and SWITCH.on() and PREP.on() and cpu_experts.library() is not None)


def prep(q_NHD: torch.Tensor, rope_dim: int, kv_NX: torch.Tensor, cos_NR: torch.Tensor, sin_NR: torch.Tensor,
         norm_w: torch.Tensor, eps: float, slots_N: torch.Tensor, cache_PX: torch.Tensor, lib=None) -> torch.Tensor:
    """Writes each token's normalized latent and roped shared key (``kv``: [N, C + R], the latent first)
    to its cache slot, and returns the roped RoPE part of every head's query ([N, H, R], q's dtype; the
    last ``rope_dim`` of each head of ``q``), as ``layers.apply_rope`` and ``RMSNorm`` compute them."""
    lib = lib or cpu_experts.library()
    N, H, D = q_NHD.shape
    C = norm_w.shape[0]
    R = rope_dim
    assert kv_NX.shape == (N, C + R) and cache_PX.shape[1] == C + R and slots_N.shape == (N,), (
        q_NHD.shape, kv_NX.shape, cache_PX.shape, slots_N.shape)
    out = torch.empty(N, H, R, dtype=q_NHD.dtype)
    if N == 0:
        return out
    slots = slots_N.to(torch.int64).contiguous()
    w = norm_w.to(q_NHD.dtype).contiguous()
    rc = lib.mla_prep(q_NHD.data_ptr(), q_NHD.stride(0), q_NHD.stride(1), D - R, H, kv_NX.data_ptr(),
                      kv_NX.stride(0), C, R, N, int(q_NHD.dtype == torch.bfloat16), cos_NR.data_ptr(),
                      sin_NR.data_ptr(), w.data_ptr(), float(eps), slots.data_ptr(), cache_PX.data_ptr(),
                      cache_PX.shape[0], out.data_ptr())
    if rc != 0:
        raise IndexError(f"a cache slot outside the cache's {cache_PX.shape[0]} (slots {slots.tolist()})")
    return out
