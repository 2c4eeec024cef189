"""Triton paged-MLA decode (``mla_decode``) under TRITON_INTERPRET=1 (run via test_kernels_interpreter.py).

Oracle: ``paged_mla_decode_ref`` in float64 on the same inputs (the torch path gathers the padded
context; the kernel reads the cache through the block table with an online softmax). fp32: the
kernel's dots are IEEE fp32 and its running softmax reorders the sums, ~1e-6 relative, bound 1e-5.
bf16 inputs: the kernel rounds the probabilities to bf16 before the value product (2**-9 relative
each) and accumulates in fp32, bound 1e-2.
"""

import pytest
import torch

from tests.kernels.kernel_oracles import rel_err, requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool import kernels  # noqa: E402  (after the triton check)
from expertpool.kernels import mla_decode, reference as ref  # noqa: E402


def _case(gen, lens, H, C, R, page, dtype, num_blocks=64):
    B = len(lens)
    cache = torch.randn(num_blocks * page, C + R, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)  # scattered, non-contiguous blocks
    m = max(1, max(-(-n // page) for n in lens))
    table = torch.zeros(B, m, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lens):
        k = -(-n // page)
        table[b, :k] = perm[used:used + k].to(torch.int32)
        used += k
    q_abs = torch.randn(B, H, C, generator=gen).to(dtype)
    q_pe = torch.randn(B, H, R, generator=gen).to(dtype)
    return q_abs, q_pe, cache, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("H,C,R,page", [(4, 32, 8, 4), (8, 512, 64, 16), (20, 64, 16, 16)],
                         ids=["tiny", "bench-mini", "heads-not-a-multiple-of-16"])
def test_paged_decode_matches_reference(gen, H, C, R, page):
    lens = [1, 7, 33, page, 70]
    q_abs, q_pe, cache, table, seq_lens = _case(gen, lens, H, C, R, page, torch.float32)
    scale = 0.13
    got = mla_decode.paged_mla_decode(q_abs, q_pe, cache, table, seq_lens, scale, page)
    want = ref.paged_mla_decode_ref(q_abs.double(), q_pe.double(), cache.double(), table, seq_lens, scale, page,
                                    max(lens))
    assert got.shape == (len(lens), H, C) and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_paged_decode_bf16_and_empty_sequence(gen):
    lens = [0, 5, 40]
    q_abs, q_pe, cache, table, seq_lens = _case(gen, lens, 8, 64, 16, 8, torch.bfloat16)
    got = mla_decode.paged_mla_decode(q_abs, q_pe, cache, table, seq_lens, 0.2, 8)
    assert got.dtype == torch.bfloat16 and torch.equal(got[0], torch.zeros_like(got[0]))  # no context: zeros
    want = ref.paged_mla_decode_ref(q_abs[1:].double(), q_pe[1:].double(), cache.double(), table[1:], seq_lens[1:],
                                    0.2, 8, 40)
    assert rel_err(got[1:], want) < 1e-2


def test_backend_routes_decode_to_the_kernel_when_forced(gen, monkeypatch):
    lens = [3, 9]
    args = _case(gen, lens, 4, 32, 8, 4, torch.float32)
    calls = []
    real = mla_decode.paged_mla_decode
    monkeypatch.setattr(mla_decode, "paged_mla_decode", lambda *a: calls.append(1) or real(*a))
    with kernels.use_backend("triton"):
        got = kernels.paged_mla_decode(*args, 0.3, 4, max(lens))
    assert calls and rel_err(got, kernels.paged_mla_decode(*args, 0.3, 4, max(lens))) < 1e-5
