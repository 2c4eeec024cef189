"""OpenAI-compatible request and response bodies for the HTTP layer.

Requests are closed pydantic models (``extra="forbid"``): a field we do not know is a 400 that names
it. Fields whose value never changes the output (``store``, ``metadata``, ``service_tier``, ``user``,
...; see ``IGNORED_FIELDS``) are accepted and dropped with a debug log, and so are the "off" values
of fields we do not implement (``logit_bias: {}``, penalties 0, ``tools: []``, ``tool_choice:
"none"``); any other value of those is a 400 saying what is supported. Range checks that the
engine's ``SamplingParams`` also makes are repeated here so the client gets the OpenAI field name
back (``max_completion_tokens``, not ``max_tokens``).

Implemented beyond plain sampling: ``n`` (prompt KV shared), ``logprobs``/``top_logprobs``, ``tools``
and ``tool_choice`` (DeepSeek-V3 tool-call format; required/named calls forced by a grammar),
``response_format`` json_object/json_schema (grammar), ``chat_template_kwargs``. Extensions (as in
vLLM): ``top_k``, ``ignore_eos``, ``stop_token_ids``, ``response_format`` on /v1/completions.
Not supported: echo, suffix, best_of > n, penalties, logit_bias.
"""

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from expertpool.errors import UserError

MAX_STOP_STRINGS = 16
MAX_N = 16                # completions per request; the engine also caps it at one worker's batch
MAX_TOP_LOGPROBS = 20     # as OpenAI (chat); completions allow 5 there, 20 here as in vLLM
JSON_OBJECT_SCHEMA = '{"type": "object"}'


class ApiError(UserError):
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
    continuous_usage_stats: bool | None = Field(None, description="Accepted and ignored (vLLM extension).")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: NamedFunction


# Fields whose value never changes the output: accepted and dropped with a debug log. (A field that
# changes the output only with some values, such as logit_bias, is checked by a validator instead.)
IGNORED_FIELDS = ("store", "metadata", "service_tier", "user", "prediction", "safety_identifier",
                  "prompt_cache_key", "prompt_cache_retention")


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
    n: int | None = Field(None, ge=1, le=MAX_N, description="Completions of the prompt; the prompt is prefilled "
                          "once and its KV blocks shared.")
    presence_penalty: float | None = Field(None, description="Only 0 is supported.")
    frequency_penalty: float | None = Field(None, description="Only 0 is supported.")
    logit_bias: dict[str, float] | None = Field(None, description="Only an empty map is supported.")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema: the output "
                                                   "is constrained by a grammar to valid JSON (of the schema).")
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    user: str | None = None
    prediction: dict[str, Any] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0):
            raise ValueError("penalties are not supported; leave it unset or 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported; leave it unset or {}")
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

    def ignored_fields(self) -> list[str]:
        return [f for f in IGNORED_FIELDS if f in self.model_fields_set] + [
            f for f in ("logit_bias", "presence_penalty", "frequency_penalty") if f in self.model_fields_set]

    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def num_choices(self) -> int:
        return self.n or 1

    def response_schema(self) -> str | None:
        """The JSON schema text the output must match (json_object: any object), or None."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object" or rf.json_schema.schema_ in (None, True):
            return JSON_OBJECT_SCHEMA
        return json.dumps(rf.json_schema.schema_)


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str | dict[str, Any] = ""


class AssistantToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    # Open on purpose: clients echo back assistant messages with fields such as `refusal` or `name`.
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    tool_calls: list[AssistantToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_template(self) -> dict:
        """The message as chat templates expect it: ``developer`` is ``system`` (OpenAI's newer name);
        ``tool_calls`` (arguments as JSON text) and ``tool_call_id`` only when present."""
        m: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            m["tool_calls"] = [{"id": c.id, "type": c.type, "function": {
                "name": c.function.name, "arguments": c.function.arguments if isinstance(c.function.arguments, str)
                else json.dumps(c.function.arguments, ensure_ascii=False)}} for c in self.tool_calls]
        for k in ("tool_call_id", "name", "reasoning_content"):
            if getattr(self, k) is not None:
                m[k] = getattr(self, k)
        return m


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="Preferred over max_tokens when both are set.")
    logprobs: bool | None = Field(None, description="Return the logprob of each output token.")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="With logprobs: also the k most "
                                     "likely tokens at each position.")
    tools: list[Tool] | None = Field(None, description="Functions the model may call (DeepSeek-V3 tool-call format).")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or a named function; required and named "
        "calls are enforced by a grammar.")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call per answer.")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="Extra variables for the chat template "
                                                        "(e.g. DeepSeek-V3.1's thinking).")

    @model_validator(mode="after")
    def _tools_consistent(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        names = [t.function.name for t in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names the function '{choice.function.name}', which is not in tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("tool_choice=required needs at least one tool in tools")
        if self.forced_tools() and self.response_schema() is not None:
            raise ValueError("a forced tool call (tool_choice required or named) and response_format json cannot "
                             "both constrain the output; send one of them")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict]:
        return [m.for_template() for m in self.messages]

    def tools_enabled(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def forced_tools(self) -> list[Tool]:
        """The tools a grammar must force a call of: all for ``required``, one for a named choice."""
        if not self.tools:
            return []
        if self.tool_choice == "required":
            return list(self.tools)
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools if t.function.name == self.tool_choice.function.name]
        return []

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def ignored_fields(self) -> list[str]:
        out = super().ignored_fields()
        if "tools" in self.model_fields_set and not self.tools:
            out.append("tools")
        for f in ("parallel_tool_calls", "tool_choice"):
            if f in self.model_fields_set and not self.tools:
                out.append(f)
        return out


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] = Field(description="Text, or a list of token ids. One prompt per request.")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="Return each token's logprob and the "
                                 "k most likely alternatives.")
    echo: bool | None = Field(None, description="Not supported.")
    suffix: str | None = Field(None, description="Not supported.")
    best_of: int | None = Field(None, description="Only 1 (or n) is supported.")

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

    @model_validator(mode="after")
    def _best_of_is_n(self):
        if self.best_of not in (None, 1, self.n or 1):
            raise ValueError("best_of > n is not supported; leave it unset or equal to n")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def logprobs_k(self) -> int | None:
        return self.logprobs


class TokenizeRequest(_Request):
    """vLLM's /tokenize: a prompt or chat messages."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="prompt: prepend BOS.")
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int] = Field(description="Token ids to decode.")


# ---- responses (plain dict builders: the wire format is the contract, and dicts serialise fastest) ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI usage; ``prompt_tokens_details.cached_tokens``: prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_choice(index: int, message: dict, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", **message}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason: str | None,
               with_usage_field: bool, logprobs: dict | None = None) -> dict:
    out: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]}
    if with_usage_field:
        out["usage"] = None
    return out


def completion_choice(index: int, text: str, finish_reason: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion(rid: str, created: int, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason: str | None,
                     with_usage_field: bool, logprobs: dict | None = None) -> dict:
    out: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                        "finish_reason": finish_reason}]}
    if with_usage_field:
        out["usage"] = None
    return out


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(model_id: str, created: int, owned_by: str = "expertpool", parent: str | None = None) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "root": parent or model_id,
            "parent": parent}
