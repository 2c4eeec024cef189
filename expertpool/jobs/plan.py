"""``TrainPlan``: one validated fine-tuning job, resolved for the workers by ``finetune.prepare``.

It is what the training loop reads, in one process (``finetune.run_local``) or on every Ray Train
worker (``finetune.run_ray``; Ray pickles it): the typed ``TrainJobConfig`` as validated from
cluster.yaml (never a dict re-read through string keys), the resolved locations and, through the
job, the elastic worker range. It is frozen: a run on other terms is a copy (``for_one_process``,
``dataclasses.replace``). It carries no data rows (``jobs.data.LocalRows`` / ``RayShards``) and no
test instrumentation (``jobs.hooks``).

Locations. ``base_model`` is a ``model.storage`` location: each worker resolves it itself, fetching
only its share of a remote checkpoint (``base_dir``). ``output_dir`` is an absolute path or a URI,
never relative: relative ones were put under ``train.storage_path`` by the driver. Rank 0 writes its
files into ``local_output`` (``output_dir`` itself, or for a URI a staging directory in the local
cache) and ``upload`` copies them to a URI output_dir (the step log after every step); ``pull`` brings
the stored log back to a rank 0 that starts or restarts on any node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from expertpool.model import storage
from expertpool.platform.config import DatasetConfig, TrainJobConfig


@dataclass(frozen=True)
class TrainPlan:
    job_name: str                    # the key under train.jobs
    job: TrainJobConfig              # validated; workers = the most workers (the size Ray Train asks for)
    dataset: DatasetConfig           # path absolute, format and field filled in (``check_dataset``)
    base_model: str                  # the checkpoint to fine-tune (a storage location; see embedded_base)
    output_dir: str                  # absolute path or URI
    publish_to: str | None = None    # the Serve app to declare the result in; None = do not publish

    @property
    def embedded_base(self) -> bool:
        """The job fine-tunes the embedded tiny model: each node resolves its own copy (caches may not
        be shared between nodes)."""
        return self.job.base_model is None

    def base_dir(self, experts: list[int] | None = None, *, weights: bool = True) -> Path:
        """The base checkpoint on this node, with the routed experts ``experts`` (None = all; MTP layers
        included); ``weights=False``: its config and tokenizer only."""
        if self.embedded_base:
            from expertpool.model.embedded import ensure_embedded_model

            return ensure_embedded_model()
        return storage.resolve_model(self.base_model, experts=experts, weights=weights)

    @property
    def remote_output(self) -> bool:
        return storage.is_remote(self.output_dir, hub=False)

    @property
    def local_output(self) -> Path:
        """Where rank 0 writes its files on its node: output_dir, or a staging directory for a URI."""
        if not self.remote_output:
            return Path(self.output_dir)
        return storage.cache_dir() / "runs" / self.output_dir.replace("://", "/")

    def output(self, name: str) -> str:
        """The location of ``name`` in output_dir."""
        return storage.parse(self.output_dir, hub=False).join(name)

    def upload(self, *names: str) -> None:
        """Copy files (or directories, with manifest.json last) of ``local_output`` to a URI output_dir;
        nothing to do for a local one."""
        if not self.remote_output:
            return
        for name in names:
            path = self.local_output / name
            if path.is_dir():
                storage.upload_dir(path, self.output(name), last=["manifest.json", "config.json"])
            elif path.exists():
                storage.write_text(self.output(name), path.read_text())

    def pull(self, name: str) -> None:
        """Make ``local_output/name`` the URI output_dir's copy (absent there: absent here), so a rank 0
        on any node continues the stored file; nothing to do for a local output_dir."""
        if not self.remote_output:
            return
        local = self.local_output / name
        local.parent.mkdir(parents=True, exist_ok=True)
        if storage.exists(self.output(name)):
            local.write_text(storage.read_text(self.output(name)))
        else:
            local.unlink(missing_ok=True)

    @property
    def ray_storage(self) -> str:
        """Ray Train's storage_path for this job's runs (checkpoints)."""
        return self.output("ray")

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
