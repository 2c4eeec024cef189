"""ESFT on an FP8 checkpoint, on CPU with the same code a GPU runs: frozen FP8 weights stay FP8 and go
through the kernels' dispatch point; their backward matches autograd through the dequantized weights;
only the selected experts get fp32 master weights and optimizer state. No Ray."""

import pytest
import torch
import torch.nn.functional as F

from expertpool.jobs import finetune
from expertpool.jobs.esft import SelectedExperts, TrainExperts, frozen_fp8_linears
from expertpool.jobs.hooks import FrozenCheck
from expertpool.kernels.reference import dequant_w13_ref, moe_experts_ref, weight_dequant_ref
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.patch import read_patch
from tests.jobs.helpers import Formats, job_config

FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    from expertpool.model.embedded import init_model

    return init_model("tiny", tmp_path_factory.mktemp("fp8") / "tiny-fp8", fp8=True, seed=0)


def _dense_experts(ex):
    w13 = torch.stack([dequant_w13_ref(ex.w13_weight[i], ex.w13_weight_scale_inv[i], torch.float32)
                       for i in range(ex.num_local)])
    w2 = torch.stack([weight_dequant_ref(ex.w2_weight[i], ex.w2_weight_scale_inv[i], torch.float32)
                      for i in range(ex.num_local)])
    return w13, w2


def test_frozen_fp8_experts_and_linears_backpropagate_like_their_dequantized_weights(fp8_dir):
    model = load_checkpoint(fp8_dir, dtype=torch.float32)
    ex = model.moe_layers()[0].experts
    assert ex.w13_weight.dtype == FP8
    g = torch.Generator().manual_seed(0)
    T, K = 24, 8
    x = torch.randn(T, ex.w13_weight.shape[2], generator=g, requires_grad=True)
    ids = torch.randint(0, ex.num_local, (T, K), generator=g)
    ids[::5, 0] = -1  # slots owned elsewhere
    w = torch.rand(T, K, generator=g, requires_grad=True)
    sel = SelectedExperts(ex, [int(ex.expert_ids[e]) for e in ids.unique().tolist() if e >= 0][:3])
    assert sel.w13.dtype == torch.float32  # fp32 masters of the selected experts only
    out = TrainExperts(ex, sel)(x, ids, w)
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)

    # the reference: autograd through the dequantized weights, the selected rows as leaves
    w13, w2 = _dense_experts(ex)
    x2, w_2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    sel13, sel2 = sel.w13.detach().clone().requires_grad_(), sel.w2.detach().clone().requires_grad_()
    rows13, rows2 = list(w13.unbind(0)), list(w2.unbind(0))
    for j, i in enumerate(sel.local_idx.tolist()):
        rows13[i], rows2[i] = sel13[j], sel2[j]
    ref = moe_experts_ref(x2, ids, w_2, rows13, None, rows2, None)
    ref.backward(dy)
    # the same dequantized weights and fp32 matmuls, summed in another order (frozen and selected
    # experts apart): equal to float rounding, 1e-5 relative
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad, w_2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sel.w13.grad, sel13.grad, rtol=1e-5, atol=1e-6)
    assert sel.w13.grad.abs().sum() > 0
    assert ex.w13_weight.grad is None and ex.w13_weight.dtype == FP8  # frozen: FP8, no gradient

    lin = next(m for m in model.modules() if hasattr(m, "weight_scale_inv") and m.weight.dtype == FP8)
    assert frozen_fp8_linears(model) > 0
    xl = torch.randn(5, lin.in_features, generator=g, requires_grad=True)
    lin(xl).pow(2).sum().backward()
    xr = xl.detach().clone().requires_grad_()
    F.linear(xr, weight_dequant_ref(lin.weight, lin.weight_scale_inv, torch.float32)).pow(2).sum().backward()
    torch.testing.assert_close(xl.grad, xr.grad, rtol=1e-5, atol=1e-6)


def test_esft_on_an_fp8_checkpoint_keeps_frozen_weights_fp8(tmp_path, fp8_dir):
    plan = job_config(tmp_path, fp8_dir, """
workers: 1
batch_size: 2
seq_len: 384
mode: esft
esft: {scoring: token, p: 0.2, score_tokens: 768}
lr: 1.0e-2
steps: 3
""")
    s = finetune.run_local(plan, [FrozenCheck(), Formats()])
    assert s["device"] == "cpu"  # worker_resources.gpu is 0: the CPU, chosen by the same code as a GPU
    assert s["stacked_dtype"] == "torch.float8_e4m3fn" and s["trainable_dtypes"] == ["torch.float32"]
    # everything outside the selected experts (FP8 rows and scales included) is bit-identical
    assert s["frozen_changed"] == 0
    patch = read_patch(s["output"], base_model_dir=fp8_dir)
    assert patch.dtype == "float32" and 0 < patch.num_experts < 2 * 256
    assert s["optimized"] == patch.num_experts * 3 * 64 * 16  # fp32 masters: the selected experts, nothing else
    assert s["eval_loss_final"] < s["eval_loss_initial"]
