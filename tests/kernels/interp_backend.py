"""The kernel backend's Triton path, forced on CPU under TRITON_INTERPRET=1.

``linear`` on the Triton path is W8A8 (activations quantized), the torch path W8A16; both are
compared with the float64 product of the dequantized weight and the unquantized input, so the
bound is ``E4M3_REL_ERROR_BOUND`` (one activation quantization; reason in kernel_oracles.py).
"""

import logging

import pytest
import torch

from tests.kernels.kernel_oracles import (E4M3_REL_ERROR_BOUND, make_moe, moe_w8a16_f64, rel_err,
                            requires_interpreter)

pytest.importorskip("triton")
pytestmark = requires_interpreter

import expertpool.kernels as K  # noqa: E402  (after the triton check)
from expertpool.kernels import backend, reference as ref  # noqa: E402


def test_forced_triton_linear_matches_reference(gen):
    w_q, w_s = ref.weight_quant_ref(torch.randn(576, 256, generator=gen) * 0.05)
    x = torch.randn(2, 3, 256, generator=gen)
    want = x.double() @ ref.weight_dequant_ref(w_q, w_s, torch.float64).T
    with K.use_backend("triton"):
        assert K.select_backend(x.device)[0] == "triton"
        y = K.linear(x, w_q, w_s)
    assert y.shape == (2, 3, 576) and y.dtype == torch.float32
    assert rel_err(y, want) < E4M3_REL_ERROR_BOUND
    assert not torch.equal(y, K.linear(x, w_q, w_s))  # auto on CPU = torch path: W8A16 differs


def test_env_var_is_read_per_call(gen, monkeypatch):
    q, s = ref.weight_quant_ref(torch.randn(128, 128, generator=gen))
    monkeypatch.setenv("EXPERTPOOL_KERNELS", "triton")
    from expertpool.kernels import quant

    calls = []
    monkeypatch.setattr(quant, "weight_dequant",
                        lambda *a: calls.append(a) or ref.weight_dequant_ref(*a))
    K.weight_dequant(q, s)
    monkeypatch.setenv("EXPERTPOOL_KERNELS", "torch")
    K.weight_dequant(q, s)
    assert len(calls) == 1


def test_forced_triton_quantizers_are_bit_exact(gen):
    x = torch.randn(4, 256, generator=gen)
    with K.use_backend("triton"):
        y, s = K.act_quant(x, scale_fmt="ue8m0")
        q, qs = K.weight_quant(x)
    y_ref, s_ref = ref.act_quant_ref(x, scale_fmt="ue8m0")
    q_ref, qs_ref = ref.weight_quant_ref(x)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(qs, qs_ref)


def test_forced_triton_moe_matches_reference(gen):
    layer = make_moe(gen, t=6, top_k=2, e=3, d=256, f=128, idle_expert=1)
    with K.use_backend("triton"):
        y = K.moe_experts(*layer)
    # Two activation quantizations (x and h) on the Triton path.
    assert rel_err(y, moe_w8a16_f64(*layer)) < E4M3_REL_ERROR_BOUND


def test_non_fp8_weights_stay_in_torch_even_when_triton_forced(gen):
    w = torch.randn(64, 96, generator=gen)
    x = torch.randn(5, 96, generator=gen)
    with K.use_backend("triton"):
        assert torch.equal(K.linear(x, w), torch.nn.functional.linear(x, w))
        x_TD, ids, weights, *_ = make_moe(gen, t=3, top_k=2, e=2, d=128, f=64)
        w13, w2 = torch.randn(2, 128, 128, generator=gen), torch.randn(2, 128, 64, generator=gen)
        y = K.moe_experts(x_TD, ids, weights, w13, None, w2, None)
    assert torch.equal(y, ref.moe_experts_ref(x_TD, ids, weights, w13, None, w2, None))


def test_k_not_multiple_of_128_falls_back_and_logs_once(gen, caplog):
    backend._log_once.cache_clear()
    q, s = ref.weight_quant_ref(torch.randn(64, 200, generator=gen))
    x = torch.randn(3, 200, generator=gen)
    with caplog.at_level(logging.INFO, logger="expertpool.kernels.backend"), \
            K.use_backend("triton"):
        y1, y2 = K.linear(x, q, s), K.linear(x, q, s)
    assert torch.equal(y1, ref.linear_ref(x, q, s)) and torch.equal(y2, y1)
    fallback = [r for r in caplog.records if "K=200" in r.getMessage()]
    assert len(fallback) == 1
