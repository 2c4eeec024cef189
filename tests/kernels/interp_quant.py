"""Triton quantizers under TRITON_INTERPRET=1 against the torch references.

Tolerances: e4m3 codes and fp32 scales must be bit-exact (the kernel uses IEEE division and
rounds explicitly, like torch); fp32 dequant is exact (one fp32 product per element on both
sides). bf16 dequant output may differ by one bf16 ulp in the interpreter only, because Triton's
interpreter truncates fp32 -> bf16 where torch (and the GPU) round to nearest even.
"""

import pytest
import torch

from tests.kernels.kernel_oracles import requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool.kernels import quant, reference as ref  # noqa: E402  (after the triton check)


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _tricky_activations(gen) -> torch.Tensor:
    """Rows spanning 11 decades, an all-zero row, negative zeros, e4m3 ties and subnormals."""
    x = torch.randn(21, 384, generator=gen) * torch.logspace(-8, 3, 21)[:, None]
    x[3] = 0.0
    x[4, :128] = -0.0
    # Row 5, group 0: amax 448 makes the scale exactly 1, so x/s is x: e4m3 ties (1.0625 between
    # 1 and 1.125, 232, 248 -> 256 with a carry, subnormal ties 2**-10 and 1.5 * 2**-9), one ulp
    # either side of a tie, the subnormal range (< 2**-6) and 124.7 -> 128 (the interpreter's
    # dropped-carry case).
    tie = torch.tensor(1.0625)
    ties = torch.tensor([448.0, 1.0625, torch.nextafter(tie, torch.tensor(2.0)).item(),
                         torch.nextafter(tie, torch.tensor(0.0)).item(), 1.1875, 232.0, 248.0,
                         2.0 ** -7 * 1.5, 2.0 ** -10, 2.0 ** -9 * 1.5, 124.7, 240.0, 0.001,
                         -3.3125, -0.0, -(2.0 ** -9) * 1.5])
    x[5, :ties.numel()] = ties
    x[5, ties.numel():128] = torch.linspace(-440, 440, 128 - ties.numel())
    return x


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_bit_exact(gen, scale_fmt):
    x = _tricky_activations(gen)
    y, s = quant.act_quant(x, scale_fmt=scale_fmt)
    y_ref, s_ref = ref.act_quant_ref(x, scale_fmt=scale_fmt)
    assert y.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (21, 3)
    assert torch.equal(_codes(y), _codes(y_ref))
    assert torch.equal(s, s_ref)


def test_act_quant_all_zero_is_finite_and_keeps_leading_dims():
    x = torch.zeros(2, 3, 256, dtype=torch.bfloat16)
    y, s = quant.act_quant(x)
    assert y.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert torch.isfinite(y.float()).all() and (y.float() == 0).all()
    assert (s == torch.tensor(ref.AMAX_FLOOR / ref.FP8_E4M3_MAX, dtype=torch.float32)).all()


def test_act_quant_bf16_input_bit_exact(gen):
    x = (torch.randn(5, 256, generator=gen) * 7).to(torch.bfloat16)
    y, s = quant.act_quant(x)
    y_ref, s_ref = ref.act_quant_ref(x)
    assert torch.equal(_codes(y), _codes(y_ref)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("shape", [(576, 256), (200, 300)])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_weight_quant_bit_exact_ragged_edges(gen, shape, scale_fmt):
    w = torch.randn(*shape, generator=gen) * 0.02
    w[:128, :128] = 0.0  # an all-zero block
    q, s = quant.weight_quant(w, scale_fmt=scale_fmt)
    q_ref, s_ref = ref.weight_quant_ref(w, scale_fmt=scale_fmt)
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert torch.equal(_codes(q), _codes(q_ref)) and torch.equal(s, s_ref)


def test_weight_dequant_exact_fp32_and_bf16_within_one_ulp(gen):
    q, s = ref.weight_quant_ref(torch.randn(576, 256, generator=gen))
    assert torch.equal(quant.weight_dequant(q, s), ref.weight_dequant_ref(q, s))
    got = quant.weight_dequant(q, s, torch.bfloat16).float()
    want = ref.weight_dequant_ref(q, s, torch.float32)
    assert ((got - want).abs() <= want.abs() * 2.0 ** -7).all()  # one bf16 ulp (see module doc)


def test_quant_rejects_bad_inputs():
    with pytest.raises(TypeError, match="x must be"):
        quant.act_quant(torch.zeros(2, 128, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 128"):
        quant.act_quant(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="scale_fmt"):
        quant.act_quant(torch.zeros(2, 128), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="2-D"):
        quant.weight_quant(torch.zeros(2, 2, 128))
    with pytest.raises(ValueError, match="row-major"):
        quant.weight_quant(torch.zeros(256, 128).t())
    q, s = ref.weight_quant_ref(torch.randn(256, 128))
    with pytest.raises(TypeError, match="w must be torch.float8_e4m3fn"):
        quant.weight_dequant(q.float(), s)
    with pytest.raises(TypeError, match="s must be torch.float32"):
        quant.weight_dequant(q, s.double())
    with pytest.raises(ValueError, match=r"s must have shape \(2, 1\)"):
        quant.weight_dequant(q, s[:1])
