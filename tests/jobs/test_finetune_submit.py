"""End to end: a private ``ray start --head`` and ``ray job submit -- python -m expertpool.jobs.finetune
--config cluster.yaml --job demo``, as a user runs it. Slow (a fresh cluster plus the 20-step demo)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from expertpool.model.patch import read_patch

pytestmark = [pytest.mark.slow, pytest.mark.ray]
ROOT = Path(__file__).resolve().parents[2]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _own_processes(marker: str) -> list[int]:
    """PIDs of the processes of our private cluster: their command lines name its temp dir."""
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if marker in cmd and p.info["pid"] != os.getpid():
            pids.append(p.info["pid"])
    return pids


@pytest.fixture
def head(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="eprs", dir="/tmp")  # short: Ray's unix socket paths are limited
    gcs, dash, client, nm, om, agent, metrics, wmin = _free_ports(8)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # a private localhost cluster: without this, Ray 2.60 turns token auth on whenever some earlier
    # local cluster left ~/.ray/auth_token, and the job CLI then fails to authenticate
    env["RAY_AUTH_MODE"] = "disabled"
    cmd = ["ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
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


def test_ray_job_submit_demo(head, tiny_dir):
    address, env = head
    runtime_env = {"excludes": [".git", "out", "*.pyc", ".pytest_cache"],
                   "env_vars": {"EXPERTPOOL_CACHE": str(Path(tiny_dir).parent)}}
    r = subprocess.run(["ray", "job", "submit", f"--address={address}", "--working-dir", ".",
                        "--runtime-env-json", json.dumps(runtime_env), "--",
                        "python", "-m", "expertpool.jobs.finetune", "--config", "cluster.yaml", "--job", "demo",
                        "--no-publish", "--check-frozen"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    summary = json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith('{"step"')))
    assert summary["step"] == 20 and summary["world"] == 2 and summary["mode"] == "esft"
    assert summary["eval_loss_final"] < summary["eval_loss_initial"]
    assert summary["frozen_changed"] == 0
    assert read_patch(summary["output"]).domain == "demo"
