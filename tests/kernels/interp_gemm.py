"""``fp8_gemm`` under TRITON_INTERPRET=1 (run via test_kernels_interpreter.py).

Two oracles, both float64:
- ``fp8_gemm_ref`` in float64 on the *same quantized operands*: the kernel differs only by fp32
  accumulation and the per-block scale multiply (~K * 2**-24 relative), so fp32 output is held to
  1e-5 relative (Frobenius) and 1e-4 elementwise against the product magnitude. bf16 output may
  additionally lose 2**-7 of each value: Triton's interpreter truncates fp32 -> bf16 (the GPU
  rounds to nearest, 2**-8).
- the exact product of the *unquantized* inputs: e4m3 error only, bound ``E4M3_REL_ERROR_BOUND``
  (reason in kernel_oracles.py).
"""

import pytest
import torch

from tests.kernels.kernel_oracles import E4M3_REL_ERROR_BOUND, rel_err, requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool.kernels import quant, reference as ref  # noqa: E402  (after the triton check)
from expertpool.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref  # noqa: E402

SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 32}  # several tiles per dim on tiny shapes


@pytest.mark.parametrize("m,n,k", [(1, 576, 256), (33, 96, 256), (16, 256, 384)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_float64(gen, m, n, k, out_dtype):
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    a, a_s = quant.act_quant(x)
    b, b_s = ref.weight_quant_ref(w)
    c = fp8_gemm(a, a_s, b, b_s, out_dtype=out_dtype, config=SMALL_TILES)
    assert c.shape == (m, n) and c.dtype == out_dtype
    want = fp8_gemm_ref(a, a_s, b, b_s, torch.float64, torch.float64)
    scale = (a.double().abs() * a_s.double().repeat_interleave(128, -1)) @ \
        ref.weight_dequant_ref(b, b_s, torch.float64).abs().T  # sum |a||b|: fp32 error scale
    out_rel = 0.0 if out_dtype == torch.float32 else 2.0 ** -7
    assert ((c.double() - want).abs() <= out_rel * want.abs() + 1e-4 * scale).all()
    if out_dtype == torch.float32:
        assert rel_err(c, want) < 1e-5
    assert rel_err(c, x.double() @ w.double().T) < E4M3_REL_ERROR_BOUND


def test_fp8_gemm_default_config_and_zero_activations(gen):
    a, a_s = quant.act_quant(torch.zeros(3, 256))
    b, b_s = ref.weight_quant_ref(torch.randn(64, 256, generator=gen))
    c = fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32)  # JSON default config
    assert torch.equal(c, torch.zeros(3, 64))


def test_fp8_gemm_empty_m():
    b, b_s = ref.weight_quant_ref(torch.randn(64, 128))
    a, a_s = ref.act_quant_ref(torch.zeros(0, 128))
    assert fp8_gemm(a, a_s, b, b_s).shape == (0, 64)


def test_fp8_gemm_rejects_bad_inputs(gen):
    a, a_s = ref.act_quant_ref(torch.randn(4, 256, generator=gen))
    b, b_s = ref.weight_quant_ref(torch.randn(64, 256, generator=gen))
    with pytest.raises(TypeError, match="a must be a torch.float8_e4m3fn"):
        fp8_gemm(a.float(), a_s, b, b_s)
    with pytest.raises(TypeError, match="b must be a torch.float8_e4m3fn"):
        fp8_gemm(a, a_s, b.to(torch.bfloat16), b_s)
    with pytest.raises(ValueError, match="b must be row-major"):
        fp8_gemm(a, a_s, b.t().contiguous().t(), b_s)
    with pytest.raises(ValueError, match=r"a_s must be a row-major \(4, 2\)"):
        fp8_gemm(a, a_s[:, :1], b, b_s)
    with pytest.raises(TypeError, match="b_s must be a torch.float32"):
        fp8_gemm(a, a_s, b, b_s.half())
    with pytest.raises(ValueError, match="K=200 must be a multiple of 128"):
        fp8_gemm(a[:, :200].contiguous(), a_s, b[:, :200].contiguous(), b_s)
    with pytest.raises(ValueError, match="a is"):
        fp8_gemm(a, a_s, b[:, :128].contiguous(), b_s[:, :1])
    with pytest.raises(TypeError, match="out_dtype"):
        fp8_gemm(a, a_s, b, b_s, out_dtype=torch.int32)
