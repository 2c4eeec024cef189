"""Triton fused router (``router``) under TRITON_INTERPRET=1 (run via test_kernels_interpreter.py).

Oracle: ``route_ref``, the exact V3 router in torch, on the same fp32 logits. Expert ids must agree
exactly (continuous random scores have no ties); weights agree to 1e-6 relative (the kernel's sigmoid
is ``1 / (1 + exp(-x))`` in fp32, torch's differs in the last bits).
"""

import pytest
import torch

from tests.kernels.kernel_oracles import requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

from expertpool import kernels  # noqa: E402  (after the triton check)
from expertpool.kernels import reference as ref, router  # noqa: E402


@pytest.mark.parametrize("E,G,TG,K,scoring,bias_mean", [
    (256, 8, 4, 8, "sigmoid", 0.0),      # DeepSeek-V3
    (64, 8, 4, 6, "sigmoid", 0.0),       # bench-mini: top-6 (not a power of two)
    (32, 8, 3, 4, "sigmoid", -2.0),      # negative biased scores: dropped groups must be -inf, not 0
    (64, 1, 1, 6, "softmax", 0.0),       # V2-style: one group, softmax
    (16, 4, 2, 1, "sigmoid", 0.0),       # top-1: no normalization
])
def test_router_matches_reference(gen, E, G, TG, K, scoring, bias_mean):
    logits = torch.randn(13, E, generator=gen) * 2
    bias = torch.randn(E, generator=gen) * 0.5 + bias_mean
    w, ids = router.route(logits, bias, G, TG, K, scoring, True, 2.5)
    w_ref, ids_ref, _ = ref.route_ref(logits, bias, G, TG, K, scoring, True, 2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)


def test_router_without_bias_and_backend_choice(gen):
    logits = torch.randn(5, 64, generator=gen)
    w, ids = router.route(logits, None, 8, 4, 6)
    w_ref, ids_ref, _ = ref.route_ref(logits, None, 8, 4, 6)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    with kernels.use_backend("triton"), torch.no_grad():
        w2, ids2, scores = kernels.route(logits, None, 8, 4, 6, need_scores=False)
        assert scores is None and torch.equal(ids2, ids)  # the fused kernel ran
        _, _, scores = kernels.route(logits, None, 8, 4, 6, need_scores=True)
        assert scores is not None  # the score matrix is asked for: the reference runs
