"""The per-worker memory plan of a training job: exact parameter arithmetic (checked against a loaded
model), the DeepSeek-V3 size, and what it accepts and refuses. No Ray."""

import math

import pytest
import torch

from expertpool.model.args import preset
from expertpool.platform.config import GIB, parse_config
from expertpool.platform.memory_plan import HEADROOM, sizes, train_memory_plan


def _job(**job):
    body = {"dataset": {"path": "x.jsonl"}, **job}
    return parse_config({"train": {"jobs": {"j": body}}}).train.jobs["j"]


def test_parameter_counts_equal_the_loaded_model(tiny_dir):
    from expertpool.model.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=True)
    s = sizes(model.args)
    params = dict(model.named_parameters())
    bias = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    experts = sum(p.numel() for n, p in params.items() if ".experts." in n)
    assert experts == s.expert * model.args.n_routed_experts * s.moe_layers
    assert sum(p.numel() for p in params.values()) + bias == s.dense + experts


def test_deepseek_v3_is_671b_without_its_mtp_layer():
    a = preset("deepseek-v3")
    s = sizes(a.replace(num_nextn_predict_layers=0))
    total = s.dense + s.expert * a.n_routed_experts * s.moe_layers
    assert total == pytest.approx(671e9, rel=5e-3)  # DeepSeek's figure, rounded to the billion


def test_esft_plan_parts_and_the_verdict():
    a = preset("deepseek-v3")
    s = sizes(a)
    job = _job(workers=8, batch_size=8, seq_len=1024, worker_resources={"cpu": 8, "gpu": 1, "gpu_memory_gb": 141})
    plan = train_memory_plan(job, a)
    # frozen: FP8 experts of this worker (1 byte) + the dense weights, FP8 linears and bf16 the rest
    assert plan.frozen == s.embed_head * 2 + s.dense_linear + s.small * 4 + s.moe_layers * 32 * s.expert
    # trainable: at most ceil(0.2 x 256) = 52 experts per layer over 8 workers: 7 per worker, fp32 + grad
    assert plan.trainable == 7 * a.num_hidden_layers * s.expert * 8 and plan.optimizer == plan.trainable
    assert plan.budget == HEADROOM * 141 * GIB and plan.total > plan.budget
    assert "add workers" in plan.problem and "lower esft.p" in plan.problem
    more = train_memory_plan(job.model_copy(update={"workers": 64, "batch_size": 64, "seq_len": 256}), a)
    assert more.frozen < plan.frozen and more.activations < plan.activations


def test_small_gpu_jobs_fit_and_cpu_jobs_are_unchecked(tiny_dir):
    from expertpool.model.args import ModelArgs

    a = ModelArgs.from_dir(tiny_dir)
    gpu = train_memory_plan(_job(seq_len=256, worker_resources={"cpu": 1, "gpu": 1, "gpu_memory_gb": 16}), a)
    assert gpu.problem is None and gpu.device == "GPU" and gpu.total < gpu.budget
    cpu = train_memory_plan(_job(mode="full", seq_len=256), a)
    assert cpu.budget is None and cpu.problem is None and cpu.frozen == 0 and cpu.device == "CPU"
    assert math.isclose(cpu.tokens, 32 // 2 * 256)
