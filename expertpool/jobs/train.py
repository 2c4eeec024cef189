"""The fine-tuning loop: ``train_loop(config)``, run by every Ray Train worker or in one process.

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
  there is no dense optimizer and DeepSpeed is not used.

Loss (fp32): masked next-token CE + ``mtp_loss_weight`` x masked MTP CE (token i+2) + the
sequence-wise balance loss (``balance_loss_alpha``), each a global mean: a rank's CE is its summed
token loss over the all-reduced token count, and its balance loss is its sequence mean weighted by
its share of the batch's sequences. DeepSpeed averages dense gradients over ranks, so the
backward loss is scaled by W and owned-expert gradients (already a sum over ranks) are divided by W.
The aux-loss-free router bias update (``router_bias_rate``) uses the all-reduced expert load and
runs after the optimizer step, outside forward (full mode only: a patch cannot carry router changes).

Reliability. Every ``checkpoint_every`` steps each rank writes its part and reports it with
``ray.train.report``; Ray merges the parts into one checkpoint that any world size can restore
(``jobs.train_state``: experts by global id, dense state whole, global state once). After a restart,
with the same or another worker count, the loop reloads the latest checkpoint and skips the batches
already consumed, so the data position is a function of the step.
"""

import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from expertpool.jobs.esft import (SelectedExperts, TrainDispatcher, TrainExperts, all_reduce_scores, expert_scores,
                                  select_experts)
from expertpool.jobs.train_state import (ExpertRows, dense_state, dense_step, expert_rows_state, load_dense_state,
                                         load_expert_rows, load_scheduler, rank_files, read_expert_rows, read_state,
                                         uniform_step, write_state)
from expertpool.model.args import ModelArgs
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint
from expertpool.model.dispatch import AllToAllDispatcher, LocalDispatcher, owned_experts
from expertpool.model.moe import RoutingRecord, sequence_balance_loss, update_router_bias
from expertpool.model.patch import save_patch

log = logging.getLogger("expertpool.finetune")

ADAM_BETAS = (0.9, 0.95)  # DeepSeek-V3 pre-training betas


# ---------------------------------------------------------------------------------------------- setup

def _in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context().get_world_size()
        return True
    except (RuntimeError, ValueError, AttributeError, ImportError):
        return False


def _init_single_process_group() -> None:
    """A world-1 gloo group so DeepSpeed and the collectives work in one process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _lr_lambda(job):
    """Linear warmup to the peak, then cosine decay to 10% of it."""
    def f(step: int) -> float:
        if job["warmup_steps"] and step < job["warmup_steps"]:
            return (step + 1) / job["warmup_steps"]
        span = max(1, job["steps"] - job["warmup_steps"])
        t = min(1.0, (step - job["warmup_steps"]) / span)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
    return f


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def batch_rows(rank: int, world: int, batch_size: int) -> slice:
    """The rows of each global batch rank ``rank`` of ``world`` trains on: [r*B//W, (r+1)*B//W)."""
    assert 0 <= rank < world <= batch_size, f"rank {rank} of {world} over {batch_size} sequences"
    return slice(rank * batch_size // world, (rank + 1) * batch_size // world)


def _layout(world: int, n_experts: int, batch_size: int) -> str:
    """One log line: the experts and batch rows of every rank of this attempt."""
    experts = [owned_experts(r, world, n_experts) for r in range(world)]
    rows = [batch_rows(r, world, batch_size) for r in range(world)]
    return (f"{world} workers; routed experts per rank {', '.join(f'{x[0]}-{x[-1]} ({len(x)})' for x in experts)}; "
            f"batch rows per rank {', '.join(str(r.stop - r.start) for r in rows)}")


def _tensor_batches(iterate, rows: slice):
    """Endless epochs of global batches -> this rank's rows, as (input_ids, loss_mask)."""
    while True:
        n = 0
        for b in iterate():
            n += 1
            yield torch.as_tensor(b["input_ids"])[rows].long(), torch.as_tensor(b["loss_mask"])[rows].bool()
        assert n > 0, "the training data yields no full global batch (checked before start)"


def _numpy_epoch(rows: dict[str, np.ndarray], batch: int):
    def iterate():
        for i in range(0, len(rows["input_ids"]) - batch + 1, batch):
            yield {k: v[i:i + batch] for k, v in rows.items()}
    return iterate


# ---------------------------------------------------------------------------------------------- loop

class _Trainer:
    def __init__(self, config: dict):
        self.cfg = config
        self.job = config["job"]
        self.in_ray = _in_ray_train()
        if not dist.is_initialized():
            _init_single_process_group()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(config.get("seed", 0))
        # intra-op threads = the worker's CPUs (what Ray sets as OMP_NUM_THREADS for its workers): more
        # threads than reserved cores make OpenMP spin against other processes, ~30x slower on a busy box
        torch.set_num_threads(max(1, int(config.get("worker_resources", {}).get("CPU", 1))))
        if config.get("embedded_base"):  # resolve on this node: the driver's cache may not be shared
            from expertpool.model.embedded import ensure_embedded_model

            config["base_model"] = str(ensure_embedded_model())
        self.base = config["base_model"]
        self.args = ModelArgs.from_dir(self.base)
        E, B = self.args.n_routed_experts, self.job["batch_size"]
        # the config allows W up to `workers`, which divides E and B; an elastic restart may pick any
        # W in [min_workers, workers], so the splits below may be uneven, never empty
        self.owned = owned_experts(self.rank, self.world, E)
        self.rows = batch_rows(self.rank, self.world, B)
        self.per_worker = self.rows.stop - self.rows.start
        self.model = load_checkpoint(self.base, dtype=torch.float32, experts=self.owned if self.world > 1 else None,
                                     with_mtp=True)
        if self.world > 1:
            self.inner_dispatcher = AllToAllDispatcher(E)  # owners: owned_experts, as loaded above
        else:
            self.inner_dispatcher = LocalDispatcher()
        self.model.set_dispatcher(self.inner_dispatcher)
        if self.rank == 0:
            log.info("layout: %s", _layout(self.world, E, B))
        self.out = Path(config["output_dir"])
        self.engine = None
        self.resumed_from_world: int | None = None
        self.selection: dict[int, list[int]] | None = None
        self.selected: dict[int, SelectedExperts] = {}

    # -- data ------------------------------------------------------------------------------------
    def _data(self):
        B = self.job["batch_size"]
        if self.in_ray:
            import ray.train

            train = ray.train.get_dataset_shard("train")
            self.train_iterate = lambda: train.iter_torch_batches(batch_size=B, drop_last=True, prefetch_batches=1)
            ev = ray.train.get_dataset_shard("eval") if self.cfg.get("has_eval") else None
            eval_batches = list(ev.iter_torch_batches(batch_size=256)) if ev is not None else []
            self.eval_rows = ({k: torch.cat([b[k] for b in eval_batches]) for k in ("input_ids", "loss_mask")}
                              if eval_batches else None)
        else:
            train_rows, eval_rows = self.cfg["local_rows"]
            self.train_iterate = _numpy_epoch(train_rows, B)
            self.eval_rows = ({k: torch.as_tensor(v) for k, v in eval_rows.items()}
                              if len(eval_rows["input_ids"]) else None)

    # -- model setup -----------------------------------------------------------------------------
    def _setup_trainables(self, selection: dict[int, list[int]] | None):
        model, mode = self.model, self.job["mode"]
        for p in model.parameters():
            p.requires_grad_(False)
        views = {}
        self.expert_groups: list[ExpertRows] = []  # the trainable expert rows, by global id (checkpoints)
        if mode == "esft":
            self.selection = selection
            for moe in model.moe_layers():
                mine = [e for e in selection.get(moe.layer_id, []) if int(moe.experts.global_to_local[e]) >= 0]
                sel = SelectedExperts(moe.experts, mine) if mine else None
                if sel is not None:
                    self.selected[moe.layer_id] = sel
                    self.expert_groups.append(ExpertRows(moe.layer_id, sel.global_ids, sel.w13, sel.w2))
                views[id(moe.experts)] = TrainExperts(moe.experts, sel)
            self.dense_named: list[tuple[str, nn.Parameter]] = []
        else:
            for moe in model.moe_layers():
                ex = moe.experts
                ex.w13_weight.requires_grad_(True)
                ex.w2_weight.requires_grad_(True)
                self.expert_groups.append(ExpertRows(moe.layer_id, ex.expert_ids.tolist(), ex.w13_weight, ex.w2_weight))
                views[id(ex)] = TrainExperts(ex)
            expert_ids = {id(p) for g in self.expert_groups for p in g.params().values()}
            self.dense_named = [(n, p) for n, p in model.named_parameters() if id(p) not in expert_ids]
            for _, p in self.dense_named:
                p.requires_grad_(True)
        self.expert_params = [p for g in self.expert_groups for p in g.params().values()]
        self.dense_params = [p for _, p in self.dense_named]
        model.set_dispatcher(TrainDispatcher(self.inner_dispatcher, views))
        lr, wd = self.job["lr"], self.job["weight_decay"]
        self.expert_opt = torch.optim.AdamW(self.expert_params, lr=lr, betas=ADAM_BETAS, weight_decay=wd) \
            if self.expert_params else None
        self.expert_sched = torch.optim.lr_scheduler.LambdaLR(self.expert_opt, _lr_lambda(self.job)) \
            if self.expert_opt else None
        if self.dense_params:
            self._setup_deepspeed(lr, wd)

    def _setup_deepspeed(self, lr: float, wd: float):
        import deepspeed

        holder = nn.Module()
        holder.params = nn.ParameterList(self.dense_params)
        ds_config = {
            "train_micro_batch_size_per_gpu": self.per_worker,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.job["zero_stage"]},
            "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": list(ADAM_BETAS), "weight_decay": wd,
                                                      "torch_adam": True}},
            "checkpoint": {"use_node_local_storage": True},
            "steps_per_print": 10 ** 9,
        }
        if self.job["grad_clip"]:
            ds_config["gradient_clipping"] = self.job["grad_clip"]
        lam = _lr_lambda(self.job)
        self.engine, _, _, _ = deepspeed.initialize(
            model=holder, model_parameters=holder.parameters(), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lam))

    # -- ESFT scoring ------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self) -> tuple[dict[int, list[int]], dict[int, list[float]]]:
        esft = self.job["esft"]
        B, S = self.job["batch_size"], self.job["seq_len"]
        n_batches = max(1, math.ceil(esft["score_tokens"] / (B * S)))
        model, args = self.model, self.args
        model.set_dispatcher(self.inner_dispatcher)
        totals: dict[int, torch.Tensor] = {}
        batches = _tensor_batches(self.train_iterate, self.rows)
        for _ in range(n_batches):
            ids, _mask = next(batches)
            rec = RoutingRecord()
            model.hidden_states(ids, rec)
            for layer, s in expert_scores(rec, args.n_routed_experts, args.num_hidden_layers, esft["scoring"]).items():
                totals[layer] = totals.get(layer, 0) + s
        all_reduce_scores(totals)
        chosen = select_experts(totals, esft["p"])
        norm = {layer: (s / s.sum()).tolist() for layer, s in totals.items()}
        return chosen, norm

    # -- one step --------------------------------------------------------------------------------
    def _losses(self, ids, mask, grad: bool):
        job, args, model = self.job, self.args, self.model
        rec = RoutingRecord()
        with torch.set_grad_enabled(grad):
            hidden = model.hidden_states(ids, rec)
            logits = model.lm_head(hidden)
            tgt, m = ids[:, 1:], mask[:, 1:].float()
            n_tok = _all_reduce(m.sum().detach().clone()).clamp(min=1)
            ce = (F.cross_entropy(logits[:, :-1].float().flatten(0, 1), tgt.flatten(), reduction="none")
                  * m.flatten()).sum() / n_tok
            total = ce
            mtp = torch.zeros(())
            if job["mtp_loss_weight"] > 0 and len(model.model.mtp):
                ml = model.mtp_logits(hidden, ids, record=rec)[:, :-1]
                t2, m2 = ids[:, 2:], mask[:, 2:].float()
                n2 = _all_reduce(m2.sum().detach().clone()).clamp(min=1)
                mtp = (F.cross_entropy(ml.float().flatten(0, 1), t2.flatten(), reduction="none")
                       * m2.flatten()).sum() / n2
                total = total + job["mtp_loss_weight"] * mtp
            bal = torch.zeros(())
            if job["balance_loss_alpha"] > 0:
                for _, (_, ids_TK, scores_TE) in sorted(rec.layers.items()):
                    bal = bal + sequence_balance_loss(scores_TE, ids_TK, ids.shape[0], job["balance_loss_alpha"], args)
                # a mean over this rank's sequences; weighted by its share of the batch, the ranks'
                # parts sum to the mean over the global batch (ranks may hold different row counts)
                bal = bal * (ids.shape[0] / job["batch_size"])
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

    def _step(self, ids, mask) -> dict:
        W = self.world
        total, ce, mtp, bal, rec = self._losses(ids, mask, grad=True)
        if self.engine is not None:
            self.engine.backward(total * W)
            for p in self.expert_params:
                if p.grad is not None:
                    p.grad.div_(W)
        else:
            total.backward()
        # a zero gradient where no token reached an expert parameter this step (Megatron's dense expert
        # gradients do the same): every AdamW state then steps every step, so one step count
        # describes them all and a checkpoint can be re-sharded (jobs.train_state)
        for p in self.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        expert_norm = 0.0
        if self.expert_opt is not None:
            sq = torch.zeros((), dtype=torch.float64)
            for p in self.expert_params:
                sq += p.grad.double().pow(2).sum()
            expert_norm = float(_all_reduce(sq).sqrt())
            clip = self.job["grad_clip"]
            if clip and expert_norm > clip:
                for p in self.expert_params:
                    p.grad.mul_(clip / (expert_norm + 1e-6))
        if self.engine is not None:
            self.engine.step()
        if self.expert_opt is not None:
            self.expert_opt.step()
            self.expert_opt.zero_grad(set_to_none=True)
            self.expert_sched.step()
        for moe in self.model.moe_layers():
            if moe.layer_id in self.selected:
                self.selected[moe.layer_id].write_back(moe.experts)
        loads = self._load(rec)
        if self.job["router_bias_rate"] > 0:
            moes = {m.layer_id: m for m in self.model.moe_layers()}
            for layer, load in loads.items():
                update_router_bias(moes[layer].gate, load, self.job["router_bias_rate"])
        stats = torch.stack([total.detach(), ce.detach(), mtp.detach(), bal.detach()]).double()
        stats = _all_reduce(stats)  # each rank's parts are shares of the global mean: sum them
        ratio = max((float(v.max() / v.mean().clamp(min=1e-9)) for v in loads.values()), default=0.0)
        return {"loss": float(stats[0]), "ce": float(stats[1]), "mtp": float(stats[2]), "balance": float(stats[3]),
                "expert_grad_norm": expert_norm, "load_max_over_mean": ratio}

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Masked next-token CE over the whole eval set (global token mean)."""
        if self.eval_rows is None:
            return None
        ids_all, mask_all = self.eval_rows["input_ids"], self.eval_rows["loss_mask"]
        n = ids_all.shape[0]
        idx = list(range(self.rank, max(n, self.world), self.world))  # equal counts: wrap when n < W
        idx = [i % n for i in idx]
        per = max(1, self.job["batch_size"] // self.world)  # the same on every rank: equal chunk counts
        n_chunks = math.ceil(math.ceil(max(n, self.world) / self.world) / per)
        loss_sum, tok = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for c in range(n_chunks):
            chunk = idx[c * per:(c + 1) * per] or idx[:1]  # every rank runs every chunk (collectives)
            weight = 1.0 if idx[c * per:(c + 1) * per] else 0.0
            ids, mask = ids_all[chunk].long(), mask_all[chunk].bool()
            logits = self.model(ids)
            m = mask[:, 1:].float() * weight
            loss_sum += (F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                         * m.flatten()).sum().double()
            tok += m.sum().double()
        out = _all_reduce(torch.stack([loss_sum, tok]))
        return float(out[0] / out[1].clamp(min=1))

    @torch.no_grad()
    def _dense_replicas_agree(self) -> bool:
        """Data-parallel invariant: every rank holds the same dense weights (else a reduction is missing)."""
        mine = torch.stack([p.detach().double().sum() for p in self.dense_params]
                           + [p.detach().double().abs().sum() for p in self.dense_params])
        if self.world == 1:
            return True
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        return all(torch.equal(parts[0], q) for q in parts[1:])

    def _optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds (AdamW moments; ZeRO partitions for the dense part)."""
        opts = [self.expert_opt] + ([self.engine.optimizer.optimizer if hasattr(self.engine.optimizer, "optimizer")
                                     else self.engine.optimizer] if self.engine is not None else [])
        return sum(t.numel() * t.element_size() for o in opts if o is not None for st in o.state.values()
                   for t in st.values() if torch.is_tensor(t))

    # -- checkpoints -----------------------------------------------------------------------------
    def write_checkpoint(self, d: Path, step: int) -> None:
        """Write this rank's part of the checkpoint after ``step`` into ``d`` (``jobs.train_state``).
        Collective: every rank calls it."""
        if self.expert_opt is not None:
            assert uniform_step(self.expert_opt.state[p] for p in self.expert_params) == step, \
                "an expert AdamW state missed a step"
        if self.engine is not None:
            assert dense_step(self.engine, self.dense_params) == step, "the dense AdamW missed a step"
        torch.save(expert_rows_state(self.expert_groups, self.expert_opt), d / f"experts-rank{self.rank}.pt")
        if self.engine is not None:
            torch.save(dense_state(self.engine, self.dense_named), d / f"dense-rank{self.rank}.pt")
        # every rank runs the same schedule; in ESFT rank 0 may train no expert: take the first one's
        scheds = [None] * self.world
        dist.all_gather_object(scheds, self.expert_sched.state_dict() if self.expert_sched else None)
        if self.rank == 0:
            torch.save({"adam_step": step, "selection": self.selection,
                        "expert_sched": next((x for x in scheds if x is not None), None),
                        "dense_sched": self.engine.lr_scheduler.state_dict() if self.engine is not None else None,
                        "router_bias": {m.layer_id: m.gate.e_score_correction_bias.clone()
                                        for m in self.model.moe_layers()}}, d / "global.pt")
            write_state(d, step, self.world, self.job)

    def _save_checkpoint(self, step: int, metrics: dict) -> None:
        """Write the checkpoint to a fresh local directory and report it: Ray registers it only once
        every rank has reported, so a rank dying mid-write leaves no half-written checkpoint behind."""
        import ray.train

        tmp = Path(tempfile.mkdtemp(prefix="expertpool-ckpt-"))
        try:
            self.write_checkpoint(tmp, step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def restore(self, d: Path) -> int:
        """Set up the trainables from the checkpoint in ``d``, written by any world size, taking the
        expert rows this rank owns now. Returns the step to continue after. Local: no collectives."""
        state = read_state(d, self.job)
        glob = torch.load(d / "global.pt", weights_only=True)
        self._setup_trainables(glob["selection"] if self.job["mode"] == "esft" else None)
        self.resumed_from_world = state["world"]
        if self.expert_opt is not None:
            rows = read_expert_rows(rank_files(d, "experts"), self.expert_groups)
            load_expert_rows(self.expert_groups, self.expert_opt, rows, glob["adam_step"], source=str(d))
            load_scheduler(self.expert_sched, glob["expert_sched"])
        if self.engine is not None:
            saved: dict = {}
            for f in rank_files(d, "dense"):
                saved.update(torch.load(f, mmap=True, weights_only=True))
            load_dense_state(self.engine, self.dense_named, saved, glob["adam_step"], source=str(d))
            load_scheduler(self.engine.lr_scheduler, glob["dense_sched"])
        with torch.no_grad():
            for m in self.model.moe_layers():
                m.gate.e_score_correction_bias.copy_(glob["router_bias"][m.layer_id])
                if m.layer_id in self.selected:
                    self.selected[m.layer_id].write_back(m.experts)
        return int(state["step"])

    # -- outputs ---------------------------------------------------------------------------------
    def _gather_experts(self, only_selected: bool) -> dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        mine: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for moe in self.model.moe_layers():
            ex = moe.experts
            ids = (self.selected[moe.layer_id].global_ids if moe.layer_id in self.selected else []) \
                if only_selected else ex.expert_ids.tolist()
            for e in ids:
                i = int(ex.global_to_local[e])
                mine.setdefault(moe.layer_id, {})[e] = (ex.w13_weight[i].detach().clone(),
                                                        ex.w2_weight[i].detach().clone())
        if self.world == 1:
            return mine
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)  # only rank 0 writes the result
        merged: dict[int, dict] = {}
        for part in parts or []:
            for layer, ex in part.items():
                merged.setdefault(layer, {}).update(ex)
        return merged

    @torch.no_grad()
    def _frozen_changed(self) -> int:
        """ESFT invariant: tensors (or expert rows) that changed but are not selected. 0 expected."""
        ref = load_checkpoint(self.base, dtype=torch.float32, experts=self.owned if self.world > 1 else None,
                              with_mtp=True)
        now = dict(self.model.named_parameters())
        now.update(dict(self.model.named_buffers()))
        changed = 0
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            cur = now[name]
            if name.endswith("experts.w13_weight") or name.endswith("experts.w2_weight"):
                layer = next(m.layer_id for m in self.model.moe_layers()
                             if name.startswith(_module_prefix(self.model, m)))
                keep = torch.ones(cur.shape[0], dtype=torch.bool)
                if layer in self.selected:
                    keep[self.selected[layer].local_idx] = False
                changed += int(not torch.equal(cur[keep], t[keep]))
            elif name.endswith("expert_load"):
                continue  # a routing counter, not a weight
            else:
                changed += int(not torch.equal(cur, t))
        return int(_all_reduce(torch.tensor(changed)))

    def _write_outputs(self, summary: dict) -> None:
        job = self.job
        if job["mode"] == "esft":
            experts = self._gather_experts(only_selected=True)
            if self.rank == 0:
                path = save_patch(self.out / "patch", base_model_dir=self.base, domain=self.cfg["domain"],
                                  experts=experts, dtype=torch.float32,
                                  info={"job": self.cfg["job_name"], "steps": job["steps"],
                                        "scoring": job["esft"]["scoring"], "p": job["esft"]["p"],
                                        "eval_loss": summary.get("eval_loss_final")})
                summary["output"] = str(path)
        else:
            experts = self._gather_experts(only_selected=False)
            if self.rank == 0:
                full = load_checkpoint(self.base, dtype=torch.float32, with_mtp=len(self.model.model.mtp) > 0)
                dense = {k: v for k, v in self.model.state_dict().items() if ".experts." not in k}
                missing, unexpected = full.load_state_dict(dense, strict=False)
                assert not unexpected, unexpected
                for moe in full.moe_layers():
                    for e, (w13, w2) in experts[moe.layer_id].items():
                        moe.experts.w13_weight.data[e] = w13
                        moe.experts.w2_weight.data[e] = w2
                path = save_checkpoint(full, self.out / "model", dtype=torch.float32, tokenizer_dir=self.base)
                summary["output"] = str(path)

    # -- driver ----------------------------------------------------------------------------------
    def run(self) -> dict:
        job, cfg = self.job, self.cfg
        self._data()
        start = 0
        resumed = False
        if self.in_ray:
            import ray.train

            ckpt = ray.train.get_checkpoint()
            if ckpt is not None:
                with ckpt.as_directory() as d:
                    start = self.restore(Path(d))
                resumed = True
                log.info("rank %d of %d: resumed from the step-%d checkpoint written by %d workers", self.rank,
                         self.world, start, self.resumed_from_world)
        eval_initial = None
        if not resumed:
            eval_initial = self.evaluate()
            if job["mode"] == "esft":
                t0 = time.perf_counter()
                chosen, norm = self._score()
                self._setup_trainables(chosen)
                if self.rank == 0:
                    self.out.mkdir(parents=True, exist_ok=True)
                    (self.out / "esft_experts.json").write_text(json.dumps({
                        "scoring": job["esft"]["scoring"], "p": job["esft"]["p"],
                        "layers": {str(k): {"experts": v, "scores": [round(norm[k][e], 6) for e in v]}
                                   for k, v in chosen.items()}}, indent=1))
                    log.info("ESFT (%s, p=%.2f) selected %s experts per layer in %.1fs: %s", job["esft"]["scoring"],
                             job["esft"]["p"], {k: len(v) for k, v in chosen.items()}, time.perf_counter() - t0,
                             {k: v for k, v in chosen.items()})
            else:
                self._setup_trainables(None)
        n_expert = int(_all_reduce(torch.tensor(sum(p.numel() for p in self.expert_params))))
        self.trainable_params = n_expert + sum(p.numel() for p in self.dense_params)
        if self.rank == 0:
            log.info("trainable parameters: %d (mode %s, world %d)", self.trainable_params, job["mode"], self.world)
        self.model.train()
        batches = _tensor_batches(self.train_iterate, self.rows)
        for _ in range(start):  # skip what the restored steps consumed: same data position
            next(batches)
        history_file = self.out / "train_log.jsonl"
        fault = cfg.get("fault")
        tok_s_hist, loss = [], float("nan")
        step_metrics = {}
        for step in range(start + 1, job["steps"] + 1):
            if fault and self.rank == fault["rank"] and step == fault["step"] and not Path(fault["marker"]).exists():
                if self.in_ray:
                    # crash after the latest checkpoint is committed: a crash inside the commit window
                    # resumes from the checkpoint before it, which this test hook must not depend on
                    import ray.train

                    ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
                Path(fault["marker"]).write_text(f"killed rank {self.rank} at step {step}\n")
                if fault.get("hold"):  # the test takes a node away now; this rank waits to be killed
                    log.warning("fault injection: rank %d holds at step %d", self.rank, step)
                    time.sleep(180)  # not killed by then: exit as a plain failure rather than hang
                log.warning("fault injection: rank %d exits at step %d", self.rank, step)
                os._exit(1)
            t0 = time.perf_counter()
            ids, mask = next(batches)
            step_metrics = self._step(ids, mask)
            dt = time.perf_counter() - t0
            tok_s = job["batch_size"] * job["seq_len"] / dt
            tok_s_hist.append(tok_s)
            loss = step_metrics["loss"]
            fp = int(_all_reduce(ids.sum().reshape(1))[0])
            if self.rank == 0:
                log.info("step %d/%d loss %.4f (ce %.4f mtp %.4f bal %.5f) %.0f tok/s load max/mean %.2f",
                         step, job["steps"], loss, step_metrics["ce"], step_metrics["mtp"], step_metrics["balance"],
                         tok_s, step_metrics["load_max_over_mean"])
                self.out.mkdir(parents=True, exist_ok=True)
                with history_file.open("a") as fh:
                    fh.write(json.dumps({"step": step, "loss": loss, "tokens_per_s": tok_s, "data_fingerprint": fp,
                                         "world": self.world, "resumed_from": start if resumed else None}) + "\n")
            if self.in_ray and job["checkpoint_every"] and step % job["checkpoint_every"] == 0 and step < job["steps"]:
                self._save_checkpoint(step, {"step": step, "loss": loss})
        self.model.eval()
        eval_final = self.evaluate()
        summary = {"step": job["steps"], "mode": job["mode"], "world": self.world, "train_loss_final": loss,
                   "eval_loss_initial": eval_initial, "eval_loss_final": eval_final,
                   "tokens_per_s": float(np.median(tok_s_hist)) if tok_s_hist else None,
                   "resumed_from": start if resumed else None,
                   "resumed_from_world": self.resumed_from_world if resumed else None}
        if self.dense_params:
            summary["dense_replicas_agree"] = self._dense_replicas_agree()
        summary["trainable_params"] = self.trainable_params
        summary["optimizer_state_bytes_rank0"] = self._optimizer_state_bytes()
        if job["mode"] == "esft":
            summary["experts_selected"] = {str(k): len(v) for k, v in (self.selection or {}).items()}
            summary["frozen_changed"] = self._frozen_changed()
        self._write_outputs(summary)
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if self.in_ray:
            import ray.train

            ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        return summary


def _module_prefix(model, moe) -> str:
    for name, m in model.named_modules():
        if m is moe:
            return name + "."
    raise AssertionError("MoE module not in model")


def train_loop(config: dict) -> dict:
    """Train one job. ``config``: job (TrainJobConfig as a dict), job_name, domain, base_model (dir),
    output_dir; in one process also ``local_rows`` = (train, eval) packed rows; optional ``fault``
    {rank, step, marker, hold?} (tests: once the latest checkpoint is committed, that rank exits at
    that step, or with ``hold`` waits there to be killed with its node). Returns the summary."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _Trainer(config).run()
