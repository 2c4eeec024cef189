"""Ray Serve HTTP ingress: the middleware that makes the errors Serve answers itself OpenAI JSON, and
the cluster environment of ``serving.ingress`` (Serve's Python proxy, or HAProxy in front of an HTTP
server inside each replica).

Most errors come from the replica (``api.py``) and are already OpenAI JSON. A few never reach it:
Serve's proxy answers them with a plain-text body. The one clients meet in production is
back-pressure: more than ``serving.max_queued_requests`` requests waiting for a replica gives a
``503`` (with ``Retry-After`` when Serve knows one); others are a request timeout (``408``), an
unknown route (``404``) or no healthy replica (``503``). An OpenAI client parses ``error.message``
from JSON, so this middleware rewrites those plain-text answers on OpenAI paths (``.../v1/...``)
into ``{"error": {"message", "type", "param", "code"}}`` with the same status, and adds
``Retry-After: 1`` to a 429/503 that has none. JSON and SSE responses pass through untouched, as
does everything on other paths (other Serve applications sharing the proxy).

Serve loads proxy middlewares from the import path in the environment variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` of the Ray cluster processes (it must be set before
the proxy starts): ``expertpool serve`` sets it when it starts its own Ray; the generated KubeRay
manifests set it on every pod; for a cluster you start yourself, export it before ``ray start``.
"""

import json
from typing import Any

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "expertpool.platform.proxy:middlewares"
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # serving.ingress: haproxy

_TYPES = {408: ("timeout", "request_timeout"), 429: ("server_overloaded", "too_many_requests"),
          503: ("server_overloaded", "service_unavailable")}


def openai_error_body(status: int, text: str) -> dict[str, Any]:
    err_type, code = _TYPES.get(status, ("invalid_request_error" if status < 500 else "internal_error",
                                         str(status)))
    message = text or f"HTTP {status}"
    if status in (429, 503):
        message += " The server is overloaded; retry after the Retry-After delay."
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


def _is_openai_path(path: str) -> bool:
    return "/v1/" in path or path.endswith("/v1")


class OpenAIErrorMiddleware:
    """Pure ASGI middleware (no body buffering except for the rewritten error responses)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not _is_openai_path(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}

        async def send_rewriting(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers") or []
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"").lower()
                if message["status"] >= 400 and not ctype.startswith((b"application/json", b"text/event-stream")):
                    held.update(start=message, body=b"")
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                start = held.pop("start")
                status = start["status"]
                body = json.dumps(openai_error_body(status, held["body"].decode(errors="replace").strip())).encode()
                headers = [(k, v) for k, v in start.get("headers") or []
                           if k.lower() not in (b"content-type", b"content-length")]
                headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                if status in (429, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                    headers.append((b"retry-after", b"1"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        await self.app(scope, receive, send_rewriting)


def ingress_env(ingress: str = "proxy") -> dict[str, str]:
    """The environment every Ray process of a cluster needs for ``serving.ingress``: the middleware
    always (Serve applies HTTP middlewares in its proxy and in a replica's own HTTP server alike), and
    Ray Serve's HAProxy switch for ``haproxy``."""
    env = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
    if ingress == "haproxy":
        env[HAPROXY_ENV] = "1"
    return env


def set_proxy_env(ingress: str = "proxy") -> None:
    """Make a Ray instance started by this process load the middleware, and use HAProxy for
    ``ingress="haproxy"`` (call before ``ray.init``; a value the caller exported wins)."""
    import os

    for key, value in ingress_env(ingress).items():
        os.environ.setdefault(key, value)


def cluster_ingress() -> str:
    """The ingress of the Ray cluster this process belongs to, as its environment says."""
    import os

    return "haproxy" if os.environ.get(HAPROXY_ENV, "0") == "1" else "proxy"


def ingress_mismatch(declared: str) -> str | None:
    """Why the cluster does not serve ``declared`` (a replica logs it), or None."""
    actual = cluster_ingress()
    if actual == declared:
        return None
    how = (f"export {HAPROXY_ENV}=1" if declared == "haproxy" else f"unset {HAPROXY_ENV}")
    return (f"serving.ingress is {declared!r} but this Ray cluster runs the {actual!r} ingress; "
            f"{HAPROXY_ENV} is a setting of the cluster: {how} before `ray start` on every node "
            "(expertpool serve and the KubeRay manifests set it for you)")


def orphaned_haproxies() -> list[int]:
    """PIDs of Ray Serve HAProxy processes whose Ray is gone (no longer children of Serve's
    HAProxyManager actor). A Ray stopped with ``ray stop --force`` kills the manager actor before it
    can stop its HAProxy; the orphan keeps its ports and makes the next HAProxy start fail."""
    import os

    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if not (cmd and cmd[0].endswith(b"/haproxy") and any(b"haproxy-serve" in c for c in cmd)):
            continue
        try:  # a live one is a child of Serve's HAProxyManager actor; an orphan, of init or a subreaper
            with open(f"/proc/{ppid}/cmdline", "rb") as f:
                parent = f.read()
        except OSError:
            parent = b""
        if b"HAProxyManager" not in parent:
            pids.append(int(entry))
    return pids


def middlewares() -> list:
    """The proxy callback Serve calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    from starlette.middleware import Middleware

    return [Middleware(OpenAIErrorMiddleware)]
