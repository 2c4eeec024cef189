"""Every Triton kernel compiles to a cubin for sm_89 (Ada) and sm_90 (Hopper), on this CPU.

The interpreter executes kernels as numpy and accepts code the real compiler rejects (types of
constexprs, early returns, fp8 dot layouts), so ahead-of-time compilation (``triton.compile`` on
an ``ASTSource`` with an explicit ``GPUTarget``) is the CPU-side check that the GPU path builds.
It also pins one performance property: fp8 tiles with BLOCK_M >= 64 use Hopper's wgmma.
Skipped where Triton or its NVIDIA backend (ptxas) is missing.
"""

import inspect

import pytest

from tests.kernels.kernel_oracles import requires_triton

pytestmark = requires_triton

FP8_GEMM_PTRS = {"a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "c_ptr": "*bf16", "a_s_ptr": "*fp32",
                 "b_s_ptr": "*fp32"}
MOE_PTRS = {"a_ptr": "*fp8e4nv", "a_s_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_s_ptr": "*fp32",
            "out_ptr": "*bf16", "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32",
            "num_padded_ptr": "*i32", "topk_w_ptr": "*fp32"}


def _cases():
    """(kernel module, kernel name, pointer types, constexprs, options)."""
    quant_ptrs = {"y_ptr": "*fp8e4nv", "s_ptr": "*fp32"}
    yield ("quant", "_block_quant_kernel", {"x_ptr": "*bf16", **quant_ptrs},
           {"BLOCK_R": 16, "BLOCK_C": 128, "PER_ROW": True, "UE8M0": True}, {"num_warps": 4})
    yield ("quant", "_block_quant_kernel", {"x_ptr": "*fp32", **quant_ptrs},
           {"BLOCK_R": 128, "BLOCK_C": 128, "PER_ROW": False, "UE8M0": False}, {"num_warps": 8})
    yield ("quant", "_weight_dequant_kernel",
           {"w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16"}, {"BLOCK": 128},
           {"num_warps": 8})
    yield ("fp8_gemm", "_fp8_gemm_kernel", FP8_GEMM_PTRS,
           {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, {"num_warps": 4, "num_stages": 5})
    yield ("fp8_gemm", "_fp8_gemm_kernel", FP8_GEMM_PTRS,
           {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}, {"num_warps": 8, "num_stages": 3})
    mla = {"q_abs_ptr": "*bf16", "q_pe_ptr": "*bf16", "cache_ptr": "*bf16", "table_ptr": "*i32", "lens_ptr": "*i32",
           "out_ptr": "*bf16", "scale": "fp32"}
    yield ("mla_decode", "_paged_mla_decode_kernel", mla,
           {"PAGE": 64, "C_PAD": 512, "R_PAD": 64, "BLOCK_H": 16, "BLOCK_T": 32, "IEEE": False, "UPCAST": False},
           {"num_warps": 4, "num_stages": 2})
    yield ("router", "_router_kernel", {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "w_ptr": "*fp32",
                                        "ids_ptr": "*i64", "scale": "fp32"},
           {"E_PAD": 256, "G": 8, "EG": 32, "TOPK_GROUP": 4, "K": 8, "K_PAD": 8, "SIGMOID": True, "HAS_BIAS": True,
            "NORM": True}, {"num_warps": 4})
    yield ("fused_moe", "_align_kernel", {"ids_ptr": "*i64", "sorted_pair_ptr": "*i32", "block_expert_ptr": "*i32",
                                          "num_padded_ptr": "*i32"},
           {"BLOCK_M": 64, "E_PAD": 64, "TILE": 32}, {"num_warps": 4})
    for gated in (True, False):
        yield ("fused_moe", "_fused_moe_kernel", MOE_PTRS,
               {"TOP_K": 8, "GATED": gated, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128},
               {"num_warps": 4, "num_stages": 3})


CASES = list(_cases())
CASE_IDS = [f"{c[1]}-{'-'.join(map(str, c[3].values()))}" for c in CASES]


@pytest.mark.parametrize("capability", [89, 90])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_kernel_compiles_for_gpu(case, capability):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    module, name, ptrs, constexprs, options = case
    kernel = getattr(importlib.import_module(f"expertpool.kernels.{module}"), name)
    if not isinstance(kernel, JITFunction):
        pytest.skip("TRITON_INTERPRET=1 was set when triton was imported; kernels are interpreted")
    params = inspect.signature(kernel.fn).parameters
    signature = {p: ptrs.get(p, "constexpr" if p in constexprs else "i32") for p in params}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", capability, 32), options=options)
    assert compiled.asm.get("cubin")
    if capability == 90 and name in ("_fp8_gemm_kernel", "_fused_moe_kernel") and constexprs["BLOCK_M"] >= 64:
        assert "wgmma" in compiled.asm["ptx"], "fp8 tile should use Hopper wgmma"
