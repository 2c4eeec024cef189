"""``TrainPlan``: one validated fine-tuning job, resolved for the workers by ``finetune.prepare``.

It is what the training loop reads, in one process (``finetune.run_local``) or on every Ray Train
worker (``finetune.run_ray``; Ray pickles it): the typed ``TrainJobConfig`` as validated from
cluster.yaml (never a dict re-read through string keys), the resolved paths and, through the job,
the elastic worker range. It is frozen: a run on other terms is a copy (``for_one_process``,
``dataclasses.replace``). It carries no data rows (``jobs.data.LocalRows`` / ``RayShards``) and no
test instrumentation (``jobs.hooks``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from expertpool.platform.config import DatasetConfig, TrainJobConfig


@dataclass(frozen=True)
class TrainPlan:
    job_name: str                    # the key under train.jobs
    job: TrainJobConfig              # validated; workers = the most workers (the size Ray Train asks for)
    dataset: DatasetConfig           # path absolute, format and field filled in (``check_dataset``)
    base_model: Path                 # the checkpoint to fine-tune, as resolved on the driver (see embedded_base)
    output_dir: Path                 # absolute
    publish_to: str | None = None    # the Serve app to hot-swap the result into; None = do not publish

    @property
    def embedded_base(self) -> bool:
        """The job fine-tunes the embedded tiny model: each node resolves its own copy (caches may not
        be shared between nodes)."""
        return self.job.base_model is None

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) Ray Train workers; equal when the job is not elastic."""
        return self.job.worker_range

    @property
    def domain(self) -> str:
        """The variant name the result is served as (``<model>:<domain>``)."""
        return self.job.domain

    def for_one_process(self) -> TrainPlan:
        """This plan on one worker holding every expert (``--local``)."""
        return dataclasses.replace(self, job=self.job.model_copy(update={"workers": 1, "min_workers": None}))
