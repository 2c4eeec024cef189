"""DeepSeek-V3 MoE: route -> dispatch -> experts -> combine, plus the load-balancing tools.

Shape legend: T tokens, D hidden, E routed experts (global), El local experts, K experts per token,
G expert groups, F expert intermediate width.

- ``Gate`` is the exact V3 router: fp32 sigmoid scores; ``e_score_correction_bias`` only for
  selection; group score = sum of the top-2 biased scores in the group; dropped groups masked with
  -inf; weights gathered from the *unbiased* scores, normalized, times ``routed_scaling_factor``.
- ``Experts`` holds the local routed experts as stacked tensors (w13 [El, 2F, D], w2 [El, D, F]) and
  runs them through ``expertpool.kernels.moe_experts`` (grouped, one matmul pair per active expert;
  the FP8 Triton kernel plugs in there).
- The dispatcher seam (``model.dispatch``): ``LocalDispatcher`` (all experts in this process) by
  default, or ``AllToAllDispatcher`` (expert parallelism), set from outside (``set_dispatcher``).
- Balance tools live outside ``forward``: ``update_router_bias`` (aux-loss-free sign rule),
  ``sequence_balance_loss`` and per-expert token counts (``MoE.expert_load``).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from expertpool import kernels
from expertpool.kernels import cpu_router
from expertpool.kernels.reference import int8_weight_quant
from expertpool.model.args import ModelArgs
from expertpool.model.dispatch import Dispatcher, LocalDispatcher
from expertpool.model.layers import MLP


def route(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None, args: ModelArgs,
          need_scores: bool = True):
    """Returns (weights_TK fp32, ids_TK, scores_TE fp32 or None): the exact V3 router in fp32
    (``kernels.reference.route_ref``; a fused kernel on the GPU when no scores or gradients are needed)."""
    if not need_scores and x_TD.device.type == "cpu" and kernels.fast_paths() and cpu_router.applies(
            x_TD, weight_ED, bias_E, args.n_group, args.topk_group, args.num_experts_per_tok, args.scoring_func):
        w_TK, ids_TK = cpu_router.route(x_TD, weight_ED, bias_E, args.n_group, args.topk_group,
                                        args.num_experts_per_tok, args.norm_topk_prob, args.routed_scaling_factor)
        return w_TK, ids_TK, None
    x_TD32, T = x_TD.float(), x_TD.shape[0]
    if x_TD.device.type == "cpu":
        # MKL's fp32 GEMM rounds a row differently at some row counts (1 and 9 among them); at a multiple of
        # kernels.ROW_TILE rows each row's logits are the same in any batch, so a replayed or re-batched token
        # routes with bit-identical weights (a recovery then continues exactly, tests/platform/test_engine_local)
        x_TD32, T = kernels.pad_rows(x_TD32, kernels.tile_rows(T))
    logits_TE = F.linear(x_TD32, weight_ED.float())[:T]
    return kernels.route(logits_TE, bias_E, args.n_group, args.topk_group, args.num_experts_per_tok,
                         args.scoring_func, args.norm_topk_prob, args.routed_scaling_factor, need_scores)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(args.n_routed_experts))

    def forward(self, x_TD, need_scores: bool = True):
        return route(x_TD, self.weight, self.e_score_correction_bias, self.args, need_scores)


def quantize_expert(w13_2FD: torch.Tensor, w2_DF: torch.Tensor, scale_fmt: str | None = None):
    """One expert in its FP8 resident form: (w13, w13_scale, w2, w2_scale). The gate and up halves of
    w13 are block-quantized separately, as the kernels contract requires (F need not divide 128)."""
    f = w13_2FD.shape[0] // 2
    g, gs = kernels.weight_quant(w13_2FD[:f].float(), scale_fmt=scale_fmt)
    u, us = kernels.weight_quant(w13_2FD[f:].float(), scale_fmt=scale_fmt)
    d, ds = kernels.weight_quant(w2_DF.float(), scale_fmt=scale_fmt)
    return torch.cat([g, u]), torch.cat([gs, us]), d, ds


# The routed experts a process holds: all (None), the same in every MoE layer (a list of global ids),
# or per layer (``(rest, {MoE layer id: ids})``: layers absent from the dict hold ``rest``; an
# expert-parallel group's per-layer placement, ``platform.placement``)
ExpertIds = list[int] | tuple[list[int], dict[int, list[int]]] | None


def layer_expert_ids(expert_ids: ExpertIds, layer_id: int) -> list[int] | None:
    """The global ids of the routed experts MoE layer ``layer_id`` holds under ``expert_ids``."""
    if isinstance(expert_ids, tuple):
        rest, per_layer = expert_ids
        return per_layer.get(layer_id, rest)
    return expert_ids


def all_expert_ids(expert_ids: ExpertIds) -> list[int] | None:
    """Every global id some MoE layer holds under ``expert_ids`` (None: all), ascending."""
    if isinstance(expert_ids, tuple):
        rest, per_layer = expert_ids
        return sorted(set(rest).union(*per_layer.values()))
    return None if expert_ids is None else sorted(set(expert_ids))


class Experts(nn.Module):
    """Local routed experts; ``expert_ids`` are their global ids (sorted)."""

    def __init__(self, args: ModelArgs, expert_ids: list[int] | None = None):
        super().__init__()
        ids = list(range(args.n_routed_experts)) if expert_ids is None else sorted(expert_ids)
        El, F_, D = len(ids), args.moe_intermediate_size, args.hidden_size
        self.n_routed = args.n_routed_experts
        self.scale_fmt = args.scale_fmt
        self.register_buffer("expert_ids", torch.tensor(ids, dtype=torch.long, device="cpu"), persistent=False)
        g2l = torch.full((args.n_routed_experts,), -1, dtype=torch.long, device="cpu")
        g2l[self.expert_ids] = torch.arange(El, device="cpu")
        self.register_buffer("global_to_local", g2l, persistent=False)
        # all experts here and no variants: global ids are local ids, the dispatcher skips the lookup
        self.identity_map = El == args.n_routed_experts
        self.w13_weight = nn.Parameter(torch.empty(El, 2 * F_, D))
        self.w2_weight = nn.Parameter(torch.empty(El, D, F_))
        self.register_buffer("w13_weight_scale_inv", None)  # set for FP8 experts
        self.register_buffer("w2_weight_scale_inv", None)

    @property
    def num_local(self) -> int:
        return self.expert_ids.numel()

    @property
    def num_variants(self) -> int:
        """Served variants incl. the base: ``global_to_local`` holds one table of ``n_routed`` per variant
        (``model.patch.add_variant`` appends them)."""
        return self.global_to_local.numel() // self.n_routed

    def resident(self, w13_2FD: torch.Tensor, w2_DF: torch.Tensor):
        """One expert's weights in this module's resident format and device: (w13, w13 scale, w2,
        w2 scale). FP8 experts are re-quantized (gate and up separately, as the loader does; scales
        None otherwise), others cast. The one writer of expert rows: patches and variants use it."""
        dev = self.w13_weight.device
        if self.w13_weight.dtype == torch.float8_e4m3fn:
            q13, s13, q2, s2 = quantize_expert(w13_2FD, w2_DF, self.scale_fmt)
            return q13.to(dev), s13.to(dev), q2.to(dev), s2.to(dev)
        if self.w13_weight.dtype == torch.int8:
            (q13, s13), (q2, s2) = int8_weight_quant(w13_2FD), int8_weight_quant(w2_DF)
            return q13.to(dev), s13.to(dev), q2.to(dev), s2.to(dev)
        return w13_2FD.to(dev, self.w13_weight.dtype), None, w2_DF.to(dev, self.w2_weight.dtype), None

    @torch.no_grad()
    def write_expert(self, local: int, w13_2FD: torch.Tensor, w2_DF: torch.Tensor) -> None:
        """Overwrite local slot ``local`` with one expert's weights (``model.patch.apply_patch``)."""
        q13, s13, q2, s2 = self.resident(w13_2FD, w2_DF)
        self.w13_weight.data[local], self.w2_weight.data[local] = q13, q2
        if s13 is not None:
            self.w13_weight_scale_inv[local], self.w2_weight_scale_inv[local] = s13, s2

    def forward(self, x_TD, local_ids_TK, weights_TK):
        return kernels.moe_experts(x_TD, local_ids_TK, weights_TK, self.w13_weight, self.w13_weight_scale_inv,
                                   self.w2_weight, self.w2_weight_scale_inv, scale_fmt=self.scale_fmt)


@dataclass
class RoutingRecord:
    """Per-MoE-layer routing of one forward, for training losses and ESFT scoring."""
    shape: tuple[int, ...] = ()
    # layer id -> (weights_TK, ids_TK, scores_TE)
    layers: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, expert_ids: ExpertIds = None):
        super().__init__()
        self.args, self.layer_id = args, layer_id
        self.gate = Gate(args)
        self.experts = Experts(args, layer_expert_ids(expert_ids, layer_id))
        self.shared_experts = (MLP(args.hidden_size, args.n_shared_experts * args.moe_intermediate_size)
                               if args.n_shared_experts else None)
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.register_buffer("expert_load", torch.zeros(args.n_routed_experts, dtype=torch.long, device="cpu"),
                             persistent=False)
        self.register_buffer("_one", torch.ones((), dtype=torch.long, device="cpu"), persistent=False)

    def forward(self, x: torch.Tensor, record: RoutingRecord | None = None,
                variant_T: torch.Tensor | None = None) -> torch.Tensor:
        """variant_T: per-token served variant (0 = base); variant v routes expert e to the slot of
        virtual id ``e + v * n_routed`` (a fine-tuned copy where the variant has one)."""
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, ids_TK, scores_TE = self.gate(x_TD, need_scores=record is not None)
        with torch.no_grad():  # token counts stay on the device (no host read; read when asked)
            self.expert_load.index_put_((ids_TK.flatten(),), self._one, accumulate=True)
        if record is not None:
            record.shape = tuple(shape[:-1])
            record.layers[self.layer_id] = (weights_TK, ids_TK, scores_TE)
        if variant_T is not None:
            ids_TK = ids_TK + variant_T[:, None] * self.args.n_routed_experts
        y_TD = self.dispatcher(x_TD, ids_TK, weights_TK, self.experts)  # fp32 weights: applied in the combine
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        return y_TD.view(shape)


def sequence_balance_loss(scores_TE: torch.Tensor, ids_TK: torch.Tensor, batch: int, alpha: float,
                          args: ModelArgs) -> torch.Tensor:
    """L_Bal = alpha * sum_i f_i P_i per sequence (DeepSeek-V3 eq. 17-20), averaged over sequences."""
    E, K = args.n_routed_experts, args.num_experts_per_tok
    scores_BSE = scores_TE.view(batch, -1, E)
    S = scores_BSE.shape[1]
    counts_BE = torch.zeros(batch, E, device=scores_TE.device).scatter_add_(
        1, ids_TK.view(batch, -1), torch.ones(batch, S * K, device=scores_TE.device))
    f_BE = counts_BE * E / (K * S)
    p_BE = (scores_BSE / scores_BSE.sum(-1, keepdim=True)).mean(1)
    return alpha * (f_BE * p_BE).sum(-1).mean()


@torch.no_grad()
def update_router_bias(gate: Gate, tokens_per_expert_E: torch.Tensor, gamma: float) -> None:
    """Aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i) over the whole batch."""
    if gamma == 0:
        return
    load = tokens_per_expert_E.float()
    gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
