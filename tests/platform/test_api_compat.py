"""What popular clients send and expect, over the fake engine in process (no Ray): default payloads,
"off" values, reasoning_content, tool calls parsed from text, n choices, /tokenize, /detokenize,
/version. Every body and chunk is validated against the openai package's own types."""

import asyncio
import json

import httpx
import pytest

from expertpool.platform.api import OpenAIServer, build_fastapi_app
from tests.platform.fake_engine import REPLY, VOCAB, FakeEngine, FakeTokenizer
from tests.platform.openai_check import post_validated

TOK = FakeTokenizer()
CALL = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
        '<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{"zone": "CET"}\n```'
        '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
TOOLS = [{"type": "function", "function": {"name": n, "description": "d", "parameters": {"type": "object"}}}
         for n in ("get_weather", "get_time")]

# LangChain's ChatOpenAI (langchain-openai) default body: model, messages, stream, n, temperature.
LANGCHAIN = {"model": "fake-base", "messages": [{"role": "system", "content": "You are helpful."},
                                                {"role": "user", "content": "hi"}],
             "stream": False, "n": 1, "temperature": 0.7}
# What agent frameworks (the OpenAI Agents SDK's chat-completions model and others) send with default
# settings: developer role, empty tools, "off" values, bookkeeping fields.
AGENTS = {"model": "fake-base", "messages": [{"role": "developer", "content": "You are an agent."},
                                             {"role": "user", "content": "hi"}],
          "tools": [], "tool_choice": "none", "parallel_tool_calls": True, "response_format": {"type": "text"},
          "logit_bias": {}, "store": False, "metadata": {"trace": "t1"}, "service_tier": "auto", "user": "u1",
          "presence_penalty": 0, "frequency_penalty": 0.0, "top_p": 1.0, "logprobs": False}


def _server(**kw) -> tuple[OpenAIServer, FakeEngine]:
    engine = FakeEngine(max_seq_len=4096)  # room for echoing a tool call: its tags are many bytes
    return OpenAIServer(engine, TOK, **kw), engine


def _post(server, path, body):
    return asyncio.run(post_validated(build_fastapi_app(server), path, body))


@pytest.mark.parametrize("payload", [LANGCHAIN, AGENTS, {**AGENTS, "stream": True,
                                                           "stream_options": {"include_usage": True}}],
                         ids=["langchain", "agents", "agents-stream"])
def test_client_default_payloads_are_accepted(payload, caplog):
    server, engine = _server()
    with caplog.at_level("DEBUG", logger="expertpool.platform.api"):
        out = _post(server, "/v1/chat/completions", payload)
    if payload.get("stream"):
        assert "".join(c.choices[0].delta.content or "" for c in out if c.choices) == REPLY
        assert out[-1].usage.completion_tokens > 0
    else:
        assert out.choices[0].message.content == REPLY and out.choices[0].finish_reason == "stop"
    prompt = TOK.decode(engine.calls[-1][1])
    assert "<|system|>" in prompt and "<|developer|>" not in prompt  # developer is system for the template
    if payload is not LANGCHAIN:
        assert "ignoring request fields" in caplog.text and "store" in caplog.text and "tools" in caplog.text


def test_output_changing_values_are_still_refused():
    server, _ = _server()
    app = build_fastapi_app(server)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [await c.post("/v1/chat/completions", json={**LANGCHAIN, **extra}) for extra in (
                {"logit_bias": {"12": 5}}, {"presence_penalty": 1.0}, {"response_format": {"type": "yaml"}})]
    for r, field in zip(asyncio.run(go()), ("logit_bias", "presence_penalty", "response_format")):
        assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content_is_split_from_content(stream):
    server, _ = _server(reasoning_parser="deepseek_r1")
    body = {"messages": [{"role": "user", "content": "ECHO <think>plan it</think>the answer"}], "stream": stream}
    out = _post(server, "/v1/chat/completions", body)
    if stream:
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in out if c.choices)
        content = "".join(c.choices[0].delta.content or "" for c in out if c.choices)
    else:
        msg = out.choices[0].message
        reasoning, content = msg.reasoning_content, msg.content
    # the echo is the rendered prompt: "<|user|>ECHO <think>plan it</think>the answer\n<|assistant|>"
    assert reasoning == "<|user|>ECHO <think>plan it" and content == "the answer\n<|assistant|>"
    off = _post(server, "/v1/chat/completions", {**body, "stream": False,
                                                  "chat_template_kwargs": {"thinking": False}})
    assert "</think>" in off.choices[0].message.content  # thinking off: nothing to split


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_are_parsed_from_the_deepseek_format(stream):
    server, _ = _server()
    body = {"messages": [{"role": "user", "content": "ECHO " + CALL}], "tools": TOOLS, "stream": stream}
    out = _post(server, "/v1/chat/completions", body)
    if stream:
        calls = [tc for c in out if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        assert [c.index for c in calls] == [0, 1]
        content = "".join(c.choices[0].delta.content or "" for c in out if c.choices)
        finish = [c.choices[0].finish_reason for c in out if c.choices and c.choices[0].finish_reason]
    else:
        msg = out.choices[0].message
        calls, content, finish = msg.tool_calls, msg.content, [out.choices[0].finish_reason]
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert content == "<|user|>ECHO " and finish == ["tool_calls"]
    one = _post(server, "/v1/chat/completions", {**body, "stream": False, "parallel_tool_calls": False})
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
    none = _post(server, "/v1/chat/completions", {**body, "stream": False, "tool_choice": "none"})
    assert none.choices[0].message.tool_calls is None and "<｜tool▁sep｜>" in none.choices[0].message.content


def test_n_choices_and_a_stop_string_ends_one_choice_alone():
    """Fake completion i starts its reply i tokens in: only choice 0 begins with "Hello"."""
    server, engine = _server()
    out = _post(server, "/v1/completions", {"prompt": "hi", "n": 3, "stop": ["Hello"]})
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.choices[0].text == "" and out.choices[0].finish_reason == "stop"
    assert out.choices[1].text == REPLY[len("Hello"):] and out.choices[2].text == REPLY[len("Hello world"):]
    rid = out.id
    assert engine.aborted == [f"{rid}#0"]  # the stop string aborted that completion, not the request
    # choice 0: the "Hello" token; 1 and 2: the rest of the reply and EOS
    rest = len(TOK.encode(REPLY[5:], False)) + 1 + len(TOK.encode(REPLY[11:], False)) + 1
    assert out.usage.completion_tokens == 1 + rest


def test_logprobs_reach_the_client_in_both_formats():
    server, _ = _server()
    chat = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                  "logprobs": True, "top_logprobs": 2})
    entries = chat.choices[0].logprobs.content
    first = TOK.encode(REPLY, False)[0]
    assert [len(e.top_logprobs) for e in entries] == [2, 2, 2]
    assert entries[0].logprob == -first / 1000 and entries[0].top_logprobs[1].logprob == -((first + 2) % VOCAB) / 1000
    chunks = _post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "logprobs": 0, "stream": True})
    lps = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert sum(len(lp.tokens) for lp in lps) == 3 and all(lp.top_logprobs == [{}] * len(lp.tokens) for lp in lps)
    offsets = [o for lp in lps for o in lp.text_offset]
    assert offsets[0] == 0 and offsets == sorted(offsets)


def test_tokenize_detokenize_version():
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ensure_embedded_model())
    app = build_fastapi_app(OpenAIServer(FakeEngine(max_seq_len=512), tok, api_key="k"))
    h = {"Authorization": "Bearer k"}
    history = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "-3 C"}]

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            t = (await c.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}, headers=h)).json()
            d = (await c.post("/detokenize", json={"tokens": t["tokens"]}, headers=h)).json()
            chat = (await c.post("/tokenize", json={"messages": history, "tools": TOOLS}, headers=h)).json()
            v = await c.get("/version")
            unauth = await c.post("/tokenize", json={"prompt": "x"})
            bad = await c.post("/detokenize", json={"tokens": [10 ** 6]}, headers=h)
            return t, d, chat, v, unauth, bad
    t, d, chat, v, unauth, bad = asyncio.run(go())
    assert t["count"] == len(t["tokens"]) and t["max_model_len"] == 512 and t["tokens"][0] == tok.bos_token_id
    assert "".join(t["token_strs"][1:]).replace("Ġ", " ") == "Hello world" and d["prompt"] == "Hello world"
    rendered = tok.decode(chat["tokens"], skip_special_tokens=False)
    assert rendered.startswith(tok.bos_token + "Be brief.\n\n## Tools")  # developer -> system, then the tools
    assert ('<｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city":"Oslo"}\n```' in rendered
            and "<｜tool▁output▁begin｜>-3 C<｜tool▁output▁end｜>" in rendered)  # tool_calls and the tool turn
    assert v.status_code == 200 and v.json()["version"]
    assert unauth.status_code == 401 and bad.status_code == 400
