"""Shared helpers for the fine-tuning tests: a one-job cluster.yaml on the demo data, and its step log."""

import json
from pathlib import Path

from expertpool.jobs import finetune
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
