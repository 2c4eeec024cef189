"""GPU-only: the Triton kernels compiled for real on DeepSeek-V3 shapes (skipped without CUDA).

Shapes: hidden 7168, moe_intermediate 2048, 256 routed experts, top-8; q_b 24576x1536,
kv_b 32768x512, o 7168x16384, kv_a 576x7168 (N not a multiple of 128).

Tolerances: quantizers bit-exact and dequant exact (same IEEE operations as torch, and the GPU
rounds fp32 -> bf16 to nearest even like torch). GEMMs against a float64 product of the *same*
quantized operands: Hopper's FP8 MMA accumulates with ~14 bits inside each 128-wide K block
(DeepSeek-V3 report §3.3.2), so 2**-14 per block; 1e-3 relative leaves margin while a wrong
scale or a dropped block (>= 1e-1) fails. bf16 output adds one rounding (2**-8). MoE results
against the fp32 W8A16 torch reference: two activation quantizations, ``E4M3_REL_ERROR_BOUND``.
"""

import pytest
import torch

from tests.kernels.kernel_oracles import E4M3_REL_ERROR_BOUND, gpu, rel_err

pytestmark = gpu

import expertpool.kernels as K  # noqa: E402
from expertpool.kernels import reference as ref  # noqa: E402

DIM, MOE_INTER, N_EXPERTS, TOP_K = 7168, 2048, 256, 8
LINEAR_SHAPES = {"q_b": (24576, 1536), "kv_b": (32768, 512), "o": (7168, 16384),
                 "kv_a": (576, 7168)}
SAME_OPERANDS_BOUND = 1e-3
BF16_ROUNDING = 2.0 ** -8


@pytest.fixture(scope="module")
def cuda():
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        pytest.skip("FP8 Triton kernels need compute capability >= 8.9")
    return dev


def _gen(seed=0):
    return torch.Generator(device="cuda").manual_seed(seed)


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_act_quant_bit_exact_prefill(cuda, scale_fmt):
    from expertpool.kernels import quant

    x = torch.randn(4096, DIM, device=cuda, generator=_gen()).to(torch.bfloat16)
    x[7] = 0
    y, s = quant.act_quant(x, scale_fmt=scale_fmt)
    y_ref, s_ref = ref.act_quant_ref(x, scale_fmt=scale_fmt)
    assert torch.equal(y.view(torch.uint8), y_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@pytest.mark.parametrize("name", ["kv_a", "q_b"])
def test_weight_quant_and_dequant_exact(cuda, name):
    from expertpool.kernels import quant

    w = torch.randn(*LINEAR_SHAPES[name], device=cuda, generator=_gen()) * 0.02
    q, s = quant.weight_quant(w)
    q_ref, s_ref = ref.weight_quant_ref(w)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(quant.weight_dequant(q, s, dtype), ref.weight_dequant_ref(q, s, dtype))


@pytest.mark.parametrize("name", list(LINEAR_SHAPES))
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_fp8_gemm_deepseek_shapes(cuda, name, m):
    from expertpool.kernels import quant
    from expertpool.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref

    n, k = LINEAR_SHAPES[name]
    a, a_s = quant.act_quant(torch.randn(m, k, device=cuda, generator=_gen(1)))
    b, b_s = quant.weight_quant(torch.randn(n, k, device=cuda, generator=_gen(2)) * 0.02)
    want = fp8_gemm_ref(a, a_s, b, b_s, torch.float64, torch.float64)
    assert rel_err(fp8_gemm(a, a_s, b, b_s, torch.float32), want) < SAME_OPERANDS_BOUND
    assert rel_err(fp8_gemm(a, a_s, b, b_s, torch.bfloat16), want) < \
        SAME_OPERANDS_BOUND + BF16_ROUNDING


def test_linear_auto_dispatch_uses_triton(cuda):
    assert K.select_backend(cuda)[0] == "triton"
    n, k = LINEAR_SHAPES["kv_a"]
    w_q, w_s = K.weight_quant(torch.randn(n, k, device=cuda, generator=_gen(3)) * 0.02)
    x = torch.randn(2, 5, k, device=cuda, generator=_gen(4), dtype=torch.bfloat16)
    want = x.double() @ ref.weight_dequant_ref(w_q, w_s, torch.float64).T
    y = K.linear(x, w_q, w_s)
    assert y.shape == (2, 5, n) and y.dtype == torch.bfloat16
    assert rel_err(y, want) < E4M3_REL_ERROR_BOUND


def _expert_weights(n_experts, device):
    """Quantized like a checkpoint (bf16 randn -> weight_quant), one expert at a time."""
    w13_q = torch.empty(n_experts, 2 * MOE_INTER, DIM, dtype=torch.float8_e4m3fn, device=device)
    w13_s = torch.empty(n_experts, 2 * MOE_INTER // 128, DIM // 128, device=device)
    w2_q = torch.empty(n_experts, DIM, MOE_INTER, dtype=torch.float8_e4m3fn, device=device)
    w2_s = torch.empty(n_experts, DIM // 128, MOE_INTER // 128, device=device)
    g = _gen(5)
    for e in range(n_experts):
        w13 = torch.randn(2 * MOE_INTER, DIM, device=device, generator=g, dtype=torch.bfloat16)
        w2 = torch.randn(DIM, MOE_INTER, device=device, generator=g, dtype=torch.bfloat16)
        w13_q[e], w13_s[e] = K.weight_quant(w13 * 0.02)
        w2_q[e], w2_s[e] = K.weight_quant(w2 * 0.02)
    return w13_q, w13_s, w2_q, w2_s


@pytest.fixture(scope="module")
def experts_256(cuda):
    return _expert_weights(N_EXPERTS, cuda)  # ~11 GB of fp8 weights


@pytest.mark.parametrize("tokens", [1, 64])
def test_fused_moe_all_256_experts(cuda, experts_256, tokens):
    from expertpool.kernels.fused_moe import fused_moe

    weights = experts_256
    x = torch.randn(tokens, DIM, device=cuda, generator=_gen(6))
    scores = torch.rand(tokens, N_EXPERTS, device=cuda, generator=_gen(7))
    topk_w, topk_ids = scores.topk(TOP_K, dim=-1)
    y = fused_moe(x, topk_ids, topk_w, *weights)
    want = ref.moe_experts_ref(x, topk_ids, topk_w, *weights)
    assert torch.isfinite(y).all()
    assert rel_err(y, want) < E4M3_REL_ERROR_BOUND


def test_fused_moe_32_local_experts_with_remote_slots(cuda, experts_256):
    local = 32  # EP = 8: this rank holds experts 0..31
    weights = tuple(w[:local] for w in experts_256)
    x = torch.randn(128, DIM, device=cuda, generator=_gen(8), dtype=torch.bfloat16)
    topk_w, global_ids = torch.rand(128, N_EXPERTS, device=cuda, generator=_gen(9)).topk(TOP_K)
    local_ids = torch.where(global_ids < local, global_ids, -1)  # this rank owns experts 0..31
    local_ids[:, :] = torch.where(local_ids == 5, -1, local_ids)  # expert 5: zero tokens
    y = K.moe_experts(x, local_ids, topk_w, *weights)
    want = ref.moe_experts_ref(x.float(), local_ids, topk_w, *weights)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, want) < E4M3_REL_ERROR_BOUND + 2 * BF16_ROUNDING  # bf16 h and output


# --- the decode-step kernels of issue 16: paged MLA decode, the fused router, the one-launch alignment


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_mla_decode_deepseek_heads(cuda, dtype):
    """H = 128 heads, C = 512, R = 64, 64-token pages, contexts 1..4,000 on scattered blocks. bf16:
    real tensor-core dots (the interpreter widens them), probabilities rounded to bf16 before the
    value product: 1e-2 relative; fp32: IEEE dots, 1e-5."""
    from expertpool.kernels import mla_decode

    H, C, R, page = 128, 512, 64, 64
    lens = [1, 63, 64, 1000, 4000, 257]
    g = _gen(10)
    blocks = sum(-(-n // page) for n in lens) + 8
    cache = torch.randn(blocks * page, C + R, device=cuda, generator=g).to(dtype)
    perm = torch.randperm(blocks, device=cuda, generator=g).to(torch.int32)
    table = torch.zeros(len(lens), -(-max(lens) // page), dtype=torch.int32, device=cuda)
    used = 0
    for b, n in enumerate(lens):
        k = -(-n // page)
        table[b, :k] = perm[used:used + k]
        used += k
    q_abs = torch.randn(len(lens), H, C, device=cuda, generator=g).to(dtype) * 0.05
    q_pe = torch.randn(len(lens), H, R, device=cuda, generator=g).to(dtype) * 0.05
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=cuda)
    got = mla_decode.paged_mla_decode(q_abs, q_pe, cache, table, seq_lens, 0.135, page)
    want = ref.paged_mla_decode_ref(q_abs.double(), q_pe.double(), cache.double(), table, seq_lens, 0.135, page,
                                    max(lens))
    assert rel_err(got, want) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_router_and_alignment_on_deepseek_shapes(cuda):
    """The fused router equals route_ref (ids exact on continuous scores, weights to 1e-6) and the
    one-launch alignment equals the torch one, at 256 experts, 8 groups, top-8, 1..4,096 tokens."""
    from expertpool.kernels import fused_moe, router

    bias = torch.randn(N_EXPERTS, device=cuda, generator=_gen(11)) * 0.1
    for t in (1, 16, 4096):
        logits = torch.randn(t, N_EXPERTS, device=cuda, generator=_gen(12))
        w, ids = router.route(logits, bias, 8, 4, TOP_K, "sigmoid", True, 2.5)
        w_ref, ids_ref, _ = ref.route_ref(logits, bias, 8, 4, TOP_K, "sigmoid", True, 2.5)
        assert torch.equal(ids, ids_ref)
        torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-6)
        local = torch.where(ids < 32, ids, -1)  # EP 8: 32 local experts
        want = fused_moe.moe_align_block_size(local, 32, 64)
        got = fused_moe.moe_align(local, 32, 64)
        n = int(want[2])
        assert int(got[2]) == n and torch.equal(got[0][:n], want[0][:n])
        assert torch.equal(got[1][: n // 64], want[1][: n // 64])
