"""W8A8 dense linears on CPU: ``csrc/w8a8_gemm.c``, in the library ``cpu_experts`` builds.

``model.weight_dtype: w8a8`` (CPU only). At a decode batch a bf16 product on this kind of CPU is bound
by the rate of the bf16 dot product, not by memory: bench-mini's output head (32000 x 1024, 16 rows)
took ~1.8-2.2 ms through the bf16 kernel against ~1.3 ms to stream its 65 MB. The int8 dot product
(AVX512_VNNI) multiplies twice the pairs per instruction and reads one byte per weight. The weights of
every dense linear the model packs for the CPU (attention projections, dense and shared MLPs, the
output head) are quantized once, symmetric int8 with one fp32 scale per output row; each call quantizes
its activations per row and 128-column block (symmetric, round half to even), as DeepSeek-V3's FP8
inference quantizes its activations in 1 x 128 blocks, but to int8 (7 bits of magnitude against e4m3's
3 bits of mantissa). Products and block sums are exact integers; each block's sum is scaled in fp32.

Error (docs/architecture.md, tests/kernels/test_cpu_w8a8.py): ~1e-2 relative on a product of random
Gaussian rows; the model-level logit error is measured by the tests and bench. Each row's result does not
depend on its batch. Where the CPU lacks AVX512_VNNI (or K % 128 / N % 16 do not hold) a linear keeps
its bf16 / fp32 pack, logged once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_W8A8_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "W8A8 linears run from their dequantized weights in torch")
switched_off = SWITCH.off
BLOCK = 128  # activation scale block along k


@dataclass(frozen=True)
class Packed8:
    """A linear's int8 weights in the kernel's layout (see ``csrc/w8a8_gemm.c``)."""
    data: torch.Tensor    # int8 [N / 16, K / 4, 16, 4]
    corr: torch.Tensor    # int32 [N / 16, K / 128, 16]: 128 x each block's sum of the weights
    scale: torch.Tensor   # fp32 [N]
    n: int
    k: int

    @property
    def q(self) -> torch.Tensor:
        """The codes row-major, int8 [N, K] (a copy: the fallback and the tests read them)."""
        return self.data.permute(0, 2, 1, 3).reshape(self.n, self.k)


def available(lib=None) -> bool:
    """Whether this build of the CPU kernels has the W8A8 entries (compiled where the target CPU has
    AVX512_VNNI: AMD Zen 4/5, Intel Cascade Lake and later)."""
    lib = lib or cpu_experts.library()
    return lib is not None and hasattr(lib, "w8a8_gemm")


def _symmetric_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8, scales fp32) of fp32 ``x`` along its last dim: s = amax / 127 (1 where all zero),
    q = round-half-even(x / s) clamped to [-127, 127]; the kernel's rule for activations too."""
    amax = x.abs().amax(-1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(x / s[..., None]).clamp(-127, 127).to(torch.int8), s


def quantize_weight(w_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [N, K], scale fp32 [N]): symmetric per output row (``_symmetric_int8``)."""
    return _symmetric_int8(w_NK.detach().float())


def quantize_rows_ref(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization in torch: (codes int8 [M, K], scales fp32 [M, K / 128])."""
    M, K = x_MK.shape
    q, s = _symmetric_int8(x_MK.float().view(M, K // BLOCK, BLOCK))
    return q.view(M, K), s


def pack(w_NK: torch.Tensor, lib=None) -> Packed8 | None:
    """The kernel's packed int8 form of the dense CPU weight ``w_NK`` (fp32 or bf16), or None where it
    cannot take it (switched off by the environment, no AVX512_VNNI build, K % 128 or N % 16)."""
    if w_NK.device.type != "cpu" or w_NK.dim() != 2 or not SWITCH.env_on() or not available(lib):
        return None
    N, K = w_NK.shape
    if K % BLOCK or N % 16 or w_NK.dtype not in (torch.float32, torch.bfloat16):
        return None
    q, s = quantize_weight(w_NK)
    data = q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).contiguous()
    corr = (q.view(N, K // BLOCK, BLOCK).sum(-1, dtype=torch.int32) * 128).view(N // 16, 16, K // BLOCK)
    return Packed8(data, corr.permute(0, 2, 1).contiguous(), s.contiguous(), N, K)


def applies(x: torch.Tensor, packed: Packed8) -> bool:
    """Whether the kernel serves ``x`` (CPU fp32 or bf16 rows of length K, no autograd, not switched off)."""
    return (SWITCH.on() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[-1] == packed.k and not (x.requires_grad and torch.is_grad_enabled()))


def linear(x: torch.Tensor, packed: Packed8, lib=None) -> torch.Tensor:
    """``x @ W.T`` in x's dtype with W packed by ``pack``: activations quantized per row and 128-column
    block, int8 products, fp32 block sums (see the module docstring)."""
    if not applies(x, packed):
        return reference_linear(x, packed)
    lib = lib or cpu_experts.library()
    K, N = packed.k, packed.n
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out = torch.empty(M, N, dtype=x.dtype)
    if M:
        xq = torch.empty(M, K, dtype=torch.uint8)
        xs = torch.empty(M, K // BLOCK, dtype=torch.float32)
        bf16 = int(x.dtype == torch.bfloat16)
        lib.w8a8_quant_rows(x2.data_ptr(), bf16, M, K, x2.stride(0), xq.data_ptr(), xs.data_ptr())
        lib.w8a8_gemm(xq.data_ptr(), xs.data_ptr(), M, K, packed.data.data_ptr(), packed.corr.data_ptr(),
                      packed.scale.data_ptr(), N, out.data_ptr(), N, bf16, torch.get_num_threads())
    return out.view(*x.shape[:-1], N)


def reference_linear(x: torch.Tensor, packed: Packed8) -> torch.Tensor:
    """The same quantized product in torch (the fallback where the kernel is switched off, and the
    tests' reference): block sums exact in fp64, scaled per block, then by the row scale."""
    K = packed.k
    x2 = x.reshape(-1, K)
    q, s = quantize_rows_ref(x2)
    M = x2.shape[0]
    sums = torch.einsum("mbk,nbk->mnb", q.double().view(M, K // BLOCK, BLOCK),
                        packed.q.double().reshape(packed.n, K // BLOCK, BLOCK))
    y = (sums * s.double()[:, None, :]).sum(-1) * packed.scale.double()
    return y.to(x.dtype).view(*x.shape[:-1], packed.n)
