"""The absorbed MLA decode's per-head products on CPU: ``csrc/small_gemm.c``, in the library
``cpu_experts`` builds.

A decode step multiplies each head's query part by W_UK ([Dn, C] per head) and each head's attention
output by W_UV ([C, Dv] per head), for the few rows of the batch. ``torch.bmm`` repacks every head's
weight on each call; in a bench-mini bf16 step each product took ~150 us for 1 MB of weights (~7 GB/s).
The kernel takes weights packed once (``pack``, cached by the model beside the absorbed weights) and
the rows in place (strided heads, no copy). Each output row is summed over k in one fixed order, so it
does not depend on its batch (no padding for batch-invariant mode). bf16 runs on the CPU's bf16 dot
product (AVX512_BF16; exact products, fp32 sums, output rounded to bf16); fp32 on the build's fp32
vectors (AVX-512 or AVX2). ``switched_off()`` or ``EXPERTPOOL_CPU_GEMM_KERNEL=0`` keeps ``torch.bmm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_GEMM_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "the absorbed per-head products run through torch.bmm")
switched_off = SWITCH.off  # torch.bmm inside the block (tests and A/B benchmarks)


@dataclass(frozen=True)
class Packed:
    """Weights [G, K, N] in the kernel's layout (see ``csrc/small_gemm.c``)."""
    data: torch.Tensor
    groups: int
    k: int
    n: int


def pack(w_GKN: torch.Tensor, lib=None) -> Packed | None:
    """The kernel's layout of ``w_GKN`` (CPU, fp32 or bf16), or None where the kernel cannot take it
    (switched off by the environment, no library, bf16 without the bf16 dot product, K odd or N not a
    multiple of the lanes). Packs inside a ``switched_off()`` block too: the block decides per call."""
    if w_GKN.device.type != "cpu" or w_GKN.dim() != 3 or not SWITCH.env_on():
        return None
    lib = lib or cpu_experts.library()
    if lib is None:
        return None
    G, K, N = w_GKN.shape
    w = w_GKN.detach()
    if w.dtype == torch.bfloat16:
        if not cpu_experts.has_bf16_dot(lib) or K % 2 or N % 16:
            return None
        # [G, K/2, 2, N/16, 16] -> [G, N/16, K/2, 16, 2]: a lane holds the pair (W[k, n], W[k+1, n])
        data = w.reshape(G, K // 2, 2, N // 16, 16).permute(0, 3, 1, 4, 2).contiguous()
        return Packed(data, G, K, N)
    if w.dtype == torch.float32:
        lanes = lib.grouped_gemm_lanes()
        if N % lanes:
            return None
        data = w.reshape(G, K, N // lanes, lanes).permute(0, 2, 1, 3).contiguous()
        return Packed(data, G, K, N)
    return None


def applies(x_MGK: torch.Tensor, packed: Packed | None) -> bool:
    """Whether ``per_head`` serves this call: packed weights of x's dtype, x on the CPU with unit
    stride along k, not switched off, no autograd through x."""
    return (packed is not None and SWITCH.on() and x_MGK.device.type == "cpu" and x_MGK.dim() == 3
            and not (x_MGK.requires_grad and torch.is_grad_enabled())
            and x_MGK.dtype == packed.data.dtype and x_MGK.shape[1:] == (packed.groups, packed.k)
            and x_MGK.stride(2) == 1)


def per_head(x_MGK: torch.Tensor, packed: Packed, lib=None) -> torch.Tensor:
    """``out[m, g] = x[m, g] @ W[g]`` ([M, G, N], x's dtype) with W packed by ``pack``; x may be a strided
    view (unit stride along k). ``lib``: another build of the library (tests)."""
    lib = lib or cpu_experts.library()
    M, G, K = x_MGK.shape
    assert applies(x_MGK, packed), (x_MGK.shape, x_MGK.dtype, x_MGK.stride())
    out = torch.empty(M, G, packed.n, dtype=x_MGK.dtype)
    if M == 0:
        return out
    fn = lib.grouped_gemm_bf16 if x_MGK.dtype == torch.bfloat16 else lib.grouped_gemm_f32
    fn(x_MGK.data_ptr(), x_MGK.stride(0), x_MGK.stride(1), M, K, packed.data.data_ptr(), packed.n, G,
       out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    return out
