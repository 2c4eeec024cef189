"""OpenAI-compatible HTTP API over an ``Engine``: routes, SSE streaming, errors, auth, usage.

``OpenAIServer`` holds the logic and knows nothing about Ray; ``build_fastapi_app`` wires it to
routes. The Serve deployment (``app.py``) only builds both inside the replica, so everything here is
tested in-process and through ``serve.run`` with a fake engine.

Contract with the engine: ``generate`` is an async generator of ``TokenEvent``s. We always close it
(``aclose``) when we stop reading, whatever the reason — stop string hit, client disconnect (Serve
cancels the handler task), error — and closing is what aborts the request and frees its KV blocks.
The close is shielded from cancellation so the engine's cleanup can await.

Text: token ids are detokenized incrementally (vLLM's prefix/read offsets: decode a small window
and emit only text that is complete, i.e. does not end in an unfinished UTF-8 sequence). Stop
strings are matched on that text across token boundaries; text that could still be the start of a
stop string is held back, so a stop string is never streamed, and the output is cut before it.

Streaming requests wait for the first engine event before sending headers, so an overloaded engine
(``EngineOverloaded``, raised before the first event) is still a 503 with ``Retry-After``, and the
time to first token is measured where the client sees it. Errors after headers are sent go out as
an SSE ``error`` event followed by ``[DONE]``.

Not supported (rejected with 400 by ``protocol``): n > 1, logprobs, echo, suffix, penalties, tools.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertpool.model.sampling import SamplingParams
from expertpool.platform import protocol as P
from expertpool.platform.scheduler import EngineOverloaded, EngineUnavailable
from expertpool.platform.metrics import ServerMetrics

logger = logging.getLogger(__name__)

STATUS_CLIENT_GONE = 499  # nginx's convention, used only as a metrics tag
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TokenizerLike(Protocol):
    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without ever emitting half a character.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and emits the difference: the short prefix
    window keeps tokenizers whose pieces depend on their left neighbour (leading-space markers)
    right, and the cost per step stays O(window) instead of O(length)."""

    def __init__(self, tokenizer: TokenizerLike, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(full_text) > len(prefix_text) and not full_text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full_text[len(prefix_text):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end, decoded as U+FFFD)."""
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full_text = self.tok.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text):]


class StopStringMatcher:
    """Finds the earliest stop string in streamed text, however it is split across deltas.

    ``push`` returns the text that is safe to emit and whether a stop string was hit (then the text
    before it is all that is left to emit). The held-back tail is the longest suffix that is a
    prefix of some stop string: any match must start inside it, so emitted text is never part of a
    match."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        keep = self._held_back_len()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_back_len(self) -> int:
        p = self.pending
        for n in range(min(len(p), max(len(s) for s in self.stops) - 1), 0, -1):
            tail = p[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0


@dataclass
class Delta:
    text: str
    finish_reason: str | None  # None while running


async def close_shielded(gen: Any) -> None:
    """Close the engine generator even while our task is being cancelled (client disconnect)."""
    with anyio.CancelScope(shield=True):
        await gen.aclose()


class GenerationStream:
    """One engine request seen as text deltas. ``start`` waits for the first engine event (so an
    overload is raised before any response is sent); iterating yields ``Delta``s; ``aclose`` closes
    the engine generator, which aborts the request if it is still running."""

    def __init__(self, gen: Any, tokenizer: TokenizerLike, stops: list[str], metrics: ServerMetrics, model: str,
                 t_arrival: float):
        self.gen = gen
        self.detok = IncrementalDetokenizer(tokenizer)
        self.matcher = StopStringMatcher(stops)
        self.metrics = metrics
        self.model = model
        self.t_arrival = t_arrival
        self.t_last: float | None = None
        self.first_event: Any = None
        self.closed = False
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    async def start(self) -> None:
        try:
            self.first_event = await self.gen.__anext__()
        except StopAsyncIteration:
            raise RuntimeError("engine.generate() ended without a final event") from None
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await close_shielded(self.gen)

    def _timing(self, n_tokens: int) -> None:
        if n_tokens <= 0:
            return
        t = time.perf_counter()
        if self.t_last is None:
            self.metrics.first_token(self.model, t - self.t_arrival)
            self.metrics.tokens(self.model, n_tokens, None)
        else:
            self.metrics.tokens(self.model, n_tokens, t - self.t_last)
        self.t_last = t

    def _handle(self, ev: Any) -> Delta | None:
        self._timing(len(ev.token_ids))
        self.prompt_tokens, self.completion_tokens = ev.num_prompt_tokens, ev.num_output_tokens
        text = self.detok.push(list(ev.token_ids))
        if ev.finish_reason is not None:
            text += self.detok.flush()
        safe, hit = self.matcher.push(text)
        if hit:
            self.finish_reason = "stop"
        elif ev.finish_reason is not None:
            self.finish_reason = ev.finish_reason
            safe += self.matcher.flush()
        if self.finish_reason is not None:
            return Delta(safe, self.finish_reason)
        return Delta(safe, None) if safe else None

    async def __aiter__(self) -> AsyncIterator[Delta]:
        assert self.first_event is not None, "call start() first"
        try:
            ev = self.first_event
            while True:
                d = self._handle(ev)
                if d is not None:
                    yield d
                    if d.finish_reason is not None:
                        return
                try:
                    ev = await self.gen.__anext__()
                except StopAsyncIteration:
                    raise RuntimeError("engine.generate() ended without a finish_reason") from None
        finally:
            await self.aclose()


class EngineStreamingResponse(StreamingResponse):
    """SSE response that closes its body and the engine stream however it ends. Starlette leaves a
    body iterator suspended at ``yield`` when the task is cancelled during a send; closing it here
    (shielded) instead of at garbage collection frees the engine's KV blocks right away."""

    def __init__(self, body: AsyncIterator[str], stream: GenerationStream):
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await self.stream.aclose()


def unavailable_error(e: EngineUnavailable) -> P.ApiError:
    """The engine lost its worker group for good: 503 with Retry-After (Serve replaces the replica)."""
    return P.ApiError(503, f"The server is unavailable: {e}; retry after {e.retry_after_s:.0f} s.",
                      type="server_error", code="engine_unavailable",
                      headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})


def error_response(err: P.ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# Characters that JSON leaves raw but line readers built on str.splitlines() (httpx's aiter_lines, for one)
# treat as line breaks: escaped, a generated U+2028 can't cut an SSE data line in two.
_SPLITLINES_EXTRA = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def sse(obj: Any) -> str:
    data = json.dumps(obj, separators=(',', ':'), ensure_ascii=False).translate(_SPLITLINES_EXTRA)
    return f"data: {data}\n\n"


class OpenAIServer:
    """The API logic over one engine and tokenizer. ``api_key`` None = no auth.
    ``stats_interval_s`` is how often engine stats are copied into the gauges."""

    def __init__(self, engine: Any, tokenizer: TokenizerLike, *, api_key: str | None = None,
                 metrics: ServerMetrics | None = None, stats_interval_s: float = 1.0):
        self.engine = engine
        self.tokenizer = tokenizer
        self.api_key = api_key or None
        self.metrics = metrics or ServerMetrics()
        self.stats_interval_s = stats_interval_s
        self.created = P.now()
        self._stats_task: asyncio.Task | None = None

    # ---- background stats -------------------------------------------------------------------

    def record_stats(self) -> None:
        self.metrics.update_from_stats(self.engine.stats())

    async def _stats_loop(self) -> None:
        while True:
            try:
                self.record_stats()
            except Exception:
                # A metrics hiccup must not kill serving; log every occurrence (no silent fallback).
                logger.exception("updating metrics from engine.stats() failed")
            await asyncio.sleep(self.stats_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI):
        self._stats_task = asyncio.create_task(self._stats_loop(), name="expertpool-stats")
        try:
            yield
        finally:
            self._stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_task

    # ---- helpers ------------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise P.ApiError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                             type="authentication_error", code="invalid_api_key")

    def resolve_model(self, model: str | None) -> str:
        ids = self.engine.model_ids()
        if model is None:
            return ids[0]
        if model not in ids:
            raise P.ApiError(404, f"The model '{model}' does not exist. Served models: {', '.join(ids)}.",
                             param="model", code="model_not_found")
        return model

    @staticmethod
    async def parse(request: Request, cls: type):
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise P.ApiError(400, f"Request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise P.ApiError(400, f"Request body must be a JSON object, got {type(body).__name__}.",
                             code="invalid_json")
        try:
            return cls.model_validate(body)
        except ValidationError as e:
            raise P.validation_error_to_api_error(e) from None

    def sampling_params(self, req: Any, prompt_len: int) -> SamplingParams:
        max_seq_len = self.engine.max_seq_len
        room = max_seq_len - prompt_len
        if room < 1:
            raise P.ApiError(400, f"The prompt has {prompt_len} tokens, which leaves no room to generate within "
                             f"max_seq_len={max_seq_len} (prompt tokens + 1 must be <= max_seq_len). "
                             "Shorten the prompt.", param="messages" if hasattr(req, "messages") else "prompt",
                             code="context_length_exceeded")
        requested = req.requested_max_tokens()
        top_k = req.top_k if req.top_k is not None else 0
        try:
            return SamplingParams(
                max_tokens=min(requested, room) if requested is not None else room,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=max(top_k, 0),
                seed=req.seed,
                stop_token_ids=tuple(req.stop_token_ids or ()),
                ignore_eos=bool(req.ignore_eos),
            )
        except ValueError as e:
            raise P.ApiError(400, f"Invalid sampling parameters: {e}", code="invalid_value") from None

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(req.chat_messages(), add_generation_prompt=True)
        except ValueError as e:  # the template rejects the conversation (e.g. a role it has no slot for)
            raise P.ApiError(400, f"The chat template rejected the messages: {e}", param="messages",
                             code="invalid_value") from None
        return self.tokenizer.encode(text, add_bos=False)

    def completion_prompt(self, req: P.CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt, add_bos=True)
        return list(req.prompt)

    async def start_stream(self, rid: str, prompt: list[int], params: SamplingParams, model: str,
                           stops: list[str], t0: float) -> GenerationStream:
        gen = self.engine.generate(rid, prompt, params, model=model)
        stream = GenerationStream(gen, self.tokenizer, stops, self.metrics, model, t0)
        try:
            await stream.start()
        except ValueError as e:  # the engine rejects the prompt itself (e.g. token ids outside the vocabulary)
            raise P.ApiError(400, f"Invalid prompt: {e}", param="prompt", code="invalid_value") from None
        except EngineUnavailable as e:
            raise unavailable_error(e) from None
        except EngineOverloaded as e:
            retry = e.retry_after_s
            raise P.ApiError(503, f"The server is overloaded ({e}); retry after {retry:.1f} s.",
                             type="server_overloaded", code="engine_overloaded",
                             headers={"Retry-After": str(max(1, math.ceil(retry)))}) from None
        return stream

    # ---- endpoints ----------------------------------------------------------------------------

    async def completions(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        model_tag = "unknown"
        status = 500
        streaming = False
        try:
            self.check_auth(request)
            req = await self.parse(request, P.ChatCompletionRequest if chat else P.CompletionRequest)
            model = self.resolve_model(req.model)
            model_tag = model
            prompt = self.chat_prompt(req) if chat else self.completion_prompt(req)
            params = self.sampling_params(req, len(prompt))
            rid = P.new_id("chatcmpl" if chat else "cmpl")
            stream = await self.start_stream(rid, prompt, params, model, req.stop_strings(), t0)
            if req.stream:
                streaming = True
                body = self._sse_body(stream, rid, model, chat, req.include_usage_chunk(), t0)
                return EngineStreamingResponse(body, stream)
            text, finish = [], None
            try:
                async for d in stream:
                    text.append(d.text)
                    finish = d.finish_reason
            except EngineUnavailable as e:
                raise unavailable_error(e) from None
            finally:
                await stream.aclose()
            use = P.usage(stream.prompt_tokens, stream.completion_tokens)
            build = P.chat_completion if chat else P.completion
            status = 200
            self.metrics.request_latency(model, time.perf_counter() - t0, stream.prompt_tokens)
            return JSONResponse(build(rid, P.now(), model, "".join(text), finish, use))
        except P.ApiError as e:
            status = e.status
            return error_response(e)
        except asyncio.CancelledError:
            status = STATUS_CLIENT_GONE
            raise
        except Exception as e:
            logger.exception("request failed")
            return error_response(P.ApiError(500, f"Internal error: {type(e).__name__}: {e}", type="internal_error",
                                             code="internal_error"))
        finally:
            if not streaming:
                self.metrics.request_done(model_tag, status)

    async def _sse_body(self, stream: GenerationStream, rid: str, model: str, chat: bool, include_usage: bool,
                        t0: float) -> AsyncIterator[str]:
        created = P.now()
        status = 200
        obj = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield sse(P.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}, None,
                                       include_usage))
            async for d in stream:
                if chat:
                    if d.text:
                        yield sse(P.chat_chunk(rid, created, model, {"content": d.text}, None, include_usage))
                    if d.finish_reason is not None:
                        yield sse(P.chat_chunk(rid, created, model, {}, d.finish_reason, include_usage))
                else:
                    yield sse(P.completion_chunk(rid, created, model, d.text, d.finish_reason, include_usage))
            if include_usage:
                yield sse(P.usage_chunk(rid, created, model, obj,
                                        P.usage(stream.prompt_tokens, stream.completion_tokens)))
            self.metrics.request_latency(model, time.perf_counter() - t0, stream.prompt_tokens)
            yield SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            status = STATUS_CLIENT_GONE
            raise
        except EngineUnavailable as e:  # headers are already sent: the 503 body goes in-band
            logger.warning("request %s ended: %s", rid, e)
            status = 503
            yield sse(unavailable_error(e).body())
            yield SSE_DONE
        except Exception as e:
            # Headers are already sent: report in-band, as OpenAI does, and log the traceback.
            logger.exception("request %s failed while streaming", rid)
            status = 500
            yield sse({"error": {"message": f"Internal error while generating: {type(e).__name__}: {e}",
                                 "type": "internal_error", "param": None, "code": None}})
            yield SSE_DONE
        finally:
            await stream.aclose()
            self.metrics.request_done(model, status)

    async def list_models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self.engine.model_ids()]})

    async def get_model(self, request: Request, model_id: str) -> Response:
        self.check_auth(request)
        return JSONResponse(self._card(self.resolve_model(model_id)))

    def _card(self, model_id: str) -> dict:
        base = self.engine.model_ids()[0]
        return P.model_card(model_id, self.created, parent=None if model_id == base else base)

    async def health(self) -> Response:
        try:
            await self.engine.check_health()
        except Exception as e:
            logger.warning("health check failed: %s: %s", type(e).__name__, e)
            raise P.ApiError(503, f"Engine unhealthy: {type(e).__name__}: {e}", type="server_error",
                             code="unhealthy") from None
        return JSONResponse({"status": "ok"})


def build_fastapi_app(server: OpenAIServer) -> FastAPI:
    """Routes over ``server``. Every error leaves as OpenAI error JSON."""
    app = FastAPI(title="expertpool", lifespan=server.lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(P.ApiError)
    async def _api_error(_request: Request, exc: P.ApiError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(P.ApiError(exc.status_code, str(exc.detail), code="not_found"
                                         if exc.status_code == 404 else None, headers=exc.headers))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.completions(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request, chat=False)

    @app.get("/v1/models")
    async def list_models(request: Request):
        return await server.list_models(request)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        return await server.get_model(request, model_id)

    @app.get("/health")
    async def health():
        return await server.health()

    return app
