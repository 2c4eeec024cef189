"""Shared builders and float64 oracles for the kernel tests.

Imported as ``tests.kernels.kernel_oracles``, like the helpers of the other test folders.
"""

import os

import pytest
import torch

from expertpool.kernels import reference as ref
from expertpool.kernels._triton import triton_import_error

requires_triton = pytest.mark.skipif(triton_import_error() is not None,
                                     reason=f"triton unavailable: {triton_import_error()}")
requires_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 before triton is imported; "
           "run via test_kernels_interpreter.py")
gpu = [pytest.mark.gpu,
       pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
       requires_triton]

# Relative Frobenius error bound for a result computed from e4m3-quantized operands against the
# exact float64 product of the unquantized ones. e4m3 keeps 3 mantissa bits, so round-to-nearest
# errs by at most 2**-4 = 6.25% of a value (relative to the value, for normal codes) and by
# ~2-3% rms on Gaussian data (DeepSeek-V3 notes ~3.7% for a full W8A8 GEMM). Independent errors
# of several quantized operands add in quadrature, so 2**-4 bounds one or two quantizations with
# margin, and a wrong scale index or a dropped K block (errors of order 1) fails it.
E4M3_REL_ERROR_BOUND = 2.0 ** -4


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-300)).item()


def dequant_act(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Exact float64 value of an act_quant result."""
    return q.double() * s.double().repeat_interleave(q.shape[-1] // s.shape[-1], dim=-1)


def quant_experts(w_ENK: torch.Tensor):
    """Per-expert 128x128 block quantization with the reference -> (e4m3 [E,N,K], fp32 scales)."""
    pairs = [ref.weight_quant_ref(w) for w in w_ENK]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def make_moe(gen, t, top_k, e, d, f, idle_expert=None):
    """Random FP8 MoE layer. ``idle_expert`` gets no tokens; one slot is -1 (owned elsewhere)."""
    x = torch.randn(t, d, generator=gen)
    busy = [i for i in range(e) if i != idle_expert]
    ids = torch.tensor(busy)[torch.randint(0, len(busy), (t, top_k), generator=gen)]
    ids[0, -1] = -1
    weights = torch.rand(t, top_k, generator=gen)
    gate_q, gate_s = quant_experts(torch.randn(e, f, d, generator=gen) * 0.05)
    up_q, up_s = quant_experts(torch.randn(e, f, d, generator=gen) * 0.05)
    w2_q, w2_s = quant_experts(torch.randn(e, d, f, generator=gen) * 0.05)
    w13_q, w13_s = torch.cat([gate_q, up_q], 1), torch.cat([gate_s, up_s], 1)
    return x, ids, weights, w13_q, w13_s, w2_q, w2_s


def moe_w8a16_f64(x, ids, weights, w13_q, w13_s, w2_q, w2_s):
    """Float64 oracle with unquantized activations: the torch reference computed in float64."""
    return ref.moe_experts_ref(x.double(), ids, weights.double(), w13_q, w13_s, w2_q, w2_s)


def moe_w8a8_f64(x, ids, weights, w13_q, w13_s, w2_q, w2_s, scale_fmt=None):
    """Float64 per-(token, slot) oracle of the W8A8 recipe: x and h quantized in 1x128 groups
    with the reference quantizer (scales in ``scale_fmt``), everything else exact."""
    t, d = x.shape
    f = w13_q.shape[1] // 2
    f_pad = -(-f // ref.BLOCK_SIZE) * ref.BLOCK_SIZE
    xq, xs = ref.act_quant_ref(x, scale_fmt=scale_fmt)
    xd = dequant_act(xq, xs)
    y = torch.zeros(t, d, dtype=torch.float64)
    for ti in range(t):
        for k in range(ids.shape[1]):
            e = int(ids[ti, k])
            if e < 0:
                continue
            gate, up = (ref.dequant_w13_ref(w13_q[e], w13_s[e], torch.float64) @ xd[ti]).chunk(2)
            h = torch.zeros(f_pad)
            h[:f] = (torch.nn.functional.silu(gate) * up).float()
            hq, hs = ref.act_quant_ref(h, scale_fmt=scale_fmt)
            w2 = ref.weight_dequant_ref(w2_q[e], w2_s[e], torch.float64)
            y[ti] += weights[ti, k].double() * (w2 @ dequant_act(hq, hs)[:f])
    return y
