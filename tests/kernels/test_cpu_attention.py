"""The CPU decode attention (``kernels.cpu_attention``, ``csrc/mla_decode.c``): against the fp64
softmax attention over each row's context, the torch path's contract (paged cache, block tables,
lengths), rows that do not depend on their batch, the dispatch and its switches, bad tables refused,
and the AVX2 build. Then ``prep`` (``csrc/mla_prep.c``): the torch ops' bits, its refusals, the AVX2
build."""

import shutil

import pytest
import torch

from expertpool import kernels
from expertpool.kernels import cpu_attention, cpu_experts
from expertpool.kernels import reference as ref

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or cpu_experts.library() is None,
                                reason="needs a C compiler to build the CPU kernels")


def _case(B, H, C, R, bs, q_dtype, c_dtype, lens, seed=0):
    """Random queries and a paged cache whose blocks are shuffled (a row's blocks are not adjacent),
    with spare blocks and a block table padded past each row's last block."""
    g = torch.Generator().manual_seed(seed)
    lens_B = torch.tensor(lens, dtype=torch.int32)
    M = (max(lens) + bs - 1) // bs + 1
    nblk = B * M + 5
    table = torch.randperm(nblk, generator=g)[:B * M].view(B, M).to(torch.int32)
    cache = torch.randn(nblk * bs, C + R, generator=g).to(c_dtype)
    q_abs = (torch.randn(B, H, C, generator=g) * 0.2).to(q_dtype)
    q_pe = (torch.randn(B, H, R, generator=g) * 0.2).to(q_dtype)
    return q_abs, q_pe, cache, table, lens_B, (C + R) ** -0.5 * 4


def _oracle(q_abs, q_pe, cache, table, lens, scale, bs):
    B, H, C = q_abs.shape
    out = torch.empty(B, H, C, dtype=torch.float64)
    for b in range(B):
        t = torch.arange(int(lens[b]))
        ctx = cache[table[b, t // bs].long() * bs + t % bs].double()
        p = torch.softmax(torch.cat([q_abs[b], q_pe[b]], -1).double() @ ctx.T * scale, -1)
        out[b] = p @ ctx[:, :C]
    return out


def _check_against_oracle(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape
    err = (got.double() - want).abs()
    fp32_bound = 2e-6 * want.abs().max()  # the fp32 sums' error, on the scale of the row's terms
    if dtype == torch.float32:
        assert err.max() < fp32_bound, err.max()
    else:  # the fp32 result (within the fp32 bound) rounded once to bf16: half a bf16 ulp more. An output
        # that cancels to ~1e-6 of its terms' scale moves by more than its half ulp with an fp32 error of
        # a few fp32 ulps of the terms (the one-pass kernel: 4.8e-9 on a 9.0e-7 output; the kernel
        # before it was off by 1.4e-10 there, with the same mean error over the case, 1.8e-8)
        assert (err <= want.abs() * 2.0 ** -8 + fp32_bound).all(), (err / want.abs()).max()


@pytest.mark.parametrize("q_dtype,c_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("shape", [
    # B, H, C, R, block size, lengths
    (4, 8, 512, 64, 16, [1, 17, 96, 33]),        # bench-mini / DeepSeek-V3 head geometry
    (3, 11, 40, 6, 4, [200, 5, 131]),            # heads past a group of 8, C and C + R not whole vectors,
                                                 # contexts over several tiles of the weighted sum
    (2, 4, 32, 8, 8, [1, 64]),                   # the tiny model's shapes
])
def test_equals_softmax_attention_in_fp64(q_dtype, c_dtype, shape):
    B, H, C, R, bs, lens = shape
    q_abs, q_pe, cache, table, lens_B, scale = _case(B, H, C, R, bs, q_dtype, c_dtype, lens)
    got = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens_B, scale, bs)
    _check_against_oracle(got, _oracle(q_abs, q_pe, cache, table, lens_B, scale, bs), q_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_later_tile_with_a_larger_score_rescales_the_earlier_tiles(dtype):
    """The kernel runs one pass over a context, 64 rows a tile, with a running max and sum: where the
    scores grow along the context every tile brings a new max and the sums so far are rescaled; where
    they shrink, none does. Both against fp64, over contexts of several tiles."""
    q_abs, q_pe, cache, table, lens, scale = _case(2, 8, 512, 64, 16, dtype, dtype, [300, 200], seed=4)
    grow = torch.linspace(0.2, 3.0, 300)
    for b, ramp in ((0, grow), (1, grow.flip(0)[:200])):
        t = torch.arange(int(lens[b]))
        slots = table[b, t // 16].long() * 16 + t % 16
        cache[slots] = (cache[slots].float() * ramp[:, None]).to(dtype)
    got = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens, scale, 16)
    _check_against_oracle(got, _oracle(q_abs, q_pe, cache, table, lens, scale, 16), dtype)


def test_scores_stay_fp32_where_the_torch_path_rounds_them():
    """With bf16 compute the torch path's batched GEMM rounds the scores to bf16 before the softmax;
    the kernel keeps them fp32, so its error against fp64 is the output's rounding alone."""
    q_abs, q_pe, cache, table, lens, scale = _case(8, 8, 512, 64, 16, torch.bfloat16, torch.bfloat16,
                                                   [96] * 8, seed=3)
    want = _oracle(q_abs, q_pe, cache, table, lens, scale, 16)
    got = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens, scale, 16)
    torch_path = ref.paged_mla_decode_ref(q_abs, q_pe, cache, table, lens, scale, 16, table.shape[1] * 16)
    err_kernel, err_torch = ((x.double() - want).abs().mean() for x in (got, torch_path))
    assert err_kernel < err_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_row_does_not_depend_on_its_batch(dtype):
    """Each row alone, and beside rows of other lengths, gives the same bits (a replay after a failure
    continues exactly)."""
    q_abs, q_pe, cache, table, lens, scale = _case(6, 8, 512, 64, 16, dtype, dtype, [3, 90, 1, 47, 16, 70], seed=1)
    together = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens, scale, 16)
    for b in range(6):
        alone = cpu_attention.mla_decode(q_abs[b:b + 1], q_pe[b:b + 1], cache, table[b:b + 1], lens[b:b + 1], scale, 16)
        assert torch.equal(alone[0], together[b])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens, scale, 16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one_thread, together)


def test_the_cpu_decode_step_takes_the_kernel_and_the_switches_keep_the_torch_path(monkeypatch):
    q_abs, q_pe, cache, table, lens, scale = _case(3, 8, 64, 16, 16, torch.float32, torch.float32, [5, 20, 9])
    calls = []
    kernel = cpu_attention.mla_decode
    monkeypatch.setattr(cpu_attention, "mla_decode", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    max_len = table.shape[1] * 16
    with torch.no_grad():
        fast = kernels.paged_mla_decode(q_abs, q_pe, cache, table, lens, scale, 16, max_len)
        assert calls == [1]
        with cpu_attention.switched_off():
            slow = kernels.paged_mla_decode(q_abs, q_pe, cache, table, lens, scale, 16, max_len)
        with kernels.use_backend("torch"):  # the reference path of the parity tests
            kernels.paged_mla_decode(q_abs, q_pe, cache, table, lens, scale, 16, max_len)
        monkeypatch.setenv(cpu_attention.ENV_SWITCH, "0")
        cpu_attention.SWITCH.reread()
        try:
            kernels.paged_mla_decode(q_abs, q_pe, cache, table, lens, scale, 16, max_len)
        finally:
            monkeypatch.delenv(cpu_attention.ENV_SWITCH)
            cpu_attention.SWITCH.reread()
    assert calls == [1]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    # autograd (training, scoring with gradients) keeps the torch path
    q = q_abs.clone().requires_grad_()
    kernels.paged_mla_decode(q, q_pe, cache, table, lens, scale, 16, max_len).sum().backward()
    assert calls == [1] and q.grad is not None


def test_a_length_or_block_outside_the_cache_is_refused_before_reading():
    q_abs, q_pe, cache, table, lens, scale = _case(2, 8, 64, 16, 16, torch.float32, torch.float32, [5, 20])
    with pytest.raises(IndexError, match="context length"):
        cpu_attention.mla_decode(q_abs, q_pe, cache, table, torch.tensor([5, 0], dtype=torch.int32), scale, 16)
    with pytest.raises(IndexError, match="context length"):
        cpu_attention.mla_decode(q_abs, q_pe, cache, table, torch.tensor([5, 10_000], dtype=torch.int32), scale, 16)
    bad = table.clone()
    bad[1, 1] = cache.shape[0] // 16  # one block past the cache
    with pytest.raises(IndexError, match="block outside"):
        cpu_attention.mla_decode(q_abs, q_pe, cache, bad, lens, scale, 16)


def test_the_avx2_build_equals_softmax_attention_in_fp64(avx2_lib):
    lib = avx2_lib
    for dtype in (torch.float32, torch.bfloat16):
        q_abs, q_pe, cache, table, lens, scale = _case(3, 11, 40, 6, 4, dtype, dtype, [70, 1, 9], seed=2)
        got = cpu_attention.mla_decode(q_abs, q_pe, cache, table, lens, scale, 4, lib=lib)
        _check_against_oracle(got, _oracle(q_abs, q_pe, cache, table, lens, scale, 4), dtype)


def _prep_case(N, H, Dn, R, C, P, dtype, seed=0):
    """q rows of H heads [Dn | R] as the strided view a serving step hands over (a slice of a wider
    projection output), kv_a's output [C | R] as a view of the merged down-projection, RoPE tables of
    distinct positions, distinct slots in a cache of P."""
    g = torch.Generator().manual_seed(seed)
    q_wide = torch.randn(N, H * (Dn + R) + 24, generator=g).to(dtype)
    q = q_wide[:, :H * (Dn + R)].view(N, H, Dn + R)
    kv = torch.randn(N, 40 + C + R, generator=g).to(dtype)[:, 40:]
    ang = torch.rand(N, R // 2, generator=g) * 50
    cos, sin = ang.cos() * 1.3, ang.sin() * 1.3
    w = (torch.rand(C, generator=g) + 0.5).to(dtype)
    slots = torch.randperm(P, generator=g)[:N]
    cache = torch.randn(P, C + R, generator=g).to(dtype)
    return q, kv, cos, sin, w, slots, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,Dn,R,C", [(16, 8, 128, 64, 512), (3, 5, 6, 8, 12), (1, 1, 2, 2, 3)])
def test_prep_equals_the_torch_ops_bit_for_bit(dtype, N, H, Dn, R, C):
    """RoPE of every head's query, the latent's norm and the shared key's RoPE in the cache: the same
    bits as layers.apply_rope, RMSNorm (its CPU kernel) and index_copy_; other slots untouched."""
    from expertpool.model.layers import RMSNorm, apply_rope
    q, kv, cos, sin, w, slots, cache = _prep_case(N, H, Dn, R, C, 3 * N + 5, dtype)
    norm = RMSNorm(C, 1e-6)
    norm.weight.data.copy_(w.float())
    want_cache = cache.clone()
    with torch.no_grad():
        want_q = apply_rope(q[..., Dn:], cos[:, None], sin[:, None])
        c, k_pe = kv.split([C, R], -1)
        want_cache.index_copy_(0, slots, torch.cat([norm(c), apply_rope(k_pe, cos, sin)], -1))
        assert cpu_attention.prep_applies(q, kv, cos, sin, norm.weight, slots, cache)
        got_q = cpu_attention.prep(q, R, kv, cos, sin, norm.weight, 1e-6, slots, cache)
    assert got_q.dtype == dtype and torch.equal(got_q, want_q)
    assert torch.equal(cache, want_cache)


def test_prep_refuses_a_slot_outside_the_cache_and_what_it_does_not_take():
    q, kv, cos, sin, w, slots, cache = _prep_case(4, 2, 4, 4, 8, 10, torch.float32)
    bad = slots.clone()
    bad[2] = cache.shape[0]
    with pytest.raises(IndexError, match="cache slot"):
        cpu_attention.prep(q, 4, kv, cos, sin, w, 1e-6, bad, cache)
    assert not cpu_attention.prep_applies(q.bfloat16(), kv, cos, sin, w, slots, cache)  # mixed dtypes
    assert not cpu_attention.prep_applies(q, kv, cos[:, :1], sin[:, :1], w, slots, cache)  # tables of another R
    with cpu_attention.switched_off():
        assert not cpu_attention.prep_applies(q, kv, cos, sin, w, slots, cache)
    assert not cpu_attention.prep_applies(q.requires_grad_(), kv, cos, sin, w, slots, cache)


def test_the_avx2_build_of_prep_equals_the_native_one(avx2_lib):
    for dtype in (torch.float32, torch.bfloat16):
        q, kv, cos, sin, w, slots, cache = _prep_case(5, 3, 8, 16, 37, 20, dtype, seed=3)
        other = cache.clone()
        a = cpu_attention.prep(q, 16, kv, cos, sin, w, 1e-6, slots, cache)
        b = cpu_attention.prep(q, 16, kv, cos, sin, w, 1e-6, slots, other, lib=avx2_lib)
        assert torch.equal(a, b)  # RoPE is elementwise: the same bits on any vector width
        # the norm's sum of squares runs over 8 lanes instead of 16: its last bit may differ
        tol = dict(rtol=2.0 ** -7, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(cache, other, **tol)
