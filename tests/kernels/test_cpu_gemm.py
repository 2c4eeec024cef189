"""The absorbed MLA decode's per-head products on CPU (``kernels.cpu_gemm``, ``csrc/small_gemm.c``):
against fp64 products, strided rows read in place, rows that depend neither on their batch nor on the
thread count, what ``pack`` refuses, the decode's dispatch and its switches, and the AVX2 build. The
greedy parity of a whole decode with the kernel against the reference path is in
tests/platform/test_fast_paths.py."""

import shutil

import pytest
import torch

from expertpool import kernels
from expertpool.kernels import cpu_experts, cpu_gemm
from expertpool.model import attention

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or cpu_experts.library() is None,
                                reason="needs a C compiler to build the CPU kernels")

BF16_DOT = cpu_experts.library() is not None and cpu_experts.has_bf16_dot(cpu_experts.library())
DTYPES = [torch.float32] + ([torch.bfloat16] if BF16_DOT else [])

SHAPES = [  # M rows, G heads, K, N
    (16, 8, 128, 512),   # bench-mini's q_nope x W_UK (DeepSeek-V3: 128 heads, same K and N)
    (16, 8, 512, 128),   # its attention output x W_UV
    (1, 8, 128, 512),    # one sequence
    (25, 3, 32, 48),     # rows past two tiles, a last output block of one vector
    (4, 4, 16, 32),      # the tiny model's W_UK
    (5, 4, 32, 16),      # the tiny model's W_UV
]


def _case(M, G, K, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, G, K, generator=g).to(dtype), (torch.randn(G, K, N, generator=g) * 0.1).to(dtype)


def _check(got, x, w):
    want = torch.einsum("mgk,gkn->mgn", x.double(), w.double())
    assert got.dtype == x.dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    if x.dtype == torch.float32:  # K fp32 products summed in order: within K ulps of sum |x_k w_k|
        bound = x.shape[2] * 2.0 ** -24 * torch.einsum("mgk,gkn->mgn", x.double().abs(), w.double().abs())
        assert (err <= bound).all(), (err / bound).max()
    else:  # exact products summed in fp32, rounded once to bf16: within one bf16 ulp of the exact value
        assert (err <= want.abs() * 2.0 ** -8 + 1e-30).all(), (err / want.abs()).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_equals_the_fp64_products(dtype, shape):
    x, w = _case(*shape, dtype)
    packed = cpu_gemm.pack(w)
    assert packed is not None
    _check(cpu_gemm.per_head(x, packed), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_strided_heads_in_place(dtype):
    """q_nope is a view of the query projection ([B, H, Dn + R], the rope part beside it)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(16, 8, 192, generator=g).to(dtype)
    w = (torch.randn(8, 128, 512, generator=g) * 0.1).to(dtype)
    packed = cpu_gemm.pack(w)
    view = q[..., :128]
    assert not view.is_contiguous() and cpu_gemm.applies(view, packed)
    got = cpu_gemm.per_head(view, packed)
    assert torch.equal(got, cpu_gemm.per_head(view.contiguous(), packed))
    _check(got, view, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_depends_neither_on_its_batch_nor_on_the_threads(dtype):
    x, w = _case(16, 8, 128, 512, dtype, seed=2)
    packed = cpu_gemm.pack(w)
    together = cpu_gemm.per_head(x, packed)
    for rows in ([3], [0, 1], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1]):
        alone = cpu_gemm.per_head(x[rows], packed)
        assert torch.equal(alone, together[rows])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(cpu_gemm.per_head(x, packed), together)
    finally:
        torch.set_num_threads(threads)


def test_pack_refuses_what_the_kernel_cannot_take(monkeypatch):
    lib = cpu_experts.library()
    lanes = lib.grouped_gemm_lanes()
    assert cpu_gemm.pack(torch.randn(2, 8, lanes + 1)) is None               # N not whole vectors
    assert cpu_gemm.pack(torch.randn(2, 8, 16, dtype=torch.float16)) is None  # fp16
    assert cpu_gemm.pack(torch.randn(8, 16)) is None                           # not [G, K, N]
    if BF16_DOT:
        assert cpu_gemm.pack(torch.randn(2, 7, 16, dtype=torch.bfloat16)) is None  # odd K: pairs
        assert cpu_gemm.pack(torch.randn(2, 8, 24, dtype=torch.bfloat16)) is None  # N not 16-wide
    # x must match: dtype, heads, K, unit stride along k
    packed = cpu_gemm.pack(torch.randn(2, 8, 16))
    assert not cpu_gemm.applies(torch.randn(3, 2, 8, dtype=torch.float64), packed)
    assert not cpu_gemm.applies(torch.randn(3, 2, 9), packed)
    assert not cpu_gemm.applies(torch.randn(3, 8, 2).transpose(1, 2), packed)
    assert not cpu_gemm.applies(torch.randn(3, 2, 8, requires_grad=True), packed)  # autograd keeps torch.bmm
    monkeypatch.setenv(cpu_gemm.ENV_SWITCH, "0")
    cpu_gemm.SWITCH.reread()
    try:
        assert cpu_gemm.pack(torch.randn(2, 8, 16)) is None and not cpu_gemm.applies(torch.randn(3, 2, 8), packed)
    finally:
        monkeypatch.delenv(cpu_gemm.ENV_SWITCH)
        cpu_gemm.SWITCH.reread()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_decode_takes_the_kernel_and_the_switches_keep_torch_bmm(monkeypatch, dtype):
    x, w = _case(6, 8, 128, 512, dtype, seed=3)
    with cpu_gemm.switched_off():  # packing inside the block: the block decides per call
        packed = cpu_gemm.pack(w)
    assert packed is not None
    calls = []
    kernel = cpu_gemm.per_head
    monkeypatch.setattr(cpu_gemm, "per_head", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    fast = attention._per_head(x, w, packed)
    assert calls == [1]
    with cpu_gemm.switched_off():
        slow = attention._per_head(x, w, packed)
    with kernels.use_backend("torch"):  # the reference path of the parity tests
        ref = attention._per_head(x, w, packed)
    assert calls == [1] and torch.equal(slow, ref)
    _check(fast, x, w)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 1e-2}
    torch.testing.assert_close(fast, slow, **tol)


def test_the_model_packs_its_absorbed_weights_for_the_kernel(tiny_dir):
    from expertpool.model.checkpoint import load_checkpoint
    for dtype in DTYPES:
        m = load_checkpoint(tiny_dir, dtype=dtype, with_mtp=False)
        m.prepare_for_inference()
        for mla in (mod for mod in m.modules() if isinstance(mod, attention.MLA)):
            _, w_uk, w_uv_t, (uk, uv) = mla._kv_b_cached(dtype)
            x = torch.randn(3, mla.n_heads, mla.nope).to(dtype)
            assert torch.equal(cpu_gemm.per_head(x, uk), cpu_gemm.per_head(x, cpu_gemm.pack(w_uk)))
            _check(cpu_gemm.per_head(x, uk), x, w_uk)
            o = torch.randn(3, mla.n_heads, mla.kv_lora_rank).to(dtype)
            _check(cpu_gemm.per_head(o, uv), o, w_uv_t)


def test_the_avx2_build_equals_the_fp64_products(avx2_lib):
    lib = avx2_lib
    assert lib.grouped_gemm_lanes() == 8 and not cpu_experts.has_bf16_dot(lib)
    assert cpu_gemm.pack(torch.randn(2, 8, 16, dtype=torch.bfloat16), lib=lib) is None  # no bf16 dot product
    for shape in SHAPES:
        x, w = _case(*shape, torch.float32, seed=4)
        packed = cpu_gemm.pack(w, lib=lib)
        got = cpu_gemm.per_head(x, packed, lib=lib)
        _check(got, x, w)
        assert torch.equal(cpu_gemm.per_head(x[:1], packed, lib=lib), got[:1])
