"""The fine-tuning loop: ``train_loop(plan, data, hooks)``, run by every Ray Train worker or in one process.

Parallelism. Rank r of W loads the dense weights and only its routed experts [r*E//W, (r+1)*E//W)
and routes tokens with ``AllToAllDispatcher`` (``LocalDispatcher`` when W = 1). Each rank reads
the same global batch of B sequences and keeps rows [r*B//W, (r+1)*B//W). W is whatever Ray Train
started this attempt with: any count in the job's elastic range, so neither split needs to be even.

Parameters and optimizers.
- Dense, attention, router and shared-expert weights are replicated (data-parallel). In ``full``
  mode they train under DeepSpeed ZeRO ``zero_stage`` with torch AdamW (``torch_adam``: no C++ build).
  DeepSpeed only ever sees these parameters (a holder module shares them with the model), so it
  neither broadcasts nor all-reduces the experts.
- Routed experts are owned, not replicated: gradients reach the owner through the backward
  all-to-all, complete. They train under a separate torch AdamW, outside DeepSpeed. Clipping is
  therefore split: DeepSpeed clips the dense gradient norm, and the expert norm (all-reduced over
  ranks) is clipped separately, both at ``grad_clip``.
- ``esft`` mode trains only the selected experts (``jobs.esft``); everything else is frozen, so
  there is no dense optimizer and DeepSpeed is not used. With ``mtp_loss_weight > 0`` it also trains
  the MTP module: the ESFT-selected experts of its MoE layer (scored like a main layer) and its
  non-expert tensors, router excepted (``model.patch.mtp_parameters``).
- ``mtp`` mode trains only the MTP module (all its routed experts, as ``SelectedExperts`` rows, and
  its non-expert tensors) on the base's own greedy continuations of the data's prompts
  (``jobs.distill``); the main model is frozen and runs without autograd.
- The MTP module's non-expert tensors (esft and mtp modes) are replicated: fp32 copies under a torch
  AdamW of their own, gradients summed over ranks by an all-reduce (each rank's loss is its share of
  the global mean), clipped at ``grad_clip`` on their own. The embedding and output head are shared
  with the main model and stay frozen.

Devices and precision. ``jobs.rank.train_device`` picks the device: in Ray Train the one Ray Train gives the
worker (``use_gpu`` follows ``worker_resources.gpu``, and Ray Train then forms an NCCL group, which
the all-to-all and DeepSpeed use), in one process the first GPU when the job reserves GPUs; else the
CPU, by the same code. On GPU the forward runs under bf16 autocast; the CPU keeps its fp32 path.
ESFT loads the frozen weights in their stored format (FP8 stays FP8 and runs through the kernels'
dispatch point, ``jobs.esft``; others in the compute dtype); only the selected experts get fp32
master weights and AdamW state. Full fine-tuning trains everything, so it loads fp32 (FP8
dequantized). ``platform.memory_plan`` checks before the start that this fits a worker's GPUs.

Loss (fp32): masked next-token CE + ``mtp_loss_weight`` x masked MTP CE (token i+2) + the
sequence-wise balance loss (``balance_loss_alpha``), each a global mean: a rank's CE is its summed
token loss over the all-reduced token count, and its balance loss is its sequence mean weighted by
its share of the batch's sequences. DeepSpeed averages dense gradients over ranks, so the
backward loss is scaled by W and owned-expert gradients (already a sum over ranks) are divided by W.
The aux-loss-free router bias update (``router_bias_rate``) uses the all-reduced expert load and
runs after the optimizer step, outside forward (full mode only: a patch cannot carry router changes).
Mode ``mtp`` has one loss: the MTP CE against the base's greedy token after token i+1, on every
position of the generated rows; its evaluation reports that CE on the eval rows and the share of
positions where the module's argmax agrees (what greedy acceptance of one draft token measures).

Reliability. Every ``checkpoint_every`` steps each rank writes its part and reports it with
``ray.train.report``; Ray merges the parts into one checkpoint that any world size can restore
(``jobs.train_state``: experts by global id, dense state whole, global state once). After a restart,
with the same or another worker count, the loop reloads the latest checkpoint and skips the batches
already consumed, so the data position is a function of the step.

Rooms. ``Trainer`` holds setup, losses, the step, evaluation and the run. It reads the job from a
``jobs.plan.TrainPlan`` and its rows from a ``jobs.data.TrainData``; where this rank runs (device,
process group, its batch rows) is ``jobs.rank``; checkpoints are
``jobs.train_state``, the patch or full checkpoint at the end ``jobs.results``, expert scoring and
selection ``jobs.esft``. Tests reach in through ``jobs.hooks`` (fault injection, extra checks),
which the loop calls at named points and never when none are given.
"""

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from expertpool.jobs.data import TrainData
from expertpool.jobs.distill import GreedyContinuations
from expertpool.jobs.esft import (SelectedExperts, TrainDispatcher, TrainExperts, frozen_fp8_linears,
                                  score_and_select)
from expertpool.jobs.hooks import TrainHook
from expertpool.jobs.plan import TrainPlan
from expertpool.jobs.rank import batch_rows, describe_layout, in_ray_train, init_single_process_group, train_device
from expertpool.jobs.results import write_result, write_selection
from expertpool.jobs.train_state import ExpertRows, Trainables, report_checkpoint, restore
from expertpool.model.args import ModelArgs
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.dispatch import AllToAllDispatcher, LocalDispatcher, owned_experts
from expertpool.model.layers import Linear
from expertpool.model.moe import RoutingRecord, sequence_balance_loss, update_router_bias
from expertpool.model.patch import mtp_parameters
from expertpool.platform.config import TrainJobConfig

log = logging.getLogger("expertpool.finetune")

ADAM_BETAS = (0.9, 0.95)  # DeepSeek-V3 pre-training betas
SEED = 0  # every rank and every attempt starts from the same torch RNG state


# ---------------------------------------------------------------------------------------------- setup

def _lr_lambda(job: TrainJobConfig):
    """Linear warmup to the peak, then cosine decay to 10% of it."""
    def f(step: int) -> float:
        if job.warmup_steps and step < job.warmup_steps:
            return (step + 1) / job.warmup_steps
        span = max(1, job.steps - job.warmup_steps)
        t = min(1.0, (step - job.warmup_steps) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _tensor_batches(iterate, rows: slice, device: torch.device):
    """Endless epochs of global batches -> this rank's rows on ``device``, as (input_ids, loss_mask, token_mask)."""
    while True:
        n = 0
        for b in iterate():
            n += 1
            yield tuple(torch.as_tensor(b[k])[rows].to(device, dtype) for k, dtype in
                        (("input_ids", torch.long), ("loss_mask", torch.bool), ("token_mask", torch.bool)))
        assert n > 0, "the training data yields no full global batch (checked before start)"


# ---------------------------------------------------------------------------------------------- loop

class Trainer:
    def __init__(self, plan: TrainPlan, data: TrainData, hooks: Sequence[TrainHook] = ()):
        self.plan, self.job, self.hooks = plan, plan.job, tuple(hooks)
        self.in_ray = in_ray_train()
        self.device = train_device(self.job, self.in_ray)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL collectives and object gathers use the current device
        if not dist.is_initialized():
            init_single_process_group(self.device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(SEED)
        # intra-op threads = the worker's CPUs (what Ray sets as OMP_NUM_THREADS for its workers): more
        # threads than reserved cores make OpenMP spin against other processes, ~30x slower on a busy box
        torch.set_num_threads(max(1, int(self.job.worker_resources.cpu)))
        # every node resolves the base itself (caches may not be shared), fetching only its experts
        self.args = ModelArgs.from_dir(plan.base_dir(weights=False))
        E, B = self.args.n_routed_experts, self.job.batch_size
        # the config allows W up to `workers`, which divides E and B; an elastic restart may pick any
        # W in [min_workers, workers], so the splits below may be uneven, never empty
        self.owned = owned_experts(self.rank, self.world, E)
        self.rows = batch_rows(self.rank, self.world, B)
        self.per_worker = self.rows.stop - self.rows.start
        self.base = plan.base_dir(self.owned if self.world > 1 else None)
        self.model = self.load_base()
        if self.trains_mtp:
            mtp_to_fp32(self.model)  # before the FP8 wrapping below: these linears train
        n_fp8 = frozen_fp8_linears(self.model)
        # owners: owned_experts, as loaded above
        self.inner_dispatcher = AllToAllDispatcher(E) if self.world > 1 else LocalDispatcher()
        self.model.set_dispatcher(self.inner_dispatcher)
        if self.rank == 0:
            log.info("layout: %s; device %s, compute %s%s", describe_layout(self.world, E, B), self.device,
                     str(self.compute_dtype).removeprefix("torch."),
                     f", {n_fp8} frozen FP8 linears through the FP8 kernels" if n_fp8 else "")
        self.out = plan.local_output
        if self.rank == 0:
            plan.pull("train_log.jsonl")  # a URI output_dir: continue the stored log, whichever node this is
        self.train_iterate = data.train_epochs(B)
        self.eval_rows = data.eval_rows()
        self.trainables: Trainables | None = None  # set up by run: setup_trainables, or restore
        self.resumed_from_world: int | None = None
        self.distill = (GreedyContinuations(self.model, self.job.mtp.prompt_tokens, self.job.seq_len, self.device)
                        if self.job.mode == "mtp" else None)

    @property
    def trains_mtp(self) -> bool:
        """Whether the MTP module trains outside full mode (full trains everything anyway)."""
        job = self.job
        return bool(self.args.num_nextn_predict_layers) and (
            job.mode == "mtp" or (job.mode == "esft" and job.mtp_loss_weight > 0))

    # -- precision -------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        """bf16 autocast on GPU; the CPU keeps its fp32 path."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def load_base(self):
        """This rank's share of the base checkpoint, as training holds it. ESFT: frozen weights stay in
        their stored format (FP8 stays FP8; others in the compute dtype), only the selected experts get
        fp32 copies (``SelectedExperts``). Full: everything trains, so everything is fp32 (FP8
        dequantized); autocast computes in bf16 on GPU."""
        esft = self.job.mode in ("esft", "mtp")
        return load_checkpoint(self.base, dtype=self.compute_dtype if esft else torch.float32,
                               weight_dtype=None if esft else "fp32", device=self.device,
                               experts=self.owned if self.world > 1 else None, with_mtp=True)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- trainables ------------------------------------------------------------------------------
    def setup_trainables(self, selection: dict[int, list[int]] | None) -> Trainables:
        """Mark what trains (ESFT: the experts of ``selection`` this rank owns; full: everything), route
        the forward through the training views and build the optimizers."""
        model, job = self.model, self.job
        for p in model.parameters():
            p.requires_grad_(False)
        views, groups, selected = {}, [], {}
        dense_named: list[tuple[str, nn.Parameter]] = []
        if job.mode == "mtp" and selection is None:  # the whole MTP module: every routed expert of its layers
            n = self.args.num_hidden_layers
            selection = {n + k: list(range(self.args.n_routed_experts)) for k in range(len(model.model.mtp))}
        if job.mode in ("esft", "mtp"):
            for moe in model.moe_layers():
                mine = [e for e in selection.get(moe.layer_id, []) if int(moe.experts.global_to_local[e]) >= 0]
                sel = SelectedExperts(moe.experts, mine) if mine else None
                if sel is not None:
                    selected[moe.layer_id] = sel
                    groups.append(ExpertRows(moe.layer_id, sel.global_ids, sel.w13, sel.w2))
                views[id(moe.experts)] = TrainExperts(moe.experts, sel)
        else:
            for moe in model.moe_layers():
                ex = moe.experts
                ex.w13_weight.requires_grad_(True)
                ex.w2_weight.requires_grad_(True)
                groups.append(ExpertRows(moe.layer_id, ex.expert_ids.tolist(), ex.w13_weight, ex.w2_weight))
                views[id(ex)] = TrainExperts(ex)
            expert_ids = {id(p) for g in groups for p in g.params().values()}
            dense_named = [(n, p) for n, p in model.named_parameters() if id(p) not in expert_ids]
            for _, p in dense_named:
                p.requires_grad_(True)
        t = Trainables(groups, dense_named, selection=selection if job.mode in ("esft", "mtp") else None,
                       selected=selected)
        if self.trains_mtp:
            t.mtp_named = mtp_parameters(model)
            for _, p in t.mtp_named:
                p.requires_grad_(True)
            t.mtp_opt = torch.optim.AdamW(t.mtp_params, lr=job.lr, betas=ADAM_BETAS, weight_decay=job.weight_decay)
            t.mtp_sched = torch.optim.lr_scheduler.LambdaLR(t.mtp_opt, _lr_lambda(job))
        model.set_dispatcher(TrainDispatcher(self.inner_dispatcher, views))
        if t.expert_params:
            t.expert_opt = torch.optim.AdamW(t.expert_params, lr=job.lr, betas=ADAM_BETAS,
                                             weight_decay=job.weight_decay)
            t.expert_sched = torch.optim.lr_scheduler.LambdaLR(t.expert_opt, _lr_lambda(job))
        if t.dense_params:
            t.engine = self._deepspeed(t.dense_params)
        self.trainables = t
        return t

    def _deepspeed(self, dense_params: list[nn.Parameter]):
        """DeepSpeed ZeRO over the dense parameters only (a holder module shares them with the model)."""
        import deepspeed

        job = self.job
        holder = nn.Module()
        holder.params = nn.ParameterList(dense_params)
        ds_config = {
            "train_micro_batch_size_per_gpu": self.per_worker,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": job.zero_stage},
            "optimizer": {"type": "AdamW", "params": {"lr": job.lr, "betas": list(ADAM_BETAS),
                                                      "weight_decay": job.weight_decay, "torch_adam": True}},
            "checkpoint": {"use_node_local_storage": True},
            "steps_per_print": 10 ** 9,
        }
        if job.grad_clip:
            ds_config["gradient_clipping"] = job.grad_clip
        lam = _lr_lambda(job)
        engine, _, _, _ = deepspeed.initialize(
            model=holder, model_parameters=holder.parameters(), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam))
        return engine

    # -- one step --------------------------------------------------------------------------------
    def distill_losses(self, ids, grad: bool):
        """Mode mtp: CE of the MTP module against the base's greedy token after token i+1 (row i), every
        position; the main model runs without autograd. Returns (mtp CE, agreement share, routing record
        of the MTP layer, main-model CE on the rows for the log, the global row count)."""
        model = self.model
        with torch.no_grad(), self.autocast():
            hidden = model.hidden_states(ids)
            logits = model.lm_head(hidden)
            ce = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
            target = logits[:, 1:].argmax(-1)  # [B, S-1]: the base's greedy choice after token i+1
        rec = RoutingRecord()
        with torch.set_grad_enabled(grad), self.autocast():
            ml = model.mtp_logits(hidden.detach(), ids, record=rec)  # [B, S-1, V]
            n = _all_reduce(torch.tensor(float(target.numel()), device=self.device))
            loss = F.cross_entropy(ml.float().flatten(0, 1), target.flatten(), reduction="sum") / n
            agree = (ml.detach().argmax(-1) == target).sum().float() / n
        return loss, agree, rec, ce, n

    def losses(self, ids, mask, grad: bool):
        job, args, model = self.job, self.args, self.model
        if job.mode == "mtp":
            mtp, _agree, rec, ce, _ = self.distill_losses(ids, grad)
            ce = ce * (ids.shape[0] / job.batch_size)  # a share of the global mean, as the others
            zero = torch.zeros((), device=self.device)
            return mtp, ce.detach(), mtp, zero, rec
        rec = RoutingRecord()
        with torch.set_grad_enabled(grad), self.autocast():
            hidden = model.hidden_states(ids, rec)
            logits = model.lm_head(hidden)
            tgt, m = ids[:, 1:], mask[:, 1:].float()
            n_tok = _all_reduce(m.sum().detach().clone()).clamp(min=1)
            ce = (F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten(), reduction="none")
                  * m.flatten()).sum() / n_tok
            total = ce
            mtp = torch.zeros((), device=self.device)
            if job.mtp_loss_weight > 0 and len(model.model.mtp):
                ml = model.mtp_logits(hidden, ids, record=rec)[:, :-1]
                t2, m2 = ids[:, 2:], mask[:, 2:].float()
                n2 = _all_reduce(m2.sum().detach().clone()).clamp(min=1)
                mtp = (F.cross_entropy(ml.float().flatten(0, 1), t2.flatten(), reduction="none")
                       * m2.flatten()).sum() / n2
                total = total + job.mtp_loss_weight * mtp
            bal = torch.zeros((), device=self.device)
            if job.balance_loss_alpha > 0:
                for _, (_, ids_TK, scores_TE) in sorted(rec.layers.items()):
                    bal = bal + sequence_balance_loss(scores_TE, ids_TK, ids.shape[0], job.balance_loss_alpha, args)
                # a mean over this rank's sequences; weighted by its share of the batch, the ranks'
                # parts sum to the mean over the global batch (ranks may hold different row counts)
                bal = bal * (ids.shape[0] / job.batch_size)
                total = total + bal
        return total, ce, mtp, bal, rec

    def _load(self, rec: RoutingRecord) -> dict[int, torch.Tensor]:
        E = self.args.n_routed_experts
        loads = {layer: torch.bincount(ids_TK.flatten(), minlength=E).float()
                 for layer, (_, ids_TK, _) in rec.layers.items()}
        if loads:
            flat = _all_reduce(torch.stack([loads[k] for k in sorted(loads)]))
            loads = {k: flat[i] for i, k in enumerate(sorted(loads))}
        return loads

    def step(self, ids, mask) -> dict:
        W, t = self.world, self.trainables
        if self.distill is not None:
            ids = self.distill(ids)  # prompts -> prompt + the base's greedy continuation (collective)
        total, ce, mtp, bal, rec = self.losses(ids, mask, grad=True)
        if t.engine is not None:
            t.engine.backward(total * W)
            for p in t.expert_params:
                if p.grad is not None:
                    p.grad.div_(W)
        else:
            total.backward()
        # a zero gradient where no token reached an expert parameter this step (Megatron's dense expert
        # gradients do the same): every AdamW state then steps every step, so one step count
        # describes them all and a checkpoint can be re-sharded (jobs.train_state)
        for p in t.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        expert_norm = 0.0
        if t.expert_opt is not None:
            sq = torch.zeros((), dtype=torch.float64, device=self.device)
            for p in t.expert_params:
                sq += p.grad.double().pow(2).sum()
            expert_norm = float(_all_reduce(sq).sqrt())
            clip = self.job.grad_clip
            if clip and expert_norm > clip:
                for p in t.expert_params:
                    p.grad.mul_(clip / (expert_norm + 1e-6))
        if t.engine is not None:
            t.engine.step()
        if t.mtp_opt is not None:
            self._mtp_dense_step(t)
        if t.expert_opt is not None:
            t.expert_opt.step()
            t.expert_opt.zero_grad(set_to_none=True)
            t.expert_sched.step()
        for moe in self.model.moe_layers():
            if moe.layer_id in t.selected:
                t.selected[moe.layer_id].write_back(moe.experts)
        loads = self._load(rec)
        if self.job.router_bias_rate > 0:
            moes = {m.layer_id: m for m in self.model.moe_layers()}
            for layer, load in loads.items():
                update_router_bias(moes[layer].gate, load, self.job.router_bias_rate)
        stats = torch.stack([total.detach(), ce.detach(), mtp.detach(), bal.detach()]).double()
        stats = _all_reduce(stats)  # each rank's parts are shares of the global mean: sum them
        ratio = max((float(v.max() / v.mean().clamp(min=1e-9)) for v in loads.values()), default=0.0)
        return {"loss": float(stats[0]), "ce": float(stats[1]), "mtp": float(stats[2]), "balance": float(stats[3]),
                "expert_grad_norm": expert_norm, "load_max_over_mean": ratio}

    def _mtp_dense_step(self, t: Trainables) -> None:
        """The MTP module's replicated tensors: sum the ranks' gradient shares, clip, step."""
        for p in t.mtp_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            _all_reduce(p.grad)
        if self.job.grad_clip:
            torch.nn.utils.clip_grad_norm_(t.mtp_params, self.job.grad_clip)
        t.mtp_opt.step()
        t.mtp_opt.zero_grad(set_to_none=True)
        t.mtp_sched.step()

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Masked next-token CE over the whole eval set (global token mean); mode mtp: the MTP module's
        CE against the base's greedy tokens (``distill_losses``), its agreement in ``self.agreement``."""
        if self.eval_rows is None:
            return None
        if self.job.mode == "mtp":
            return self._evaluate_mtp()
        ids_all, mask_all = self.eval_rows["input_ids"], self.eval_rows["loss_mask"]
        n = ids_all.shape[0]
        idx = list(range(self.rank, max(n, self.world), self.world))  # equal counts: wrap when n < W
        idx = [i % n for i in idx]
        per = max(1, self.job.batch_size // self.world)  # the same on every rank: equal chunk counts
        n_chunks = math.ceil(math.ceil(max(n, self.world) / self.world) / per)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tok = torch.zeros((), dtype=torch.float64, device=self.device)
        for c in range(n_chunks):
            chunk = idx[c * per:(c + 1) * per] or idx[:1]  # every rank runs every chunk (collectives)
            weight = 1.0 if idx[c * per:(c + 1) * per] else 0.0
            ids, mask = ids_all[chunk].to(self.device, torch.long), mask_all[chunk].to(self.device, torch.bool)
            with self.autocast():
                logits = self.model(ids)
            m = mask[:, 1:].float() * weight
            loss_sum += (F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                         * m.flatten()).sum().double()
            tok += m.sum().double()
        out = _all_reduce(torch.stack([loss_sum, tok]))
        return float(out[0] / out[1].clamp(min=1))

    @torch.no_grad()
    def _evaluate_mtp(self) -> float:
        """Mode mtp on the eval rows as stored (no generation): the global mean CE and agreement of
        the MTP module with the base's greedy next token. Every rank runs every chunk (collectives)."""
        ids_all = self.eval_rows["input_ids"]
        n = ids_all.shape[0]
        idx = [i % n for i in range(self.rank, max(n, self.world), self.world)]
        per = max(1, self.job.batch_size // self.world)
        n_chunks = math.ceil(math.ceil(max(n, self.world) / self.world) / per)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss x rows, agree x rows, rows
        for c in range(n_chunks):
            chunk = idx[c * per:(c + 1) * per] or idx[:1]
            weight = 1.0 if idx[c * per:(c + 1) * per] else 0.0
            ids = ids_all[chunk].to(self.device, torch.long)
            loss, agree, _, _, n = self.distill_losses(ids, grad=False)
            # distill_losses divides by the chunk's global row count: times it, this rank's sums
            sums += torch.stack([loss.double() * n, agree.double() * n,
                                 torch.tensor(float(ids.shape[0] * (ids.shape[1] - 1)), device=self.device)]) * weight
        _all_reduce(sums)
        self.agreement = float(sums[1] / sums[2].clamp(min=1))
        return float(sums[0] / sums[2].clamp(min=1))

    @torch.no_grad()
    def _dense_replicas_agree(self) -> bool:
        """Data-parallel invariant: every rank holds the same dense weights (else a reduction is missing)."""
        dense = self.trainables.dense_params
        mine = torch.stack([p.detach().double().sum() for p in dense]
                           + [p.detach().double().abs().sum() for p in dense])
        if self.world == 1:
            return True
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return all(torch.equal(parts[0], q) for q in parts[1:])

    def _optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (AdamW moments; ZeRO partitions for the dense part)."""
        t = self.trainables
        opts = [t.expert_opt] + ([t.engine.optimizer.optimizer if hasattr(t.engine.optimizer, "optimizer")
                                  else t.engine.optimizer] if t.engine is not None else [])
        return sum(x.numel() * x.element_size() for o in opts if o is not None for st in o.state.values()
                   for x in st.values() if torch.is_tensor(x))

    # -- driver ----------------------------------------------------------------------------------
    def _resume(self) -> int | None:
        """Restore the trainables from the checkpoint Ray Train hands this attempt, if any; returns
        the step it continues after (None: a fresh start)."""
        if not self.in_ray:
            return None
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            _, start, self.resumed_from_world = restore(Path(d), self.job, self.model, self.setup_trainables)
        log.info("rank %d of %d: resumed from the step-%d checkpoint written by %d workers", self.rank, self.world,
                 start, self.resumed_from_world)
        return start

    def _select_experts(self) -> dict[int, list[int]]:
        """ESFT: score the experts on the training data and select them (``jobs.esft``)."""
        esft, job = self.job.esft, self.job
        t0 = time.perf_counter()
        self.model.set_dispatcher(self.inner_dispatcher)
        n_batches = max(1, math.ceil(esft.score_tokens / (job.batch_size * job.seq_len)))
        with self.autocast():
            chosen, norm = score_and_select(self.model, _tensor_batches(self.train_iterate, self.rows, self.device),
                                            n_batches, esft.scoring, esft.p, with_mtp=self.trains_mtp)
        if self.rank == 0:
            write_selection(self.out, esft.scoring, esft.p, chosen, norm)
            self.plan.upload("esft_experts.json")
            log.info("ESFT (%s, p=%.2f) selected %s experts per layer in %.1fs: %s", esft.scoring, esft.p,
                     {k: len(v) for k, v in chosen.items()}, time.perf_counter() - t0, chosen)
        return chosen

    def run(self) -> dict:
        job = self.job
        resumed_from = self._resume()
        eval_initial = agreement_initial = None
        if resumed_from is None:
            eval_initial = self.evaluate()
            agreement_initial = getattr(self, "agreement", None)
            self.setup_trainables(self._select_experts() if job.mode == "esft" else None)
        t = self.trainables
        n_expert = int(_all_reduce(torch.tensor(sum(p.numel() for p in t.expert_params), device=self.device)))
        trainable_params = n_expert + sum(p.numel() for p in t.dense_params) + sum(p.numel() for p in t.mtp_params)
        if self.rank == 0:
            log.info("trainable parameters: %d (mode %s, world %d)", trainable_params, job.mode, self.world)
        self.model.train()
        start = resumed_from or 0
        batches = _tensor_batches(self.train_iterate, self.rows, self.device)
        for _ in range(start):  # skip what the restored steps consumed: same data position
            next(batches)
        history_file = self.out / "train_log.jsonl"
        tok_s_hist, loss = [], float("nan")
        for step in range(start + 1, job.steps + 1):
            for hook in self.hooks:
                hook.before_step(self, step)
            t0 = time.perf_counter()
            ids, mask, _tokens = next(batches)
            step_metrics = self.step(ids, mask)
            dt = time.perf_counter() - t0
            tok_s = job.batch_size * job.seq_len / dt
            tok_s_hist.append(tok_s)
            loss = step_metrics["loss"]
            fp = int(_all_reduce(ids.sum().reshape(1))[0])
            if self.rank == 0:
                log.info("step %d/%d loss %.4f (ce %.4f mtp %.4f bal %.5f) %.0f tok/s load max/mean %.2f",
                         step, job.steps, loss, step_metrics["ce"], step_metrics["mtp"], step_metrics["balance"],
                         tok_s, step_metrics["load_max_over_mean"])
                self.out.mkdir(parents=True, exist_ok=True)
                with history_file.open("a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss, "tokens_per_s": tok_s, "data_fingerprint": fp,
                                         "world": self.world, "resumed_from": resumed_from}) + "\n")
                self.plan.upload("train_log.jsonl")
            if self.in_ray and job.checkpoint_every and step % job.checkpoint_every == 0 and step < job.steps:
                report_checkpoint(step, {"step": step, "loss": loss}, t, self.model, job)
        self.model.eval()
        eval_final = self.evaluate()
        summary = {"step": job.steps, "mode": job.mode, "world": self.world, "train_loss_final": loss,
                   "eval_loss_initial": eval_initial, "eval_loss_final": eval_final,
                   "tokens_per_s": float(np.median(tok_s_hist)) if tok_s_hist else None,
                   "resumed_from": resumed_from, "resumed_from_world": self.resumed_from_world}
        if t.dense_params:
            summary["dense_replicas_agree"] = self._dense_replicas_agree()
        if job.mode == "mtp":
            summary["mtp_agreement_initial"] = agreement_initial
            summary["mtp_agreement_final"] = getattr(self, "agreement", None)
            summary["generated_tokens"] = self.distill.generated_tokens
        summary["trainable_params"] = trainable_params
        summary["optimizer_state_bytes_rank0"] = self._optimizer_state_bytes()
        if job.mode == "esft":
            summary["experts_selected"] = {str(k): len(v) for k, v in (t.selection or {}).items()}
        for hook in self.hooks:
            hook.after_run(self, summary)
        write_result(self.plan, self.base, self.model, t.selected, summary, with_mtp=self.trains_mtp)
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            self.plan.upload("summary.json")
        if self.in_ray:
            import ray.train

            ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        return summary


@torch.no_grad()
def mtp_to_fp32(model) -> None:
    """The MTP module's non-expert tensors as fp32 trainable parameters (FP8 linears dequantized): the
    master weights of an esft or mtp run that trains the module."""
    for name, p in mtp_parameters(model):
        mod = model.get_submodule(_module_path(model, name).rsplit(".", 1)[0])
        attr = name.rsplit(".", 1)[1]
        if isinstance(mod, Linear) and attr == "weight" and mod.weight_scale_inv is not None:
            mod.weight = nn.Parameter(mod.dense_weight(torch.float32))
            mod.weight_scale_inv = None
        elif p.dtype != torch.float32:
            setattr(mod, attr, nn.Parameter(p.detach().float()))


def _module_path(model, hf_name: str) -> str:
    """HF name of an MTP tensor (model.layers.{L+k}.x) -> our module path (model.mtp.{k}.x)."""
    layer, rest = hf_name[len("model.layers."):].split(".", 1)
    return f"model.mtp.{int(layer) - model.args.num_hidden_layers}.{rest}"


def train_loop(plan: TrainPlan, data: TrainData, hooks: Sequence[TrainHook] = ()) -> dict:
    """Train one job on this rank (in one process: world 1). ``data``: ``jobs.data.LocalRows`` in one
    process, ``RayShards`` in a Ray Train worker. ``hooks``: called at named points (``jobs.hooks``:
    fault injection and extra checks). Returns the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Trainer(plan, data, hooks).run()
