"""GPU-only (skipped without CUDA): fine-tuning on GPUs through the production path, the device chosen
by the same code as on CPU (``worker_resources.gpu``). On 2 GPUs, Ray Train with ``use_gpu`` (one GPU
per worker, NCCL): one ESFT step on an FP8 checkpoint whose hidden size (1024) lets the Triton FP8
kernels serve the frozen experts and linears, and one full step under DeepSpeed ZeRO-1 on CUDA. On
one GPU: ESFT in one process (``--local``)."""

import math

import pytest
import torch

from expertpool.jobs import finetune
from expertpool.jobs.hooks import FrozenCheck
from tests.jobs.helpers import Formats, job_config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs: NCCL runs one rank per GPU")
GPU_JOB = "worker_resources: {cpu: 1, gpu: 1, gpu_memory_gb: 16}\nseq_len: 256\ncheckpoint_every: 0\n"


@pytest.fixture(scope="module")
def fp8_mini(tmp_path_factory):
    from expertpool.model.embedded import init_model

    return init_model("bench-mini", tmp_path_factory.mktemp("gpu") / "mini-fp8", fp8=True, seed=0)


ESFT = "mode: esft\nesft: {score_tokens: 512}\nlr: 1.0e-3\n"


def _esft_on_fp8_gpus(s: dict) -> None:
    assert s["stacked_dtype"] == "torch.float8_e4m3fn" and s["trainable_dtypes"] == ["torch.float32"]
    assert s["frozen_changed"] == 0 and math.isfinite(s["train_loss_final"])


def test_esft_in_one_process_on_one_gpu(fp8_mini, tmp_path):
    plan = job_config(tmp_path, fp8_mini, GPU_JOB + ESFT + "workers: 1\nbatch_size: 2\nsteps: 2\n")
    s = finetune.run_local(plan, [FrozenCheck(), Formats()])
    assert s["device"] == "cuda:0" and s["weights_on"] == "cuda" and s["backend"] == "nccl"
    _esft_on_fp8_gpus(s)


@two_gpus
def test_esft_step_on_two_ranks_over_nccl(ray_cluster, fp8_mini, tmp_path):
    plan = job_config(tmp_path, fp8_mini, GPU_JOB + ESFT + "workers: 2\nbatch_size: 2\nsteps: 1\n")
    s = finetune.run_ray(plan, hooks=[FrozenCheck(), Formats()])
    assert s["world"] == 2 and s["backend"] == "nccl" and s["device"].startswith("cuda")
    _esft_on_fp8_gpus(s)


@two_gpus
def test_full_step_on_two_ranks_deepspeed_on_cuda(ray_cluster, tiny_dir, tmp_path):
    plan = job_config(tmp_path, tiny_dir, GPU_JOB + "workers: 2\nbatch_size: 2\nmode: full\nzero_stage: 1\n"
                      "lr: 1.0e-3\nsteps: 1\n")
    s = finetune.run_ray(plan, hooks=[Formats()])
    assert s["world"] == 2 and s["backend"] == "nccl" and s["deepspeed_accelerator"] == "cuda"
    assert s["dense_replicas_agree"] and math.isfinite(s["train_loss_final"])
