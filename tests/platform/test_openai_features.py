"""OpenAI features over the real engine in process: the embedded tiny model (random weights) behind
``OpenAIServer``, driven by the official ``openai`` client through an in-process ASGI transport.

The model's weights are random, so what it says is noise: every check here is one the noise cannot
pass by luck. JSON output must parse and validate because the grammar forces it; greedy logprobs
must put the chosen token first; n completions must each equal a separate request with the seed
the engine derives for that completion. The engine runs with async scheduling, so grammar masks
are computed for run-ahead decodes whose token the replica does not know yet.

Every response body and every streamed chunk is also validated against the ``openai`` package's
own response types (the client itself only constructs them, without validation).
"""

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
from expertpool.platform.api import OpenAIServer, build_fastapi_app
from tests.platform.openai_check import post_validated

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
    "required": ["name", "age", "ok", "color"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                     "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"],
    "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
MSGS = [{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def app():
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.engine import AsyncEngine, local_engine
    import torch

    d = ensure_embedded_model()
    tok = Tokenizer.from_dir(d)
    model = load_checkpoint(d, dtype=torch.float32, with_mtp=False)
    core = local_engine(model, max_batch_size=8, max_seq_len=1024, block_size=8, eos_token_id=tok.eos_token_id,
                        tokenizer=tok)
    engine = AsyncEngine(core, "tiny", 1024, async_scheduling=True)
    loop = asyncio.new_event_loop()  # one loop for the module: the engine's step task lives on it
    LOOP.append(loop)
    yield build_fastapi_app(OpenAIServer(engine, tok)), engine
    loop.run_until_complete(engine.shutdown())
    loop.close()
    LOOP.clear()


def _client(app) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    return openai.AsyncOpenAI(base_url="http://t/v1", api_key="none", http_client=http, max_retries=0)


async def _raw(app, path: str, body: dict):
    return await post_validated(app, path, body)


LOOP: list[asyncio.AbstractEventLoop] = []


def _run(coro):
    return LOOP[0].run_until_complete(coro)


def test_n3_choices_equal_separate_requests_with_derived_seeds(app):
    app, engine = app

    async def go():
        c = _client(app)
        r = await c.chat.completions.create(model="tiny", messages=MSGS, n=3, seed=100, temperature=1.0,
                                            max_tokens=10, extra_body={"ignore_eos": True})
        singles = [await c.chat.completions.create(model="tiny", messages=MSGS, seed=100 + i, temperature=1.0,
                                                   max_tokens=10, extra_body={"ignore_eos": True})
                   for i in range(3)]
        return r, singles
    r, singles = _run(go())
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.message.content for ch in r.choices] == [s.choices[0].message.content for s in singles]
    assert len({ch.message.content for ch in r.choices}) > 1  # different seeds: different samples
    assert r.usage.completion_tokens == 30
    assert engine.stats()["kv_blocks_used"] == 0


def test_n3_streaming_chunks_carry_their_index_and_validate(app):
    app, _ = app
    chunks = _run(_raw(app, "/v1/chat/completions", {"messages": MSGS, "n": 3, "max_tokens": 5, "temperature": 0,
                                                      "ignore_eos": True, "stream": True,
                                                      "stream_options": {"include_usage": True}}))
    texts = {0: "", 1: "", 2: ""}
    finished = set()
    for ch in chunks[:-1]:
        c = ch.choices[0]
        texts[c.index] += c.delta.content or ""
        if c.finish_reason:
            finished.add((c.index, c.finish_reason))
    assert finished == {(0, "length"), (1, "length"), (2, "length")}
    assert texts[0] == texts[1] == texts[2] != ""  # greedy: identical completions
    assert chunks[-1].usage.completion_tokens == 15


def test_logprobs_chat_and_completions_greedy_top1_is_the_chosen_token(app):
    app, _ = app

    async def go():
        c = _client(app)
        chat = await c.chat.completions.create(model="tiny", messages=MSGS, max_tokens=6, temperature=0,
                                               logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
        comp = await c.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=6, temperature=0,
                                          logprobs=2, extra_body={"ignore_eos": True})
        return chat, comp
    chat, comp = _run(go())
    content = chat.choices[0].logprobs.content
    assert len(content) == 6
    for e in content:
        assert len(e.top_logprobs) == 3 and e.logprob <= 0
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == comp.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # keyed by token text: two byte tokens of one character both read U+FFFD and share a key
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(val) and top[tok] == pytest.approx(val)


def test_logprobs_streamed_match_the_non_streamed(app):
    app, _ = app
    body = {"messages": MSGS, "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 1,
            "ignore_eos": True}
    whole = _run(_raw(app, "/v1/chat/completions", body))
    chunks = _run(_raw(app, "/v1/chat/completions", {**body, "stream": True}))
    streamed = [e for ch in chunks for e in (ch.choices[0].logprobs.content if ch.choices and ch.choices[0].logprobs
                                             else [])]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in whole.choices[0].logprobs.content]
    comp = _run(_raw(app, "/v1/completions", {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logprobs": 1,
                                              "ignore_eos": True, "stream": True}))
    assert sum(len(ch.choices[0].logprobs.tokens) for ch in comp if ch.choices[0].logprobs) == 4


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_validates_against_its_schema(app, stream):
    app, _ = app
    body = {"messages": MSGS, "max_tokens": 200, "temperature": 1.0, "seed": 7, "stream": stream,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
    out = _run(_raw(app, "/v1/chat/completions", body))
    if stream:
        text = "".join(ch.choices[0].delta.content or "" for ch in out if ch.choices)
        finish = [ch.choices[0].finish_reason for ch in out if ch.choices and ch.choices[0].finish_reason]
    else:
        text, finish = out.choices[0].message.content, [out.choices[0].finish_reason]
    assert finish == ["stop"], text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_on_completions_with_n_and_the_openai_client(app):
    app, _ = app

    async def go():
        return await _client(app).completions.create(
            model="tiny", prompt="{", max_tokens=200, temperature=1.0, seed=3, n=3,
            extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}})
    r = _run(go())
    assert len(r.choices) == 3
    docs = [json.loads(ch.text) for ch in r.choices]
    for d in docs:
        jsonschema.validate(d, SCHEMA)
    assert len({json.dumps(d) for d in docs}) > 1  # forks sample independently under their own grammar state


@pytest.mark.parametrize("choice", ["named", "required"])
def test_forced_tool_call_arguments_parse_and_validate(app, choice):
    app, _ = app
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else "required"

    async def go():
        return await _client(app).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
            tool_choice=tool_choice, parallel_tool_calls=False, max_tokens=200, temperature=1.0, seed=11)
    r = _run(go())
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1, ch
    call = ch.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    tools = {"get_weather": WEATHER, "get_time": TIME}
    if choice == "named":
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])


def test_forced_tool_call_streams_as_tool_call_deltas(app):
    app, _ = app
    chunks = _run(_raw(app, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "What time is it?"}], "tools": [TIME], "stream": True,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}}, "max_tokens": 250, "seed": 5,
        "parallel_tool_calls": False}))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [d.index for d in deltas] == list(range(len(deltas))) and deltas
    assert {d.function.name for d in deltas} == {"get_time"}
    for d in deltas:
        assert json.loads(d.function.arguments)["zone"] in ("UTC", "CET")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == [
        "tool_calls"]
