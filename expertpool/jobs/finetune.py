"""Fine-tune a DeepSeek-V3-class MoE on the expert-parallel pool: ESFT or full, as a Ray Train job.

    ray job submit --working-dir . -- python -m expertpool.jobs.finetune --config cluster.yaml --job demo
    python -m expertpool.jobs.finetune --config cluster.yaml --job demo --local   # one process, no Ray

Order of work: validate everything a user can get wrong (job name, dataset, experts vs workers,
seq_len, ESFT p, publishing) before any worker starts, and exit 2 with the message; then Ray Data
reads, tokenizes and packs the data; a ``TorchTrainer`` runs ``jobs.train.train_loop`` on
``workers`` gloo/nccl workers (elastic: ``min_workers``..``workers``) with
``FailureConfig(max_failures)``; rank 0 writes the result (``<output_dir>/patch`` for ESFT and MTP,
``<output_dir>/model`` for full), ``summary.json`` and ``train_log.jsonl``; finally the patch is
published to the serving app when ``publish_to`` is set. ``prepare`` hands the workers a
``jobs.plan.TrainPlan``; ``--check-frozen`` adds the ESFT invariant check (``jobs.hooks.FrozenCheck``).

Runs. Each submission is a new Ray Train run under ``<output_dir>/ray`` (the run name carries a
timestamp): a restarted worker group resumes from the run's latest checkpoint, whatever its worker
count. ``--resume`` instead continues the newest earlier run of the job that has a checkpoint: Ray
Train V2 restores a run's checkpoints when a trainer reuses its name and storage path, so the
resubmitted job starts from that run's latest checkpoint, with any worker count. Without one it
starts a new run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from expertpool.errors import UserError
from expertpool.jobs.plan import TrainPlan
from expertpool.model import storage

if TYPE_CHECKING:  # the hooks module imports torch; this one stays light until a run starts
    from expertpool.jobs.hooks import TrainHook

log = logging.getLogger("expertpool.finetune")


class JobError(UserError, ValueError):
    """A job setting that cannot run; the message names the field and the fix."""


def prepare(config_path: str, job_name: str, *, publish: bool = True, base_dir: str | None = None) -> TrainPlan:
    """Validate the job and resolve everything the workers need. Raises ConfigError / JobError.

    Relative paths (base model, dataset, output) resolve against ``base_dir`` (default: the cwd)."""
    from expertpool.model.args import ModelArgs
    from expertpool.platform.config import load_config

    cfg = load_config(config_path)
    job = cfg.get_job(job_name)
    base_dir = Path(base_dir or os.getcwd())
    dataset = job.check_dataset(base_dir)
    prefix = f"{cfg.source}: train.jobs.{job_name}"
    if job.base_model is None:
        from expertpool.model.embedded import ensure_embedded_model

        base = str(ensure_embedded_model())
    elif storage.is_remote(job.base_model):
        base = job.base_model
    else:
        base = str(base_dir / Path(job.base_model).expanduser())  # an absolute path stays as it is
    try:
        meta = storage.resolve_model(base, weights=False)  # config and tokenizer only: the workers fetch weights
    except storage.StorageError as e:
        raise JobError(f"{prefix}.base_model: {e}") from None
    if not (meta / "config.json").exists():
        raise JobError(f"{prefix}.base_model: '{base}' has no config.json; point base_model at an HF checkpoint "
                       "directory or remove it to use the embedded tiny model")
    args = ModelArgs.from_dir(meta)
    job.resolved_experts_per_worker(args.n_routed_experts)
    if job.seq_len > args.max_position_embeddings:
        raise JobError(f"{prefix}.seq_len: ({job.seq_len}) exceeds the model's max_position_embeddings "
                       f"({args.max_position_embeddings}); set seq_len to at most {args.max_position_embeddings}")
    if job.mode in ("esft", "mtp") and job.router_bias_rate > 0:
        raise JobError(f"{prefix}.router_bias_rate: ({job.router_bias_rate}) updates the router, but a {job.mode} "
                       "patch holds no router, so the change would be lost; set router_bias_rate: 0 or mode: full")
    if job.mode == "mtp" and not args.num_nextn_predict_layers:
        raise JobError(f"{prefix}.mode: mtp trains the multi-token-prediction module, and {base} has none "
                       "(num_nextn_predict_layers = 0); use a checkpoint with an MTP layer or another mode")
    if publish and job.publish_to:
        if job.mode == "full":
            raise JobError(f"{prefix}.publish_to: only ESFT and MTP patches can be hot-swapped; remove publish_to "
                           "or set mode: esft (serve a full fine-tune as its own model.path)")
    from expertpool.platform.memory_plan import train_memory_plan

    plan = train_memory_plan(job, args)
    if plan.problem:
        raise JobError(f"{prefix}: {plan.problem}")
    out = cfg.train.output_location(job_name)
    data_path = Path(dataset.path)
    if not data_path.is_absolute():
        data_path = base_dir / data_path
    return TrainPlan(job_name=job_name, job=job, dataset=dataset.model_copy(update={"path": str(data_path)}),
                     base_model=base, output_dir=out, publish_to=job.publish_to if publish else None)


def _too_little_data(plan: TrainPlan, n_rows: int) -> JobError:
    j = plan.job
    return JobError(f"train.jobs.{plan.job_name}.batch_size: the training data packs into {n_rows} sequences "
                    f"of {j.seq_len} tokens, fewer than one global batch ({j.batch_size}); lower batch_size or "
                    "seq_len, or add data")


def _fresh_outputs(plan: TrainPlan, resume: bool = False) -> None:
    """A new run starts a new log; worker restarts within a run, and resumed runs, append to it (for
    a URI output_dir, to the log stored there: rank 0 pulls it at its start)."""
    if not plan.remote_output:
        plan.local_output.mkdir(parents=True, exist_ok=True)
    for name in ("summary.json",) if resume else ("train_log.jsonl", "summary.json"):
        storage.remove(plan.output(name))


def resumable_run(runs: str, job_name: str) -> str | None:
    """The name of the newest Ray Train run of ``job_name`` under ``runs`` (a path or URI) that registered
    a checkpoint (Ray Train keeps ``checkpoint_manager_snapshot.json`` in the run directory), or None."""
    run = re.compile(rf"{re.escape(job_name)}-\d{{8}}-\d{{6}}")  # the names run_ray gives (not job 'a-b' for 'a')
    root = storage.parse(runs, hub=False)
    found = []
    for name, (is_dir, _) in storage.listdir(runs).items():
        if is_dir and run.fullmatch(name):
            entries = storage.listdir(root.join(name))
            if "checkpoint_manager_snapshot.json" in entries:
                found.append((entries["checkpoint_manager_snapshot.json"][1], name))
    return max(found)[1] if found else None


def run_local(plan: TrainPlan, hooks: Sequence[TrainHook] = ()) -> dict:
    """The one-process path: same data functions, ``train_loop`` called directly (world 1)."""
    from expertpool.jobs.data import LocalRows, local_rows
    from expertpool.jobs.train import train_loop

    if plan.job.workers != 1:
        log.info("--local runs one process: workers %d -> 1 (all experts local)", plan.job.workers)
        plan = plan.for_one_process()
    d, j = plan.dataset, plan.job
    train, evals = local_rows(d.path, d.format, d.field, plan.base_model, j.seq_len, d.eval_fraction)
    if len(train["input_ids"]) < j.batch_size:
        raise _too_little_data(plan, len(train["input_ids"]))
    _fresh_outputs(plan)
    return train_loop(plan, LocalRows(train, evals), hooks)


def run_ray(plan: TrainPlan, *, hooks: Sequence[TrainHook] = (), run_name: str | None = None,
            resume: bool = False) -> dict:
    """Run the job as a Ray Train ``TorchTrainer`` on the connected Ray cluster; returns the summary.

    ``resume``: continue the newest earlier run of this job in ``<output_dir>/ray`` from its latest
    checkpoint (see the module docstring); ``run_name`` names the run explicitly instead. ``hooks``
    travel to every worker (picklable)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    from expertpool.jobs.data import RayShards, ray_datasets
    from expertpool.jobs.train import train_loop

    d, j = plan.dataset, plan.job
    train_ds, eval_ds = ray_datasets(d.path, d.format, d.field, None if plan.embedded_base else plan.base_model,
                                     j.seq_len, d.eval_fraction)
    n_rows = train_ds.count()
    if n_rows < j.batch_size:
        raise _too_little_data(plan, n_rows)
    datasets = {"train": train_ds} | ({"eval": eval_ds} if eval_ds is not None else {})
    if run_name is None and resume:
        run_name = resumable_run(plan.ray_storage, plan.job_name)
        log.info("--resume: %s", f"continuing run {run_name} from its latest checkpoint" if run_name else
                 f"no earlier run of {plan.job_name} with a checkpoint in {plan.ray_storage}; starting a new one")
    _fresh_outputs(plan, resume=run_name is not None and resume)
    low, high = plan.worker_range
    trainer = TorchTrainer(
        # no train_loop_config: the plan, the data shards and the hooks are bound here (Ray pickles them)
        functools.partial(train_loop, plan, RayShards(has_eval=eval_ds is not None), tuple(hooks)),
        # a (min, max) range makes Ray Train elastic: it starts or restarts on as many workers as it
        # can get in the range; every world size restores the same checkpoint (jobs.train_state)
        # use_gpu: Ray Train then reserves the GPUs, sets each worker's device and picks NCCL
        scaling_config=ray.train.ScalingConfig(num_workers=(low, high) if low < high else high,
                                               use_gpu=j.worker_resources.gpu > 0,
                                               resources_per_worker=j.worker_resources.bundle()),
        run_config=ray.train.RunConfig(
            name=run_name or f"{plan.job_name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=plan.ray_storage,  # checkpoints: a shared path or a URI outlives the cluster
            failure_config=ray.train.FailureConfig(max_failures=j.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
        # not split: every worker reads the same ordered global batches and keeps its slice, so the
        # data position after a restart is a function of the step
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ExecutionOptions(preserve_order=True)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return json.loads(storage.read_text(plan.output("summary.json")))  # written by rank 0 at the end


def _log_summary(s: dict) -> None:
    log.info("done: %d steps (%s, %d workers%s), train loss %.4f, eval loss %s -> %s, %.0f tokens/s, %s%s",
             s["step"], s["mode"], s["world"],
             f"; resumed at step {s['resumed_from']} from {s['resumed_from_world']} workers" if s["resumed_from"]
             else "", s["train_loss_final"],
             None if s["eval_loss_initial"] is None else round(s["eval_loss_initial"], 4),
             None if s["eval_loss_final"] is None else round(s["eval_loss_final"], 4),
             s["tokens_per_s"] or 0, s.get("output"),
             f", {sum(s['experts_selected'].values())} experts selected" if "experts_selected" in s else "")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m expertpool.jobs.finetune", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="cluster.yaml", help="cluster.yaml with the job under train.jobs, or "
                   "env:VAR for the YAML in an environment variable, as generated RayJobs pass it "
                   "(default: %(default)s)")
    p.add_argument("--job", required=True, help="name of the job under train.jobs")
    p.add_argument("--local", action="store_true", help="run in this process (one worker, no Ray) instead of "
                   "as a Ray Train job")
    p.add_argument("--no-publish", action="store_true", help="do not publish the patch to the serving app even "
                   "if the job sets publish_to")
    p.add_argument("--resume", action="store_true", help="continue the newest earlier run of this job in "
                   "<output_dir>/ray from its latest checkpoint (after a cluster restart or a cancelled job; the "
                   "worker count may differ; mode, batch_size, seq_len and base_model must not) instead of "
                   "starting over; starts a new run if there is none")
    p.add_argument("--address", default=None, help="Ray address to connect to (default: RAY_ADDRESS, a running "
                   "local cluster, or a new local instance)")
    p.add_argument("--check-frozen", action="store_true", help="ESFT: after training, reload the base checkpoint "
                   "and count the tensors outside the selected experts that changed (summary frozen_changed, 0 "
                   "expected); costs one more load of the base model per worker")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    a = build_parser().parse_args(argv)
    from expertpool.jobs.hooks import FrozenCheck
    from expertpool.model.args import ConfigError as ModelConfigError
    from expertpool.platform.config import ConfigError

    try:
        plan = prepare(a.config, a.job, publish=not a.no_publish)
    except (ConfigError, JobError, ModelConfigError, storage.StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    hooks = [FrozenCheck()] if a.check_frozen else []
    if a.local:
        if a.resume:
            print("error: --resume continues a Ray Train run; --local runs have no checkpoints", file=sys.stderr)
            return 2
        summary = run_local(plan, hooks)
    else:
        import ray

        if not ray.is_initialized():
            ray.init(address=a.address, include_dashboard=False, logging_level=logging.WARNING)
        summary = run_ray(plan, hooks=hooks, resume=a.resume)
    _log_summary(summary)
    if plan.publish_to:
        from expertpool.platform.patches import AppNotRunning, publish
        try:
            model_id = publish(plan.publish_to, summary["output"], plan.domain)
            log.info("published %s to app %s as %s", summary["output"], plan.publish_to, model_id)
        except AppNotRunning as e:  # the patch is saved; publishing can follow once the app runs
            log.warning("not published: %s. The patch is saved; publish it later with "
                        "`expertpool publish --patch %s --app %s`", e, summary["output"], plan.publish_to)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
