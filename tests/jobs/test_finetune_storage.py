"""Fine-tuning against object storage (the loopback S3 server, a real one, not a mocked client): the base
checkpoint from s3:// (each worker fetches only its shards), and every output in s3://: Ray Train's
checkpoints (its storage_path), the step log, the summary and the ESFT patch, which `--resume` and
`read_patch` then find there. Shares the session's Ray cluster."""

import json

import pytest
import torch

from expertpool.jobs import finetune
from expertpool.model.checkpoint import load_checkpoint, save_checkpoint
from expertpool.model.patch import read_patch
from expertpool.model.storage import listdir, read_text, upload_dir
from tests.jobs.helpers import ROOT

pytestmark = pytest.mark.ray


def test_esft_from_s3_to_s3_and_resume_from_there(ray_cluster, s3, tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EXPERTPOOL_CACHE", str(tmp_path / "cache"))  # the driver's cache (workers: their own)
    s3.create_bucket("ckpt")
    s3.create_bucket("runs")
    sharded = save_checkpoint(load_checkpoint(tiny_dir, dtype=torch.bfloat16), tmp_path / "tiny",
                              max_shard_bytes=200_000, tokenizer_dir=tiny_dir)
    upload_dir(sharded, "s3://ckpt/tiny", last=["config.json"])
    (tmp_path / "c.yaml").write_text(f"""
train:
  storage_path: s3://runs/team
  jobs:
    law:
      base_model: s3://ckpt/tiny
      dataset: {{path: {ROOT / 'data/demo_domain.jsonl'}, eval_fraction: 0.1}}
      mode: esft
      esft: {{scoring: token, score_tokens: 768}}
      lr: 1.0e-2
      steps: 3
      batch_size: 2
      seq_len: 384
      workers: 2
      worker_resources: {{cpu: 1}}
      checkpoint_every: 2
""")
    plan = finetune.prepare(str(tmp_path / "c.yaml"), "law")
    assert plan.output_dir == "s3://runs/team/law" and plan.ray_storage == "s3://runs/team/law/ray"
    s = finetune.run_ray(plan)
    assert s["step"] == 3 and s["output"] == "s3://runs/team/law/patch"
    patch = read_patch(s["output"])
    assert patch.base_model == "s3://ckpt/tiny" and 0 < patch.num_experts
    assert patch.base_fingerprint == read_patch(s["output"], base_model_dir=sharded).base_fingerprint
    log = [json.loads(line) for line in read_text("s3://runs/team/law/train_log.jsonl").splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert json.loads(read_text("s3://runs/team/law/summary.json"))["step"] == 3
    assert "esft_experts.json" in listdir("s3://runs/team/law")
    runs = [name for name, (is_dir, _) in listdir(plan.ray_storage).items() if is_dir]
    assert len(runs) == 1 and "checkpoint_manager_snapshot.json" in listdir(f"{plan.ray_storage}/{runs[0]}")
    # --resume finds the run (and its step-2 checkpoint) in object storage
    assert finetune.resumable_run(plan.ray_storage, "law") == runs[0]
    more = plan.job.model_copy(update={"steps": 4})
    s2 = finetune.run_ray(finetune.TrainPlan(**{**plan.__dict__, "job": more}), resume=True)
    assert s2["resumed_from"] == 2 and s2["step"] == 4
    log = [json.loads(line) for line in read_text("s3://runs/team/law/train_log.jsonl").splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4]  # continues the log stored there
