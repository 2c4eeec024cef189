"""Pure-torch references (the CPU production path): formats, edge cases, the grouped MoE loop."""

import numpy as np
import torch

from expertpool import kernels
from expertpool.kernels import cpu_experts
from expertpool.kernels import reference as ref
from tests.kernels.kernel_oracles import make_moe, moe_w8a16_f64, rel_err


def test_act_quant_ref_zero_groups_are_finite():
    x = torch.zeros(2, 256)
    x[1, 128:] = torch.randn(128)
    y, s = ref.act_quant_ref(x)
    assert torch.isfinite(y.float()).all() and torch.isfinite(s).all()
    assert s[0, 0] == torch.tensor(ref.AMAX_FLOOR / ref.FP8_E4M3_MAX, dtype=torch.float32)
    assert (y[0].float() == 0).all()


def test_ue8m0_scales_are_powers_of_two_at_least_amax_over_max():
    x = torch.randn(8, 512) * torch.logspace(-3, 3, 8)[:, None]
    _, s = ref.act_quant_ref(x, scale_fmt="ue8m0")
    mantissa, _ = torch.frexp(s)
    assert (mantissa == 0.5).all()
    amax = x.view(8, 4, 128).abs().amax(-1)
    assert (s * ref.FP8_E4M3_MAX >= amax).all()
    assert (s * ref.FP8_E4M3_MAX < 2 * amax).all()


def test_pow2_ceil_exact_at_and_just_above_powers_of_two():
    # log2 of 2**-10 * (1 + 2**-23) rounds to exactly -10 in fp32; frexp does not.
    s = torch.tensor([2.0 ** -10, 2.0 ** -10 * (1 + 2.0 ** -23), 3.0, 0.75], dtype=torch.float32)
    want = torch.tensor([2.0 ** -10, 2.0 ** -9, 4.0, 1.0], dtype=torch.float32)
    assert torch.equal(ref._pow2_ceil(s), want)


def test_weight_quant_ref_576_rows_roundtrip():
    w = torch.randn(576, 300)
    q, s = ref.weight_quant_ref(w)
    assert q.shape == (576, 300) and s.shape == (5, 3)
    # Reason: one e4m3 rounding per element, <= 2**-4 relative (2**-4 bounds the rms with margin).
    assert rel_err(ref.weight_dequant_ref(q, s), w) < 2.0 ** -4


def test_weight_dequant_ref_view_path_equals_repeat_path():
    q, s = ref.weight_quant_ref(torch.randn(256, 384))
    full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert torch.equal(ref.weight_dequant_ref(q, s), q.float() * full)  # exact: same fp32 products


def test_moe_experts_ref_matches_per_token_loop_and_skips_idle_expert():
    gen = torch.Generator().manual_seed(1)
    layer = make_moe(gen, t=6, top_k=3, e=4, d=256, f=96, idle_expert=2)
    x, ids, w, w13_q, w13_s, w2_q, w2_s = layer
    w13_q[2] = float("nan")  # never dequantized: it has no tokens
    y = ref.moe_experts_ref(x.double(), ids, w.double(), w13_q, w13_s, w2_q, w2_s)
    want = torch.zeros(6, 256, dtype=torch.float64)
    for t in range(6):
        for k in range(3):
            e = int(ids[t, k])
            if e >= 0:
                w13 = ref.dequant_w13_ref(w13_q[e], w13_s[e], torch.float64)
                gate, up = (w13 @ x[t].double()).chunk(2)
                w2 = ref.weight_dequant_ref(w2_q[e], w2_s[e], torch.float64)
                want[t] += w[t, k].double() * (w2 @ (torch.nn.functional.silu(gate) * up))
    # Reason: both sides are float64 over the same dequantized weights; only the summation
    # order differs.
    assert rel_err(y, want) < 1e-12
    assert torch.equal(moe_w8a16_f64(x, ids, w, w13_q, w13_s, w2_q, w2_s), y)


def test_moe_experts_ref_all_slots_remote_gives_zeros():
    gen = torch.Generator().manual_seed(2)
    x, ids, w, *weights = make_moe(gen, t=3, top_k=2, e=2, d=128, f=128)
    y = ref.moe_experts_ref(x, torch.full_like(ids, -1), w, *weights)
    assert torch.equal(y, torch.zeros_like(x))


def test_moe_experts_inference_equals_reference():
    """The no-grad CPU path (used by serving) against the reference, with remote (-1) slots, an idle
    expert and a single token: bit for bit where it runs the same kernels (bf16 activations, dense or
    fp8 weights); fp32 activations at few rows take W @ x^T (another summation order) and int8 weights
    the int8 kernel with bf16 activations, so those are compared within their rounding."""
    gen = torch.Generator().manual_seed(3)
    x, ids, w, w13_q, w13_s, w2_q, w2_s = make_moe(gen, t=9, top_k=3, e=5, d=256, f=96, idle_expert=1)
    ids[0, 1] = -1
    w13_q[1] = float("nan")  # never touched: no tokens
    for dt in (torch.float32, torch.bfloat16):
        xd = x.to(dt)
        got = ref.moe_experts_inference(xd, ids, w, w13_q, w13_s, w2_q, w2_s)
        want = ref.moe_experts_ref(xd, ids, w, w13_q, w13_s, w2_q, w2_s)
        # fp32: sums of <= 256 products in another order, ~1e-7 relative; 1e-5 leaves margin
        assert torch.equal(got, want) if dt == torch.bfloat16 else rel_err(got, want) < 1e-5
        w13 = torch.stack([ref.dequant_w13_ref(w13_q[e], w13_s[e], dt) for e in range(5)])
        w2 = torch.stack([ref.weight_dequant_ref(w2_q[e], w2_s[e], dt) for e in range(5)])
        for rows in (slice(None), slice(0, 1)):
            with cpu_experts.switched_off():  # the torch loop; the grouped kernel: tests/kernels/test_cpu_experts.py
                got = ref.moe_experts_inference(xd[rows], ids[rows], w[rows], w13, None, w2, None)
            want = ref.moe_experts_ref(xd[rows], ids[rows], w[rows], w13, None, w2, None)
            assert torch.equal(got, want) if dt == torch.bfloat16 else rel_err(got, want) < 1e-5
        q13, s13 = ref.int8_weight_quant(w13)
        q2, s2 = ref.int8_weight_quant(w2)
        got = ref.moe_experts_inference(xd, ids, w, q13, s13, q2, s2)
        want = ref.moe_experts_ref(xd, ids, w, q13, s13, q2, s2)
        # the int8 kernel rounds activations (x and h) to bf16: two 2**-9 roundings, ~4e-3 relative
        assert rel_err(got, want) < 1e-2
    assert torch.equal(ref.moe_experts_inference(x, torch.full_like(ids, -1), w, w13_q, w13_s, w2_q, w2_s),
                       torch.zeros_like(x))


def test_shape_bucket_takes_few_sizes_and_pads_at_most_a_quarter():
    """Row counts 1..4096 map to 48 sizes (16 exact, then 4 per power of two), each size a fixed
    point, at most 25% above the count; the decode context's coarser buckets (exact to 4, then 2 per
    power of two) pad at most 50%."""
    ns = range(1, 4097)
    sizes = [ref.shape_bucket(n) for n in ns]
    assert sizes[:16] == list(range(1, 17))
    assert all(n <= b <= 1.25 * n for n, b in zip(ns, sizes))
    assert len(set(sizes)) == 16 + 4 * 8 and all(ref.shape_bucket(b) == b for b in set(sizes))
    coarse = [ref.shape_bucket(n, exact=4, per_octave=2) for n in ns]
    assert all(n <= b <= 1.5 * n for n, b in zip(ns, coarse)) and len(set(coarse)) == 4 + 2 * 10


def test_expert_rows_padded_to_a_bucket_keep_their_results():
    """Experts with more than 16 rows run their bf16 products on rows padded to a bucket (cut off
    after): bit for bit the reference, which multiplies the exact rows (each output row depends on
    its own input row only)."""
    gen = torch.Generator().manual_seed(4)
    x, ids, w, w13_q, w13_s, w2_q, w2_s = make_moe(gen, t=60, top_k=2, e=3, d=256, f=96, idle_expert=None)
    w13 = torch.stack([ref.dequant_w13_ref(w13_q[e], w13_s[e], torch.bfloat16) for e in range(3)])
    w2 = torch.stack([ref.weight_dequant_ref(w2_q[e], w2_s[e], torch.bfloat16) for e in range(3)])
    xb = x.to(torch.bfloat16)
    counts = torch.bincount(ids[ids >= 0], minlength=3)
    assert (counts > 16).all() and any(ref.shape_bucket(int(c)) > c for c in counts)  # padding happens
    with cpu_experts.switched_off():  # more than cpu_experts.MAX_ROWS rows: the torch loop anyway
        got = ref.moe_experts_inference(xb, ids, w, w13, None, w2, None)
    assert torch.equal(got, ref.moe_experts_ref(xb, ids, w, w13, None, w2, None))


def test_int8_weight_quant_roundtrip_and_kernel():
    """int8 weight-only: codes in [-127, 127] against bf16-rounded per-row scales; the CPU kernel
    (``int8_linear``) equals the dequantized product up to its bf16 activations."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(96, 256, generator=g) * 0.05
    q, s = ref.int8_weight_quant(w)
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and s.shape == (96,)
    assert int(q.abs().max()) <= ref.INT8_MAX
    # one rounding to 1/127 of the row's amax, plus the bf16 scale (2**-9): < 1e-2 relative
    assert rel_err(ref.int8_dequant(q, s), w) < 1e-2
    x = torch.randn(5, 256, generator=g)
    # the kernel rounds x to bf16 (2**-9) and accumulates in fp32
    assert rel_err(kernels.int8_linear(x, q, s), x @ ref.int8_dequant(q, s).T) < 5e-3


def test_moe_experts_ref_over_per_expert_rows_matches_stacked_with_grads():
    """The training path (``jobs.esft.TrainExperts``) hands the reference per-expert rows."""
    g = torch.Generator().manual_seed(0)
    E, D, F_, T, K = 6, 16, 8, 10, 3
    x = torch.randn(T, D, generator=g, requires_grad=True)
    ids = torch.randint(-1, E, (T, K), generator=g)  # -1: expert not held here
    w = torch.rand(T, K, generator=g)
    w13 = torch.randn(E, 2 * F_, D, generator=g, requires_grad=True)
    w2 = torch.randn(E, D, F_, generator=g, requires_grad=True)
    stacked = kernels.moe_experts(x, ids, w, w13, None, w2, None)
    gx_ref, g13_ref, g2_ref = torch.autograd.grad(stacked.square().sum(), [x, w13, w2])
    out = ref.moe_experts_ref(x, ids, w, list(w13.unbind(0)), None, list(w2.unbind(0)), None)
    gx, g13, g2 = torch.autograd.grad(out.square().sum(), [x, w13, w2])
    # same fp32 products, different summation order in index_add/backward: 1e-5 relative covers that
    for a, b in [(out, stacked), (gx, gx_ref), (g13, g13_ref), (g2, g2_ref)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_moe_experts_ref_with_no_slots_stays_on_the_graph():
    x = torch.randn(3, 4, requires_grad=True)
    out = ref.moe_experts_ref(x, torch.full((3, 2), -1), torch.ones(3, 2), [], None, [], None)
    assert out.requires_grad and torch.equal(out, torch.zeros(3, 4))
    assert np.array_equal(out.shape, (3, 4))
