"""The CPU W8A8 linears (``kernels.cpu_w8a8``, ``csrc/w8a8_gemm.c``; ``weight_dtype: w8a8``): the kernel's
activation quantization is the torch reference's bit for bit, its products are the reference's quantized
product to fp32 rounding, a row's result does not depend on its batch, and shapes or CPUs the kernel does
not take keep the compute dtype's pack."""

import logging

import pytest
import torch

from expertpool import kernels
from expertpool.kernels import cpu_experts, cpu_gemm, cpu_w8a8

needs_vnni = pytest.mark.skipif(not cpu_w8a8.available(), reason="the CPU kernels have no AVX512_VNNI build here")


def _quant_rows(x):
    lib = cpu_experts.library()
    M, K = x.shape
    xq = torch.empty(M, K, dtype=torch.uint8)
    xs = torch.empty(M, K // cpu_w8a8.BLOCK)
    lib.w8a8_quant_rows(x.data_ptr(), int(x.dtype == torch.bfloat16), M, K, x.stride(0), xq.data_ptr(),
                        xs.data_ptr())
    return (xq.int() - 128).to(torch.int8), xs


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_quantization_is_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 512, generator=g) * torch.logspace(-3, 2, 9)[:, None]).to(dtype)
    x[2, 128:256] = 0  # an all-zero block: scale 1, codes 0
    x[4, 5] = 1e4      # an outlier: its block's scale, not the row's
    wide = torch.zeros(9, 640, dtype=dtype)
    wide[:, :512] = x
    for rows in (x, wide[:, :512]):  # contiguous and strided rows
        q, s = _quant_rows(rows)
        rq, rs = cpu_w8a8.quantize_rows_ref(rows)
        assert torch.equal(q, rq) and torch.equal(s, rs)
    assert s[2, 1] == 1 and (q[2, 128:256] == 0).all()
    assert q.abs().max() == 127


@needs_vnni
@pytest.mark.parametrize("n,k", [(64, 128), (48, 384), (1040, 256), (32, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_are_the_quantized_reference(n, k, dtype):
    """Block sums are exact integers; only their fp32 scaling and the output rounding differ from the fp64
    reference (N % 32 == 16 takes the one-vector tail; M from 1 to past two row tiles)."""
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    packed = cpu_w8a8.pack(w)
    assert packed is not None and torch.equal(packed.q, cpu_w8a8.quantize_weight(w)[0])
    for m in (1, 5, 6, 13):
        x = torch.randn(m, k, generator=g).to(dtype)
        y = cpu_w8a8.linear(x, packed)
        ref = cpu_w8a8.reference_linear(x.float(), packed).double()
        assert y.dtype == dtype and y.shape == (m, n)
        tol = 1e-6 if dtype == torch.float32 else 2 ** -8  # fp32 sums; bf16 output: half an ulp
        assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-6 * ref.abs().max()).all(), (m, dtype)


@needs_vnni
def test_quantization_error_of_a_product():
    """What the docs state: ~1e-2 relative L2 against the unquantized product on Gaussian rows (weights
    and activations one int8 step each, amax / 127 of a row or block)."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(512, 1024, generator=g), torch.randn(16, 1024, generator=g)
    y = cpu_w8a8.linear(x, cpu_w8a8.pack(w)).double()
    exact = x.double() @ w.double().T
    rel = ((y - exact).norm() / exact.norm()).item()
    assert 2e-3 < rel < 2e-2, rel


@needs_vnni
def test_a_rows_result_does_not_depend_on_its_batch():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 256, generator=g).bfloat16()
    packed = cpu_w8a8.pack(w)
    x = torch.randn(16, 256, generator=g).bfloat16()
    full = cpu_w8a8.linear(x, packed)
    for i in (0, 5, 15):
        assert torch.equal(cpu_w8a8.linear(x[i:i + 1], packed)[0], full[i])
    assert torch.equal(cpu_w8a8.linear(x[3:11], packed), full[3:11])


@needs_vnni
def test_switched_off_runs_the_reference():
    g = torch.Generator().manual_seed(3)
    packed = cpu_w8a8.pack(torch.randn(32, 128, generator=g))
    x = torch.randn(4, 128, generator=g)
    with cpu_w8a8.switched_off():
        assert torch.equal(cpu_w8a8.linear(x, packed), cpu_w8a8.reference_linear(x, packed))
    assert torch.allclose(cpu_w8a8.linear(x, packed), cpu_w8a8.reference_linear(x, packed), rtol=1e-5, atol=1e-5)


def test_shapes_it_cannot_take_keep_the_compute_dtypes_pack(caplog):
    from expertpool.kernels import backend

    backend._warn_once.cache_clear()  # warned once per message and process: earlier tests may have
    for shape in ((40, 128), (64, 96)):  # N % 16, K % 128
        w = torch.randn(*shape).bfloat16()
        assert cpu_w8a8.pack(w) is None
        with caplog.at_level(logging.WARNING, logger="expertpool.kernels"):
            packed = kernels.pack_weight(w, w8a8=True)
        assert not isinstance(packed, cpu_w8a8.Packed8)
        assert packed is None or isinstance(packed, cpu_gemm.Packed) or isinstance(packed, torch.Tensor)
    why = "K % 128 == 0 and N % 16 == 0" if cpu_w8a8.available() else "no AVX512_VNNI build"
    assert "weight_dtype w8a8" in caplog.text and why in caplog.text


@needs_vnni
def test_merged_product_equals_the_separate_ones():
    """MLA's q_a with kv_a, an MLP's gate with up: one W8A8 product, each output column computed alone from
    the same quantized rows, so the merged product is the separate ones bit for bit."""
    from expertpool.model.layers import Linear, MergedPack

    g = torch.Generator().manual_seed(4)
    a, b = Linear(256, 64), Linear(256, 96)
    for lin in (a, b):
        lin.weight = torch.nn.Parameter(torch.randn(lin.out_features, 256, generator=g).bfloat16(),
                                        requires_grad=False)
    merged = MergedPack()
    assert merged.pack([a, b], w8a8=True) and isinstance(merged.packed.form, cpu_w8a8.Packed8)
    assert a.pack_for_cpu(w8a8=True) and b.pack_for_cpu(w8a8=True)
    x = torch.randn(7, 256, generator=g).bfloat16()
    with torch.inference_mode():
        ya, yb = merged([a, b], x)
        assert torch.equal(ya, a(x)) and torch.equal(yb, b(x))
        assert torch.equal(a(x), cpu_w8a8.linear(x, a.packed.form))


def test_a_cpu_without_vnni_keeps_the_compute_dtypes_pack(monkeypatch, caplog):
    """An AVX2-only CPU (the kernel is compiled only for AVX512_VNNI): the linear keeps the pack it would
    have without w8a8, and says why once."""
    from expertpool.kernels import backend

    backend._warn_once.cache_clear()
    monkeypatch.setattr(cpu_w8a8, "available", lambda lib=None: False)
    w = torch.randn(64, 256).bfloat16()
    assert cpu_w8a8.pack(w) is None
    with caplog.at_level(logging.WARNING, logger="expertpool.kernels"):
        packed = kernels.pack_weight(w, w8a8=True)
    assert type(packed) is type(kernels.pack_weight(w))
    assert "no AVX512_VNNI build" in caplog.text
