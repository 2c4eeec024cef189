"""The grouped few-row expert kernel on CPU (``kernels.cpu_experts``, ``csrc/expert_gemv.c``): its
products against an fp64 oracle, row independence (a row's bits do not depend on its batch), the
routed-expert layer it serves against the reference, and how it is built and switched off."""

import shutil

import pytest
import torch

from expertpool.kernels import cpu_experts
from expertpool.kernels import reference as ref
from tests.kernels.kernel_oracles import rel_err

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build the CPU kernel")


def _weights(shape, g, wdt):
    """Random expert weights in ``wdt``; int8 as ``reference.int8_weight_quant`` makes them: (codes,
    bf16 row scales). Returns (weights, scales or None, the exact weights the kernel multiplies by)."""
    w = torch.randn(*shape, generator=g) * 0.05
    if wdt == torch.int8:
        q, s = ref.int8_weight_quant(w)
        return q, s, ref.int8_dequant(q, s, torch.float64)
    w = w.to(wdt)
    return w, None, w


def _oracle(x_PK, counts, w_ENK):
    out, s = [], 0
    for e, n in enumerate(counts):
        if n:
            out.append(x_PK[s:s + n].double() @ w_ENK[e].double().T)
            s += n
    return torch.cat(out)


@pytest.mark.parametrize("wdt", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("K,N", [(1024, 512), (256, 1024), (48, 40), (40, 17)])
def test_grouped_gemv_equals_the_fp64_products(wdt, K, N):
    """Every row count the kernel blocks differently (1-3, a whole block of 4, 5-8: two passes), an
    idle expert, K with a vector tail (48 = 3 x 16) and without whole vectors (40: packed with zeros),
    N not a multiple of the work item: fp32 accumulation of exact widened weights, ~1e-7 relative.
    int8 weights: each row's sum of exact int8 products times its bf16 scale equals the product with
    the dequantized weights (code x scale, exact in fp64) to the same rounding."""
    g = torch.Generator().manual_seed(0)
    counts = [1, 0, 2, 3, 4, 5, 8, 1]
    w, scale, exact = _weights((len(counts), N, K), g, wdt)
    x = torch.randn(sum(counts), K, generator=g)
    got = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w, scale_EN=scale)
    assert got.dtype == torch.float32 and got.shape == (sum(counts), N)
    assert rel_err(got, _oracle(x, counts, exact)) < 1e-6


def test_int8_weights_need_their_row_scales():
    """int8 codes without their scales (or scales for a dense weight) are a caller's bug, not a
    product with unit scales; a layer whose int8 scales do not have one per row stays off the kernel."""
    g = torch.Generator().manual_seed(11)
    q, s, _ = _weights((2, 32, 64), g, torch.int8)
    x = torch.randn(3, 64, generator=g)
    with pytest.raises(AssertionError, match="row scales"):
        cpu_experts.grouped_gemv(x, cpu_experts.Groups([1, 2]), q)
    with pytest.raises(AssertionError, match="row scales"):
        cpu_experts.grouped_gemv(x, cpu_experts.Groups([1, 2]), q.float(), scale_EN=s)
    assert cpu_experts.applies(x, q, q, [1, 2], s, s)
    assert not cpu_experts.applies(x, q, q, [1, 2])  # no scales
    assert not cpu_experts.applies(x, q, q, [1, 2], s[:, :16], s)  # not one per row


def test_the_avx2_build_equals_the_fp64_products(avx2_lib):
    """The kernel built for an AVX2-only CPU (generic vectors, 8-lane halves; bf16 widened without the
    AVX-512 intrinsic), which is where fp32 compute with bf16 weights matters most, run here."""
    lib = avx2_lib
    g = torch.Generator().manual_seed(5)
    counts = [2, 0, 1, 5, 3]
    for wdt in (torch.float32, torch.bfloat16, torch.int8):
        w, scale, exact = _weights((len(counts), 40, 48), g, wdt)
        x = torch.randn(sum(counts), 48, generator=g)
        got = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w, lib=lib, scale_EN=scale)
        assert rel_err(got, _oracle(x, counts, exact)) < 1e-6, wdt


@pytest.mark.parametrize("wdt", [torch.bfloat16, torch.int8])
def test_a_rows_result_does_not_depend_on_its_batch(wdt):
    """The kernel sums each row in one order whatever shares its expert: every row alone gives the
    same bits as in a group of up to 8 rows (each position in a block of 4, and the second block)."""
    g = torch.Generator().manual_seed(1)
    w, scale, _ = _weights((2, 96, 256), g, wdt)
    x = torch.randn(8, 256, generator=g)
    together = cpu_experts.grouped_gemv(x, cpu_experts.Groups([0, 8]), w, scale_EN=scale)
    for r in range(8):
        alone = cpu_experts.grouped_gemv(x[r:r + 1], cpu_experts.Groups([0, 1]), w, scale_EN=scale)
        assert torch.equal(alone[0], together[r]), r


needs_bf16_dot = pytest.mark.skipif(
    shutil.which("cc") is None or cpu_experts.library() is None or not cpu_experts.has_bf16_dot(cpu_experts.library())
    or not cpu_experts.BF16_DOT.on(),
    reason=f"the kernel's bf16 dot-product entry needs a CPU (and compiler target) with AVX512_BF16 (and "
           f"{cpu_experts.DOT_SWITCH} not 0)")


@needs_bf16_dot
@pytest.mark.parametrize("K,N", [(1024, 512), (256, 1024), (96, 40), (40, 17)])
def test_the_bf16_dot_product_equals_the_fp64_products(K, N, monkeypatch):
    """bf16 activations and weights take the bf16 dot-product entry: every product of two bf16 values
    is exact in fp32, so only the fp32 sums round (~1e-7 relative), at every row blocking (1-8 rows),
    with a K tail past the last whole pair of vectors (96, 40) and N not a multiple of the work item.
    It agrees with the widening fp32 path to that rounding."""
    g = torch.Generator().manual_seed(6)
    counts = [1, 0, 2, 3, 4, 5, 8, 1]
    w = (torch.randn(len(counts), N, K, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(sum(counts), K, generator=g).to(torch.bfloat16)
    lib, calls = cpu_experts.library(), []
    entry = lib.grouped_gemv_bf16
    monkeypatch.setattr(lib, "grouped_gemv_bf16", lambda *a: calls.append(len(a)) or entry(*a))
    got = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w)
    assert calls == [11] and got.dtype == torch.float32 and got.shape == (sum(counts), N)
    assert rel_err(got, _oracle(x, counts, w)) < 1e-6
    with cpu_experts.without_bf16_dot():
        widened = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w)
    assert calls == [11] and rel_err(got, widened) < 1e-6


@needs_bf16_dot
def test_a_rows_result_does_not_depend_on_its_batch_through_the_bf16_dot_product():
    """The bf16 entry blocks rows as the fp32 path does and sums each row in one order: a row alone
    gives the same bits as in a group of 8 (every position of a block of 4, and the second block)."""
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(2, 96, 320, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(8, 320, generator=g).to(torch.bfloat16)
    together = cpu_experts.grouped_gemv(x, cpu_experts.Groups([0, 8]), w)
    for r in range(8):
        alone = cpu_experts.grouped_gemv(x[r:r + 1], cpu_experts.Groups([0, 1]), w)
        assert torch.equal(alone[0], together[r]), r


@needs_bf16_dot
def test_the_environment_switch_keeps_the_widening_path(monkeypatch):
    """EXPERTPOOL_CPU_BF16_DOT=0 (read once per process) sends bf16 activations through the widening
    fp32 path even where the build has the bf16 entry."""
    lib = cpu_experts.library()
    calls = []
    entry = lib.grouped_gemv_bf16
    monkeypatch.setattr(lib, "grouped_gemv_bf16", lambda *a: calls.append(1) or entry(*a))
    monkeypatch.setenv(cpu_experts.DOT_SWITCH, "0")
    cpu_experts.BF16_DOT.reread()
    g = torch.Generator().manual_seed(10)
    w = (torch.randn(2, 24, 64, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=g).to(torch.bfloat16)
    try:
        got = cpu_experts.grouped_gemv(x, cpu_experts.Groups([1, 2]), w)
    finally:
        cpu_experts.BF16_DOT.reread()
    assert not calls and rel_err(got, _oracle(x, [1, 2], w)) < 1e-6


needs_i8_dot = pytest.mark.skipif(
    shutil.which("cc") is None or cpu_experts.library() is None or not cpu_experts.has_i8_dot(cpu_experts.library())
    or not (cpu_experts.BF16_DOT.on() and cpu_experts.I8_DOT.on()),
    reason=f"the kernel's int8 x bf16 dot-product entry needs a CPU (and compiler target) with AVX512_BF16 and "
           f"AVX512_VBMI (and {cpu_experts.DOT_SWITCH}, {cpu_experts.I8_DOT_SWITCH} not 0)")


def _spy(monkeypatch, name):
    lib, calls = cpu_experts.library(), []
    entry = getattr(lib, name)
    monkeypatch.setattr(lib, name, lambda *a: calls.append(1) or entry(*a))
    return calls


@needs_i8_dot
@pytest.mark.parametrize("K,N", [(1024, 512), (256, 1024), (64, 40), (192, 17)])
def test_int8_codes_through_the_bf16_dot_product_equal_the_fp64_products(K, N, monkeypatch):
    """bf16 activations against int8 codes (bf16 compute, ``weight_dtype: int8``) take the entry that
    looks the codes up as bf16 and uses the bf16 dot product: code x activation is exact in fp32, so
    only the fp32 sums round (~1e-7 relative), at every row blocking (1-8 rows), with an odd number of
    64-code chunks (64, 192) and N not a multiple of the work item. It agrees with the widening fp32
    path to that rounding."""
    g = torch.Generator().manual_seed(13)
    counts = [1, 0, 2, 3, 4, 5, 8, 1]
    q, s, exact = _weights((len(counts), N, K), g, torch.int8)
    x = torch.randn(sum(counts), K, generator=g).to(torch.bfloat16)
    calls = _spy(monkeypatch, "grouped_gemv_i8bf16")
    got = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), q, scale_EN=s)
    assert calls == [1] and got.dtype == torch.float32 and got.shape == (sum(counts), N)
    assert rel_err(got, _oracle(x, counts, exact)) < 1e-6
    with cpu_experts.without_i8_dot():
        widened = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), q, scale_EN=s)
    assert calls == [1] and rel_err(got, widened) < 1e-6


@needs_i8_dot
def test_every_int8_code_reads_as_itself_through_the_bf16_lookup():
    """The lookup that turns codes into bf16 (sign, then the low and high bytes of bf16(|q|)) is exact
    for every code the quantizer makes, -127..127: with unit scales and one-hot activations each output
    is one code, at every position of a 64-code chunk (the unpack order of the packed activations)."""
    K = 128
    codes = torch.arange(-127, 128, dtype=torch.int64)  # 255 codes, spread over the rows and positions
    n = -(-codes.numel() * 3 // K)
    q = codes.repeat(3)[: n * K]
    q = torch.cat([q, codes[: n * K - q.numel()]]).reshape(1, n, K).to(torch.int8)
    s = torch.ones(1, n, dtype=torch.bfloat16)
    x = torch.eye(K).to(torch.bfloat16)  # row k picks column k
    for rows in (1, 2, 3, 4):  # every blocking of the rows
        for r0 in range(0, K, rows):
            m = min(rows, K - r0)
            got = cpu_experts.grouped_gemv(x[r0:r0 + m], cpu_experts.Groups([m]), q, scale_EN=s)
            assert torch.equal(got, q[0, :, r0:r0 + m].T.float()), (rows, r0)


@needs_i8_dot
def test_a_rows_result_does_not_depend_on_its_batch_through_the_int8_lookup():
    """The int8 x bf16 entry sums each row in one order whatever shares its expert: a row alone gives
    the same bits as in a group of 8 (one block of 4 and another of 4, or any remainder)."""
    g = torch.Generator().manual_seed(14)
    q, s, _ = _weights((2, 96, 320), g, torch.int8)
    x = torch.randn(8, 320, generator=g).to(torch.bfloat16)
    for n in (2, 3, 5, 8):
        together = cpu_experts.grouped_gemv(x[:n], cpu_experts.Groups([0, n]), q, scale_EN=s)
        for r in range(n):
            alone = cpu_experts.grouped_gemv(x[r:r + 1], cpu_experts.Groups([0, 1]), q, scale_EN=s)
            assert torch.equal(alone[0], together[r]), (n, r)


@needs_i8_dot
def test_int8_codes_with_k_off_the_64_chunk_and_the_switch_widen(monkeypatch):
    """K not a multiple of 64 (the lookup converts 64 codes at a time), and EXPERTPOOL_CPU_I8_DOT=0 (read
    once per process), keep the widening fp32 path: the entry is not called and the products hold."""
    g = torch.Generator().manual_seed(15)
    calls = _spy(monkeypatch, "grouped_gemv_i8bf16")
    q, s, exact = _weights((2, 24, 96), g, torch.int8)
    x = torch.randn(3, 96, generator=g).to(torch.bfloat16)
    got = cpu_experts.grouped_gemv(x, cpu_experts.Groups([1, 2]), q, scale_EN=s)
    assert not calls and rel_err(got, _oracle(x, [1, 2], exact)) < 1e-6
    q, s, exact = _weights((2, 24, 128), g, torch.int8)
    x = torch.randn(3, 128, generator=g).to(torch.bfloat16)
    monkeypatch.setenv(cpu_experts.I8_DOT_SWITCH, "0")
    cpu_experts.I8_DOT.reread()
    try:
        got = cpu_experts.grouped_gemv(x, cpu_experts.Groups([1, 2]), q, scale_EN=s)
    finally:
        cpu_experts.I8_DOT.reread()
    assert not calls and rel_err(got, _oracle(x, [1, 2], exact)) < 1e-6


def test_an_avx2_build_has_no_bf16_dot_product_and_widens(avx2_lib):
    """A build without AVX-512 (an AVX2-only CPU, or ATEN_CPU_CAPABILITY=avx2) has no bf16 entry:
    bf16 activations are widened there, as before."""
    lib = avx2_lib
    assert not cpu_experts.has_bf16_dot(lib)
    g = torch.Generator().manual_seed(8)
    counts = [2, 1, 3]
    w = (torch.randn(3, 24, 64, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(6, 64, generator=g).to(torch.bfloat16)
    got = cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w, lib=lib)
    assert rel_err(got, _oracle(x, counts, w)) < 1e-6


def _layer(g, t, e=8, d=256, f=64, k=2, wdt=torch.bfloat16):
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[0, 1] = -1  # a slot owned by another rank
    w = torch.rand(t, k, generator=g)
    w13 = (torch.randn(e, 2 * f, d, generator=g) * 0.05).to(wdt)
    w2 = (torch.randn(e, d, f, generator=g) * 0.05).to(wdt)
    return x, ids, w, w13, w2


@pytest.mark.parametrize("t", [12, 96])  # decode row counts; a short prefill chunk (tens of rows per expert)
@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.bfloat16)])
def test_the_routed_experts_through_the_kernel_equal_the_reference(xdt, wdt, t, monkeypatch):
    """``moe_experts_inference`` takes the kernel at decode row counts and for short prefill chunks (it
    outran the per-expert oneDNN loop up to 128 rows per expert). fp32 compute (fp32 or bf16 weights)
    differs from the reference only in summation order (~1e-7). In bf16 both paths round the same
    intermediates to bf16 (the products, silu, silu * up, the outputs): their distance to the fp64
    oracle is that rounding (a few 2**-9), and the kernel is as close to it as the torch loop. Each
    row depends on its own input row only."""
    g = torch.Generator().manual_seed(2)
    x, ids, w, w13, w2 = _layer(g, t=t, wdt=wdt)
    xd = x.to(xdt)
    counts = torch.bincount(ids[ids >= 0], minlength=8)
    assert 0 < counts.max() <= cpu_experts.MAX_ROWS
    assert t == 12 or counts.min() > 16  # the chunk: more rows on every expert than a decode gives
    calls = []
    kernel = cpu_experts.grouped_gemv
    monkeypatch.setattr(cpu_experts, "grouped_gemv", lambda *a, **k: calls.append(a[2].shape) or kernel(*a, **k))
    with torch.no_grad():
        got = ref.moe_experts_inference(xd, ids, w, w13, None, w2, None)
    assert calls == [w13.shape, w2.shape]  # one call per product for the whole layer
    with torch.no_grad():
        want = ref.moe_experts_ref(xd, ids, w, w13, None, w2, None)
        oracle = ref.moe_experts_ref(xd.double(), ids, w.double(), w13.double(), None, w2.double(), None)
        alone = ref.moe_experts_inference(xd[:5], ids[:5], w[:5], w13, None, w2, None)
    with cpu_experts.switched_off(), torch.no_grad():
        loop = ref.moe_experts_inference(xd, ids, w, w13, None, w2, None)
    assert got.dtype == xdt
    assert torch.equal(alone, got[:5])  # the first rows alone give the same rows
    if xdt == torch.float32:
        assert rel_err(got, want) < 1e-6
    else:
        assert torch.equal(loop, want)  # the torch loop runs the reference's kernels
        assert rel_err(got, oracle) < 1e-2 and rel_err(want, oracle) < 1e-2
        assert rel_err(got, oracle) < 1.5 * rel_err(want, oracle)


@pytest.mark.parametrize("t", [12, 96])
@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16])
def test_int8_routed_experts_through_the_kernel(xdt, t, monkeypatch):
    """Weight-only int8 experts (``weight_dtype: int8``) take the kernel too, one call per product with
    the row scales; before, each expert went through ``torch._weight_int8pack_mm``, which takes bf16
    activations only. Against the fp64 oracle of the dequantized weights (code x scale): fp32
    compute ~1e-7 (the loop rounds x to bf16 first, ~1e-3); bf16 compute rounds the same
    intermediates as the loop and is as close to the oracle. Rows depend on their own input only."""
    g = torch.Generator().manual_seed(12)
    x, ids, w, w13, w2 = _layer(g, t=t, wdt=torch.float32)
    (q13, s13), (q2, s2) = ref.int8_weight_quant(w13), ref.int8_weight_quant(w2)
    xd = x.to(xdt)
    calls = []
    kernel = cpu_experts.grouped_gemv
    monkeypatch.setattr(cpu_experts, "grouped_gemv", lambda *a, **k: calls.append(a[2].dtype) or kernel(*a, **k))
    with torch.no_grad():
        got = ref.moe_experts_inference(xd, ids, w, q13, s13, q2, s2)
        alone = ref.moe_experts_inference(xd[:5], ids[:5], w[:5], q13, s13, q2, s2)
        oracle = ref.moe_experts_ref(xd.double(), ids, w.double(), ref.int8_dequant(q13, s13, torch.float64), None,
                                     ref.int8_dequant(q2, s2, torch.float64), None)
        with cpu_experts.switched_off():
            loop = ref.moe_experts_inference(xd, ids, w, q13, s13, q2, s2)
    assert calls[:2] == [torch.int8, torch.int8] and len(calls) == 4  # two per call, loop excluded
    assert got.dtype == xdt and torch.equal(alone, got[:5])
    if xdt == torch.float32:
        assert rel_err(got, oracle) < 1e-6 < rel_err(loop, oracle)
    else:
        assert rel_err(got, oracle) < 1e-2 and rel_err(loop, oracle) < 1e-2
        assert rel_err(got, oracle) < 1.5 * rel_err(loop, oracle)


def test_many_rows_and_batch_invariant_mode_take_the_torch_loop():
    """More than MAX_ROWS rows on an expert (a long prefill chunk), or batch-invariant mode (whole-tile
    oneDNN products everywhere), keep the torch loop: bit for bit the reference in bf16."""
    g = torch.Generator().manual_seed(3)
    x, ids, w, w13, w2 = _layer(g, t=2 * cpu_experts.MAX_ROWS + 40, e=4)
    xb = x.to(torch.bfloat16)
    assert torch.bincount(ids[ids >= 0]).max() > cpu_experts.MAX_ROWS
    with torch.no_grad():
        assert torch.equal(ref.moe_experts_inference(xb, ids, w, w13, None, w2, None),
                           ref.moe_experts_ref(xb, ids, w, w13, None, w2, None))
        x, ids, w, w13, w2 = _layer(g, t=6, e=4)
        xb = x.to(torch.bfloat16)
        ref.set_batch_invariant(True)
        try:
            got = ref.moe_experts_inference(xb, ids, w, w13, None, w2, None)
        finally:
            ref.set_batch_invariant(False)
        with cpu_experts.switched_off():
            assert torch.equal(got, ref.moe_experts_inference(xb, ids, w, w13, None, w2, None))


def test_the_kernel_is_built_once_per_source_compiler_and_cpu(tmp_path, monkeypatch, caplog):
    """A fresh cache builds the library once and logs it; a second load reuses the file. Without a
    compiler, or switched off by the environment, the kernel is unavailable and says why."""
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_experts, "_state", {})
    with caplog.at_level("INFO", logger=cpu_experts.log.name):
        assert cpu_experts.library() is not None
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1 and "built the CPU kernels" in caplog.text
    mtime = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_experts, "_state", {})
    assert cpu_experts.library() is not None and built[0].stat().st_mtime_ns == mtime
    assert list((tmp_path / "kernels").iterdir()) == built  # no temporary left behind

    for env, why in (({"CC": str(tmp_path / "no-such-cc")}, "no C compiler"),
                     ({cpu_experts.ENV_SWITCH: "0"}, f"{cpu_experts.ENV_SWITCH}=0")):
        caplog.clear()
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            m.setattr(cpu_experts, "_state", {})
            assert cpu_experts.library() is None
            assert "CPU kernels unavailable" in caplog.text and why in caplog.text
            x = torch.randn(2, 16)
            assert not cpu_experts.applies(x, torch.zeros(1, 8, 16), torch.zeros(1, 16, 4), [2])


def test_an_isa_cap_for_torch_caps_the_kernels_build(tmp_path, monkeypatch, caplog):
    """``ATEN_CPU_CAPABILITY=avx2`` (how an AVX-512 machine runs as an AVX2-only one) builds a second
    library without AVX-512, which still computes the products."""
    assert cpu_experts.isa_cap_flags({}) == [] and cpu_experts.isa_cap_flags({"ATEN_CPU_CAPABILITY": "AVX512"}) == []
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)  # the first build uncapped, whatever the shell set
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_experts, "_state", {})
    assert cpu_experts.library() is not None
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setattr(cpu_experts, "_state", {})
    with caplog.at_level("INFO", logger=cpu_experts.log.name):
        lib = cpu_experts.library()
    assert lib is not None and "-mno-avx512f" in caplog.text
    assert len(list((tmp_path / "kernels").glob("cpu_kernels-*.so"))) == 2
    g = torch.Generator().manual_seed(6)
    counts = [1, 3, 0, 2]
    w = (torch.randn(len(counts), 40, 48, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(sum(counts), 48, generator=g)
    assert rel_err(cpu_experts.grouped_gemv(x, cpu_experts.Groups(counts), w, lib=lib), _oracle(x, counts, w)) < 1e-6


def test_an_unwritable_cache_builds_in_the_temporary_directory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(blocker))  # kernels/ under a file: mkdir fails, even as root
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(cpu_experts.tempfile, "tempdir", None)  # re-read TMPDIR
    monkeypatch.setattr(cpu_experts, "_state", {})
    assert cpu_experts.library() is not None
    assert "building it in" in caplog.text
    assert list((tmp_path / "tmp" / "expertpool-kernels").glob("cpu_kernels-*.so"))


def test_a_compiler_error_leaves_no_library_and_names_the_failure(tmp_path, monkeypatch, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\n[ \"$1\" = --version ] && exit 0\necho 'expert_gemv.c:1: error: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setattr(cpu_experts, "_state", {})
    assert cpu_experts.library() is None
    assert "error: broken" in caplog.text
    assert not list((tmp_path / "cache" / "kernels").glob("*"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_steps_around_the_products_equal_torchs(dtype):
    """SwiGLU between the kernel's products and the weighted combine after them (``moe_ops.c``), one C
    call each, against the torch ops they replace: bf16 bit for bit (same roundings), fp32 within a few
    ulps (silu through another exp, torch's summation order in a row's tail); slots without a pair
    (another rank's experts) add nothing, and a token's slots are summed in slot order."""
    g = torch.Generator().manual_seed(11)
    P, F2, D, T, K = 45, 2 * 72, 200, 9, 6  # F and D not whole vectors
    h = torch.randn(P, F2, generator=g) * 3
    gate, up = (h.to(dtype).float() if dtype != torch.float32 else h).chunk(2, dim=-1)
    silu = torch.nn.functional.silu(gate)
    want_a = silu.to(dtype).float().mul_(up).to(dtype) if dtype != torch.float32 else silu.mul(up)
    got_a = cpu_experts.swiglu(h, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(got_a, want_a, rtol=4 * 2.0 ** -24, atol=1e-30)
    else:
        assert torch.equal(got_a, want_a)
    y = torch.randn(P, D, generator=g)
    w = torch.rand(P, generator=g).to(dtype)
    idx = torch.randperm(T * K, generator=g)[:P]  # 9 of the 54 slots without a pair
    weighted = y.clone().to(dtype).mul_(w[:, None])
    got = cpu_experts.combine(y, w, idx, T, K)
    slots = torch.zeros(T * K, D, dtype=dtype).index_copy(0, idx, weighted).view(T, K, D).float()
    in_order = slots[:, 0]
    for k in range(1, K):
        in_order = in_order + slots[:, k]
    assert torch.equal(got, in_order.to(dtype))
    # torch's own reduction adds the slots in that order too, except past the last 16 columns of a row
    # whose length is not a multiple of 16 in fp32 (its tail loop): within the rounding of K fp32 sums there
    bound = K * 2.0 ** -24 * slots.abs().sum(1)
    assert ((got.float() - ref.combine_pairs(weighted, idx, T, K).float()).abs() <= bound).all()
    if dtype == torch.bfloat16:
        assert torch.equal(got, ref.combine_pairs(weighted, idx, T, K))


def test_the_decode_layer_takes_the_fused_steps_and_they_keep_its_result():
    g = torch.Generator().manual_seed(12)
    t, e, d, f, k = 12, 8, 256, 64, 3
    x = torch.randn(t, d, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[2, 1] = -1  # a slot routed to another rank
    wts = torch.rand(t, k, generator=g)
    w13 = (torch.randn(e, 2 * f, d, generator=g) * 0.05).bfloat16()
    w2 = (torch.randn(e, d, f, generator=g) * 0.05).bfloat16()
    with torch.no_grad():
        fused = ref.moe_experts_inference(x, ids, wts, w13, None, w2, None)
        with cpu_experts.without_fused_steps():
            ops = ref.moe_experts_inference(x, ids, wts, w13, None, w2, None)
    assert torch.equal(fused, ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouping_the_pairs_in_c_equals_the_torch_ops(dtype):
    """``cpu_experts.group`` (one C call) gives the pairs of ``reference._pairs_by_expert`` in the same
    stable order, their rows and routing weights (in x's dtype) bit for bit, and the kernel's groups;
    slots of another rank (-1) are skipped, a layer with none valid gives None, and an id past the
    layer's experts is refused by name."""
    g = torch.Generator().manual_seed(16)
    for T, K, E in ((16, 6, 64), (5, 2, 8), (1, 3, 4)):
        x = torch.randn(T, 40, generator=g).to(dtype)
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
        ids[0, 0] = -1
        w = torch.rand(T, K, generator=g)
        counts, pair_idx, xs, ws = ref._pairs_by_expert(x, ids, w, E)
        groups, pair_idx2, xs2, ws2 = cpu_experts.group(x, ids, w, E)
        assert torch.equal(pair_idx, pair_idx2) and torch.equal(xs, xs2) and torch.equal(ws, ws2)
        want = cpu_experts.Groups(counts)
        assert torch.equal(groups.experts, want.experts) and torch.equal(groups.start, want.start)
        assert torch.equal(groups.count, want.count) and groups.rows == want.rows
        assert groups.max_count == want.max_count == max(counts)
    assert cpu_experts.group(x, torch.full((2, 1), -1), w[:2, :1], E) is None
    with pytest.raises(ValueError, match=r"ids must be in \[-1, 4\)"):
        cpu_experts.group(x, torch.tensor([[4]]), w[:1, :1], 4)


def _ep_torch(x, ids, w, d):
    """Expert parallelism's pack and combine as ``AllToAllDispatcher``'s torch ops do them, for one rank
    whose pairs come straight back (``back``: the packed rows themselves)."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    dest = d.destinations(flat)
    order = torch.argsort(dest, stable=True)
    counts = torch.zeros(d.world, dtype=torch.long).scatter_add_(0, dest, torch.ones_like(dest))
    rows = x.index_select(0, torch.div(order, K, rounding_mode="floor"))
    send = torch.cat([rows, flat[order].view(x.dtype).view(len(order), 8 // x.element_size())], 1)
    return send, order, counts


@pytest.mark.parametrize("lib_kind", ["native", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_parallel_pack_and_combine_in_c_equal_the_torch_ops(dtype, lib_kind, request):
    """``cpu_experts.ep_pack`` packs a rank's pairs as the dispatcher's torch ops do (destinations by
    owner or by copy p mod copies, stable order, rows, the ids' bytes, counts), and ``ep_combine``
    equals ``combine_pairs`` of the rows times their weights in the compute dtype, bit for bit, also at
    a hidden size off the vector width and for rows that are a column slice of the packed buffer
    (the id columns beside them). Negative ids are refused by name."""
    from unittest import mock

    from expertpool.model.dispatch import AllToAllDispatcher
    lib = request.getfixturevalue("avx2_lib") if lib_kind == "avx2" else cpu_experts.library()
    g = torch.Generator().manual_seed(17)
    E = 8
    replicas = [[0, 2], [1], [2], [3, 0, 1], [0], [1], [2], [3]]
    for world, reps in ((2, None), (4, None), (4, replicas)):
        with mock.patch("torch.distributed.get_world_size", return_value=world), \
                mock.patch("torch.distributed.get_rank", return_value=0):
            d = AllToAllDispatcher(E, replicas=reps)
        for T, K, D in ((16, 6, 64), (5, 3, 40), (1, 2, 16), (0, 6, 32)):
            x = torch.randn(T, D, generator=g).to(dtype)
            ids = torch.randint(0, 2 * E, (T, K), generator=g)  # variant-offset ids too (e + E)
            w = torch.rand(T, K, generator=g)
            want_send, want_order, want_counts = _ep_torch(x, ids, w, d)
            copies = (d.copies_EC, d.ncopies_E) if d.replicated else (None, None)
            send, order, counts = cpu_experts.ep_pack(x, ids, E, world, d.owner_E, *copies, lib=lib)
            assert torch.equal(send, want_send) and torch.equal(order, want_order), (world, reps, T, K, D)
            assert torch.equal(counts, want_counts)
            back = (send * 3 - 1)[:, :D]  # a column slice of a wider buffer (as the exchange returns rows)
            want = ref.combine_pairs(back * w.reshape(-1)[order].unsqueeze(1).to(dtype), order, T, K)
            got = cpu_experts.ep_combine(back, w, order, lib=lib)
            assert got.dtype == dtype and torch.equal(got, want), (world, reps, T, K, D)
    with pytest.raises(ValueError, match="non-negative"):
        cpu_experts.ep_pack(x[:1], torch.tensor([[-1, 0]]), E, 2, d.owner_E, lib=lib)
