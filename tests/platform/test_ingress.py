"""``serving.ingress: haproxy`` end to end, the way a user runs it: ``expertpool serve --ingress haproxy``
starts its own Ray with Ray Serve's HAProxy ingress. HAProxy, not Serve's Python proxy, listens on the
port; completions stream through it from the replica's own HTTP server; an unknown
route is OpenAI error JSON; and Ctrl-C (SIGTERM) leaves no HAProxy behind. The machine is a temporary HOME
in a directory without cluster.yaml (so the built-in defaults: 2 actors x 1 CPU on this 2-core box)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]



def _listener(port: int, wait_s: float = 30.0) -> tuple[str, list[str]] | None:
    """(name, command line) of the process listening on ``port``. HAProxy reloads when Serve's routes
    change: a new process takes the socket over and the old one exits, so a listener found a moment
    ago may be gone when it is read (a CI run once failed on that); look again until one is read whole."""
    import psutil
    deadline = time.monotonic() + wait_s
    while True:
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
                try:
                    p = psutil.Process(c.pid)
                    return p.name(), p.cmdline()
                except psutil.NoSuchProcess:
                    pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _haproxies(config: str) -> list[int]:
    """PIDs of the HAProxy processes running config file ``config`` (Ray Serve's HAProxy runs
    ``haproxy -db -f <config>``, one config per Ray node)."""
    import psutil
    pids = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("haproxy") and config in cmd:
            pids.append(p.pid)
    return pids


def test_expertpool_serve_behind_haproxy(tiny_dir, tmp_path):
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # a replica behind HAProxy drains for at least this long before it stops (30 s by default), so
    # that HAProxy has stopped routing to it; nothing here needs the wait
    env.update(HOME=str(home), EXPERTPOOL_CACHE=str(Path(tiny_dir).parent),
               RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="1")
    exe = Path(sys.executable).parent / "expertpool"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "expertpool.cli"]
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd + ["serve", "--ingress", "haproxy", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if httpx.get(f"{base}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        listener = _listener(port)
        assert listener is not None and listener[0] == "haproxy", listener
        cmd = listener[1]
        config = cmd[cmd.index("-f") + 1]  # this run's HAProxy config: checked below that none outlives it

        chunks = []
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                "model": "expertpool-tiny", "prompt": "hello", "max_tokens": 8, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        # streamed, not buffered by HAProxy: several chunks (a token that ends inside a UTF-8 character
        # waits for the next one, so the tiny model's random tokens give fewer chunks than tokens)
        assert sum(1 for c in chunks if c["choices"]) >= 2, chunks
        assert chunks[-1]["usage"]["completion_tokens"] == 8

        r = httpx.get(f"{base}/v1/no-such-route", timeout=10)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    finally:
        proc.send_signal(signal.SIGTERM)  # what Ctrl-C does: serve.shutdown() stops HAProxy
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # only this run's HAProxy: an unrelated leftover on the machine is not this test's failure
    deadline = time.monotonic() + 30
    while _listener(port, wait_s=0) is not None or _haproxies(config):
        assert time.monotonic() < deadline, ("HAProxy outlived expertpool serve", _listener(port, wait_s=0),
                                             _haproxies(config))
        time.sleep(0.5)
