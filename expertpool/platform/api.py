"""OpenAI-compatible HTTP API over an ``Engine``: routes, SSE streaming, errors, auth, usage.

``OpenAIServer`` holds the logic and knows nothing about Ray; ``build_fastapi_app`` wires it to
routes. The Serve deployment (``app.py``) only builds both inside the replica, so everything here is
tested in-process and through ``serve.run`` with a fake engine. Text handling (detokenizing, stop
strings, the n choices, reasoning and tool-call output) is in ``streams`` and ``parsers``.

A request becomes one engine request: ``n`` completions share it (the engine prefills the prompt
once), ``logprobs`` and the grammar of ``response_format`` or a forced tool call travel in its
``SamplingParams`` to the worker that samples. Streaming requests wait for the first engine event
before sending headers, so an overloaded engine (``EngineOverloaded``, raised before the first
event) is still a 503 with ``Retry-After``, and the time to first token is measured where the client
sees it. Errors after headers are sent go out as an SSE ``error`` event followed by ``[DONE]``.

Also served: ``/tokenize`` and ``/detokenize`` (vLLM's bodies), ``/version``, ``/health``.
Not supported (400 from ``protocol``): echo, suffix, penalties, logit_bias.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from expertpool.model.grammar import GrammarError, GrammarSpec, check as check_grammar
from expertpool.model.sampling import SamplingParams
from expertpool.platform import protocol as P
from expertpool.platform.metrics import ServerMetrics
from expertpool.platform.parsers import REASONING_PARSERS, chat_logprobs, completion_logprobs, tool_call_grammar
from expertpool.platform.scheduler import EngineCore, EngineOverloaded, EngineUnavailable
from expertpool.platform.streams import (ChatChoice, GenerationStream, IncrementalDetokenizer,  # noqa: F401
                                         StopStringMatcher)

logger = logging.getLogger(__name__)

STATUS_CLIENT_GONE = 499  # nginx's convention, used only as a metrics tag
SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class TokenizerLike(Protocol):
    eos_token_id: int | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **template_kwargs) -> str: ...


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
                 metrics: ServerMetrics | None = None, stats_interval_s: float = 1.0,
                 reasoning_parser: str | None = None):
        assert reasoning_parser in (None, *REASONING_PARSERS), f"unknown reasoning parser {reasoning_parser}"
        self.engine = engine
        self.tokenizer = tokenizer
        self.reasoning_parser = reasoning_parser
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

    def sampling_params(self, req: Any, prompt_len: int, grammar: GrammarSpec | None = None) -> SamplingParams:
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
                n=req.num_choices(),
                logprobs=req.logprobs_k(),
                grammar=grammar,
            )
        except ValueError as e:
            raise P.ApiError(400, f"Invalid sampling parameters: {e}", code="invalid_value") from None

    def grammar(self, req: Any) -> GrammarSpec | None:
        """The grammar the output must follow: a forced tool call, or ``response_format`` JSON."""
        forced = req.forced_tools() if isinstance(req, P.ChatCompletionRequest) else []
        if forced:
            spec, param = tool_call_grammar(forced, req.parallel_tool_calls is not False, self._single_token), "tools"
        elif (schema := req.response_schema()) is not None:
            spec, param = GrammarSpec("json_schema", schema), "response_format"
        else:
            return None
        try:
            check_grammar(spec)
        except GrammarError as e:
            raise P.ApiError(400, f"Invalid {param}: the grammar cannot be built: {e}", param=param,
                             code="invalid_value") from None
        return spec

    def _single_token(self, text: str) -> int | None:
        to_id = getattr(self.tokenizer, "token_to_id", None)
        return None if to_id is None else to_id(text)

    def reasoning(self, req: Any) -> bool:
        """Split ``<think>`` output into reasoning_content: chat with a reasoning parser, unless the
        request turned thinking off through the template (DeepSeek-V3.1 ``thinking``, Qwen ``enable_thinking``)."""
        if self.reasoning_parser is None or not isinstance(req, P.ChatCompletionRequest):
            return False
        kw = req.chat_template_kwargs or {}
        return kw.get("thinking", True) is not False and kw.get("enable_thinking", True) is not False

    def chat_prompt(self, req: P.ChatCompletionRequest) -> list[int]:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools_enabled() else None
        try:
            text = self.tokenizer.apply_chat_template(req.chat_messages(), add_generation_prompt=True, tools=tools,
                                                      **(req.chat_template_kwargs or {}))
        except (ValueError, TypeError) as e:  # the template rejects the conversation (e.g. a role it has no slot for)
            raise P.ApiError(400, f"The chat template rejected the messages: {e}", param="messages",
                             code="invalid_value") from None
        return self.tokenizer.encode(text, add_bos=False)

    def completion_prompt(self, req: P.CompletionRequest) -> list[int]:
        if isinstance(req.prompt, str):
            return self.tokenizer.encode(req.prompt, add_bos=True)
        return list(req.prompt)

    async def start_stream(self, rid: str, prompt: list[int], params: SamplingParams, model: str,
                           stops: list[str], t0: float, keep_special: bool = False) -> GenerationStream:
        gen = self.engine.generate(rid, prompt, params, model=model)
        ids = EngineCore.completion_ids(rid, params.n)

        async def abort_choice(i: int) -> None:
            await self.engine.abort(ids[i])
        eos = getattr(self.tokenizer, "eos_token_id", None)
        stream = GenerationStream(gen, self.tokenizer, stops, self.metrics, model, t0, n=params.n,
                                  abort_choice=abort_choice, skip_special_tokens=not keep_special,
                                  drop_ids={eos} if keep_special and eos is not None else set())
        try:
            await stream.start()
        except ValueError as e:  # the engine rejects the request itself (token ids outside the vocabulary, n)
            raise P.ApiError(400, f"Invalid request: {e}", param="prompt", code="invalid_value") from None
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
            if ignored := req.ignored_fields():
                logger.debug("ignoring request fields that do not change the output: %s", ", ".join(ignored))
            model = self.resolve_model(req.model)
            model_tag = model
            prompt = self.chat_prompt(req) if chat else self.completion_prompt(req)
            params = self.sampling_params(req, len(prompt), self.grammar(req))
            rid = P.new_id("chatcmpl" if chat else "cmpl")
            tools = chat and req.tools_enabled()
            stream = await self.start_stream(rid, prompt, params, model, req.stop_strings(), t0, keep_special=tools)
            out = _Output(self.tokenizer, chat, params.n, self.reasoning(req), tools,
                          req.parallel_tool_calls is not False if chat else True)
            if req.stream:
                streaming = True
                body = self._sse_body(stream, out, rid, model, req.include_usage_chunk(), t0)
                return EngineStreamingResponse(body, stream)
            try:
                async for d in stream:
                    out.collect(d)
            except EngineUnavailable as e:
                raise unavailable_error(e) from None
            finally:
                await stream.aclose()
            use = P.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)
            status = 200
            self.metrics.request_latency(model, time.perf_counter() - t0, stream.prompt_tokens)
            self.metrics.request_finished(model, stream, out.finish_reasons())
            build = P.chat_completion if chat else P.completion
            return JSONResponse(build(rid, P.now(), model, out.choices(), use))
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

    async def _sse_body(self, stream: GenerationStream, out: "_Output", rid: str, model: str, include_usage: bool,
                        t0: float) -> AsyncIterator[str]:
        created = P.now()
        status = 200
        obj = "chat.completion.chunk" if out.chat else "text_completion"
        try:
            if out.chat:
                for i in range(len(out.parts)):
                    yield sse(P.chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""}, None,
                                           include_usage))
            async for d in stream:
                for index, payload, finish, lps in out.stream(d):
                    if out.chat:
                        yield sse(P.chat_chunk(rid, created, model, index, payload, finish, include_usage, lps))
                    else:
                        yield sse(P.completion_chunk(rid, created, model, index, payload, finish, include_usage, lps))
            if include_usage:
                yield sse(P.usage_chunk(rid, created, model, obj,
                                        P.usage(stream.prompt_tokens, stream.completion_tokens, stream.cached_tokens)))
            self.metrics.request_latency(model, time.perf_counter() - t0, stream.prompt_tokens)
            self.metrics.request_finished(model, stream, out.finish_reasons())
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

    async def tokenize(self, request: Request) -> Response:
        """vLLM's /tokenize: ``{count, max_model_len, tokens[, token_strs]}`` of a prompt or a chat."""
        self.check_auth(request)
        req = await self.parse(request, P.TokenizeRequest)
        self.resolve_model(req.model)
        if req.messages is not None:
            chat = P.ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                           chat_template_kwargs=req.chat_template_kwargs)
            try:
                text = self.tokenizer.apply_chat_template(
                    chat.chat_messages(), add_generation_prompt=req.add_generation_prompt,
                    tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                    **(req.chat_template_kwargs or {}))
            except (ValueError, TypeError) as e:
                raise P.ApiError(400, f"The chat template rejected the messages: {e}", param="messages",
                                 code="invalid_value") from None
            ids = self.tokenizer.encode(text, add_bos=False)
        else:
            ids = self.tokenizer.encode(req.prompt, add_bos=req.add_special_tokens)
        body: dict[str, Any] = {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [self.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return JSONResponse(body)

    async def detokenize(self, request: Request) -> Response:
        self.check_auth(request)
        req = await self.parse(request, P.DetokenizeRequest)
        self.resolve_model(req.model)
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab is not None and any(not 0 <= t < vocab for t in req.tokens):
            raise P.ApiError(400, f"token ids must be in [0, {vocab})", param="tokens", code="invalid_value")
        return JSONResponse({"prompt": self.tokenizer.decode(req.tokens)})

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

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await server.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await server.detokenize(request)

    @app.get("/version")
    async def version():
        return JSONResponse({"version": package_version()})

    return app


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("expertpool")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


class _Output:
    """The per-choice output of one request: text (completions) or chat deltas, with logprobs.
    ``stream(delta)`` gives the chunk payloads for a delta; ``collect(delta)`` accumulates it for
    the non-streaming body (``choices()``)."""

    def __init__(self, tokenizer, chat: bool, n: int, reasoning: bool, tools: bool, parallel_tool_calls: bool):
        self.tok, self.chat, self.reasoning = tokenizer, chat, reasoning
        self.parts = [ChatChoice(reasoning, tools, parallel_tool_calls) if chat else None for _ in range(n)]
        self.text_len = [0] * n
        self.finish: list[str | None] = [None] * n
        self.acc: list[dict] = [{"content": "", "reasoning_content": "", "tool_calls": [], "logprobs": []}
                                for _ in range(n)]

    def _logprobs(self, index: int, lps, text_offset: int) -> dict | None:
        if not lps:
            return None
        return chat_logprobs(self.tok, lps) if self.chat else completion_logprobs(self.tok, lps, text_offset)

    def stream(self, d) -> list[tuple[int, Any, str | None, dict | None]]:
        """(index, chat delta dict or completion text, finish_reason, logprobs) per chunk to send."""
        lps = self._logprobs(d.index, d.logprobs, self.text_len[d.index])
        if not self.chat:
            self.text_len[d.index] += len(d.text)
            if d.finish_reason is not None:
                self.finish[d.index] = d.finish_reason
            return [(d.index, d.text, d.finish_reason, lps)]
        part = self.parts[d.index]
        delta = part.push(d.text)
        out = [(d.index, delta, None, lps)] if delta or lps else []
        if d.finish_reason is not None:
            tail = part.finish()
            if tail:
                out.append((d.index, tail, None, None))
            self.finish[d.index] = part.finish_reason(d.finish_reason)
            out.append((d.index, {}, self.finish[d.index], None))
        return out

    def collect(self, d) -> None:
        acc = self.acc[d.index]
        if d.logprobs:
            acc["logprobs"] += d.logprobs
        for _, payload, _, _ in self.stream(d):
            if not self.chat:
                acc["content"] += payload
                continue
            acc["content"] += payload.get("content", "")
            acc["reasoning_content"] += payload.get("reasoning_content", "")
            acc["tool_calls"] += [{k: v for k, v in c.items() if k != "index"} for c in payload.get("tool_calls", [])]

    def finish_reasons(self) -> list[str | None]:
        return list(self.finish)

    def choices(self) -> list[dict]:
        out = []
        for i, acc in enumerate(self.acc):
            lps = self._logprobs(i, acc["logprobs"], 0)
            if not self.chat:
                out.append(P.completion_choice(i, acc["content"], self.finish[i], lps))
                continue
            msg: dict[str, Any] = {"content": acc["content"] or (None if acc["tool_calls"] else "")}
            if self.reasoning:
                msg["reasoning_content"] = acc["reasoning_content"] or None
            if acc["tool_calls"]:
                msg["tool_calls"] = acc["tool_calls"]
            out.append(P.chat_choice(i, msg, self.finish[i], lps))
        return out
