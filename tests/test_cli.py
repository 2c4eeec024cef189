"""The `expertpool` command and package hygiene (import order, stdlib `platform` not shadowed)."""

import argparse
import json
import os
import re
import shlex
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
    from expertpool.cli import build_parser

    out = run("--help").stdout
    assert "COMMAND" in out and "{" not in out.split("\n")[0]  # the metavar, not the list of choices
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"init-model", "generate", "serve", "validate", "manifests", "schema", "publish",
                                       "scale"}
    no_help = [f"{name} {a.dest}" for name, sub in [("expertpool", parser), *subparsers.choices.items()]
               for a in sub._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]
    assert not no_help, f"flags without help text: {no_help}"
    for cmd in subparsers.choices:
        assert cmd in out
        assert "--verbose" in run(cmd, "--help").stdout


def test_version_and_verbose_before_or_after_the_command():
    import expertpool
    from expertpool.cli import build_parser

    assert run("--version").stdout.strip() == f"expertpool {expertpool.__version__}"
    parser = build_parser()
    assert parser.parse_args(["-v", "validate", "c.yaml"]).verbose is True
    assert parser.parse_args(["validate", "c.yaml", "-v"]).verbose is True
    assert parser.parse_args(["validate", "-v", "c.yaml"]).verbose is True
    assert parser.parse_args(["validate", "c.yaml"]).verbose is False


# --- one error path: `expertpool: error: <message>`, exit status 2, a traceback only with -v ---------------


def _user_error(*args, env=None) -> str:
    """Run ``expertpool *args`` expecting a user error; return its stderr, checked for the one-line form."""
    r = run(*args, check=False, env=env)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    error_lines = [line for line in r.stderr.splitlines() if "error:" in line]
    assert error_lines and error_lines[0].startswith("expertpool"), r.stderr
    return r.stderr


def test_manifests_on_a_bad_config_is_one_error_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pool:\n  actors_per_replica: 0\n")
    err = _user_error("manifests", str(bad), "--out", str(tmp_path / "k8s"))
    assert err.strip() == (f"expertpool: error: {bad}: pool.actors_per_replica: must be >= 1, got 0; "
                           "set a positive number of actors or a range {min, max}")
    assert not (tmp_path / "k8s").exists()


def test_validate_with_a_missing_model_path_names_the_path(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  path: {tmp_path / 'no-such-checkpoint'}\n")
    err = _user_error("validate", str(cfg), env={"EXPERTPOOL_CACHE": str(tmp_path / "cache")})
    assert err.startswith(f"expertpool: error: {tmp_path / 'no-such-checkpoint'}"), err


def test_generate_with_a_nonexistent_model(tmp_path):
    missing = tmp_path / "nonexistent"
    err = _user_error("generate", "--model", str(missing))
    assert f"expertpool: error: {missing}" in err


def test_init_model_unknown_preset_and_a_preset_too_large_for_memory(tmp_path):
    err = _user_error("init-model", "--preset", "foo", "--out", str(tmp_path / "x"))
    assert "expertpool init-model: error: argument --preset: invalid choice: 'foo'" in err and "'tiny'" in err
    err = _user_error("init-model", "--preset", "deepseek-v3", "--out", str(tmp_path / "v3"))
    assert re.fullmatch(r"expertpool: error: preset 'deepseek-v3' has 671\.0B parameters and needs ~[\d.]+ TiB of "
                        r"memory to initialise .* is available; choose a smaller preset \(tiny, bench-mini\)\n",
                        err), err
    assert not (tmp_path / "v3").exists()
    # with -v the same error comes with its traceback
    r = run("-v", "init-model", "--preset", "deepseek-v3", "--out", str(tmp_path / "v3"), check=False)
    assert r.returncode == 2 and "Traceback" in r.stderr and "InitModelError" in r.stderr


def test_init_model_refuses_what_does_not_fit_the_available_memory(tmp_path):
    from expertpool.model.args import preset
    from expertpool.model.embedded import InitModelError, init_model, init_model_bytes

    need = init_model_bytes(preset("bench-mini"))
    assert need == preset("bench-mini").num_params() * (4 + 2)  # float32 model + the bfloat16 copy it writes
    with pytest.raises(InitModelError, match=r"preset 'bench-mini' has 0\.2B parameters .* choose a smaller "
                       r"preset \(tiny\)"):
        init_model("bench-mini", tmp_path / "mini", available_bytes=need - 1)
    assert not (tmp_path / "mini").exists()


def test_main_catches_user_errors_once(capsys):
    """main() itself (not only the console script) turns a UserError into the one line and exit status 2."""
    from expertpool.cli import main
    from expertpool.errors import UserError
    from expertpool.model.safetensors_io import CheckpointError
    from expertpool.model.storage import StorageError
    from expertpool.platform.config import ConfigError
    from expertpool.platform.protocol import ApiError

    assert all(issubclass(e, UserError) for e in (ConfigError, CheckpointError, StorageError, ApiError))
    with pytest.raises(SystemExit) as info:
        main(["manifests", str(ROOT / "missing.yaml")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("expertpool: error: ") and "missing.yaml" in err and "Traceback" not in err


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
    assert r.returncode == 2, r.stdout
    assert re.search(r"train\.jobs\.law: needs ~\d+ GiB per worker of 72 GiB on GPU \(frozen weights [\d.]+, "
                     r"trainable weights and gradients [\d.]+, optimizer state [\d.]+, activations for 4096 "
                     r"tokens [\d.]+\).*add workers", r.stderr), r.stderr
    cfg.write_text(job.format(base="null", workers=2, seq=256, mem=80))  # the tiny model fits easily
    r = run("validate", str(cfg), env=env)
    assert re.search(r"train\.jobs\.law: ~[\d.]+ GiB per worker of 72 GiB on GPU", r.stdout) and "ok" in r.stdout


def test_validate_checks_what_the_replica_would_and_prints_what_it_derived(tmp_path):
    env = {"EXPERTPOOL_CACHE": str(tmp_path / "cache")}
    r = run("validate", "cluster.yaml", env=env)
    out = r.stdout
    # the embedded tiny model: 256 experts over the shipped 2 actors; 3 layers x (32 + 8) x 2 bytes of KV
    assert "2 actors per replica holding [128, 128] expert slots (0 redundant)" in out, out
    assert "KV 240 bytes per token" in out
    assert re.search(r"serving\.kv_cache: \d+ blocks of 16 tokens", out)
    assert "placement bundles per replica (PACK): [{'CPU': 0.1}, {'CPU': 0.5}, {'CPU': 0.5}]" in out
    assert "kuberay: 1 pool pod(s) per replica" in out
    assert "train.jobs.demo.dataset: data/demo_domain.jsonl (jsonl, field messages)" in out
    shipped = (ROOT / "cluster.yaml").read_text()
    long = tmp_path / "long.yaml"
    long.write_text(shipped.replace("max_seq_len: 512", "max_seq_len: 1000000"))
    err = _user_error("validate", str(long), env=env)
    assert "serving.max_seq_len: (1000000) exceeds the model's max_position_embeddings (2048)" in err
    kv = tmp_path / "kv.yaml"  # 512 tokens x 240 bytes need 120 KiB; 0.0001 GiB is ~105 KiB
    kv.write_text(shipped.replace("    block_size: 16\n", "    block_size: 16\n    memory_gb: 0.0001\n"))
    err = _user_error("validate", str(kv), env=env)
    assert "serving.kv_cache.memory_gb: 0.0001 GiB holds 27 blocks, fewer than one sequence" in err


def test_validate_checks_each_jobs_dataset_or_only_the_named_job(tmp_path):
    env = {"EXPERTPOOL_CACHE": str(tmp_path / "cache")}
    shipped = (ROOT / "cluster.yaml").read_text()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(shipped.replace("path: data/demo_domain.jsonl", "path: data/no-such-file.jsonl"))
    err = _user_error("validate", str(cfg), env=env)
    assert "train.jobs.demo.dataset.path: 'data/no-such-file.jsonl' does not exist" in err
    err = _user_error("validate", str(cfg), "--job", "dmeo", env=env)
    assert "no job named 'dmeo' (known: demo); did you mean 'demo'?" in err
    r = run("validate", "cluster.yaml", "--job", "demo", env=env)
    assert "train.jobs.demo.dataset:" in r.stdout and r.stdout.strip().endswith("cluster.yaml: ok")


def test_public_api():
    from expertpool.model import ModelArgs, Transformer, load_checkpoint
    from expertpool.model.args import ModelArgs as args_ModelArgs
    from expertpool.model.checkpoint import load_checkpoint as checkpoint_load
    from expertpool.model.transformer import Transformer as transformer_Transformer
    from expertpool.platform import build_app, load_config
    from expertpool.platform.app import build_app as app_build_app
    from expertpool.platform.config import load_config as config_load

    assert (ModelArgs, Transformer, load_checkpoint) == (args_ModelArgs, transformer_Transformer, checkpoint_load)
    assert (build_app, load_config) == (app_build_app, config_load)
    with pytest.raises(ImportError):
        from expertpool.model import no_such_name  # noqa: F401


def test_the_cli_imports_neither_torch_nor_ray_nor_pydantic_for_help():
    code = ("import sys, expertpool.model, expertpool.platform, expertpool.cli\n"
            "expertpool.cli.build_parser()\n"
            "bad = [m for m in ('torch', 'ray', 'pydantic') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# --- the documented command lines are the real ones -------------------------------------------------------


def _documented_commands():
    """(where, argv) of every ``expertpool ...`` command line in README.md and docs/*.md code blocks and in
    cluster.yaml's header comment; a line may chain commands with && ; or |, and end in a # comment."""
    sources = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        fenced = False
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            elif fenced:
                sources.append((f"{path.name}:{n}", line))
    for n, line in enumerate((ROOT / "cluster.yaml").read_text().splitlines(), 1):
        if re.match(r"#\s{2,}expertpool ", line):
            sources.append((f"cluster.yaml:{n}", line.lstrip("# ")))
    for where, line in sources:
        if not re.search(r"(^|&&|;|\|)\s*expertpool(\s|$)", line):
            continue  # not a shell line that runs the command (YAML, Python, error messages, prose)
        argv: list[str] = []
        redirect = False  # `> file` belongs to the shell, not to the command
        for token in [*shlex.split(line, comments=True), "&&"]:
            if token in ("&&", ";", "|", "||"):
                if argv[:1] == ["expertpool"]:
                    yield where, argv[1:]
                argv, redirect = [], False
            elif token in (">", ">>", "2>", "<") or redirect:
                redirect = True
            else:
                argv.append(token)


def _documented_mentions():
    """(where, subcommands, flags) of each inline `expertpool ...` span of README.md and docs/*.md."""
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for span in re.findall(r"`expertpool ([^`]*)`", line):
                words = span.split()
                if words and not words[0].startswith("-"):
                    yield f"{path.name}:{n}", words[0].split("/"), [w.strip("[]").split("=")[0] for w in words
                                                                     if w.strip("[]").startswith("--")]


def test_documented_command_lines_parse_with_the_real_parser():
    from expertpool.cli import build_parser

    commands = list(_documented_commands())
    assert len(commands) >= 10  # README's quick start and operations.md's examples are found
    wrong = []
    for where, argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit:
            wrong.append(f"{where}: expertpool {' '.join(argv)}")
    assert not wrong, "documented commands the CLI rejects:\n" + "\n".join(wrong)


def test_documented_inline_commands_and_flags_exist():
    from expertpool.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    wrong = []
    for where, names, flags in _documented_mentions():
        for name in names:
            if name not in commands:
                wrong.append(f"{where}: no command {name!r}")
                continue
            known = {s for a in commands[name]._actions for s in a.option_strings}
            wrong += [f"{where}: expertpool {name} has no {flag}" for flag in flags if flag not in known]
    assert not wrong, "\n".join(wrong)
