"""Triton fused router: DeepSeek-V3's expert selection from the router logits in one launch per layer.

Contract (reference: ``reference.route_ref``): ``logits [T, E]`` fp32 (the router GEMM's output),
``bias [E]`` fp32 (the selection-only correction bias, or None). Per token: scores = sigmoid (or
softmax) of the logits; biased choice scores; with groups, each group's score is the sum of its two
best biased scores (sigmoid; its best for softmax), the ``topk_group`` best groups are kept; the
``top_k`` best experts among them are chosen in descending order; weights are their unbiased
scores, normalized (``norm_topk_prob``) and scaled. Returns ``weights [T, top_k]`` fp32 and
``ids [T, top_k]`` int64. Replaces ~15 torch launches (sigmoid, add, topk x3, scatter, masked_fill,
gather, sum, div, mul, ...) with one; the reference stays the path for training (autograd) and for
returning the full score matrix.

One program per token holds the token's E scores (E <= 1024, E / n_group a power of two) and picks
by repeated argmax (top_k and topk_group passes, each a max-reduction over E): ties go to the lowest
index, where ``torch.topk`` leaves them unspecified; on continuous scores the ids agree exactly.

Shape legend: T tokens, E routed experts, G groups, EG = E / G experts per group, K top_k.
"""

import torch
import triton
import triton.language as tl

from expertpool.kernels._triton import launch

MAX_EXPERTS = 1024


@triton.jit
def _router_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, E, scale, stride_l, stride_o,
                   E_PAD: tl.constexpr, G: tl.constexpr, EG: tl.constexpr, TOPK_GROUP: tl.constexpr,
                   K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                   NORM: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.arange(0, E_PAD)
    valid = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs, mask=valid, other=float("-inf"))
    if SIGMOID:
        s = tl.where(valid, 1.0 / (1.0 + tl.exp(-x)), 0.0)
    else:
        e = tl.exp(x - tl.max(x, axis=0))
        s = e / tl.sum(e, axis=0)
    choice = s
    if HAS_BIAS:
        choice = s + tl.load(bias_ptr + offs, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))
    if G > 1:
        grouped = tl.reshape(choice, (G, EG))                      # E_PAD == E here (checked by the launcher)
        best = tl.max(grouped, axis=1)
        if SIGMOID and EG >= 2:                                    # sum of the top 2 (a tie counts twice)
            col = tl.arange(0, EG)
            first = tl.min(tl.where(grouped == best[:, None], col[None, :], EG), axis=1)
            second = tl.max(tl.where(col[None, :] == first[:, None], float("-inf"), grouped), axis=1)
            group_score = best + second
        else:
            group_score = best
        g_idx = tl.arange(0, G)
        keep = tl.zeros((G,), dtype=tl.int1)
        for _ in tl.static_range(TOPK_GROUP):
            gs = tl.where(keep, float("-inf"), group_score)
            top = tl.min(tl.where(gs == tl.max(gs, axis=0), g_idx, G), axis=0)
            keep = keep | (g_idx == top)
        choice = tl.reshape(tl.where(keep[:, None], grouped, float("-inf")), (E_PAD,))
    k_idx = tl.arange(0, K_PAD)
    ids = tl.zeros((K_PAD,), dtype=tl.int64)
    w = tl.zeros((K_PAD,), dtype=tl.float32)
    for k in tl.static_range(K):
        top = tl.min(tl.where(choice == tl.max(choice, axis=0), offs, E_PAD), axis=0)
        ids = tl.where(k_idx == k, top, ids)
        w = tl.where(k_idx == k, tl.sum(tl.where(offs == top, s, 0.0), axis=0), w)
        choice = tl.where(offs == top, float("-inf"), choice)
    if NORM:
        w = w / (tl.sum(w, axis=0) + 1e-20)
    tl.store(w_ptr + t * stride_o + k_idx, w * scale, mask=k_idx < K)
    tl.store(ids_ptr + t * stride_o + k_idx, ids, mask=k_idx < K)


def supported(num_experts: int, n_group: int, top_k: int) -> bool:
    """Shapes the kernel takes: E <= 1024, top_k <= E, and with groups E and E / n_group powers of two."""
    eg = num_experts // max(n_group, 1)
    return (num_experts <= MAX_EXPERTS and 1 <= top_k <= num_experts
            and (n_group <= 1 or (eg & (eg - 1) == 0 and num_experts & (num_experts - 1) == 0)))


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, n_group: int, topk_group: int, top_k: int,
          scoring: str = "sigmoid", norm_topk_prob: bool = True, scale: float = 1.0):
    """(weights_TK fp32, ids_TK int64); see the module docstring. Launcher: check -> allocate -> launch."""
    T, E = logits_TE.shape
    if logits_TE.dtype != torch.float32 or logits_TE.stride(-1) != 1:
        raise ValueError(f"router: logits must be fp32 with unit stride in the last dim, got {logits_TE.dtype}")
    if not supported(E, n_group, top_k):
        raise ValueError(f"router: E={E}, n_group={n_group}, top_k={top_k} unsupported (see router.supported)")
    if scoring not in ("sigmoid", "softmax"):
        raise ValueError(f"router: scoring {scoring!r} unknown")
    w_TK = torch.empty(T, top_k, dtype=torch.float32, device=logits_TE.device)
    ids_TK = torch.empty(T, top_k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return w_TK, ids_TK
    G = max(n_group, 1)
    launch(_router_kernel, (T,), logits_TE, bias_E if bias_E is not None else logits_TE, w_TK, ids_TK, E, scale,
           logits_TE.stride(0), w_TK.stride(0), E_PAD=triton.next_power_of_2(E), G=G, EG=E // G,
           TOPK_GROUP=topk_group, K=top_k, K_PAD=triton.next_power_of_2(top_k), SIGMOID=scoring == "sigmoid",
           HAS_BIAS=bias_E is not None,
           NORM=norm_topk_prob and top_k > 1)
    return w_TK, ids_TK
