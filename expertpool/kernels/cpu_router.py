"""DeepSeek-V3's sigmoid router on CPU in one call: ``csrc/router.c``, in the library ``cpu_experts``
builds.

In torch the router of a MoE layer is ~17 ops (``moe.route``: widen, the fp32 GEMM on rows padded to a
tile, then ``reference.route_ref``); at a decode batch each costs more to dispatch than to compute.
The kernel runs the same steps in one call: fp32 logits (one fixed summation order per row and expert,
so a row's logits do not depend on its batch and need no padding), sigmoid, the correction bias for
selection, the group top-2 sums, the kept groups, the top-k experts in descending order (ties: the
lower index first) and their normalized, scaled unbiased scores. Against torch its logits and sigmoid
differ in the last bits (another summation order, libm's ``expf``), which can swap two experts whose
biased scores are within that rounding. Serving only (no score matrix, no autograd, the fast paths
on); ``switched_off()`` or ``EXPERTPOOL_CPU_ROUTER_KERNEL=0`` keeps torch.
"""

from __future__ import annotations

import torch

from expertpool.kernels import cpu_experts

ENV_SWITCH = "EXPERTPOOL_CPU_ROUTER_KERNEL"
SWITCH = cpu_experts.Switch(ENV_SWITCH, "the MoE router runs as torch ops")
switched_off = SWITCH.off  # torch inside the block (tests and A/B benchmarks)
MAX_GROUPS = 256  # the kernel's per-row group scratch


def applies(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, n_group: int, topk_group: int,
            top_k: int, scoring: str) -> bool:
    """Whether ``route`` serves this call: CPU, fp32 or bf16 rows (unit stride along D), an fp32 weight,
    sigmoid scoring, groups that divide the experts, no autograd, not switched off, the library built."""
    E = weight_ED.shape[0]
    return (x_TD.device.type == "cpu" and x_TD.dim() == 2 and x_TD.dtype in (torch.float32, torch.bfloat16)
            and x_TD.stride(1) == 1 and weight_ED.dtype == torch.float32 and weight_ED.device.type == "cpu"
            and (bias_E is None or (bias_E.dtype == torch.float32 and bias_E.shape == (E,)))
            and scoring == "sigmoid" and 1 <= n_group <= MAX_GROUPS and E % n_group == 0
            and 1 <= topk_group <= n_group and 1 <= top_k <= topk_group * (E // n_group)
            and not (torch.is_grad_enabled() and (x_TD.requires_grad or weight_ED.requires_grad))
            and SWITCH.on() and cpu_experts.library() is not None)


def route(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, n_group: int, topk_group: int,
          top_k: int, norm_topk_prob: bool, scale: float, lib=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_TK fp32, ids_TK int64) of the module docstring's router."""
    lib = lib or cpu_experts.library()
    T, D = x_TD.shape
    E = weight_ED.shape[0]
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int64)
    if T == 0:
        return weights, ids
    w = weight_ED.contiguous()
    bias = None if bias_E is None else bias_E.contiguous()
    scratch = torch.empty(T * (D + 2 * E), dtype=torch.float32)
    rc = lib.route_sigmoid(x_TD.data_ptr(), x_TD.stride(0), int(x_TD.dtype == torch.bfloat16), T, D, w.data_ptr(),
                           None if bias is None else bias.data_ptr(), E, n_group, topk_group, top_k,
                           int(norm_topk_prob), float(scale), weights.data_ptr(), ids.data_ptr(), scratch.data_ptr(),
                           torch.get_num_threads())
    if rc != 0:
        raise FloatingPointError(f"router: a row has fewer than {top_k} selectable experts (non-finite router "
                                 f"logits? {E} experts in {n_group} groups, {topk_group} kept)")
    return weights, ids
