"""Where one rank of a training job runs: its device, its process group, its share of each batch.

Ray Train forms the process group of its workers and gives each a device; in one process
(``finetune --local``, the tests) ``init_single_process_group`` makes a world-1 group, so the loop's
collectives and DeepSpeed run unchanged, and ``train_device`` picks the device by the same rule.
Rank r of W trains rows [r*B//W, (r+1)*B//W) of each global batch (``batch_rows``) and owns the
routed experts ``model.dispatch.owned_experts(r, W, E)``; ``describe_layout`` logs both.
"""

import os
import socket

import torch
import torch.distributed as dist

from expertpool.model.dispatch import owned_experts
from expertpool.platform.config import TrainJobConfig


def in_ray_train() -> bool:
    try:
        import ray.train

        ray.train.get_context().get_world_size()
        return True
    except (RuntimeError, ValueError, AttributeError, ImportError):
        return False


def init_single_process_group(device: torch.device) -> None:
    """A world-1 group so DeepSpeed and the collectives work in one process (NCCL on a GPU, as Ray
    Train would pick, so collectives on device tensors work)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(port)).items():
        os.environ.setdefault(k, v)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)


def train_device(job: TrainJobConfig, in_ray: bool) -> torch.device:
    """Where this worker trains. In Ray Train: the device Ray Train gave it (``use_gpu`` follows
    ``worker_resources.gpu``). In one process: the first GPU when the job asks for GPUs, else the CPU.
    The same code picks the CPU in every CPU test."""
    if in_ray:
        import ray.train.torch

        return ray.train.torch.get_device()
    if job.worker_resources.gpu > 0:
        if not torch.cuda.is_available():
            raise RuntimeError("the job reserves GPUs (worker_resources.gpu) but this process sees no CUDA device; "
                               "run it where a GPU is, or set worker_resources.gpu: 0")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def batch_rows(rank: int, world: int, batch_size: int) -> slice:
    """The rows of each global batch rank ``rank`` of ``world`` trains on: [r*B//W, (r+1)*B//W)."""
    assert 0 <= rank < world <= batch_size, f"rank {rank} of {world} over {batch_size} sequences"
    return slice(rank * batch_size // world, (rank + 1) * batch_size // world)


def describe_layout(world: int, n_experts: int, batch_size: int) -> str:
    """One log line: the experts and batch rows of every rank of this attempt."""
    experts = [owned_experts(r, world, n_experts) for r in range(world)]
    rows = [batch_rows(r, world, batch_size) for r in range(world)]
    return (f"{world} workers; routed experts per rank {', '.join(f'{x[0]}-{x[-1]} ({len(x)})' for x in experts)}; "
            f"batch rows per rank {', '.join(str(r.stop - r.start) for r in rows)}")
