"""Re-shardable fine-tuning checkpoints: written by W ranks, restored by any W' ranks.

The whole checkpoint contract is here: the format, and the orchestration the trainer calls
(``write_checkpoint`` / ``report_checkpoint`` every ``checkpoint_every`` steps, ``restore`` when Ray
Train hands an attempt a checkpoint). What it saves is a ``Trainables``: what this rank trains
and the optimizers that step it.

Tensors are saved from CPU copies, so a checkpoint written on GPUs restores on any device. A
checkpoint is one directory; every rank writes its files into its own temporary directory and
reports it with ``ray.train.report``, and Ray merges them (registering it only once every rank has
reported, so a rank dying mid-write leaves no half-written checkpoint), so every rank of a later
attempt sees all of them. Nothing in it depends on the writer's world size:

- ``state.json`` (rank 0): the step, the writer's world size, the job settings a resume must share.
- ``global.pt`` (rank 0): what every rank holds the same copy of: router biases, the ESFT
  selection, the AdamW step, the learning-rate schedulers.
- ``experts-rank{r}.pt``: the routed expert rows rank r trained, keyed by GLOBAL expert id:
  ``"{layer}.{expert}.{w13|w2}"`` plus ``".exp_avg"`` / ``".exp_avg_sq"`` for the AdamW moments. A
  restoring rank loads these files memory-mapped and copies only the rows it owns now.
- ``mtp.pt`` (rank 0; esft and mtp modes when the MTP module trains): its replicated non-expert
  tensors in fp32 with their AdamW moments, by HF name.
- ``dense-rank{r}.pt`` (full mode): the dense (data-parallel) parameters in fp32 with their AdamW
  moments, whole tensors keyed by parameter name. DeepSpeed's own ZeRO checkpoint only loads at the
  same data-parallel size, so it is not used. Under ZeRO 1/2 each parameter is reassembled from the
  ranks' partitions with ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
  (collective: an all-reduce over the data-parallel group, so every rank calls them in the same
  order; works on gloo); parameter i is written by rank i % W so the files spread over the ranks.

One AdamW step count for everything. The trainer gives every expert parameter a gradient each
step (zeros where no token reached it, as Megatron's dense expert gradients do) and DeepSpeed does
the same for dense parameters without a gradient, so every AdamW state has step == the number of
optimizer steps, stored once. A zero gradient still moves a weight (the moments decay, weight decay
applies), exactly as a row of a stacked expert tensor that got no tokens always did.

Restoring dense state under ZeRO 1/2 has no public DeepSpeed call that creates the optimizer state
of a fresh engine (torch AdamW creates it lazily at the first step), so ``load_dense_state``
creates it (zeros of the flat fp32 partition, the step), links it with the engine's
``_lazy_init_hp_params_optimizer_state`` (checked on deepspeed 0.19.8) and then writes every
parameter's fragment with ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` (local:
each rank writes its own partition). ZeRO stage 0 is a plain torch AdamW: state by parameter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from expertpool.jobs.esft import SelectedExperts
from expertpool.model.transformer import Transformer
from expertpool.platform.config import TrainJobConfig

FORMAT = 2  # format 1 (before re-sharding) kept DeepSpeed ZeRO shards and per-rank expert lists
MOMENTS = ("exp_avg", "exp_avg_sq")
# job settings a resumed run must share with the checkpoint's run: the data position is step x
# batch_size sequences of seq_len tokens, and the optimizer state belongs to this mode and model
RESUME_FIELDS = ("mode", "batch_size", "seq_len", "base_model")


@dataclass
class ExpertRows:
    """One layer's trainable routed-expert tensors on this rank: row i of ``w13`` [n, 2F, D] and ``w2``
    [n, D, F] is global expert ``ids[i]``. Full mode: the stacked ``Experts`` weights; ESFT: the
    ``SelectedExperts`` copies."""
    layer: int
    ids: list[int]
    w13: nn.Parameter
    w2: nn.Parameter

    def params(self) -> dict[str, nn.Parameter]:
        return {"w13": self.w13, "w2": self.w2}


@dataclass
class Trainables:
    """What this rank trains and the optimizers that step it (built by ``Trainer.setup_trainables``)."""
    expert_groups: list[ExpertRows]  # the trainable routed-expert rows, by global id
    dense_named: list[tuple[str, nn.Parameter]]  # the data-parallel parameters (full mode; empty in ESFT)
    expert_opt: torch.optim.Optimizer | None = None  # torch AdamW over the expert rows
    expert_sched: torch.optim.lr_scheduler.LRScheduler | None = None
    engine: Any = None  # DeepSpeed engine over the dense parameters (full mode), with its optimizer and scheduler
    selection: dict[int, list[int]] | None = None  # ESFT: the selected experts per layer (global ids, every rank)
    selected: dict[int, SelectedExperts] = field(default_factory=dict)  # ESFT: this rank's trainable copies
    mtp_named: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # MTP non-expert tensors (esft, mtp)
    mtp_opt: torch.optim.Optimizer | None = None  # torch AdamW over them (replicated: every rank the same)
    mtp_sched: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def mtp_params(self) -> list[nn.Parameter]:
        return [p for _, p in self.mtp_named]

    @property
    def expert_params(self) -> list[nn.Parameter]:
        return [p for g in self.expert_groups for p in g.params().values()]

    @property
    def dense_params(self) -> list[nn.Parameter]:
        return [p for _, p in self.dense_named]


def adam_state(like: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
    """A torch AdamW state entry (the layout ``torch.optim.AdamW`` creates lazily), moments zero."""
    # the step is a default-dtype scalar tensor, as AdamW makes it when not fused/capturable
    return {"step": torch.tensor(float(step)), "exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like)}


def uniform_step(states: Iterable[Mapping[str, torch.Tensor]]) -> int | None:
    """The one AdamW step count of these states (None if there are none). Asserts they agree."""
    steps = {int(st["step"]) for st in states}
    assert len(steps) <= 1, f"AdamW states with different step counts {sorted(steps)}: a parameter missed a step"
    return steps.pop() if steps else None


# ---------------------------------------------------------------------------------------------- experts

def _key(layer: int, expert: int, name: str) -> str:
    return f"{layer}.{expert}.{name}"


def expert_rows_state(groups: list[ExpertRows], opt: torch.optim.Optimizer | None) -> dict[str, torch.Tensor]:
    """This rank's expert rows and their AdamW moments by global id (each row cloned: saving a view
    would write the whole stacked tensor)."""
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        for name, p in g.params().items():
            st = opt.state[p]
            for i, e in enumerate(g.ids):
                out[_key(g.layer, e, name)] = p.detach()[i].cpu().clone()
                for m in MOMENTS:
                    out[_key(g.layer, e, f"{name}.{m}")] = st[m][i].cpu().clone()
    return out


def read_expert_rows(files: Iterable[Path], groups: list[ExpertRows]) -> dict[str, torch.Tensor]:
    """The saved rows of the experts in ``groups`` from every rank's file (memory-mapped: only the
    rows this rank owns are read)."""
    wanted = {(g.layer, e) for g in groups for e in g.ids}
    rows: dict[str, torch.Tensor] = {}
    for f in files:
        for k, t in torch.load(f, mmap=True, weights_only=True).items():
            layer, expert, _ = k.split(".", 2)
            if (int(layer), int(expert)) in wanted:
                rows[k] = t
    return rows


@torch.no_grad()
def load_expert_rows(groups: list[ExpertRows], opt: torch.optim.Optimizer | None, rows: Mapping[str, torch.Tensor],
                     step: int, source: str = "checkpoint") -> None:
    """Copy the saved rows and moments into this rank's expert parameters and create their AdamW state
    at ``step``. Raises if the checkpoint lacks an expert this rank trains."""
    for g in groups:
        for name, p in g.params().items():
            st = adam_state(p, step)
            for i, e in enumerate(g.ids):
                key = _key(g.layer, e, name)
                if key not in rows:
                    raise ValueError(f"{source}: no saved state for expert {e} of layer {g.layer} ({name}); the "
                                     "checkpoint belongs to another job or selection; resume from this job's "
                                     "output_dir or start without --resume")
                p[i].copy_(rows[key])
                for m in MOMENTS:
                    st[m][i].copy_(rows[f"{key}.{m}"])
            opt.state[p] = st


# ---------------------------------------------------------------------------------------------- dense

def _is_zero_partitioned(params: list[nn.Parameter]) -> bool:
    """ZeRO 1/2 links every parameter to its fp32 partition (``_hp_mapping``); stage 0 does not."""
    return any(hasattr(p, "_hp_mapping") for p in params)


def dense_state(engine, named: list[tuple[str, nn.Parameter]]) -> dict[str, dict[str, torch.Tensor]]:
    """The dense fp32 parameters and AdamW moments, whole, by name: the ones this rank writes (index
    i % W == rank). Collective under ZeRO 1/2: every rank must call it with the same parameters."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    params = [p for _, p in named]
    zero = _is_zero_partitioned(params)
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i, (name, p) in enumerate(named):
        if zero:  # all-reduces of the partitions: every rank takes part, one keeps the result
            full = {"fp32": safe_get_full_fp32_param(p)} | {m: safe_get_full_optimizer_state(p, m) for m in MOMENTS}
        else:
            st = engine.optimizer.state[p]
            full = {"fp32": p.detach()} | {m: st[m] for m in MOMENTS}
        if i % world == rank:
            out[name] = {k: v.detach().float().cpu().clone() for k, v in full.items()}
    return out


def dense_step(engine, params: list[nn.Parameter]) -> int:
    """The AdamW step count of the dense optimizer (one flat fp32 partition per group under ZeRO 1/2)."""
    if _is_zero_partitioned(params):
        opt = engine.optimizer
        return uniform_step(opt.optimizer.state[flat] for flat in opt.single_partition_of_fp32_groups)
    return uniform_step(engine.optimizer.state[p] for p in params)


@torch.no_grad()
def load_dense_state(engine, named: list[tuple[str, nn.Parameter]], saved: Mapping[str, Mapping[str, torch.Tensor]],
                     step: int, source: str = "checkpoint") -> None:
    """Set the dense parameters (model copy and fp32 master), their moments and the AdamW step from
    whole saved tensors, on a freshly initialized engine. Local: no collectives."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    missing = [name for name, _ in named if name not in saved]
    if missing:
        raise ValueError(f"{source}: no saved dense state for {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                         "the checkpoint belongs to another model or mode; start without --resume")
    params = [p for _, p in named]
    if _is_zero_partitioned(params):
        opt = engine.optimizer  # DeepSpeedZeroOptimizer around torch AdamW over flat fp32 partitions
        for flat in opt.single_partition_of_fp32_groups:
            opt.optimizer.state[flat] = adam_state(flat, step)
        opt._lazy_init_hp_params_optimizer_state()  # link each parameter's fragment views into that state
        for name, p in named:
            s = saved[name]
            p.copy_(s["fp32"])  # the model's copy (a view into ZeRO's flat buffer)
            safe_set_full_fp32_param(p, s["fp32"])  # this rank's fp32 master partition
            for m in MOMENTS:
                safe_set_full_optimizer_state(p, s[m], m)
    else:
        for name, p in named:
            s = saved[name]
            p.copy_(s["fp32"])
            st = adam_state(p, step)
            for m in MOMENTS:
                st[m].copy_(s[m])
            engine.optimizer.state[p] = st


# ---------------------------------------------------------------------------------------------- schedulers

@torch.no_grad()
def load_scheduler(sched: torch.optim.lr_scheduler.LRScheduler, state: dict) -> None:
    """Load a scheduler's state and put its last learning rate into the optimizer's groups (a scheduler
    state_dict does not carry them; a fresh optimizer still has the initial lr)."""
    sched.load_state_dict(state)
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr


# ---------------------------------------------------------------------------------------------- files

def write_state(directory: Path, step: int, world: int, job: TrainJobConfig) -> None:
    (directory / "state.json").write_text(json.dumps({
        "format": FORMAT, "step": step, "world": world, "job": {k: getattr(job, k) for k in RESUME_FIELDS}}))


def read_state(directory: Path, job: TrainJobConfig) -> dict:
    """The checkpoint's state.json, checked against this job: raises naming the field that differs."""
    state = json.loads((directory / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise ValueError(f"{directory}: checkpoint format {state.get('format', 1)}, this version reads {FORMAT}; "
                         "start the job without --resume (or with a new output_dir)")
    for k in RESUME_FIELDS:
        if state["job"].get(k) != getattr(job, k):
            raise ValueError(f"{directory}: the checkpoint was written with {k} = {state['job'].get(k)!r}, this "
                             f"job has {getattr(job, k)!r}; set {k} back to resume it, or start without --resume")
    return state


def rank_files(directory: Path, kind: str) -> list[Path]:
    """Every rank's ``{kind}-rank{r}.pt`` in the merged checkpoint directory, by rank."""
    return sorted(directory.glob(f"{kind}-rank*.pt"), key=lambda f: int(f.stem.rsplit("rank", 1)[1]))


# ---------------------------------------------------------------------------------------------- orchestration

def write_checkpoint(d: Path, step: int, t: Trainables, model: Transformer, job: TrainJobConfig) -> None:
    """Write this rank's part of the checkpoint after ``step`` into ``d``. Collective: every rank calls it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    if t.expert_opt is not None:
        assert uniform_step(t.expert_opt.state[p] for p in t.expert_params) == step, \
            "an expert AdamW state missed a step"
    if t.engine is not None:
        assert dense_step(t.engine, t.dense_params) == step, "the dense AdamW missed a step"
    torch.save(expert_rows_state(t.expert_groups, t.expert_opt), d / f"experts-rank{rank}.pt")
    if t.engine is not None:
        torch.save(dense_state(t.engine, t.dense_named), d / f"dense-rank{rank}.pt")
    # every rank runs the same schedule; in ESFT rank 0 may train no expert: take the first one's
    scheds = [None] * world
    dist.all_gather_object(scheds, t.expert_sched.state_dict() if t.expert_sched else None)
    if rank == 0:
        if t.mtp_opt is not None:
            torch.save({name: {"fp32": p.detach().cpu().clone()} | {m: t.mtp_opt.state[p][m].cpu().clone()
                                                                   for m in MOMENTS} for name, p in t.mtp_named},
                       d / "mtp.pt")
        torch.save({"adam_step": step, "selection": t.selection,
                    "mtp_sched": t.mtp_sched.state_dict() if t.mtp_sched is not None else None,
                    "expert_sched": next((x for x in scheds if x is not None), None),
                    "dense_sched": t.engine.lr_scheduler.state_dict() if t.engine is not None else None,
                    "router_bias": {m.layer_id: m.gate.e_score_correction_bias.cpu().clone()
                                    for m in model.moe_layers()}}, d / "global.pt")
        write_state(d, step, world, job)


def report_checkpoint(step: int, metrics: dict, t: Trainables, model: Transformer, job: TrainJobConfig) -> None:
    """Write the checkpoint to a fresh local directory and report it with ``ray.train.report``: Ray
    registers it only once every rank has reported. Collective."""
    import ray.train

    tmp = Path(tempfile.mkdtemp(prefix="expertpool-ckpt-"))
    try:
        write_checkpoint(tmp, step, t, model, job)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(tmp)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore(d: Path, job: TrainJobConfig, model: Transformer,
            setup: Callable[[dict[int, list[int]] | None], Trainables]) -> tuple[Trainables, int, int]:
    """Set up the trainables (``setup(selection)``, with the checkpoint's ESFT selection) and load them
    from the checkpoint in ``d``, written by any world size, taking the expert rows this rank owns
    now; the router biases go into ``model``. Returns (trainables, the step to continue after, the
    writer's world size). No collectives of its own."""
    state = read_state(d, job)
    glob = torch.load(d / "global.pt", weights_only=True)
    t = setup(glob["selection"] if job.mode in ("esft", "mtp") else None)
    if t.expert_opt is not None:
        rows = read_expert_rows(rank_files(d, "experts"), t.expert_groups)
        load_expert_rows(t.expert_groups, t.expert_opt, rows, glob["adam_step"], source=str(d))
        load_scheduler(t.expert_sched, glob["expert_sched"])
    if t.engine is not None:
        saved: dict = {}
        for f in rank_files(d, "dense"):
            saved.update(torch.load(f, mmap=True, weights_only=True))
        load_dense_state(t.engine, t.dense_named, saved, glob["adam_step"], source=str(d))
        load_scheduler(t.engine.lr_scheduler, glob["dense_sched"])
    if t.mtp_opt is not None:
        if not (d / "mtp.pt").exists():
            raise ValueError(f"{d}: no mtp.pt, but this job trains the MTP module; the checkpoint belongs to a "
                             "run with mtp_loss_weight 0; set it back or start without --resume")
        saved = torch.load(d / "mtp.pt", weights_only=True)
        with torch.no_grad():
            for name, p in t.mtp_named:
                p.copy_(saved[name]["fp32"])
                st = adam_state(p, glob["adam_step"])
                for m in MOMENTS:
                    st[m].copy_(saved[name][m])
                t.mtp_opt.state[p] = st
        load_scheduler(t.mtp_sched, glob["mtp_sched"])
    with torch.no_grad():
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.copy_(glob["router_bias"][m.layer_id])
            if m.layer_id in t.selected:
                t.selected[m.layer_id].write_back(m.experts)
    return t, int(state["step"]), int(state["world"])
