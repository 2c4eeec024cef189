"""Shared helpers for the fine-tuning tests: a one-job cluster.yaml on the demo data, its step log, and
a hook that records how a run held its weights."""

import json
from pathlib import Path

from expertpool.jobs import finetune
from expertpool.jobs.hooks import TrainHook
from expertpool.jobs.plan import TrainPlan

ROOT = Path(__file__).resolve().parents[2]


def job_config(tmp_path, tiny_dir, body: str) -> TrainPlan:
    """Write a cluster.yaml with job ``t`` (base = tiny_dir, demo data, output under tmp_path) plus the
    YAML lines of ``body``, and return the prepared job's plan."""
    (tmp_path / "c.yaml").write_text(
        f"train:\n  jobs:\n    t:\n      base_model: {tiny_dir}\n"
        f"      dataset: {{path: {ROOT / 'data/demo_domain.jsonl'}, eval_fraction: 0.1}}\n"
        f"      output_dir: {tmp_path / 'out'}\n"
        + "".join(f"      {line}\n" for line in body.strip().splitlines()))
    return finetune.prepare(str(tmp_path / "c.yaml"), "t")


def train_log(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


class Formats(TrainHook):
    """Adds to the summary, at the end of the run, the formats and devices the trainer held its weights
    and optimizer in, and the collective backend (picklable: travels to Ray Train workers)."""

    def after_run(self, trainer, summary: dict) -> None:
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        ex = trainer.model.moe_layers()[0].experts
        summary["stacked_dtype"] = str(ex.w13_weight.dtype)
        summary["trainable_dtypes"] = sorted({str(p.dtype) for p in trainer.trainables.expert_params})
        summary["optimized"] = sum(p.numel() for p in trainer.trainables.expert_params)
        summary["device"] = str(trainer.device)
        summary["weights_on"] = str(ex.w13_weight.device.type)
        summary["backend"] = dist.get_backend()
        summary["deepspeed_accelerator"] = get_accelerator()._name if trainer.trainables.engine is not None else None
