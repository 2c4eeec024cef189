"""Ray Train integration: 2-worker ESFT and full fine-tuning on the tiny model, a worker killed
mid-run, and Ray Data rows equal to the one-process rows. Shares the session's Ray cluster."""

import dataclasses
import json

import pytest
import torch

from expertpool.jobs import finetune
from expertpool.jobs.hooks import FrozenCheck
from expertpool.jobs.plan import TrainPlan
from expertpool.model.checkpoint import load_checkpoint
from expertpool.model.patch import read_patch
from tests.jobs.faults import ExitAt
from tests.jobs.helpers import ROOT, job_config, train_log

pytestmark = pytest.mark.ray


def _job(tmp_path, tiny_dir, body: str) -> TrainPlan:
    return job_config(tmp_path, tiny_dir, "worker_resources: {cpu: 1}\n" + body)


def test_ray_data_rows_equal_local_rows(ray_cluster, tiny_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from expertpool.jobs.data import local_rows, ray_datasets

    pq.write_table(pa.table({"text": [f"Ticket {i}: chain replaced on the gravel bike." for i in range(40)]}),
                   tmp_path / "d.parquet")
    for args in ((ROOT / "data/demo_domain.jsonl", "jsonl", "messages", tiny_dir, 384, 0.1),
                 (tmp_path / "d.parquet", "parquet", "text", tiny_dir, 64, 0.2)):
        train, ev = ray_datasets(*args)
        local_train, local_eval = local_rows(*args)
        for ds, rows in ((train, local_train), (ev, local_eval)):
            got = ds.take_all()
            assert len(got) == len(rows["input_ids"]) > 0
            assert all((g["input_ids"] == rows["input_ids"][i]).all()
                       and (g["loss_mask"] == rows["loss_mask"][i]).all() for i, g in enumerate(got))


def test_esft_two_workers_lowers_domain_loss_and_freezes_the_rest(ray_cluster, tiny_dir, tmp_path):
    config = _job(tmp_path, tiny_dir, """
mode: esft
esft: {scoring: token, score_tokens: 1536}
lr: 1.0e-2
weight_decay: 0.1
steps: 8
batch_size: 4
seq_len: 384
warmup_steps: 1
workers: 2
mtp_loss_weight: 0.1
checkpoint_every: 0
""")
    s = finetune.run_ray(config, hooks=[FrozenCheck()])
    # held-out domain loss: the tiny random model starts at ~ln(512); 8 ESFT steps on the formulaic
    # domain bring it down by > 0.3 nats (observed ~0.9); 0.3 leaves room for scheduling noise
    assert s["eval_loss_final"] < s["eval_loss_initial"] - 0.3, s
    # every dense tensor and every non-selected expert row is bit-identical to the base,
    # with weight decay on (AdamW would move any row it held)
    assert s["frozen_changed"] == 0
    chosen = json.loads((config.local_output / "esft_experts.json").read_text())["layers"]
    patch = read_patch(s["output"], base_model_dir=tiny_dir)
    assert patch.expert_ids == {int(k): v["experts"] for k, v in chosen.items()}
    assert 0 < patch.num_experts < 2 * 256
    base = load_checkpoint(tiny_dir, dtype=torch.float32)
    moes = {m.layer_id: m for m in base.moe_layers()}
    changed = [not torch.equal(moes[layer].experts.w13_weight[e], w13) for layer, ex in patch.experts.items()
               for e, (w13, _) in ex.items()]
    assert all(changed), "a selected expert was not trained"
    log = train_log(config.output_dir)
    assert [r["step"] for r in log] == list(range(1, 9))
    # expert parallelism is exact: one process with all experts sees the same batches, selects the
    # same experts and gets the same first loss (1e-5 relative: all-to-all combine sums in another order)
    local = finetune.run_local(dataclasses.replace(config, output_dir=tmp_path / "local"))
    assert local["experts_selected"] == s["experts_selected"]
    assert train_log(tmp_path / "local")[0]["loss"] == pytest.approx(log[0]["loss"], rel=1e-5)


def test_full_two_workers_survives_a_killed_worker(ray_cluster, tiny_dir, tmp_path):
    config = _job(tmp_path, tiny_dir, """
mode: full
lr: 1.0e-3
steps: 5
batch_size: 2
seq_len: 384
workers: 2
zero_stage: 2
mtp_loss_weight: 0.1
router_bias_rate: 0.001
checkpoint_every: 2
max_failures: 2
""")
    marker = tmp_path / "killed"
    s = finetune.run_ray(config, hooks=[ExitAt(rank=1, step=4, marker=marker)])
    assert marker.exists(), "the fault was not injected"
    log = train_log(config.output_dir)
    steps = [r["step"] for r in log]
    # attempt 1 ran steps 1-3 (rank 1 exits at the start of step 4); the checkpoint of step 2 is the
    # latest, so attempt 2 resumes there and repeats only step 3 (<= checkpoint_every steps)
    assert steps == [1, 2, 3, 3, 4, 5], steps
    first, again = log[2], log[3]
    assert again["resumed_from"] == 2 and first["resumed_from"] is None
    assert first["data_fingerprint"] == again["data_fingerprint"], "resumed at a different data position"
    # same restored fp32 state and same batch; 1e-5 relative only absorbs reduction-order noise
    assert again["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert s["resumed_from"] == 2 and s["step"] == 5
    assert s["dense_replicas_agree"], "ZeRO left the data-parallel dense weights different across ranks"
    # the first update is the one a single process makes on the whole global batch: step 2's loss
    # matches to ~1e-8 (observed); 1e-5 relative still fails if dense gradients were not averaged
    # over ranks (each rank would step on its own half batch). Later steps drift apart legitimately:
    # top-k routing flips on float-order differences.
    local = finetune.run_local(dataclasses.replace(config, output_dir=tmp_path / "local"))
    assert local["step"] == 5
    assert train_log(tmp_path / "local")[1]["loss"] == pytest.approx(log[1]["loss"], rel=1e-5)
    trained = load_checkpoint(s["output"], dtype=torch.float32)
    base = load_checkpoint(tiny_dir, dtype=torch.float32)
    assert not torch.equal(trained.model.layers[0].self_attn.kv_a_proj_with_mqa.weight,
                           base.model.layers[0].self_attn.kv_a_proj_with_mqa.weight)
    for mt, mb in zip(trained.moe_layers(), base.moe_layers()):
        assert not torch.equal(mt.experts.w13_weight, mb.experts.w13_weight)
        assert not torch.equal(mt.gate.e_score_correction_bias, mb.gate.e_score_correction_bias)
