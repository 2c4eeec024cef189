"""OpenAI-compatible request and response bodies for the HTTP layer.

Requests are closed pydantic models (``extra="forbid"``): a field we do not implement is a 400 that
names it, never silently ignored. Fields the OpenAI clients commonly send with a harmless default
(``n=1``, ``presence_penalty=0``, ``logprobs=false``, ``user``) are declared so those requests pass,
and a non-default value is rejected with a message saying what is supported. Range checks that the
engine's ``SamplingParams`` also makes are repeated here so the client gets the OpenAI field name
back (``max_completion_tokens``, not ``max_tokens``).

Extensions beyond OpenAI (as in vLLM): ``top_k``, ``ignore_eos``, ``stop_token_ids``.
Not supported: n > 1, logprobs, echo, suffix, best_of > 1, penalties, tools, response_format.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A request error reported to the client as OpenAI error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error_to_api_error(err: ValidationError) -> ApiError:
    """Pydantic errors become one 400 naming every bad field (``param`` is the first one)."""
    parts, first = [], None
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        first = first or loc or None
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown or unsupported field"
        elif e["type"] == "value_error":  # our own validators: drop pydantic's "Value error, " prefix
            msg = str(e["ctx"]["error"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return ApiError(400, "Invalid request: " + "; ".join(parts), param=first, code="invalid_value")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a final chunk with token usage before [DONE].")


class _SamplingFields(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = Field(None, description="Served model id; None = the base model. See GET /v1/models.")
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate; default and cap: the room "
                                   "left in the context window (max_seq_len - prompt tokens).")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 = greedy; default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Default 1.")
    top_k: int | None = Field(None, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 = off.")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="Per-request RNG seed for reproducible "
                             "sampling.")
    stop: str | list[str] | None = Field(None, description="Strings that end generation; not included in the output.")
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end generation.")
    ignore_eos: bool | None = Field(None, description="Extension: keep generating past the end-of-sequence token.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, description="Only 1 is supported.")
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    user: str | None = Field(None, description="Accepted and ignored.")

    @field_validator("n")
    @classmethod
    def _n_is_one(cls, v: int | None) -> int | None:
        if v not in (None, 1):
            raise ValueError(f"only n=1 is supported, got n={v}; send {v} requests instead")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0):
            raise ValueError("penalties are not supported; leave it unset or 0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Open on purpose: clients echo back assistant messages with fields such as `refusal` or `name`.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over max_tokens when both are set.")
    logprobs: bool | None = Field(None, description="Not supported.")
    top_logprobs: int | None = Field(None, description="Not supported.")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("logprobs are not supported; leave it unset or false")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs are not supported; leave top_logprobs unset")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] = Field(description="Text, or a list of token ids. One prompt per request.")
    logprobs: int | None = Field(None, description="Not supported.")
    echo: bool | None = Field(None, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only 1 is supported.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError(f"batched prompts are not supported ({len(v)} given); send one prompt per request")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(t < 0 for t in v):
            raise ValueError("token ids must be >= 0")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v is not None:
            raise ValueError("logprobs are not supported; leave it unset")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported; leave it unset or false")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v is not None:
            raise ValueError("suffix is not supported; leave it unset")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, v):
        if v not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---- responses (plain dict builders: the wire format is the contract, and dicts serialise fastest) ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None,
               with_usage_field: bool) -> dict:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                        "finish_reason": finish_reason}]}
    if with_usage_field:
        out["usage"] = None
    return out


def completion(rid: str, created: int, model: str, text: str, finish_reason: str, use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                     with_usage_field: bool) -> dict:
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": 0, "text": text, "logprobs": None,
                                        "finish_reason": finish_reason}]}
    if with_usage_field:
        out["usage"] = None
    return out


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(model_id: str, created: int, owned_by: str = "expertpool", parent: str | None = None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "root": parent or model_id,
            "parent": parent}
