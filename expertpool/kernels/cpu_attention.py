"""Absorbed-MLA decode attention on CPU: ``csrc/mla_decode.c``, in the library ``cpu_experts`` builds.

The torch path (``reference.paged_mla_decode_ref``) gathers every context of the step, padded to the
longest, into a new tensor, then runs two batched GEMMs and the mask, scale and softmax between them.
At a decode batch of bench-mini (16 rows, 8 heads, contexts of ~100) that is ~0.4 ms per layer. The
kernel reads each context row in place through the block table, once for the scores of a group of
heads and once per latent chunk for the weighted sum, keeps scores and probabilities in fp32 (the
torch path rounds bf16 scores before the softmax) and computes each (row, head group) in one fixed
order on one thread: a row's result does not depend on its batch. ``switched_off()`` or
``EXPERTPOOL_CPU_ATTENTION_KERNEL=0`` keeps the torch path (tests, A/B benchmarks).
"""

from __future__ import annotations

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_ATTENTION_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "decode attention runs through the torch path")
switched_off = SWITCH.off  # the torch path inside the block (tests and A/B benchmarks)


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
