"""Elastic worker range on the session's Ray cluster, fine-tuning the tiny model.

- Across submissions (full mode): one job moves from 2 workers to 3 (an uneven layout: 256 experts and 4
  sequences over 3 ranks) to 1 worker through its checkpoints, each move a resubmission with
  ``resume``. The 3-worker attempt is a genuine Ray Train elastic start: the job asks for 3..4
  workers that each need one ``expertpool_test_slot``, and the session cluster has 3 (conftest.py).
- Within one run (ESFT): a second Ray node with one more slot joins, the job starts on 4 workers,
  the node is killed after a checkpoint, and Ray Train restarts the group on the 3 workers left.

Each resumed attempt's first loss must equal the loss the previous attempt logged for that step:
same restored fp32 state, same batch."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import ray
import ray.train

from expertpool.jobs import finetune
from expertpool.jobs.hooks import FrozenCheck
from tests.jobs.faults import ExitAt
from tests.jobs.helpers import job_config, train_log

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JOB = """
mode: full
lr: 1.0e-3
steps: 8
batch_size: 4
seq_len: 384
zero_stage: 2
mtp_loss_weight: 0.1
balance_loss_alpha: 0.1
router_bias_rate: 0.001
checkpoint_every: 2
max_failures: 0
"""


def test_full_job_moves_between_worker_counts_through_checkpoints(ray_cluster, tiny_dir, tmp_path):
    # attempt 1: 2 workers; rank 1 exits at the start of step 4 (after the step-2 checkpoint is
    # committed) and max_failures 0 ends the run: a stopped job, as after a lost cluster
    two = job_config(tmp_path, tiny_dir, "workers: 2\nworker_resources: {cpu: 1}\n" + JOB)
    with pytest.raises(ray.train.TrainingFailedError):
        finetune.run_ray(two, hooks=[ExitAt(rank=1, step=4, marker=tmp_path / "stop1")])
    first = train_log(two.output_dir)
    assert [r["step"] for r in first] == [1, 2, 3] and all(r["world"] == 2 for r in first)

    # attempt 2: resubmitted with an elastic range 3..4 whose workers need a slot each; the cluster
    # has 3 slots, so Ray Train starts 3 workers. It resumes at step 2 and stops at step 6 (after
    # the step-4 checkpoint, written by 3 workers)
    elastic = job_config(tmp_path, tiny_dir, "workers: 4\nmin_workers: 3\n"
                         "worker_resources: {cpu: 1, custom: {expertpool_test_slot: 1}}\n" + JOB)
    assert elastic.output_dir == two.output_dir
    with pytest.raises(ray.train.TrainingFailedError):
        finetune.run_ray(elastic, hooks=[ExitAt(rank=2, step=6, marker=tmp_path / "stop2")], resume=True)
    log = train_log(two.output_dir)
    second = log[3:]
    assert [r["step"] for r in second] == [3, 4, 5], log
    assert all(r["resumed_from"] == 2 and r["world"] == 3 for r in second)

    # attempt 3: resubmitted with 1 worker; it resumes at step 4 and finishes
    one = job_config(tmp_path, tiny_dir, "workers: 1\nworker_resources: {cpu: 1}\n" + JOB)
    s = finetune.run_ray(one, resume=True)
    log = train_log(two.output_dir)
    third = log[6:]
    assert [r["step"] for r in third] == [5, 6, 7, 8], log
    assert all(r["resumed_from"] == 4 and r["world"] == 1 for r in third)
    assert s["world"] == 1 and s["step"] == 8
    assert s["resumed_from"] == 4 and s["resumed_from_world"] == 3

    # each resume repeats only the steps after its checkpoint (< checkpoint_every), at the same data
    # position, and its first loss is the one the previous attempt logged for that step: 1e-5
    # relative only absorbs reduction-order noise (the all-to-all combine and the ZeRO partitions
    # sum in another order). The balance loss weight 0.1 makes a mis-weighted balance term over
    # the uneven 1/1/2 batch rows visible at this tolerance.
    for before, after in ((first[2], second[0]), (second[2], third[0])):
        assert after["step"] == before["step"]
        assert after["data_fingerprint"] == before["data_fingerprint"], "resumed at a different data position"
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5), (before, after)


@pytest.fixture
def second_node(ray_cluster, tmp_path):
    """One more node in the session cluster (``ray start --address``) with 1 slot and no CPU (so no
    Ray Data task can occupy it: the test's workers need only the slot); yields a function that kills
    it (its whole process group, as a lost machine)."""
    alive = sum(n["Alive"] for n in ray_cluster.nodes())
    # `ray start` records the cluster it joined in this file, which a later plain `ray.init()` (e.g.
    # `expertpool serve`) would try to connect to after the session cluster is gone: put it back
    current = Path("/tmp/ray/ray_current_cluster")
    before = current.read_text() if current.exists() else None
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    node = subprocess.Popen(["ray", "start", f"--address={ray_cluster.get_runtime_context().gcs_address}",
                             "--num-cpus=0", '--resources={"expertpool_test_slot": 1}',
                             "--object-store-memory=200000000", "--block", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=(tmp_path / "node.log").open("w"),
                            stderr=subprocess.STDOUT)

    def kill() -> None:
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    try:
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray_cluster.nodes()) <= alive:
            assert node.poll() is None and time.monotonic() < deadline, (tmp_path / "node.log").read_text()
            time.sleep(0.5)
        # Ray Train's elastic policy sizes the group from Ray's AutoscalingCoordinator, which refreshes
        # its node view every 20 s (TICK_INTERVAL_S in ray 2.60): a coordinator left from an earlier
        # test would still see 3 slots and start the job on 3 workers. Asking it for a recomputed
        # reservation runs that refresh now (a detached actor: absent if no job has run yet).
        try:
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
        except ValueError:
            coordinator = None
        if coordinator is not None:
            ray.get(coordinator.get_reserved_resources.remote("expertpool-tests", recompute=True), timeout=60)
        yield kill
    finally:
        kill()
        node.wait(timeout=60)
        if before is None:
            current.unlink(missing_ok=True)
        else:
            current.write_text(before)


def test_run_shrinks_onto_the_workers_left_after_losing_a_node(second_node, tiny_dir, tmp_path):
    config = job_config(tmp_path, tiny_dir, """
workers: 4
min_workers: 1
worker_resources: {cpu: 0, custom: {expertpool_test_slot: 1}}
mode: esft
esft: {scoring: token, score_tokens: 1536}
lr: 1.0e-2
weight_decay: 0.1
steps: 5
batch_size: 4
seq_len: 384
balance_loss_alpha: 0.1
checkpoint_every: 2
max_failures: 2
""")
    # rank 0 holds at step 4 once the step-2 checkpoint is committed; then the second node dies,
    # taking the worker it hosts. (Ray may first retry with 4 workers before it sees the node gone,
    # one more failure: max_failures 2.)
    marker = tmp_path / "held"

    def kill_when_held() -> None:
        while not marker.exists():
            time.sleep(0.2)
        second_node()

    threading.Thread(target=kill_when_held, daemon=True).start()
    s = finetune.run_ray(config, hooks=[ExitAt(rank=0, step=4, marker=marker, hold=True), FrozenCheck()])
    assert marker.exists(), "the fault was not injected"
    log = train_log(config.output_dir)
    assert [(r["step"], r["world"]) for r in log] == [(1, 4), (2, 4), (3, 4), (3, 3), (4, 3), (5, 3)], log
    assert s["world"] == 3 and s["resumed_from"] == 2 and s["resumed_from_world"] == 4 and s["step"] == 5
    # the selection and the selected experts' rows moved from 4 ranks to 3; nothing else changed, with
    # weight decay on and zero gradients for selected experts no token reached
    assert s["frozen_changed"] == 0 and sum(s["experts_selected"].values()) > 0
    before, after = log[2], log[3]
    assert after["data_fingerprint"] == before["data_fingerprint"], "resumed at a different data position"
    # same restored fp32 state and batch on 3 ranks instead of 4: reduction-order noise only
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5), (before, after)
