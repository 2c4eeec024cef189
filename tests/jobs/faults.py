"""Fault injection for the fine-tuning tests: ``jobs.hooks`` objects the tests hand to the loop.

They travel to the Ray Train workers with the plan (pickled by reference: Ray's workers import
``tests.jobs.faults`` from the repository root, as Serve replicas import ``tests.platform``)."""

import logging
import os
import time
from pathlib import Path

from expertpool.jobs.hooks import TrainHook

log = logging.getLogger("expertpool.finetune")

HOLD_S = 180  # a held rank not killed by then exits as a plain failure rather than hang the test


class ExitAt(TrainHook):
    """At the top of step ``step``, rank ``rank`` writes ``marker`` and exits its process
    (``os._exit(1)``: a crash, no cleanup), once: an existing marker means an earlier attempt had
    the fault. In Ray Train the rank first waits until the latest checkpoint is committed: a crash
    inside the commit window resumes from the checkpoint before it, which the tests must not
    depend on. ``hold``: after writing the marker, wait to be killed with the node (the test takes
    the node away when the marker appears) instead of exiting at once."""

    def __init__(self, rank: int, step: int, marker, hold: bool = False):
        self.rank, self.step, self.marker, self.hold = rank, step, Path(marker), hold

    def before_step(self, trainer, step: int) -> None:
        if trainer.rank != self.rank or step != self.step or self.marker.exists():
            return
        if trainer.in_ray:
            import ray.train

            ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120)
        self.marker.write_text(f"killed rank {trainer.rank} at step {step}\n")
        if self.hold:
            log.warning("fault injection: rank %d holds at step %d", trainer.rank, step)
            time.sleep(HOLD_S)
        log.warning("fault injection: rank %d exits at step %d", trainer.rank, step)
        os._exit(1)
