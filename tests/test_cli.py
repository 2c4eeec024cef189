"""The `expertpool` command and package hygiene (import order, stdlib `platform` not shadowed)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, env=None, check=True):
    r = subprocess.run([sys.executable, "-m", "expertpool.cli", *args], capture_output=True, text=True, cwd=ROOT,
                       env=dict(os.environ, **(env or {})), timeout=300)
    if check and r.returncode:
        raise AssertionError(f"expertpool {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def test_package_imports_before_torch_and_ray_and_keeps_stdlib_platform():
    code = ("import expertpool, expertpool.platform, expertpool.model, expertpool.kernels\n"
            "import torch, ray, platform\n"
            "assert platform.system() and platform.python_version()\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_model_layer_does_not_import_ray_or_pydantic():
    code = ("import sys, expertpool.model.checkpoint, expertpool.model.tokenizer, expertpool.kernels\n"
            "bad = [m for m in ('ray', 'pydantic') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_help_lists_every_command_and_flags_have_help():
    out = run("--help").stdout
    for cmd in ("init-model", "generate", "serve", "validate", "manifests", "publish"):
        assert cmd in out
        sub = run(cmd, "--help").stdout
        assert "--help" in sub


def test_init_model_fp8_and_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "tiny"
    run("init-model", "--preset", "tiny", "--out", str(out), "--seed", "3")
    run("init-model", "--preset", "tiny", "--out", str(tmp_path / "tiny8"), "--fp8", "--seed", "3")
    cfg = json.loads((tmp_path / "tiny8" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).exists()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(str(out))     # transformers loads it too
    assert hf.config.n_routed_experts == 256
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True).endswith("<｜Assistant｜>")
    r = run("generate", "--model", str(tmp_path / "tiny8"), "--prompt", "Hello", "--max-tokens", "5", "--chat")
    assert "5 tokens" in r.stderr
    r = run("generate", "--model", str(out), "--prompt", "a", "--prompt", "bb", "--max-tokens", "4",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "1")
    assert "8 tokens" in r.stderr and r.stdout.count("---") == 2


def test_validate_and_manifests(tmp_path):
    r = run("validate", "cluster.yaml", env={"EXPERTPOOL_CACHE": str(tmp_path / "cache")})
    assert "ok" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool:\n  actors_per_replica: 3\nserving:\n  autoscaling:\n    min_replicas: 3\n"
                   "    max_replicas: 1\n")
    r = run("validate", str(bad), check=False, env={"EXPERTPOOL_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0 and "max_replicas" in r.stderr
    bad.write_text("pool:\n  actors_per_replica: 300\n")  # uneven widths are fine; more actors than experts not
    r = run("validate", str(bad), check=False, env={"EXPERTPOOL_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0 and "actors_per_replica" in r.stderr and "256" in r.stderr
    # on Kubernetes a job's outputs must outlive its pods: the laptop example's are refused there
    r = run("manifests", "cluster.yaml", "--out", str(tmp_path / "k8s"), check=False)
    assert r.returncode == 2 and "train.jobs.demo.output_dir" in r.stderr and "s3://" in r.stderr
    on_k8s = tmp_path / "k8s.yaml"
    on_k8s.write_text((ROOT / "cluster.yaml").read_text().replace("train:\n", "train:\n  storage_path: s3://b/runs\n"))
    run("manifests", str(on_k8s), "--out", str(tmp_path / "k8s"))
    names = {str(p.relative_to(tmp_path / "k8s")) for p in (tmp_path / "k8s").rglob("*.yaml")}
    assert {"rayservice/rayservice.yaml", "raycluster/raycluster.yaml", "raycluster/rayjob-demo.yaml",
            "serve-config/raycluster.yaml", "serve-config/local.yaml"} == names
    run("manifests", str(on_k8s), "--out", str(tmp_path / "only"), "--kind", "rayservice")
    assert [p.name for p in (tmp_path / "only").rglob("*.yaml")] == ["rayservice.yaml"]


def test_serve_config_resolution_with_overrides(tmp_path, monkeypatch):
    from expertpool.cli import resolve_config
    monkeypatch.chdir(ROOT)  # ./cluster.yaml is picked up by default
    cfg = resolve_config(None)
    assert cfg.pool.actors_per_replica == 2 and "demo" in cfg.train.jobs
    # serving another checkpoint: the file's training jobs (declared for the embedded model) are dropped
    cfg = resolve_config(None, model=str(tmp_path / "ckpt"), port=9001, actors=4)
    assert cfg.model.path == str(tmp_path / "ckpt") and cfg.model.name == "ckpt"
    assert cfg.serving.port == 9001 and cfg.pool.actors_per_replica == 4 and not cfg.train.jobs
    monkeypatch.chdir(tmp_path)  # no cluster.yaml here: built-in defaults
    assert resolve_config(None).model.path is None


def test_validate_prints_each_jobs_memory_plan_and_refuses_a_gpu_job_that_cannot_fit(tmp_path):
    """A GPU training job is accepted or refused before it starts, never a late out-of-memory crash."""
    from expertpool.model.args import preset

    v3 = tmp_path / "v3"  # the architecture is all validate reads: config.json alone
    v3.mkdir()
    (v3 / "config.json").write_text(json.dumps(preset("deepseek-v3").to_hf_config()))
    job = ("train:\n  jobs:\n    law:\n      base_model: {base}\n      dataset: {{path: data/demo_domain.jsonl}}\n"
           "      workers: {workers}\n      batch_size: {workers}\n      seq_len: {seq}\n"
           "      worker_resources: {{cpu: 8, gpu: 1, gpu_memory_gb: {mem}}}\n")
    cfg = tmp_path / "c.yaml"
    env = {"EXPERTPOOL_CACHE": str(tmp_path / "cache")}
    cfg.write_text(job.format(base=v3, workers=8, seq=4096, mem=80))
    r = run("validate", str(cfg), check=False, env=env)
    assert r.returncode == 1, r.stdout
    assert re.search(r"train\.jobs\.law: needs ~\d+ GiB per worker of 72 GiB on GPU \(frozen weights [\d.]+, "
                     r"trainable weights and gradients [\d.]+, optimizer state [\d.]+, activations for 4096 "
                     r"tokens [\d.]+\).*add workers", r.stderr), r.stderr
    cfg.write_text(job.format(base="null", workers=2, seq=256, mem=80))  # the tiny model fits easily
    r = run("validate", str(cfg), env=env)
    assert re.search(r"train\.jobs\.law: ~[\d.]+ GiB per worker of 72 GiB on GPU", r.stdout) and "ok" in r.stdout
