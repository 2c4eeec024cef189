"""Pure-torch references for the FP8 kernels (the CPU path and the ground truth of kernel tests).

Formats follow DeepSeek-V3: e4m3 weights in 128x128 blocks with an fp32 dequant multiplier per
block (``weight_scale_inv``; edges not a multiple of 128 are zero-padded before the amax), and
activations in 1x128 groups. Quantization arithmetic here is fp32 with IEEE division, which the
Triton kernels reproduce bit for bit.

Contract of the CPU path: ``linear_ref`` and ``moe_experts_ref`` dequantize FP8 weights to the
activation dtype and matmul (W8A16); they never quantize activations. ``moe_experts_ref`` loops
over *experts that have tokens* (never over tokens) and dequantizes only those experts. It is also
the training path of the routed experts (autograd through it; ``jobs.esft`` hands it per-expert
weight rows, some of them trainable copies).

ue8m0 scales are rounded up to a power of two with ``frexp`` (exact), not ``exp2(ceil(log2 s))``:
``log2`` of a value just above a power of two can round to the integer and give a scale below
amax/448. Both agree everywhere else.

Shape legend: T tokens, K_top routing slots per token, E local experts, F expert intermediate,
D hidden.
"""

import functools

import torch
import torch.nn.functional as F

from expertpool.kernels import cpu_experts

FP8_E4M3_MAX = 448.0
BLOCK_SIZE = 128
AMAX_FLOOR = 1e-4  # keeps all-zero groups finite (the upstream NaN bug)


def _pow2_ceil(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= s, for positive normal fp32 s (exact, via the exponent)."""
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, s, torch.ldexp(torch.ones_like(s), exponent))


def act_quant_ref(x: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[..., K] -> (e4m3 [..., K], fp32 scales [..., K/block]). K must be a multiple of block."""
    assert x.shape[-1] % block_size == 0, f"last dim {x.shape[-1]} is not a multiple of {block_size}"
    xf = x.float().reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
    s = xf.abs().amax(-1).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    y = (xf / s.unsqueeze(-1)).to(torch.float8_e4m3fn)
    return y.reshape(x.shape), s


def weight_quant_ref(w: torch.Tensor, block_size: int = BLOCK_SIZE, scale_fmt: str | None = None):
    """[N, K] -> (e4m3 [N, K], fp32 [ceil(N/b), ceil(K/b)])."""
    assert w.dim() == 2, f"weight must be 2-D, got {tuple(w.shape)}"
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    wp = torch.zeros(nb * block_size, kb * block_size, dtype=torch.float32, device=w.device)
    wp[:n, :k] = w.float()
    blocks = wp.view(nb, block_size, kb, block_size)
    s = blocks.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR) / FP8_E4M3_MAX
    if scale_fmt == "ue8m0":
        s = _pow2_ceil(s)
    q = (blocks / s[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * block_size, kb * block_size)
    return q[:n, :k].contiguous(), s


@functools.cache
def _e4m3_table(device: str) -> torch.Tensor:
    """The 256 e4m3 values as fp32, one per byte pattern: [256, 1] for F.embedding."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().view(256, 1).to(device)


def fp8_to_float(w: torch.Tensor) -> torch.Tensor:
    """Exact e4m3 -> fp32. On CPU a 256-entry table lookup (F.embedding) is ~7x faster than
    ``w.float()``, whose per-element conversion dominated FP8-resident decoding."""
    if w.device.type != "cpu":
        return w.float()
    return F.embedding(w.view(torch.uint8).int(), _e4m3_table(str(w.device))).view(w.shape)


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32,
                       block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """Exact: w.float() * s broadcast over 128x128 blocks, cast to ``dtype``."""
    n, k = w.shape
    wf = fp8_to_float(w) if w.dtype == torch.float8_e4m3fn else w.float()
    if n % block_size == 0 and k % block_size == 0:  # broadcast a view, no full-size scale copy
        blocks = wf.view(n // block_size, block_size, k // block_size, block_size)
        return (blocks * s[:, None, :, None]).view(n, k).to(dtype)
    s_full = s.repeat_interleave(block_size, 0)[:n].repeat_interleave(block_size, 1)[:, :k]
    return (wf * s_full).to(dtype)


def fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.float32, compute_dtype=torch.float32):
    """Dequantize both operands exactly and matmul in ``compute_dtype`` (float64 in tests)."""
    a_full = a.to(compute_dtype) * a_s.to(compute_dtype).repeat_interleave(BLOCK_SIZE, dim=-1)
    b_full = weight_dequant_ref(b, b_s, torch.float32).to(compute_dtype)
    return (a_full @ b_full.T).to(out_dtype)


INT8_MAX = 127


def int8_weight_quant(w: torch.Tensor):
    """Weight-only int8, symmetric, one scale per output row: [..., N, K] -> (int8 [..., N, K],
    bf16 [..., N]). The scale is rounded to bf16 first and the codes are taken against that rounded
    scale, so every path (the CPU kernel, which takes bf16 scales, and ``int8_dequant``) multiplies
    by the same value. Codes lie in [-127, 127], never -128: the CPU kernel's bf16 lookup of the codes
    (``cpu_experts``, bf16 compute) relies on it."""
    amax = w.float().abs().amax(-1).clamp_min(AMAX_FLOOR)
    s = (amax / INT8_MAX).to(torch.bfloat16)
    q = (w.float() / s.float().unsqueeze(-1)).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, s


def int8_dequant(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * s.float().unsqueeze(-1)).to(dtype)


def _weight_as(w: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if w.dtype == torch.float8_e4m3fn:
        assert scale is not None, "an fp8 weight needs its weight_scale_inv"
        return weight_dequant_ref(w, scale, dtype)
    if w.dtype == torch.int8:
        assert scale is not None, "an int8 weight needs its per-row scale"
        return int8_dequant(w, scale, dtype)
    return w if w.dtype == dtype else w.to(dtype)


def linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, _weight_as(weight, scale, x.dtype))


def dequant_w13_ref(w13: torch.Tensor, s13: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One expert's fused [2F, D] gate/up weight, halves quantized separately (fp8)."""
    if w13.dtype != torch.float8_e4m3fn:
        return _weight_as(w13, s13, dtype)
    f = w13.shape[0] // 2
    fb = -(-f // BLOCK_SIZE)
    return torch.cat([weight_dequant_ref(w13[:f], s13[:fb], dtype),
                      weight_dequant_ref(w13[f:], s13[fb:], dtype)])


def _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, n_experts: int):
    """The valid (token, slot) pairs sorted by expert (stable): per-expert counts (host list), the
    flat pair index (t * K + k) of each, its input row and its routing weight in x's dtype; None if no
    slot is valid (-1 = routed to another rank)."""
    flat_ids = topk_ids_TK.reshape(-1)
    pair_idx = torch.nonzero(flat_ids >= 0, as_tuple=True)[0]
    if pair_idx.numel() == 0:
        return None
    ids = flat_ids[pair_idx]
    pair_idx = pair_idx[torch.argsort(ids, stable=True)]
    counts = torch.bincount(ids, minlength=n_experts).tolist()
    tok = pair_idx // topk_ids_TK.shape[1]
    return counts, pair_idx, x_TD.index_select(0, tok), topk_weights_TK.reshape(-1)[pair_idx].to(x_TD.dtype)


def combine_pairs(y_PD: torch.Tensor, pair_idx_P: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """Sum the weighted outputs of a token's slots: each pair's row goes to its own (token, slot)
    place (no two pairs share one), and the K slots of a token are added in fp32 (at least), in slot order.
    No atomics and one order on every device, so results are reproducible (and the same whatever
    order the pairs came in); autograd flows through (out-of-place index_copy)."""
    D = y_PD.shape[-1]
    buf = y_PD.new_zeros(num_tokens * top_k, D).index_copy(0, pair_idx_P, y_PD)
    acc = torch.promote_types(y_PD.dtype, torch.float32)  # fp32, or the input's wider type (float64 oracles)
    return buf.view(num_tokens, top_k, D).sum(1, dtype=acc).to(y_PD.dtype)


def moe_experts_ref(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    """Grouped SwiGLU experts: sort (token, slot) pairs by expert, one matmul pair per active expert.

    Loops over experts with at least one token (a host sync for the counts, fine on CPU); experts
    without tokens are neither dequantized nor multiplied. ``w13_E2FD`` / ``w2_EDF`` are stacked
    tensors or sequences of per-expert rows (dense, fp8 or int8 with their scales). Built for
    autograd: per-expert outputs are concatenated (no in-place slice writes, whose backward copies
    the whole buffer once per expert), and when no slot is valid the output of an ``x_TD`` that
    requires grad stays connected to it, so the backward still reaches whatever produced ``x_TD``:
    with expert parallelism that is an all-to-all, and every rank must run the same collectives in
    backward. The combine is ``combine_pairs`` (fp32, fixed order).
    """
    T, K = topk_ids_TK.shape
    grouped = _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, len(w13_E2FD))
    if grouped is None:
        return x_TD * 0 if x_TD.requires_grad else torch.zeros_like(x_TD)
    counts, pair_idx, x_sorted, w_sorted = grouped
    outs, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        xe = x_sorted[start:start + n]
        w13 = dequant_w13_ref(w13_E2FD[e], None if w13_scale is None else w13_scale[e], x_TD.dtype)
        w2 = _weight_as(w2_EDF[e], None if w2_scale is None else w2_scale[e], x_TD.dtype)
        gate, up = F.linear(xe, w13).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w2))
        start += n
    return combine_pairs(torch.cat(outs) * w_sorted[:, None], pair_idx, T, K)


def shape_bucket(n: int, exact: int = 16, per_octave: int = 4) -> int:
    """``n`` rounded up to one of few sizes: ``n`` itself up to ``exact``, above it ``per_octave`` sizes
    per power of two (at most 1 / per_octave more). oneDNN (the CPU's bf16 matmuls, every packed
    linear) compiles and caches a kernel per distinct problem shape, a few hundred KB each, up to 1024
    of them per cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY, and ideep's LRU_CACHE_CAPACITY beside it):
    serving steps whose row counts take every value from 1 to the token budget grew an expert
    actor's resident memory by ~0.7 GB before both caches filled. Rows padded to a bucket (and
    cut off after the product) keep the shapes few, so the caches stop growing early."""
    if n <= exact:
        return n
    step = max(1, (1 << (n - 1).bit_length()) // (2 * per_octave))
    return -(-n // step) * step


# the CPU GEMMs whose rows must come out the same in any batch run on whole tiles of this many rows:
# the router's fp32 GEMM always, the per-head absorbed products and the bf16 expert / packed-linear
# GEMMs in batch-invariant mode (``tile_rows``, ``row_bucket``, ``pad_rows``)
ROW_TILE = 16
_BATCH_INVARIANT = [False]


def set_batch_invariant(on: bool) -> None:
    """Batch-invariant CPU products (``serving.batch_invariant``): every row's result is the same in
    any batch, at the price of computing whole row tiles (measured on bench-mini in bf16: decode
    steps 74 vs 50 ms at batch 16, 24-30 vs 18-20 ms at batch 1; a decode step's experts get one or
    two rows each, now 16). Process-wide: an expert actor sets it at start."""
    _BATCH_INVARIANT[0] = bool(on)


def batch_invariant() -> bool:
    return _BATCH_INVARIANT[0]


def tile_rows(n: int) -> int:
    """``n`` rounded up to whole ``ROW_TILE`` tiles."""
    return -(-n // ROW_TILE) * ROW_TILE


def pad_rows(x: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
    """(``x`` with zero rows appended along dim 0 up to ``rows``, its original row count n); ``x``
    itself when it has ``rows`` already. In the products this serves each output row depends on its
    input row only, so the first n rows of the result are unchanged by the padding."""
    n = x.shape[0]
    if rows > n:
        x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - n))
    return x, n


def row_bucket(n: int) -> int:
    """The rows a CPU GEMM of ``n`` rows runs on: ``shape_bucket(n)`` (few shapes, for oneDNN's kernel
    caches); in batch-invariant mode rounded up to a multiple of ``ROW_TILE``. The GEMM kernels tile
    rows, and a row that lands in a remainder tile is summed in another order than one in a full tile
    (rarely visible in bf16, one rounding in thousands): a token's result then depends on how many
    other rows share its step, and a replay after a failure (other batches, other chunks) does not
    reproduce it bit for bit. With whole tiles every row takes the same path."""
    if not _BATCH_INVARIANT[0]:
        return shape_bucket(n)
    return max(ROW_TILE, tile_rows(shape_bucket(n, exact=0)))


# fp32 products with at most this many rows run as W @ x^T: MKL streams the weight rows at memory
# bandwidth there, while x @ W^T packs W first (measured 2-3x slower at 1-16 rows, 1024x512 weights)
FP32_SMALL_M = 16


def _expert_mm(x_nK: torch.Tensor, w_NK: torch.Tensor, scale: torch.Tensor | None, out_nN: torch.Tensor) -> None:
    """out = x @ W.T for one expert's rows, the fastest way this weight format runs on x's device."""
    if w_NK.dtype == torch.int8 and x_nK.device.type == "cpu":
        # int8 widened in registers, fp32 accumulation; the op's fast path takes bf16 activations
        out_nN.copy_(torch._weight_int8pack_mm(x_nK.to(torch.bfloat16), w_NK, scale.to(torch.bfloat16)))
        return
    w_NK = _weight_as(w_NK, scale, x_nK.dtype)
    n = x_nK.shape[0]
    if x_nK.dtype == torch.float32 and n <= FP32_SMALL_M:
        out_nN.copy_(torch.mm(w_NK, x_nK.t()).t())
    elif x_nK.device.type == "cpu" and x_nK.dtype != torch.float32 and row_bucket(n) > n:
        # oneDNN runs the CPU's bf16 products: rows padded to whole tiles of a few sizes (``row_bucket``)
        out_nN.copy_(torch.mm(pad_rows(x_nK, row_bucket(n))[0], w_NK.t())[:n])
    else:
        torch.mm(x_nK, w_NK.t(), out=out_nN)


def moe_experts_inference(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD, w13_scale, w2_EDF, w2_scale):
    """``moe_experts_ref`` for no-grad use on the CPU, with less work per expert: each expert's two
    matmuls write straight into shared buffers (no per-expert output tensors, no cat), SwiGLU runs
    once over all rows, and each weight format takes its fastest product (``_expert_mm``: int8
    through ``torch._weight_int8pack_mm``, fp32 at few rows as W @ x^T). Decode steps touch most
    experts with one or two rows each, so per-expert overhead and bytes read per expert are what
    cost. Dense fp32 / bf16 weights with at most ``cpu_experts.MAX_ROWS`` rows per expert (decode
    steps and prefill chunks of up to a few hundred tokens), and int8 ones with their row scales, go
    to the grouped C kernel (``cpu_experts``: one call per product for the layer, bf16 weights and
    int8 codes widened in registers, fp32
    accumulation in another summation order than oneDNN's, the reference's bf16 roundings of the
    intermediates kept; SwiGLU and the weighted combine one C call each, ``cpu_experts.swiglu`` /
    ``combine``), except in batch-invariant mode. Otherwise, with bf16 activations it runs the
    reference's kernels in its order (bit-identical) for dense and fp8 weights; fp32 activations
    take W @ x^T at few rows (another summation order, ~1e-6 relative; fp8 weights dequantized
    exactly first, so in this loop an fp8-resident model equals an fp32 one holding the dequantized
    weights), int8 weights (past ``MAX_ROWS`` or in batch-invariant mode) ``torch._weight_int8pack_mm``
    (bf16 activations)."""
    T, K = topk_ids_TK.shape
    kernel = not _BATCH_INVARIANT[0] and cpu_experts.applies_to_weights(x_TD, w13_E2FD, w2_EDF, w13_scale, w2_scale)
    if kernel:  # the pairs by expert in one C call (the same pairs, in the same order)
        grouped = cpu_experts.group(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD.shape[0])
        if grouped is None:
            return torch.zeros_like(x_TD)
        groups, pair_idx, x_sorted, w_sorted = grouped
        kernel = groups.max_count <= cpu_experts.MAX_ROWS
    if kernel:
        # few rows per expert (decode): one grouped call per product, weights streamed once (int8 ones
        # widened in registers and each row's sum scaled once); SwiGLU in fp32 with the reference's
        # roundings to the compute dtype (the products, silu, and silu * up: a product of two bf16
        # values is exact in fp32), without bf16 elementwise kernels
        h_P2F = cpu_experts.grouped_gemv(x_sorted, groups, w13_E2FD, scale_EN=w13_scale)
        if x_TD.dtype in (torch.float32, torch.bfloat16) and cpu_experts.EPILOGUE.on():  # one C call each
            a_PF = cpu_experts.swiglu(h_P2F, x_TD.dtype)
            return cpu_experts.combine(cpu_experts.grouped_gemv(a_PF, groups, w2_EDF, scale_EN=w2_scale), w_sorted,
                                       pair_idx, T, K)
        low = x_TD.dtype != torch.float32
        gate, up = (h_P2F.to(x_TD.dtype).float() if low else h_P2F).chunk(2, dim=-1)
        silu = F.silu(gate)
        a_PF = silu.to(x_TD.dtype).float().mul_(up).to(x_TD.dtype) if low else silu.mul_(up)
        y_PD = cpu_experts.grouped_gemv(a_PF, groups, w2_EDF, scale_EN=w2_scale).to(x_TD.dtype)
        y_PD.mul_(w_sorted[:, None])
        return combine_pairs(y_PD, pair_idx, T, K)
    grouped = _pairs_by_expert(x_TD, topk_ids_TK, topk_weights_TK, w13_E2FD.shape[0])
    if grouped is None:
        return torch.zeros_like(x_TD)
    counts, pair_idx, x_sorted, w_sorted = grouped
    (P, D), F2 = x_sorted.shape, w13_E2FD.shape[1]
    h_P2F = x_TD.new_empty(P, F2)
    y_PD = x_TD.new_empty(P, D)
    fp8 = w13_E2FD.dtype == torch.float8_e4m3fn
    active, start = [], 0
    for e, n in enumerate(counts):
        if n:
            s13 = None if w13_scale is None else w13_scale[e]
            if fp8:  # dequantized (exact), then the product a dense weight of that dtype takes
                _expert_mm(x_sorted[start:start + n], dequant_w13_ref(w13_E2FD[e], s13, x_TD.dtype), None,
                           h_P2F[start:start + n])
            else:
                _expert_mm(x_sorted[start:start + n], w13_E2FD[e], s13, h_P2F[start:start + n])
            active.append((e, start, n))
            start += n
    gate, up = h_P2F.chunk(2, dim=-1)
    a_PF = F.silu(gate) * up
    for e, s0, n in active:
        _expert_mm(a_PF[s0:s0 + n], w2_EDF[e], None if w2_scale is None else w2_scale[e], y_PD[s0:s0 + n])
    y_PD.mul_(w_sorted[:, None])
    return combine_pairs(y_PD, pair_idx, T, K)


def paged_mla_decode_ref(q_abs_BHC, q_pe_BHR, cache_PX, block_table_BM, seq_lens_B, scale: float, block_size: int,
                         max_len: int, padded=None):
    """Absorbed-MLA decode attention, the reference of ``mla_decode``: one new token per sequence,
    scores ``(q_abs . c_t + q_pe . k_pe_t) * scale`` over the sequence's context t < seq_len, read
    from the paged cache (slot of t = block_table[t // block_size] * block_size + t % block_size),
    softmax in fp32, output the probability-weighted latent [B, H, C] in q's dtype. Gathers every
    context padded to ``max_len`` (the CPU path; the Triton kernel never builds it). ``padded()``:
    precomputed (slots_BT, valid_BT), shared by the layers of a step. At most ``DECODE_ROWS`` rows are
    gathered at a time (a replay's output tokens are many decode rows of one step): the gathered
    context stays the size of a decode batch's, and rows are independent, so slicing changes nothing."""
    if padded is not None:
        slots_BT, valid_BT = padded()
    else:
        t_T = torch.arange(max_len, device=cache_PX.device)
        valid_BT = t_T[None, :] < seq_lens_B[:, None]
        slots_BT = (block_table_BM[:, t_T // block_size].long() * block_size + t_T % block_size).masked_fill(
            ~valid_BT, 0)
    B = q_abs_BHC.shape[0]
    if B > DECODE_ROWS:
        return torch.cat([_decode_rows(q_abs_BHC[i:i + DECODE_ROWS], q_pe_BHR[i:i + DECODE_ROWS], cache_PX,
                                       slots_BT[i:i + DECODE_ROWS], valid_BT[i:i + DECODE_ROWS], scale)
                          for i in range(0, B, DECODE_ROWS)])
    return _decode_rows(q_abs_BHC, q_pe_BHR, cache_PX, slots_BT, valid_BT, scale)


DECODE_ROWS = 32  # decode rows gathered at once by the torch path


def _decode_rows(q_abs_BHC, q_pe_BHR, cache_PX, slots_BT, valid_BT, scale: float):
    C = q_abs_BHC.shape[-1]
    # index_select, not cache_PX[slots_BT]: the same rows, 7-8x faster on the CPU (a row copy per slot
    # instead of the generic indexing kernel; 16 x 48 slots of 576 bf16: 20 us against 146 us)
    ctx_BTX = cache_PX.index_select(0, slots_BT.flatten()).view(*slots_BT.shape, -1).to(q_abs_BHC.dtype)
    # one product over the whole C+R row (latent and rope parts at once), no sliced copies of the context
    scores_BHT = torch.bmm(torch.cat([q_abs_BHC, q_pe_BHR], -1), ctx_BTX.transpose(1, 2)) * scale
    scores_BHT = scores_BHT.masked_fill(~valid_BT[:, None, :], float("-inf"))
    p_BHT = torch.softmax(scores_BHT, dim=-1, dtype=torch.float32).to(q_abs_BHC.dtype)
    return torch.bmm(p_BHT, ctx_BTX)[..., :C]


def route_ref(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
              scoring: str = "sigmoid", norm_topk_prob: bool = True, scale: float = 1.0):
    """DeepSeek-V3's router from the fp32 router logits: (weights_TK fp32, ids_TK, scores_TE fp32).

    Scores are sigmoid (V3) or softmax (V2) of the logits; the correction bias is added for selection
    only; with groups, a group's score is the sum of its top-2 biased scores (sigmoid) or its max
    (V2 group-limited greedy), the ``topk_group`` best groups are kept and the rest masked with -inf;
    the ``top_k`` best experts are chosen; their weights are the *unbiased* scores, normalized
    (sigmoid, ``norm_topk_prob``) and times ``scale`` (routed_scaling_factor). The reference of
    ``router`` and the training path (autograd flows from the logits)."""
    T, E = logits_TE.shape
    scores_TE = logits_TE.sigmoid() if scoring == "sigmoid" else logits_TE.softmax(-1)
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    if n_group > 1:
        grouped_TGe = choice_TE.view(T, n_group, E // n_group)
        if scoring == "sigmoid" and E // n_group >= 2:
            group_TG = grouped_TGe.topk(2, dim=-1).values.sum(-1)
        else:  # V2 group-limited greedy
            group_TG = grouped_TGe.amax(-1)
        keep_TG = group_TG.topk(topk_group, dim=-1).indices
        mask_TG = torch.ones_like(group_TG, dtype=torch.bool).scatter_(1, keep_TG, False)
        choice_TE = grouped_TGe.masked_fill(mask_TG[..., None], float("-inf")).view(T, E)
    ids_TK = choice_TE.topk(top_k, dim=-1).indices
    weights_TK = scores_TE.gather(1, ids_TK)
    if norm_topk_prob and top_k > 1:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return weights_TK * scale, ids_TK, scores_TE
