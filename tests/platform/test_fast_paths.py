"""Greedy parity of the CPU decode fast paths against the reference path (issue 14).

Fast paths (``kernels.fast_paths()``, on by default): oneDNN-packed dense linears, the grouped C
expert kernel at decode row counts (``kernels.cpu_experts``; fp32, bf16 or weight-only int8 weights,
also bf16 and int8 weights under fp32 compute), the expert loop that takes W @ x^T for fp32 at more
rows, the decode attention, absorbed per-head products, RMSNorm and router
in C (``kernels.cpu_attention``, ``cpu_gemm``, ``cpu_norm``, ``cpu_router``) and decode steps from
static buffers padded to a bucket. The
reference path is the same weights through ``kernels.use_backend("torch")``: plain ``F.linear`` and
``moe_experts_ref`` (the quantized formats dequantized exactly). Both run the in-process engine
(chunked prefill, then decode) on the tiny model and on a bench-mini-shaped one (hidden 1024, 64
experts top-6, MLA with 8 heads of 192/128, kv_lora 512; two layers and a 2,048-token vocabulary to
keep it small).

Where the two paths run the same arithmetic in another order (fp32 compute), greedy output must be
identical (int8 experts included: the kernel multiplies exact int8 codes by fp32 activations and scales
each row's sum, where the reference multiplies by the dequantized weights, which are exact in fp32
too). Where the fast path rounds differently (bf16 products in other blockings), a divergence is
allowed only at a near-tie: at the first differing token, the reference's top-two margin must be within
``NEAR_TIE_ULPS`` bf16 ulps of its top logit, and the two paths' logits on that prefix must agree
within bf16 rounding.
"""

import pytest
import torch

from expertpool import kernels
from expertpool.model.args import preset
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint
from expertpool.model.sampling import SamplingParams
from expertpool.model.transformer import init_random
from expertpool.platform.engine import generate
from expertpool.platform.scheduler import EngineCore
from expertpool.platform.executor import LocalExecutor
from expertpool.platform.worker import ModelRunner

BENCH_MINI_SHAPED = preset("bench-mini").replace(vocab_size=2048, num_hidden_layers=2)
NEW = 12
# Each path rounds every product and sum of ~2 to 4 layers to bf16 (half an ulp of that value) in its
# own order; through the layers those differences compound to a few ulps of the final logits (one ulp
# measured on the full forward). Eight ulps of the top logit is a near-tie; a wrong kernel moves
# logits by O(1) of their scale and fails both this and the agreement bound.
NEAR_TIE_ULPS = 8


def _bf16_ulp(v: float) -> float:
    return 2.0 ** (torch.tensor(abs(v)).log2().floor().item() - 7)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, args, std in (("tiny", preset("tiny"), 0.1), ("bench-mini-shaped", BENCH_MINI_SHAPED, 0.05)):
        m = init_random(args, seed=3, std=std)
        g = torch.Generator().manual_seed(4)
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.copy_(torch.randn(args.n_routed_experts, generator=g) * 0.05)
        out[name] = save_checkpoint(m, tmp_path_factory.mktemp(name), dtype=torch.float32)
    return out


def _run(model, prompts, static_decode: bool):
    runner = ModelRunner(model, num_blocks=64, block_size=8, scratch_blocks=1)
    if static_decode:
        runner.enable_decode_graphs([1, 2, 4], max_seq_len=64, capture=False)
    core = EngineCore(LocalExecutor(runner), num_blocks=64, block_size=8, max_batch_size=4, max_seq_len=64,
                      max_num_batched_tokens=16, eos_token_id=None, vocab_size=model.args.vocab_size)
    return generate(core, prompts, SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True))


def _logits(model, ids):
    """Last-position logits of the full forward (the runner already prepared the model's fast paths)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1]


CASES = [  # (compute dtype, resident weights, exact): exact where only the summation order differs
    (torch.float32, "fp32", True),
    (torch.float32, "bf16", True),     # bf16 storage, fp32 compute
    (torch.float32, "int8", True),     # int8 codes widened in registers, x kept fp32, rows scaled once
    (torch.bfloat16, "bf16", False),   # packed vs plain bf16 products: other roundings
    (torch.bfloat16, "int8", False),
]


@pytest.mark.parametrize("name", ["tiny", "bench-mini-shaped"])
@pytest.mark.parametrize("dtype,weights,exact", CASES, ids=[f"{d}-{w}".replace("torch.", "") for d, w, _ in CASES])
def test_fast_paths_keep_greedy_parity_with_the_reference(checkpoints, name, dtype, weights, exact):
    model = load_checkpoint(checkpoints[name], dtype=dtype, weight_dtype=weights, with_mtp=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, model.args.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 9, 30)]
    with kernels.use_backend("torch"):
        want = _run(model, prompts, static_decode=False)
    got = _run(model, prompts, static_decode=True)
    assert kernels.fast_paths()
    for p, w, o in zip(prompts, want, got):
        if exact:
            assert o == w
            continue
        i = next((j for j, (a, b) in enumerate(zip(o, w)) if a != b), None)
        if i is None:
            continue
        prefix = p + w[:i]
        with kernels.use_backend("torch"):
            ref = _logits(model, prefix).float()
        fast = _logits(model, prefix).float()
        disagreement = (fast - ref).abs().max().item()
        # the paths' logits agree to bf16 rounding (the same ulp budget, on the largest logit)
        assert disagreement <= NEAR_TIE_ULPS * _bf16_ulp(ref.abs().max().item()), (name, weights, disagreement)
        top2 = ref.topk(2).values
        margin = (top2[0] - top2[1]).item()
        assert margin <= NEAR_TIE_ULPS * _bf16_ulp(top2[0].item()), (name, weights, i, top2.tolist(), disagreement)
