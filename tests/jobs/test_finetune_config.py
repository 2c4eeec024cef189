"""Bad job configs fail before any worker starts, exit 2, and name the field and the fix (no Ray)."""

import pickle

import pytest

from expertpool.jobs import finetune

DATA = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _config(tmp_path, job: str, tiny_dir, data: str | None = DATA) -> str:
    if data is not None:
        (tmp_path / "d.jsonl").write_text(data)
    (tmp_path / "c.yaml").write_text(f"train:\n  jobs:\n    j:\n      base_model: {tiny_dir}\n"
                                     f"      dataset: {{path: {tmp_path / 'd.jsonl'}}}\n"
                                     + ("" if "seq_len" in job else "      seq_len: 64\n")
                                     + "".join(f"      {line}\n" for line in job.splitlines() if line))
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize("job,data,message", [
    ("workers: 2\nbatch_size: 2", None, r"train.jobs.j.dataset.path: '.*d.jsonl' does not exist"),
    ("workers: 2\nbatch_size: 2", "", r"train.jobs.j.dataset.path: '.*d.jsonl' is empty"),
    ("workers: 3\nbatch_size: 3", DATA, r"train.jobs.j.workers: .*256.*3"),
    ("esft: {p: 1.5}\nworkers: 2\nbatch_size: 2", DATA, r"train.jobs.j.esft.p: must be in \(0, 1\], got 1.5"),
    ("esft: {p: 0}\nworkers: 2\nbatch_size: 2", DATA, r"train.jobs.j.esft.p: must be in \(0, 1\], got 0"),
    ("workers: 2\nbatch_size: 2\nrouter_bias_rate: 0.001", DATA, r"router_bias_rate: .*set router_bias_rate: 0"),
    ("workers: 2\nbatch_size: 2\nseq_len: 100000", DATA, r"seq_len: \(100000\) exceeds the model's max_position"),
    ("workers: 2\nbatch_size: 3", DATA, r"batch_size: 3 sequences do not split evenly over 2 workers"),
    ("workers: 2\nmin_workers: 3\nbatch_size: 2", DATA,
     r"train.jobs.j.min_workers: \(3\) exceeds workers \(2\).*; set min_workers to at most 2"),
    ("workers: 2\nmin_workers: 0\nbatch_size: 2", DATA, r"train.jobs.j.min_workers: must be >= 1, got 0"),
    # an elastic range does not relax the full size: workers must still divide the experts and the batch
    ("workers: 3\nmin_workers: 1\nbatch_size: 3", DATA, r"train.jobs.j.workers: .*256.*3"),
    ("workers: 4\nmin_workers: 3\nbatch_size: 6", DATA, r"batch_size: 6 sequences do not split evenly over 4"),
], ids=["missing-dataset", "empty-dataset", "experts-not-divisible", "p-above-1", "p-zero", "bias-in-esft",
        "seq-len", "batch-split", "min-above-workers", "min-zero", "elastic-experts-not-divisible",
        "elastic-batch-split"])
def test_bad_job_config_exits_2_with_field_and_fix(tmp_path, tiny_dir, capsys, job, data, message):
    path = _config(tmp_path, job, tiny_dir, data)
    assert finetune.main(["--config", path, "--job", "j"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(message, err), err


def test_unknown_job_name_lists_known_jobs(tmp_path, tiny_dir, capsys):
    path = _config(tmp_path, "workers: 2\nbatch_size: 2", tiny_dir)
    assert finetune.main(["--config", path, "--job", "k"]) == 2
    assert "train.jobs: no job named 'k' (known: j)" in capsys.readouterr().err


def test_too_little_data_for_one_batch(tmp_path, tiny_dir, capsys):
    path = _config(tmp_path, "workers: 1\nbatch_size: 4\nseq_len: 64\noutput_dir: " + str(tmp_path / "o"), tiny_dir)
    config = finetune.prepare(path, "j")
    with pytest.raises(finetune.JobError, match=r"packs into 1 sequences of 64 tokens, fewer than one global batch"):
        finetune.run_local(config)


def test_publish_needs_esft(tmp_path, tiny_dir):
    path = tmp_path / "c.yaml"
    (tmp_path / "d.jsonl").write_text(DATA)
    path.write_text(f"model: {{path: {tiny_dir}}}\ntrain:\n  jobs:\n    j:\n      base_model: {tiny_dir}\n"
                    f"      dataset: {{path: {tmp_path / 'd.jsonl'}}}\n      mode: full\n      workers: 2\n"
                    "      batch_size: 2\n      seq_len: 64\n      publish_to: expertpool\n")
    with pytest.raises(finetune.JobError, match="only ESFT and MTP patches can be hot-swapped"):
        finetune.prepare(str(path), "j")
    assert finetune.prepare(str(path), "j", publish=False).publish_to is None


def test_demo_job_in_cluster_yaml_is_valid(monkeypatch):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2]
    config = finetune.prepare(str(root / "cluster.yaml"), "demo", publish=False, base_dir=str(root))
    assert config.job.mode == "esft" and config.dataset.field == "messages"
    assert pickle.loads(pickle.dumps(config)) == config  # the plan must travel to Ray workers


def test_elastic_range_is_prepared_for_the_trainer(tmp_path, tiny_dir):
    path = _config(tmp_path, "workers: 4\nmin_workers: 1\nbatch_size: 4", tiny_dir)
    config = finetune.prepare(path, "j")
    assert config.job.min_workers == 1 and config.job.workers == 4 and config.worker_range == (1, 4)
    from expertpool.platform.config import load_config

    job = load_config(path).get_job("j")
    assert job.worker_range == (1, 4)
    assert job.model_copy(update={"min_workers": None}).worker_range == (4, 4)


def test_resume_needs_ray(tmp_path, tiny_dir, capsys):
    path = _config(tmp_path, "workers: 1\nbatch_size: 1", tiny_dir)
    assert finetune.main(["--config", path, "--job", "j", "--local", "--resume"]) == 2
    assert "--resume continues a Ray Train run" in capsys.readouterr().err


def test_resume_picks_the_newest_run_with_a_checkpoint(tmp_path):
    import os

    storage = tmp_path / "ray"
    assert finetune.resumable_run(storage, "j") is None
    for i, name in enumerate(["j-20260101-000000", "j-20260102-000000", "other-20260103-000000",
                              "j-2-20260103-000000"]):  # job 'j-2' is another job
        (storage / name).mkdir(parents=True)
        snap = storage / name / "checkpoint_manager_snapshot.json"
        snap.write_text("{}")
        os.utime(snap, (1000 + i, 1000 + i))
    (storage / "j-20260104-000000").mkdir()  # a newer run that never registered a checkpoint
    assert finetune.resumable_run(storage, "j") == "j-20260102-000000"
