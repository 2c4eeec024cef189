"""RMSNorm and the V3 router on CPU in one call each (``kernels.cpu_norm``, ``csrc/rms_norm.c``;
``kernels.cpu_router``, ``csrc/router.c``): against torch's ops (the model's reference), rows that do
not depend on their batch, what each refuses, the model's dispatch and its switches, and the AVX2
build. The greedy parity of whole decodes with both is in tests/platform/test_fast_paths.py."""

import shutil

import pytest
import torch

from expertpool import kernels
from expertpool.kernels import cpu_experts, cpu_norm, cpu_router
from expertpool.kernels import reference as ref
from expertpool.model import moe
from expertpool.model.args import preset
from expertpool.model.layers import RMSNorm

pytestmark = pytest.mark.skipif(shutil.which("cc") is None or cpu_experts.library() is None,
                                reason="needs a C compiler to build the CPU kernels")


def _norm(D, dtype, seed=0):
    n = RMSNorm(D, 1e-6).to(dtype).requires_grad_(False)
    n.weight.copy_(torch.randn(D, generator=torch.Generator().manual_seed(seed)) * 0.3 + 1)
    return n


def _torch_norm(n, x):
    with cpu_norm.switched_off():
        return n(x)


def _within_one_ulp(got, want, x, w, eps=1e-6):
    """Against the fp64 value of w * x / sqrt(mean(x^2) + eps): fp32 within 8 units of 2^-24 relative
    (the sum of squares and three roundings: torch's own is 3.2 at most here); bf16 within 2^-7 relative
    (one bf16 ulp of the two roundings), as torch's (``want``) is, and nearly always torch's bits."""
    assert got.dtype == want.dtype and got.shape == want.shape
    x64 = x.double()
    exact = w.to(x.dtype).double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)
    bound = exact.abs() * (8 * 2.0 ** -24 if got.dtype == torch.float32 else 2.0 ** -7) + 1e-30
    for y in (got, want):
        assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / exact.abs()).max()
    if got.dtype == torch.bfloat16:
        assert (got == want).float().mean() >= 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 1024), (16, 512), (3, 7, 1024), (1, 64), (5, 37)])
def test_rms_norm_is_the_models_expression(dtype, shape):
    n = _norm(shape[-1], dtype)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    _within_one_ulp(cpu_norm.rms_norm(x, n.weight, n.eps), _torch_norm(n, x), x, n.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reads_strided_rows_and_rows_are_batch_independent(dtype):
    n = _norm(512, dtype)
    ckv = torch.randn(16, 576, generator=torch.Generator().manual_seed(2)).to(dtype)
    c = ckv[:, :512]  # the latent beside the rope key, as the attention normalizes it
    assert cpu_norm.applies(c, n.weight)
    got = cpu_norm.rms_norm(c, n.weight, n.eps)
    assert torch.equal(got, cpu_norm.rms_norm(c.contiguous(), n.weight, n.eps))
    assert torch.equal(cpu_norm.rms_norm(c[5:6], n.weight, n.eps), got[5:6])
    _within_one_ulp(got, _torch_norm(n, c), c, n.weight)


def test_rms_norm_refuses_what_it_cannot_take_and_the_module_dispatches(monkeypatch):
    n = _norm(64, torch.float32)
    x = torch.randn(4, 64)
    assert not cpu_norm.applies(torch.randn(4, 128)[:, ::2], n.weight)                 # k stride 2
    assert not cpu_norm.applies(torch.randn(4, 3, 64).transpose(0, 1), n.weight)        # rows of two strides
    assert not cpu_norm.applies(x.half(), n.weight)
    assert not cpu_norm.applies(x.requires_grad_(), n.weight)                            # autograd: torch
    x = x.detach()
    calls = []
    kernel = cpu_norm.rms_norm
    monkeypatch.setattr(cpu_norm, "rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    with torch.inference_mode():
        fast = n(x)
        assert calls == [1]
        with kernels.use_backend("torch"):  # the reference path of the parity tests
            slow = n(x)
        with cpu_norm.switched_off():
            n(x)
    assert calls == [1]
    _within_one_ulp(fast, slow, x, n.weight)
    m = _norm(64, torch.float32).requires_grad_(True)
    m(x).sum().backward()  # training keeps the torch ops
    assert calls == [1] and m.weight.grad is not None


def _router_case(name, T, dtype, seed=0):
    a = preset(name)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(a.n_routed_experts, a.hidden_size, generator=g) * 0.03
    b = torch.randn(a.n_routed_experts, generator=g) * 0.05
    return a, torch.randn(T, a.hidden_size, generator=g).to(dtype), w, b


def _route_torch(a, x, w, b):
    with cpu_router.switched_off():
        return moe.route(x, w, b, a, need_scores=False)[:2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["tiny", "bench-mini", "deepseek-v3"])
@pytest.mark.parametrize("T", [1, 16, 37])
def test_router_chooses_torchs_experts_with_its_weights(name, dtype, T):
    a, x, w, b = _router_case(name, T, dtype)
    got_w, got_ids = cpu_router.route(x, w, b, a.n_group, a.topk_group, a.num_experts_per_tok, a.norm_topk_prob,
                                      a.routed_scaling_factor)
    want_w, want_ids = _route_torch(a, x, w, b)
    assert torch.equal(got_ids, want_ids)  # the same experts in the same (descending) order
    torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=1e-7)


def test_router_rows_are_batch_independent_and_ties_go_to_the_lower_index():
    a, x, w, b = _router_case("bench-mini", 16, torch.bfloat16, seed=3)
    args = (a.n_group, a.topk_group, a.num_experts_per_tok, a.norm_topk_prob, a.routed_scaling_factor)
    together = cpu_router.route(x, w, b, *args)
    for rows in ([0], [7, 3], list(range(9))):
        alone = cpu_router.route(x[rows], w, b, *args)
        assert torch.equal(alone[0], together[0][rows]) and torch.equal(alone[1], together[1][rows])
    # every score equal: the first topk_group groups, and in them the first top_k experts, in order
    wts, ids = cpu_router.route(x[:2], torch.zeros_like(w), None, *args)
    assert ids.tolist() == [list(range(a.num_experts_per_tok))] * 2
    torch.testing.assert_close(wts, torch.full_like(wts, a.routed_scaling_factor / a.num_experts_per_tok))


def test_router_refuses_what_it_cannot_take_and_the_gate_dispatches(monkeypatch):
    a, x, w, b = _router_case("bench-mini", 4, torch.float32)
    ok = (a.n_group, a.topk_group, a.num_experts_per_tok, "sigmoid")
    assert cpu_router.applies(x, w, b, *ok)
    assert not cpu_router.applies(x, w, b, *ok[:3], "softmax")                       # V2 scoring
    assert not cpu_router.applies(x, w, b, 7, *ok[1:])                                # groups must divide E
    assert not cpu_router.applies(x, w.bfloat16(), b, *ok)                            # fp32 router weight
    assert not cpu_router.applies(x, w.requires_grad_(), b, *ok)                      # autograd: torch
    w = w.detach()
    calls = []
    kernel = cpu_router.route
    monkeypatch.setattr(cpu_router, "route", lambda *a_, **k: calls.append(1) or kernel(*a_, **k))
    with torch.inference_mode():
        moe.route(x, w, b, a, need_scores=False)
        assert calls == [1]
        _, _, scores = moe.route(x, w, b, a, need_scores=True)  # a routing record needs the scores: torch
        with kernels.use_backend("torch"):
            moe.route(x, w, b, a, need_scores=False)
    assert calls == [1] and scores is not None
    want = ref.route_ref(torch.nn.functional.linear(x, w), b, a.n_group, a.topk_group, a.num_experts_per_tok,
                         "sigmoid", a.norm_topk_prob, a.routed_scaling_factor)
    assert torch.equal(kernel(x, w, b, *ok[:3], a.norm_topk_prob, a.routed_scaling_factor)[1], want[1])


def test_the_avx2_build_norms_and_routes_as_the_default_one(avx2_lib):
    for dtype in (torch.float32, torch.bfloat16):
        n = _norm(1000, dtype)
        x = torch.randn(9, 1000, generator=torch.Generator().manual_seed(4)).to(dtype)
        _within_one_ulp(cpu_norm.rms_norm(x, n.weight, n.eps, lib=avx2_lib), _torch_norm(n, x), x, n.weight)
        a, x, w, b = _router_case("bench-mini", 16, dtype, seed=5)
        args = (a.n_group, a.topk_group, a.num_experts_per_tok, a.norm_topk_prob, a.routed_scaling_factor)
        got_w, got_ids = cpu_router.route(x, w, b, *args, lib=avx2_lib)
        want_w, want_ids = _route_torch(a, x, w, b)
        assert torch.equal(got_ids, want_ids)
        torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=1e-7)
