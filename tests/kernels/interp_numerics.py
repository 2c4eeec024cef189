"""W8A8 numerics as DeepSeek-V3's inference code computes them, under TRITON_INTERPRET=1 (run via
test_kernels_interpreter.py).

1. Power-of-two ("ue8m0") scale checkpoints: DeepSeek quantizes activations with the checkpoint's
   scale format in its plain ``Linear`` layers (q_a_proj, kv_a_proj_with_mqa, the routed experts)
   and with plain fp32 scales elsewhere. We do the same; the kernels are checked against float64
   oracles of each rule, and the model sets the rule on exactly those layers.
2. ``model(input_ids)`` and the serving path (prefill chunks, then decodes) compute one attention
   function: kv_b_proj multiplies with its dequantized weight everywhere (W8A16), so the two agree
   to fp32 rounding; the variant that quantizes kv_b's input in the full forward (DeepSeek's naive
   attention) differs by two orders of magnitude more, which is what this test would catch. It is
   checked on the first layer's attention output (o_proj's input), where both paths start from the
   same bits: past that point a rounding difference of ~3e-7 can move an activation across an e4m3
   code boundary in the next quantized linear (measured on a Zen 5 CPU: one code, third decode row),
   and a changed code, through the router, moves the logits by ~1e-2.
"""

import pytest
import torch

from tests.kernels.kernel_oracles import dequant_act, make_moe, moe_w8a8_f64, rel_err, requires_interpreter

pytest.importorskip("triton")
pytestmark = requires_interpreter

import expertpool.kernels as K  # noqa: E402  (after the triton check)
from expertpool.kernels import fused_moe as fm, reference as ref  # noqa: E402
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from expertpool.model.transformer import init_random  # noqa: E402
from tests.kernels.interp_decode_step import V3_SHAPED  # noqa: E402
from tests.model.helpers import stepwise_logits  # noqa: E402

# fp8 products are exact in fp32 and the kernel accumulates 2 K-blocks in fp32: ~1e-7 relative
FP32_ACCUMULATION_BOUND = 1e-5
# two e4m3 quantization grids (ue8m0 vs plain scales) differ by ~1e-2 relative on Gaussian data
DIFFERENT_GRID_MIN = 1e-3


def _w8a8_linear_f64(x, w_q, w_s, scale_fmt):
    xq, xs = ref.act_quant_ref(x, scale_fmt=scale_fmt)
    return dequant_act(xq, xs) @ ref.weight_dequant_ref(w_q, w_s, torch.float64).T


def test_linear_applies_the_activation_scale_format(gen):
    w_q, w_s = ref.weight_quant_ref(torch.randn(576, 256, generator=gen) * 0.05, scale_fmt="ue8m0")
    x = torch.randn(7, 256, generator=gen)
    with K.use_backend("triton"):
        y = K.linear(x, w_q, w_s, act_scale_fmt="ue8m0")
        y_plain = K.linear(x, w_q, w_s)
    assert rel_err(y, _w8a8_linear_f64(x, w_q, w_s, "ue8m0")) < FP32_ACCUMULATION_BOUND
    assert rel_err(y_plain, _w8a8_linear_f64(x, w_q, w_s, None)) < FP32_ACCUMULATION_BOUND
    assert rel_err(y, _w8a8_linear_f64(x, w_q, w_s, None)) > DIFFERENT_GRID_MIN


def test_fused_moe_applies_the_scale_format_to_x_and_h(gen):
    layer = make_moe(gen, t=6, top_k=2, e=3, d=256, f=128)
    y = fm.fused_moe(*layer, config={"BLOCK_M": 16, "BLOCK_N": 32}, scale_fmt="ue8m0")
    # reason for 2e-3: as in interp_moe.py (fp32 accumulation order can flip one e4m3 code of h)
    assert rel_err(y, moe_w8a8_f64(*layer, scale_fmt="ue8m0")) < 2e-3
    assert rel_err(y, moe_w8a8_f64(*layer)) > DIFFERENT_GRID_MIN


def test_model_sets_the_rule_on_deepseeks_plain_linears(tmp_path):
    d = save_checkpoint(init_random(V3_SHAPED, seed=1, std=0.05), tmp_path / "ue8m0", fp8=True, scale_fmt="ue8m0",
                        dtype=torch.bfloat16)
    m = load_checkpoint(d, dtype=torch.float32, with_mtp=False)
    assert m.args.scale_fmt == "ue8m0"
    attn, moe = m.model.layers[1].self_attn, m.moe_layers()[0]
    assert attn.q_a_proj.act_scale_fmt == attn.kv_a_proj_with_mqa.act_scale_fmt == "ue8m0"
    assert moe.experts.scale_fmt == "ue8m0"
    for lin in (attn.q_b_proj, attn.o_proj, moe.shared_experts.gate_proj, m.model.layers[0].mlp.down_proj):
        assert lin.act_scale_fmt is None  # column/row-parallel in DeepSeek's code: plain scales


def test_full_forward_and_serving_path_compute_one_function(tmp_path):
    d = save_checkpoint(init_random(V3_SHAPED, seed=2, std=0.05), tmp_path / "fp8", fp8=True, dtype=torch.bfloat16)
    m = load_checkpoint(d, dtype=torch.float32, with_mtp=False)
    ids = torch.randint(0, V3_SHAPED.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    attn = m.model.layers[0].self_attn
    seen: list[torch.Tensor] = []  # the first layer's attention output per call: o_proj's input
    hook = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))

    def first_layer_attention(run) -> torch.Tensor:
        seen.clear()
        run()
        return torch.cat(seen)

    mla_cls = type(attn)
    real_expand = mla_cls._expand

    def quantized_kv_b(self, c_TC, k_pe_TR, dtype):  # DeepSeek's naive attention: kv_b's input quantized (W8A8)
        H = self.n_heads
        kv = self.kv_b_proj(c_TC).unflatten(-1, (H, self.nope + self.v_dim))
        k_nope, v = kv.split([self.nope, self.v_dim], -1)
        k = torch.cat([k_nope, k_pe_TR.unsqueeze(-2).expand(*k_pe_TR.shape[:-1], H, self.rope_dim)], -1)
        v = torch.nn.functional.pad(v, (0, self.qk_dim - self.v_dim))
        return k.transpose(-3, -2), v.transpose(-3, -2)
    try:
        with K.use_backend("triton"), torch.no_grad():
            full = first_layer_attention(lambda: m(ids))
            served = first_layer_attention(lambda: stepwise_logits(m, ids[0].tolist(), prefill=5, block_size=4))
            mla_cls._expand = quantized_kv_b
            try:
                naive = first_layer_attention(lambda: m(ids))
            finally:
                mla_cls._expand = real_expand
    finally:
        hook.remove()
    assert full.shape == served.shape == naive.shape == (12, attn.n_heads * attn.v_dim)
    # the same W8A8 q and latent codes (same input bits, row-independent GEMMs); the attention forms
    # differ in summation order only: fp32 rounding, ~1e-6
    err = rel_err(served, full)
    assert err < 1e-4
    assert rel_err(naive, full) > 100 * err
