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
