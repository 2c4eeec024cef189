"""End to end, the user path of docs/operations.md as written: after an ``expertpool serve`` on the same
machine (which leaves Ray 2.60's ``~/.ray/auth_token``), the documented exports, ``ray get-auth-token
--generate``, a private ``ray start --head`` and ``ray job submit --working-dir . -- python -m
expertpool.jobs.finetune --config cluster.yaml --job demo``. The machine is a temporary HOME; the
environment holds no Ray variable the docs do not name. Slow (a serve, a fresh cluster, the 20-step demo)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from expertpool.model.patch import read_patch
from tests.ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]



def _own_processes(marker: str) -> list[int]:
    """PIDs of the processes of our private cluster: their command lines name its temp dir."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.info["pid"] != os.getpid():
            pids.append(p.info["pid"])
    return pids


BIN = Path(sys.executable).parent  # the console scripts (ray, expertpool) beside this interpreter
DOCUMENTED = {"RAY_AUTH_MODE": "token",  # docs/operations.md, "Running locally" and "Ray token authentication"
              "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "expertpool.platform.proxy:middlewares"}


def _script(name: str) -> list[str]:
    path = BIN / name
    return [str(path)] if path.exists() else [sys.executable, "-m", {"expertpool": "expertpool.cli"}.get(name, name)]


@pytest.fixture
def machine(tmp_path):
    """A machine as the docs assume it: its own HOME, on which `expertpool serve` has run once."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home)}
    (port,) = free_ports(1)
    r = subprocess.run(_script("expertpool") + ["serve", "--no-block", "--address", "local", "--port", str(port)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert (home / ".ray" / "auth_token").exists(), "expertpool serve (Ray 2.60 ray.init) leaves a token"
    return env


@pytest.fixture
def head(machine, tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="eprs", dir="/tmp")  # short: Ray's unix socket paths are limited
    gcs, dash, client, nm, om, agent, metrics, wmin = free_ports(8)
    env = machine | DOCUMENTED
    subprocess.run(_script("ray") + ["get-auth-token", "--generate"], check=True, env=env, capture_output=True,
                   timeout=120)
    cmd = _script("ray") + [
        "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        "--include-dashboard=true", f"--temp-dir={temp_dir}", "--num-cpus=4", f"--ray-client-server-port={client}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--dashboard-agent-listen-port={agent}",
        f"--metrics-export-port={metrics}", "--disable-usage-stats"]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        for pid in _own_processes(temp_dir):  # never `ray stop`: it would stop every Ray on the machine
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for pid in _own_processes(temp_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_demo(head, tiny_dir, tmp_path):
    address, env = head
    runtime_env = {"excludes": [".git", "out", "*.pyc", ".pytest_cache"],
                   "env_vars": {"EXPERTPOOL_CACHE": str(Path(tiny_dir).parent)}}
    submit = _script("ray") + ["job", "submit", f"--address={address}", "--working-dir", ".",
                               "--runtime-env-json", json.dumps(runtime_env), "--",
                               "python", "-m", "expertpool.jobs.finetune", "--config", "cluster.yaml", "--job", "demo",
                               "--no-publish", "--check-frozen"]
    # what the docs prevent: the cluster runs with token auth, a client without RAY_AUTH_MODE fails
    bare = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run(submit, cwd=ROOT, env=bare, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "RAY_AUTH_MODE" in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    r = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    summary = json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith('{"step"')))
    assert summary["step"] == 20 and summary["world"] == 2 and summary["mode"] == "esft"
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["frozen_changed"] == 0
    # the relative output_dir went under train.storage_path's default, ~/expertpool/runs on the head
    # node, not into the job's temporary copy of the working directory
    assert summary["output"] == str(Path(env["HOME"]) / "expertpool" / "runs" / "demo" / "patch")
    assert read_patch(summary["output"]).domain == "demo"
