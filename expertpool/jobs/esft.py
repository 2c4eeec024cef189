"""ESFT (Expert-Specialized Fine-Tuning, arXiv 2407.01906): score, select, and train a few experts.

Scoring (forward passes only, router record of every main MoE layer) per layer l and expert i:
- ``gate``: mean over sequences of the per-token mean gate value (post-top-k, 0 if not selected).
- ``token``: mean over sequences of the per-token selection ratio (1/K per selected slot).
The per-sequence mean runs over the row's real tokens, prompt tokens included (the data's
``token_mask``), as ESFT's probe does on unpadded sequences; pad positions are skipped. They are
16-17% of the demo's packed positions and route to a few experts, so scoring them changed 1-2
selected experts in most layers at p <= 0.2. The loss mask would be the wrong filter: ESFT scores
prompt tokens too.

Both scores are normalized per layer over experts (the paper's definition; the public ESFT script
normalizes across layers instead, ESFT issue #17). Per layer the selection is the smallest set of
experts, by descending score, whose cumulative normalized score reaches p. Ties break by expert id.
Ranks sum their partial scores with one all-reduce, so every rank selects the same experts.

What p means in gate mode. Normalized per layer, our gate scores sum to 1, so p is the share of
the layer's gate weight the selection covers. DeepSeek's published V2-Lite gate scores were not
normalized that way and summed to 0.26-0.53 per layer, so their p = 0.1 covered about 19-38% of
the gate weight. The same p here selects fewer experts; to cover a comparable share of the gate
weight, set p to about 0.2-0.4. Token mode is unaffected: selection ratios sum to 1 per token.

Training: the base's stacked expert tensors ([El, ...]) stay frozen and untouched. Each rank holds
its selected experts as separate small fp32 parameters (``SelectedExperts``, the only fp32 master
weights and optimizer state of the run), the forward reads those rows instead of the frozen ones
(``TrainExperts``), and only they go to the optimizer, so weight decay and Adam can never move a
non-selected row. After each optimizer step the selected rows are copied into the stacked tensors
(re-quantized when those are FP8) so that anything reading the model sees the trained weights.
The MTP layer is scored and trained only when the job trains the MTP module (``mtp_loss_weight >
0``): its routing record comes from the MTP forward (row i: the hidden of position i and token i+1),
its experts are selected by the same rule as a main layer's, and its non-expert tensors (router
excepted) train too (``jobs.train``). Without it the MTP layer is neither scored nor trained.

FP8 frozen weights stay FP8. Frozen FP8 experts run through the kernels' dispatch point
(``kernels.moe_experts``: the Triton grouped GEMM on a GPU, the torch reference on CPU) without
autograd; their backward recomputes the input gradient one expert at a time from dequantized rows
(``_FrozenExperts``), so no dense copy of them outlives a step. Frozen FP8 linears (attention,
shared experts, dense MLPs) do the same through ``kernels.linear`` (``frozen_fp8_linears``): the
gradient must pass through them to the selected experts of earlier layers.
"""

import types
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from expertpool import kernels
from expertpool.kernels.reference import dequant_w13_ref, moe_experts_ref
from expertpool.model.dispatch import Dispatcher, ExpertGroup
from expertpool.model.layers import Linear
from expertpool.model.moe import RoutingRecord

FP8 = torch.float8_e4m3fn


def expert_scores(record: RoutingRecord, n_experts: int, n_layers: int, scoring: str,
                  token_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per MoE layer below ``n_layers``: sum over the batch's sequences of the per-sequence mean score
    [E] (fp64).

    ``token_mask`` [B, S]: the real (non-pad) tokens; each sequence's mean runs over those only, and
    a row without any adds nothing. None = every position counts. A layer that saw S' < S rows per
    sequence (the MTP layer: S - 1, row i reads token i+1) uses the mask's last S' columns."""
    out = {}
    batch = record.shape[0]
    for layer, (w_TK, ids_TK, _) in record.layers.items():
        if layer >= n_layers:
            continue
        dev = ids_TK.device
        val = w_TK.detach().double() if scoring == "gate" else torch.full(ids_TK.shape, 1.0 / ids_TK.shape[1],
                                                                         dtype=torch.float64, device=dev)
        tok_E = torch.zeros(ids_TK.shape[0], n_experts, dtype=torch.float64, device=dev).scatter_add_(1, ids_TK, val)
        seq_SE = tok_E.view(batch, -1, n_experts)  # [B, S, E]
        if token_mask is None:
            out[layer] = seq_SE.mean(1).sum(0)
        else:
            m_BS = token_mask.to(dev, torch.float64).view(batch, -1)
            m_BS = m_BS[:, m_BS.shape[1] - seq_SE.shape[1]:]
            n_B = m_BS.sum(1)
            per_seq = (seq_SE * m_BS[..., None]).sum(1) / n_B.clamp(min=1)[:, None]
            out[layer] = per_seq.sum(0)
    return out


def select_experts(scores: dict[int, torch.Tensor], p: float) -> dict[int, list[int]]:
    """Per layer, the fewest experts whose normalized scores sum to >= p (ties: lower id first)."""
    chosen = {}
    for layer, s in sorted(scores.items()):
        total = float(s.sum())
        if total <= 0:
            chosen[layer] = []
            continue
        r = (s / total).tolist()
        order = sorted(range(len(r)), key=lambda e: (-r[e], e))
        acc, pick = 0.0, []
        for e in order:
            pick.append(e)
            acc += r[e]
            if acc >= p - 1e-12:  # 1e-12: float summation noise must not add one more expert at p = 1
                break
        chosen[layer] = sorted(pick)
    return chosen


def all_reduce_scores(scores: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        for v in scores.values():
            dist.all_reduce(v)
    return scores


@torch.no_grad()
def score_and_select(model, batches: Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], n_batches: int,
                     scoring: str, p: float, with_mtp: bool = False) -> tuple[dict[int, list[int]],
                                                                              dict[int, list[float]]]:
    """Score every expert on ``n_batches`` of this rank's (input_ids, loss_mask, token_mask) batches
    (forward only, with the model's dispatcher; real tokens only), sum the scores over ranks
    (collective) and select per layer. ``with_mtp``: the MTP layers too (their forward runs after the
    main one's). Returns (selected expert ids per layer, normalized scores per layer)."""
    args = model.args
    n_mtp = len(model.model.mtp) if with_mtp else 0
    totals: dict[int, torch.Tensor] = {}
    for _ in range(n_batches):
        ids, _loss_mask, token_mask = next(batches)
        rec = RoutingRecord()
        hidden = model.hidden_states(ids, rec)
        for k in range(n_mtp):
            model.mtp_logits(hidden, ids, k, record=rec)
        for layer, s in expert_scores(rec, args.n_routed_experts, args.num_hidden_layers + n_mtp, scoring,
                                      token_mask).items():
            totals[layer] = totals.get(layer, 0) + s
    all_reduce_scores(totals)
    chosen = select_experts(totals, p)
    norm = {layer: (s / s.sum()).tolist() for layer, s in totals.items()}
    return chosen, norm


def dense_expert(experts, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Local slot ``i`` of an ``Experts`` module as dense (w13 [2F, D], w2 [D, F]) in ``dtype``."""
    w13, w2 = experts.w13_weight.detach()[i], experts.w2_weight.detach()[i]
    if w13.dtype != FP8:
        return w13.to(dtype), w2.to(dtype)
    return (dequant_w13_ref(w13, experts.w13_weight_scale_inv[i], dtype),
            kernels.weight_dequant(w2, experts.w2_weight_scale_inv[i], dtype))


class SelectedExperts(nn.Module):
    """The trainable fp32 copies of one layer's selected experts that this rank owns."""

    def __init__(self, experts, global_ids: list[int]):
        super().__init__()
        local = [int(experts.global_to_local[e]) for e in global_ids]
        assert all(i >= 0 for i in local), "selected experts must be owned by this rank"
        self.global_ids = list(global_ids)
        dev = experts.w13_weight.device
        self.register_buffer("local_idx", torch.tensor(local, dtype=torch.long, device=dev), persistent=False)
        rows = [dense_expert(experts, i, torch.float32) for i in local]
        self.w13 = nn.Parameter(torch.stack([a for a, _ in rows]))
        self.w2 = nn.Parameter(torch.stack([b for _, b in rows]))

    @torch.no_grad()
    def write_back(self, experts) -> None:
        if experts.w13_weight.dtype == FP8:  # re-quantized, as the loader and patches write FP8 rows
            for j, i in enumerate(self.local_idx.tolist()):
                experts.write_expert(i, self.w13[j], self.w2[j])
            return
        experts.w13_weight.data.index_copy_(0, self.local_idx, self.w13.detach().to(experts.w13_weight.dtype))
        experts.w2_weight.data.index_copy_(0, self.local_idx, self.w2.detach().to(experts.w2_weight.dtype))


class _FrozenExperts(torch.autograd.Function):
    """Frozen (FP8) experts: forward through the kernels' dispatch point, no autograd graph; backward
    recomputes with the torch reference (weights dequantized one active expert at a time) for the
    gradients of the input rows and the routing weights. The weights get none: they are frozen."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, ids_TK, experts):
        ctx.save_for_backward(x_TD, weights_TK, ids_TK)
        ctx.experts = experts
        return kernels.moe_experts(x_TD, ids_TK, weights_TK, experts.w13_weight, experts.w13_weight_scale_inv,
                                   experts.w2_weight, experts.w2_weight_scale_inv)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weights_TK, ids_TK = ctx.saved_tensors
        ex = ctx.experts
        with torch.enable_grad():
            x = x_TD.detach().requires_grad_()
            w = weights_TK.detach().requires_grad_(weights_TK.requires_grad)
            y = moe_experts_ref(x, ids_TK, w, ex.w13_weight, ex.w13_weight_scale_inv, ex.w2_weight,
                                ex.w2_weight_scale_inv)
            wanted = [x] + ([w] if w.requires_grad else [])
            grads = torch.autograd.grad(y, wanted, dy_TD, allow_unused=True)
        return grads[0], (grads[1] if w.requires_grad else None), None, None


class _FrozenLinear(torch.autograd.Function):
    """A frozen FP8 linear: forward through ``kernels.linear`` (the FP8 GEMM on a GPU), backward
    ``dx = dy W`` with W dequantized for the call only."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return kernels.linear(x, module.weight, module.weight_scale_inv)

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.module.dense_weight(dy.dtype), None


def _frozen_fp8_forward(self, x):
    return _FrozenLinear.apply(x, self)


def frozen_fp8_linears(model) -> int:
    """Route the model's FP8 linears (frozen by construction: FP8 is no training format) through
    ``_FrozenLinear``, so gradients pass through them whatever kernel the forward uses. Returns how
    many; dense linears are untouched."""
    n = 0
    for m in model.modules():
        if isinstance(m, Linear) and m.weight.dtype == FP8:
            m.forward = types.MethodType(_frozen_fp8_forward, m)
            n += 1
    return n


class TrainExperts:
    """What the dispatcher calls in training instead of the ``Experts`` module (an ``ExpertGroup``):
    the torch reference over the module's rows, with the selected experts' trainable copies in place
    of their frozen rows. FP8 experts (frozen by construction) run through ``_FrozenExperts`` instead,
    and the selected ones through the reference over their fp32 copies."""

    def __init__(self, experts, selected: SelectedExperts | None = None):
        self.experts, self.selected = experts, selected
        self.global_to_local = experts.global_to_local
        self.fp8 = experts.w13_weight.dtype == FP8
        if self.fp8 and selected is not None:
            n = experts.num_local
            self._is_selected = torch.zeros(n, dtype=torch.bool, device=selected.local_idx.device)
            self._is_selected[selected.local_idx] = True
            self._position = torch.full((n,), -1, dtype=torch.long, device=selected.local_idx.device)
            self._position[selected.local_idx] = torch.arange(len(selected.global_ids), device=self._position.device)

    def __call__(self, x_TD, local_ids_TK, weights_TK):
        if self.selected is None and not torch.is_grad_enabled():
            # nothing trainable here and no graph to build (``mode: mtp`` generating its targets, evaluation):
            # the module's own inference path, the one serving runs
            return self.experts(x_TD, local_ids_TK, weights_TK)
        if self.fp8:
            return self._fp8(x_TD, local_ids_TK, weights_TK)
        w13 = list(self.experts.w13_weight.unbind(0))
        w2 = list(self.experts.w2_weight.unbind(0))
        if self.selected is not None:
            sel = self.selected
            for i, a, b in zip(sel.local_idx.tolist(), sel.w13.unbind(0), sel.w2.unbind(0)):
                w13[i], w2[i] = a, b
        # per-expert rows (unbind: one stacked gradient per tensor in backward, not one per row)
        return moe_experts_ref(x_TD, local_ids_TK, weights_TK, w13, None, w2, None)

    def _fp8(self, x_TD, local_ids_TK, weights_TK):
        sel = self.selected
        if sel is None:
            return _FrozenExperts.apply(x_TD, weights_TK, local_ids_TK, self.experts)
        valid = local_ids_TK >= 0
        safe = local_ids_TK.clamp(min=0)
        to_selected = valid & self._is_selected[safe]
        frozen = _FrozenExperts.apply(x_TD, weights_TK, torch.where(to_selected, -1, local_ids_TK), self.experts)
        trained = moe_experts_ref(x_TD, torch.where(to_selected, self._position[safe], -1), weights_TK,
                                  list(sel.w13.unbind(0)), None, list(sel.w2.unbind(0)), None)
        return frozen + trained


class TrainDispatcher:
    """A ``Dispatcher`` around the real one (local or all-to-all): hands it ``TrainExperts`` views, and in grad
    mode makes the MoE input require grad, so that every rank takes the autograd path of the
    all-to-all (a rank whose layer has nothing trainable would otherwise skip the backward collective
    and deadlock the others; ESFT's train_ep.py does the same)."""

    def __init__(self, inner: Dispatcher, views: dict[int, TrainExperts]):
        self.inner, self.views = inner, views

    def __call__(self, x_TD, ids_TK, weights_TK, experts: ExpertGroup):
        if torch.is_grad_enabled() and not x_TD.requires_grad:
            x_TD = x_TD.detach().requires_grad_()
        return self.inner(x_TD, ids_TK, weights_TK, self.views[id(experts)])
