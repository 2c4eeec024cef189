"""Shared pieces of the serving benchmarks (bench/soak.py, bench/faults.py): start a private local Ray
with the app deployed on a free loopback port, stream completions, read the replica's stats.
Programs in bench/ import this as ``common`` (they run as ``python bench/NAME.py``)."""

import datetime
import json
import os
import platform
import socket
import subprocess
import time


def scratch_dir(prefix: str = "expertpool-bench-") -> str:
    """A temporary directory removed when the benchmark exits (a bench-mini checkpoint is ~0.5 GB)."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isa_caps() -> str:
    """The instruction-set caps of this run's environment (torch's ATen and oneDNN), '' without any:
    ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` runs an AVX-512 machine as an AVX2-only one."""
    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    return " ".join(caps)


def cpu_kind() -> str:
    """'AVX-512 BF16' or 'AVX2 only' (or what lscpu shows), for the benchmark record; with an ISA cap in
    the environment, followed by the cap."""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    if caps := isa_caps():
        return f"{cpu_kind_of(flags)}, instruction set capped by {caps}"
    return cpu_kind_of(flags)


def cpu_kind_of(flags: str) -> str:
    if "amx_bf16" in flags:
        return "AMX + AVX-512 BF16"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def cpu_flags_line() -> str:
    """The CPU's model and the flags that decide the fast dtype (printed by every benchmark)."""
    from expertpool.model.dtype import cpu_features
    f = cpu_features()
    want = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")
    line = f"{f.model_name or 'unknown CPU'}; flags: {' '.join(x for x in want if x in f.flags) or 'none of interest'}"
    return f"{line}; capped by {caps}" if (caps := isa_caps()) else line


def machine_line(cmd: str) -> str:
    import torch
    return (f"{datetime.date.today()}, `python {cmd}`, {platform.machine()} ({cpu_kind()}), {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}")


def start(cfg_data: dict, num_cpus: int | None = None) -> tuple[str, str]:
    """ray.init (private, loopback) and deploy the app of ``cfg_data``; returns (base url, app name)."""
    import ray

    from expertpool.platform.config import parse_config
    from expertpool.platform.proxy import set_proxy_env
    from expertpool.platform.app import deploy

    cfg_data.setdefault("serving", {}).update(host="127.0.0.1", port=free_port())
    cfg = parse_config(cfg_data)
    set_proxy_env(cfg.serving.ingress)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    base = deploy(cfg)
    from ray import serve
    while serve.status().applications[cfg.serving.app_name].status != "RUNNING":
        time.sleep(0.5)
    return base, cfg.serving.app_name


def stop() -> None:
    """Shut down what ``start`` brought up: the Serve app, then the private Ray."""
    import ray
    from ray import serve
    serve.shutdown()
    ray.shutdown()


def handle(app: str):
    from ray import serve
    from expertpool.platform.config import DEPLOYMENT_NAME
    return serve.get_deployment_handle(DEPLOYMENT_NAME, app)


async def stats(app: str) -> dict:
    return await handle(app).stats.remote()


def _new_result() -> dict:
    return {"text": [], "finish": None, "usage": None, "error": None, "times": [], "t0": time.monotonic()}


def _take_line(out: dict, line: str | bytes, on_token=None) -> None:
    """One SSE line of a streamed completion into ``out`` (data lines only; [DONE] and blanks skipped)."""
    if isinstance(line, bytes):
        line = line.decode()
    line = line.rstrip("\r\n")
    if not line.startswith("data: ") or line == "data: [DONE]":
        return
    ch = json.loads(line[6:])
    if "error" in ch:
        out["error"] = ch["error"].get("message")
        return
    if ch.get("usage"):
        out["usage"] = ch["usage"]["completion_tokens"]
    for c in ch.get("choices") or ():
        if c.get("text"):
            out["text"].append(c["text"])
            out["times"].append(time.monotonic())
            if on_token is not None:
                on_token()
        out["finish"] = c.get("finish_reason") or out["finish"]


def _streaming(body: dict) -> dict:
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


async def stream(client, base: str, body: dict, on_token=None) -> dict:
    """One streaming completion over raw SSE through an ``httpx.AsyncClient``: text, finish reason,
    usage, error, token times."""
    out = _new_result()
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=_streaming(body)) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                _take_line(out, line, on_token)
    except Exception as e:  # noqa: BLE001 - a broken connection is a result to report, not to raise
        out["error"] = f"{type(e).__name__}: {e}"
    out["text"] = "".join(out["text"])
    return out


async def stream_aiohttp(session, base: str, body: dict) -> dict:
    """``stream`` through an ``aiohttp.ClientSession``: the same result, for load generators that share
    the CPUs with the server they measure (bench/serve.py): aiohttp parses HTTP in C, and a token costs
    the client about a third of what it costs through httpx."""
    out = _new_result()
    try:
        async with session.post(f"{base}/v1/completions", json=_streaming(body)) as r:
            if r.status != 200:
                out["error"] = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return out
            async for line in r.content:  # one line at a time
                _take_line(out, line)
    except Exception as e:  # noqa: BLE001 - a broken connection is a result to report, not to raise
        out["error"] = f"{type(e).__name__}: {e}"
    out["text"] = "".join(out["text"])
    return out


def append_to_benchmarks(title: str, text: str) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
    with open(path, "a") as f:
        f.write(f"\n## {title}\n\n{text}\n")
