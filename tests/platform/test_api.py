"""HTTP layer tests: pure logic in-process, then the real thing through ``serve.run`` and real HTTP.

The Serve part runs ONE application for the module (built through the ``build_app`` import-path
entry point with the fake engine of ``fake_engine.py``), with an API key set, so every request
below authenticates; the official ``openai`` client drives the happy paths and raw ``httpx`` the
error cases and the SSE wire format.
"""

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import uuid

import httpx
import openai
import pytest

from expertpool.platform import protocol as P
from expertpool.platform.api import IncrementalDetokenizer, OpenAIServer, StopStringMatcher, build_fastapi_app
from expertpool.platform.metrics import ServerMetrics
from tests.platform.fake_engine import REPLY, FakeEngine, FakeTokenizer, side_files
from tests.ports import free_port

API_KEY = "sk-test-" + uuid.uuid4().hex[:8]
MAX_SEQ_LEN = 128
TOK = FakeTokenizer()


def _tiny_tokenizer():
    from tokenizers import Tokenizer as HF

    from expertpool.model.tokenizer import BOS, EOS, Tokenizer, build_tiny_tokenizer

    return Tokenizer(HF.from_str(build_tiny_tokenizer().to_str()), BOS, EOS, None)


# ------------------------------------------------------------------------------------------------
# Unit: stop strings, incremental detokenization, request validation, metrics
# ------------------------------------------------------------------------------------------------

def _run_matcher(stops, pieces):
    m = StopStringMatcher(stops)
    out = []
    for p in pieces:
        text, hit = m.push(p)
        out.append(text)
        if hit:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


@pytest.mark.parametrize("pieces", [["abcSTOPdef"], list("abcSTOPdef"), ["abcS", "TO", "Pdef"], ["abc", "STOP"]])
def test_stop_string_found_across_any_split(pieces):
    assert _run_matcher(["STOP"], pieces) == ("abc", True)


def test_stop_string_earliest_of_several_and_false_prefix_released():
    assert _run_matcher(["xyz", "b"], ["a", "xy", "b", "xyz"]) == ("axy", True)
    # "ST" looked like the start of "STOP" but was not: it must still come out, in order
    assert _run_matcher(["STOP"], ["aST", "x", "STO"]) == ("aSTxSTO", False)


def test_stop_matcher_never_emits_a_possible_stop_prefix():
    m = StopStringMatcher(["</end>"])
    assert m.push("text </e") == ("text ", False)
    assert m.push("n") == ("", False)
    assert m.push("x") == ("</enx", False)


def _stream_decode(tok, ids):
    d = IncrementalDetokenizer(tok)
    deltas = [d.push([t]) for t in ids] + [d.flush()]
    return deltas


def test_incremental_detokenizer_never_splits_a_character_fake_bytes():
    ids = TOK.encode(REPLY, add_bos=False)
    deltas = _stream_decode(TOK, ids)
    assert "".join(deltas) == REPLY
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) > 20  # really incremental, not one blob at the end


def test_incremental_detokenizer_matches_full_decode_real_tiny_bpe():
    tok = _tiny_tokenizer()
    text = "Hello, how are you today? Grüße aus Köln 😀 — def add(a, b): return a + b"
    ids = tok.encode(text, add_bos=True)
    deltas = _stream_decode(tok, ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_detokenizer_flushes_an_unfinished_character():
    ids = TOK.encode("a😀", add_bos=False)[:-1]  # cut the emoji's last byte
    deltas = _stream_decode(TOK, ids)
    assert "".join(deltas) == "a\ufffd"


def test_stop_string_closes_the_engine_generator_at_once():
    """Explicitly, not at garbage collection: ``gen`` stays referenced until the assert."""
    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.api import GenerationStream

    engine = FakeEngine()

    async def go():
        gen = engine.generate("r1", TOK.encode("hi"), SamplingParams(max_tokens=100))
        stream = GenerationStream(gen, TOK, ["world"], ServerMetrics(), "m", time.perf_counter())
        await stream.start()
        deltas = [d async for d in stream]
        assert engine.closed_early == ["r1"] and engine.running == 0
        return gen, deltas

    _, deltas = asyncio.run(go())
    assert "".join(d.text for d in deltas) == "Hello " and deltas[-1].finish_reason == "stop"


def _asgi_post(app, path: str, body: dict, on_body):
    """Drive the ASGI app like Serve does: the request body, then nothing (Serve signals a client
    disconnect by cancelling the task, not with a message). ``on_body`` sees every body chunk."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("test", 1), "server": ("test", 80)}
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive():
        if messages:
            return messages.pop()
        await asyncio.Event().wait()

    async def send(msg):
        if msg["type"] == "http.response.body" and msg.get("body"):
            on_body(msg["body"])

    return asyncio.create_task(app(scope, receive, send))


def test_over_the_real_engine_cancel_mid_stream_frees_kv_blocks():
    """The contract with the lead's engine: a cancelled handler (client gone) leaves no KV blocks."""
    from expertpool.platform.engine import AsyncEngine, local_engine
    from tests.model.helpers import random_model

    tok = _tiny_tokenizer()
    core = local_engine(random_model("tiny"), max_batch_size=4, max_seq_len=64, block_size=4,
                        eos_token_id=tok.eos_token_id)
    engine = AsyncEngine(core, "tiny", 64)
    app = build_fastapi_app(OpenAIServer(engine, tok))
    greedy = {"prompt": "Hello, how are you", "max_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = (await c.post("/v1/completions", json=greedy)).json()
            assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
            raw = (await c.post("/v1/completions", json={**greedy, "stream": True})).text
            streamed = "".join(json.loads(e[6:])["choices"][0]["text"] for e in raw.split("\n\n")[:-2])
            assert streamed == r["choices"][0]["text"]  # greedy: streaming and not streaming agree
        assert engine.stats()["kv_blocks_used"] == 0

        chunks, two = [], asyncio.Event()

        def on_body(b):
            chunks.append(b)
            if len(chunks) >= 2:
                two.set()

        task = _asgi_post(app, "/v1/completions", {**greedy, "max_tokens": 60, "stream": True}, on_body)
        await asyncio.wait_for(two.wait(), 30)
        assert engine.stats()["running"] == 1 and engine.stats()["kv_blocks_used"] > 0
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(200):  # the engine loop drops the aborted sequence on its next step
            if engine.stats()["kv_blocks_used"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0
        assert len(chunks) < 30  # really cut short

    asyncio.run(go())


@pytest.mark.parametrize("body, param, needle", [
    ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 17}, "n", "less than or equal to 16"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, None, "top_logprobs needs logprobs=true"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs",
     "less than or equal to 20"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -0.1}, "temperature", "greater than or equal"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}}, None,
     "only allowed with stream=true"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 3}}, "logit_bias",
     "logit_bias is not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}, "presence_penalty",
     "penalties are not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}, "response_format.type",
     "Input should be"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, None,
     "tool_choice=required needs at least one tool"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, None, "names the function 'g'"),
    ({"messages": [{"role": "user", "content": "x"}], "functions": []}, "functions", "unknown or unsupported field"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "Input should be"),
])
def test_request_validation_names_the_field(body, param, needle):
    with pytest.raises(Exception) as ei:
        P.ChatCompletionRequest.model_validate(body)
    err = P.validation_error_to_api_error(ei.value)
    assert err.status == 400 and needle in err.message
    if param:
        assert err.param == param and param in err.message


def test_completion_prompt_forms():
    assert P.CompletionRequest.model_validate({"prompt": ["one"]}).prompt == "one"
    assert P.CompletionRequest.model_validate({"prompt": [5, 6]}).prompt == [5, 6]
    with pytest.raises(Exception, match="batched prompts"):
        P.CompletionRequest.model_validate({"prompt": ["a", "b"]})
    assert P.CompletionRequest.model_validate({"prompt": "x", "stop": "\n"}).stop_strings() == ["\n"]


class _Recorder:
    """Stands in for a ray.util.metrics class; keeps every recorded value with its tags."""

    def __init__(self, name, description="", boundaries=None, tag_keys=()):
        self.name, self.tag_keys, self.defaults, self.values = name, tag_keys, {}, []

    def set_default_tags(self, tags):
        self.defaults = tags
        return self

    def _rec(self, value, tags=None):
        tags = {**self.defaults, **(tags or {})}
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values.append((value, tags))

    inc = observe = set = _rec


def test_metrics_are_recorded_per_request_and_from_engine_stats():
    m = ServerMetrics(replica="r1", counter=_Recorder, gauge=_Recorder, histogram=_Recorder)
    engine = FakeEngine(max_seq_len=MAX_SEQ_LEN)
    server = OpenAIServer(engine, TOK, metrics=m)
    app = build_fastapi_app(server)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 7})
            assert r.status_code == 200
            r = await c.post("/v1/completions", json={"prompt": "hi", "model": "nope"})
            assert r.status_code == 404
            r = await c.post("/v1/completions", json={"prompt": "hi", "stream": True, "max_tokens": 3})
            assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")

    asyncio.run(go())
    assert [t for _, t in m.requests.values] == [
        {"replica": "r1", "model": "fake-base", "status": "200"},
        {"replica": "r1", "model": "unknown", "status": "404"},
        {"replica": "r1", "model": "fake-base", "status": "200"}]
    assert sum(v for v, _ in m.generated_tokens.values) == 7 + 3
    assert len(m.ttft.values) == 2 and all(0 < v < 5 for v, _ in m.ttft.values)
    assert len(m.itl.values) == 6 + 2  # every token event after the first
    assert len(m.e2e.values) == 2

    server.record_stats()
    server.record_stats()
    assert {t["expert"] for _, t in m.expert_tokens.values} == {str(e) for e in range(8)}
    total = sum(v for v, t in m.expert_tokens.values[:8])
    assert total == engine.steps > 0
    assert m.kv_usage.values[-1][0] == 0.0  # nothing running any more
    engine.expert_tokens[3] += 10  # only expert 3 got load since the last update
    server.record_stats()
    assert m.expert_balancedness.values[-1][0] == pytest.approx(1 / 8)


def test_sse_data_is_one_line_for_every_line_reader():
    """U+2028, U+2029 and U+0085 are legal raw in JSON, but readers built on str.splitlines (httpx's
    aiter_lines) break lines there; generated text may hold them."""
    from expertpool.platform.api import sse

    text = "a\u2028b\x85c\u2029d \u00e9\r\n"
    frame = sse({"text": text})
    assert frame.endswith("\n\n") and len(frame[:-2].splitlines()) == 1
    assert json.loads(frame[len("data: "):])["text"] == text


def test_preemptions_queue_time_and_request_histograms():
    m = ServerMetrics(replica="r1", model_name="base", counter=_Recorder, gauge=_Recorder, histogram=_Recorder)
    base = {"running": 2, "waiting": 1, "kv_usage": 0.5, "expert_tokens": []}
    m.update_from_stats({**base, "preempted": 0})
    m.update_from_stats({**base, "preempted": 3})
    m.update_from_stats({**base, "preempted": 5})
    assert [v for v, _ in m.preemptions.values] == [3, 2]
    assert m.preemptions.values[0][1] == {"replica": "r1", "model_name": "base", "engine": "expertpool"}
    assert [v for v, _ in m.swapped.values] == [0, 0, 0] and m.running.values[-1] == (2, m.preemptions.values[0][1])
    server = OpenAIServer(FakeEngine(max_seq_len=MAX_SEQ_LEN), TOK, metrics=m)
    app = build_fastapi_app(server)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "n": 2})
            assert r.status_code == 200
    asyncio.run(go())
    assert [(v, t["finished_reason"]) for v, t in m.success.values] == [(1, "length"), (1, "length")]
    assert [v for v, _ in m.request_generation_tokens.values] == [10]
    assert [v for v, _ in m.request_prompt_tokens.values] == [len(TOK.encode("hi"))]
    assert [v for v, _ in m.queue_time.values] == [0.001]  # the fake engine's queue time
    assert len(m.tpot.values) == len(m.decode_time.values) == len(m.prefill_time.values) == 1
    assert m.tpot.values[0][1]["model_name"] == "fake-base"


def test_recovery_metrics_follow_the_engine_counters():
    m = ServerMetrics(replica="r1", counter=_Recorder, gauge=_Recorder, histogram=_Recorder)
    base = {"running": 0, "waiting": 0, "kv_usage": 0.0, "expert_tokens": []}
    m.update_from_stats({**base, "actor_failures": 0, "recoveries": 0, "replayed_tokens": 0, "recovery_seconds": []})
    m.update_from_stats({**base, "actor_failures": 2, "recoveries": 1, "replayed_tokens": 300,
                         "recovery_seconds": [3.5]})
    m.update_from_stats({**base, "actor_failures": 2, "recoveries": 2, "replayed_tokens": 420,
                         "recovery_seconds": [3.5, 4.25]})
    assert [v for v, _ in m.actor_failures.values] == [2]
    assert [v for v, _ in m.recoveries.values] == [1, 1]
    assert [v for v, _ in m.replayed_tokens.values] == [300, 120]
    assert [v for v, _ in m.recovery_seconds.values] == [3.5, 4.25]


def test_elastic_metrics_follow_the_engine_counters():
    m = ServerMetrics(replica="r1", counter=_Recorder, gauge=_Recorder, histogram=_Recorder)
    base = {"running": 0, "waiting": 0, "kv_usage": 0.0, "expert_tokens": []}
    m.update_from_stats({**base, "width": 2, "actor_balancedness": None, "rebalances": 0, "degraded_shrinks": 0,
                         "rebalance_seconds": [], "rebalance_stall_seconds": []})
    m.update_from_stats({**base, "width": 1, "actor_balancedness": 0.81, "rebalances": 1, "degraded_shrinks": 1,
                         "rebalance_seconds": [2.0], "rebalance_stall_seconds": [0.07]})
    assert [v for v, _ in m.group_width.values] == [2, 1]
    assert [v for v, _ in m.actor_balancedness.values] == [0.81]
    assert [v for v, _ in m.rebalances.values] == [1] and [v for v, _ in m.degraded.values] == [1]
    assert [v for v, _ in m.layout_seconds.values] == [2.0]
    assert [v for v, _ in m.layout_stall_seconds.values] == [0.07]


def test_metrics_work_without_ray_initialised():
    code = ("import ray; from expertpool.platform.metrics import ServerMetrics; m = ServerMetrics('x'); "
            "m.request_done('m', 200); m.first_token('m', 0.1); m.tokens('m', 3, 0.05); "
            "m.update_from_stats({'running': 1, 'waiting': 0, 'kv_usage': 0.5, 'expert_tokens': [1, 2]}); "
            "assert not ray.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------
# Integration: one Serve application for the module, real HTTP
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(ray_cluster):
    from ray import serve

    from expertpool.platform.app import build_app

    app_name = f"ep-test-{uuid.uuid4().hex[:8]}"
    log_path, unhealthy_path = side_files(app_name)
    for p in (log_path, unhealthy_path):
        if os.path.exists(p):
            os.remove(p)
    config = {
        "model": {"name": "fake-base"},
        "pool": {"actors_per_replica": 1, "actor_resources": {"cpu": 0.1}},
        "serving": {"app_name": app_name, "max_seq_len": MAX_SEQ_LEN, "api_key": API_KEY,
                    "health_check_period_s": 600, "autoscaling": {"target_ongoing_requests": 4}},
    }
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app({"config": config, "engine_factory": "tests.platform.fake_engine:make_engine",
                     "tokenizer_factory": "tests.platform.fake_engine:make_tokenizer"})
    serve.run(app, name=app_name, route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "app_name": app_name, "log": log_path, "unhealthy": unhealthy_path,
           "headers": {"Authorization": f"Bearer {API_KEY}"},
           "client": openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0, timeout=30)}
    serve.delete(app_name)
    serve.shutdown()
    for p in (log_path, unhealthy_path):
        if os.path.exists(p):
            os.remove(p)


def _closed_early(served, request_id: str, timeout_s: float = 10.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if os.path.exists(served["log"]):
            with open(served["log"]) as f:
                if any(json.loads(line)["request_id"] == request_id for line in f):
                    return True
        time.sleep(0.05)
    return False


def _chat_prompt_len(messages) -> int:
    return len(TOK.encode(TOK.apply_chat_template(messages), add_bos=False))


@pytest.mark.ray
def test_chat_non_streaming_openai_client(served):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = served["client"].chat.completions.create(model="fake-base", messages=msgs)
    assert r.choices[0].message.content == REPLY
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    n_reply = len(TOK.encode(REPLY, add_bos=False))
    assert r.usage.prompt_tokens == _chat_prompt_len(msgs)  # template text carries the BOS: no second BOS
    assert r.usage.completion_tokens == n_reply + 1  # + EOS
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "fake-base" and r.id.startswith("chatcmpl-")


@pytest.mark.ray
def test_chat_goes_through_the_chat_template(served):
    r = served["client"].chat.completions.create(model="fake-base",
                                                 messages=[{"role": "user", "content": "ECHO me"}])
    assert r.choices[0].message.content == "<|user|>ECHO me\n<|assistant|>"


@pytest.mark.ray
def test_chat_streaming_with_usage_openai_client(served):
    chunks = list(served["client"].chat.completions.create(
        model="fake-base", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 10
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(TOK.encode(REPLY, False)) + 1
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.ray
def test_completions_non_streaming_and_streaming(served):
    c = served["client"]
    r = c.completions.create(model="fake-base", prompt="Say hello", max_tokens=5)
    assert r.choices[0].text == "Hello world! G" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len(TOK.encode("Say hello"))
    chunks = list(c.completions.create(model="fake-base", prompt="Say hello", max_tokens=5, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    ids = TOK.encode("ECHO tokens")
    r = c.completions.create(model="fake-base", prompt=ids, max_tokens=50)
    assert r.choices[0].text == "ECHO tokens" and r.usage.prompt_tokens == len(ids)


@pytest.mark.ray
def test_max_completion_tokens_ignore_eos_and_seed_pass_through(served):
    r = served["client"].chat.completions.create(
        model="fake-base", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=60, seed=7,
        temperature=0.5, top_p=0.9, extra_body={"ignore_eos": True, "top_k": 5})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 60
    assert r.choices[0].message.content.startswith(REPLY)  # kept going past EOS


@pytest.mark.ray
def test_max_tokens_clamped_to_the_context_window(served):
    prompt = "x" * (MAX_SEQ_LEN - 4)  # + BOS = MAX_SEQ_LEN - 3 tokens: room for 3
    r = served["client"].completions.create(model="fake-base", prompt=prompt, max_tokens=100)
    assert r.usage.prompt_tokens == MAX_SEQ_LEN - 3
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = served["client"].completions.create(model="fake-base", prompt=prompt)  # no max_tokens: fill the room
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.ray
@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_across_tokens_truncates_and_aborts(served, stream):
    kw = dict(model="fake-base", prompt="hi", stop=["ße 😀", "nope"], max_tokens=100)
    c = served["client"]
    if stream:
        chunks = list(c.completions.create(stream=True, **kw))
        text, finish, rid = "".join(ch.choices[0].text for ch in chunks), chunks[-1].choices[0].finish_reason, \
            chunks[0].id
    else:
        r = c.completions.create(**kw)
        text, finish, rid = r.choices[0].text, r.choices[0].finish_reason, r.id
    assert text == "Hello world! Grü" and finish == "stop"
    assert _closed_early(served, rid), "the engine request was not closed after the stop string"


@pytest.mark.ray
def test_sse_wire_format(served):
    body = {"model": "fake-base", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4}
    with httpx.stream("POST", served["base"] + "/v1/chat/completions", json=body, headers=served["headers"],
                      timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in payloads)
    assert len({p["id"] for p in payloads}) == 1
    assert payloads[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}


def _err(r, status, code=None, param=None, needle=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    if needle is not None:
        assert needle in e["message"], e
    return e


@pytest.mark.ray
def test_error_codes_then_still_serving(served):
    base, h = served["base"], served["headers"]
    chat, comp = base + "/v1/chat/completions", base + "/v1/completions"
    msgs = [{"role": "user", "content": "hi"}]
    with httpx.Client(timeout=30) as c:
        _err(c.post(chat, content=b"{not json", headers=h), 400, code="invalid_json", needle="not valid JSON")
        _err(c.post(chat, content=b"[1, 2]", headers=h), 400, needle="JSON object")
        _err(c.post(chat, json={"model": "fake-base"}, headers=h), 400, param="messages", needle="messages")
        _err(c.post(chat, json={"messages": msgs, "max_tokens": 0}, headers=h), 400, param="max_tokens")
        _err(c.post(chat, json={"messages": msgs, "max_tokens": -5}, headers=h), 400, param="max_tokens")
        _err(c.post(chat, json={"messages": msgs, "max_completion_tokens": 0}, headers=h), 400,
             param="max_completion_tokens")
        _err(c.post(chat, json={"messages": msgs, "temperature": 2.5}, headers=h), 400, param="temperature",
             needle="less than or equal to 2")
        _err(c.post(chat, json={"messages": msgs, "top_p": 0}, headers=h), 400, param="top_p")
        _err(c.post(chat, json={"messages": msgs, "n": 30}, headers=h), 400, param="n", needle="less than or equal")
        _err(c.post(chat, json={"messages": msgs, "logit_bias": {"3": 1}}, headers=h), 400, param="logit_bias",
             needle="logit_bias is not supported")
        _err(c.post(comp, json={"prompt": "x", "logprobs": 21}, headers=h), 400, param="logprobs")
        _err(c.post(chat, json={"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "objekt"}}}}, headers=h), 400, param="response_format",
             needle="grammar cannot be built")
        _err(c.post(chat, json={"messages": [{"role": "tool", "content": "x"}]}, headers=h), 400, param="messages",
             needle="unsupported role")
        long_prompt = "y" * (MAX_SEQ_LEN - 1)  # + BOS = MAX_SEQ_LEN tokens: prompt + 1 > max_seq_len
        _err(c.post(comp, json={"prompt": long_prompt}, headers=h), 400, code="context_length_exceeded",
             needle=f"max_seq_len={MAX_SEQ_LEN}")
        _err(c.post(comp, json={"prompt": "x", "stream": True, "model": "nope"}, headers=h), 404,
             code="model_not_found", param="model")
        _err(c.post(chat, json={"messages": msgs, "model": "nope"}, headers=h), 404, code="model_not_found")
        _err(c.post(chat, json={"messages": msgs}), 401, code="invalid_api_key")
        _err(c.post(chat, json={"messages": msgs}, headers={"Authorization": "Bearer wrong"}), 401)
        _err(c.get(base + "/v1/models", headers={"Authorization": "Basic " + API_KEY}), 401)
        _err(c.get(base + "/v1/nothing-here", headers=h), 404)
        for stream in (False, True):
            e = c.post(comp, json={"prompt": "OVERLOAD", "stream": stream}, headers=h)
            _err(e, 503, code="engine_overloaded")
            assert e.headers["retry-after"] == "3"  # ceil(2.5)
        r = c.post(chat, json={"messages": msgs, "max_tokens": 3}, headers=h)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.ray
def test_engine_failure_is_500_or_in_band_error_and_server_survives(served):
    base, h = served["base"], served["headers"]
    with httpx.Client(timeout=30) as c:
        _err(c.post(base + "/v1/completions", json={"prompt": "BOOM"}, headers=h), 500, needle="fake engine exploded")
        raw = c.post(base + "/v1/completions", json={"prompt": "BOOM", "stream": True}, headers=h).text
        assert '"error"' in raw and "fake engine exploded" in raw and raw.endswith("data: [DONE]\n\n")
    r = served["client"].completions.create(model="fake-base", prompt="ok", max_tokens=2)
    assert r.usage.completion_tokens == 2


@pytest.mark.ray
def test_openai_client_raises_typed_errors(served):
    c = served["client"]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        c.completions.create(model="fake-base", prompt="x", echo=True)
    bad = openai.OpenAI(base_url=served["base"] + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


@pytest.mark.ray
def test_client_disconnect_mid_stream_closes_the_engine_request(served):
    body = {"model": "fake-base", "prompt": "SLOW", "stream": True, "max_tokens": 100}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", served["base"] + "/v1/completions", json=body, headers=served["headers"]) as r:
            first = next(r.iter_lines())
            rid = json.loads(first[len("data: "):])["id"]
        # leaving the block closes the connection after 1 of 100 tokens (0.2 s each)
    assert _closed_early(served, rid), "client went away but the engine generator was never closed"


@pytest.mark.ray
def test_client_disconnect_non_streaming_closes_the_engine_request(served):
    before = 0
    if os.path.exists(served["log"]):
        with open(served["log"]) as f:
            before = len(f.readlines())
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served["base"] + "/v1/completions", json={"prompt": "SLOW", "max_tokens": 100},
                   headers=served["headers"], timeout=1.0)
    deadline = time.time() + 10
    while time.time() < deadline:
        with open(served["log"]) as f:
            new = [json.loads(line) for line in f.readlines()[before:]]
        if any(rec["event"] == "closed_early" and rec["request_id"].startswith("cmpl-") for rec in new):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the non-streaming request's engine generator was not closed after the client left")


@pytest.mark.ray
def test_models_health_and_patch_through_handle(served):
    from ray import serve

    base, h = served["base"], served["headers"]
    with httpx.Client(timeout=30) as c:
        assert [m["id"] for m in c.get(base + "/v1/models", headers=h).json()["data"]] == ["fake-base"]
        handle = serve.get_app_handle(served["app_name"])
        assert handle.load_patch.remote("legal", "/tmp/patch-legal").result() == "fake-base:legal"
        listed = c.get(base + "/v1/models", headers=h).json()
        assert listed["object"] == "list" and [m["id"] for m in listed["data"]] == ["fake-base", "fake-base:legal"]
        card = c.get(base + "/v1/models/fake-base:legal", headers=h).json()
        assert card["object"] == "model" and card["parent"] == "fake-base"
        _err(c.get(base + "/v1/models/other", headers=h), 404, code="model_not_found")
        r = served["client"].chat.completions.create(model="fake-base:legal", messages=[{"role": "user",
                                                                                       "content": "hi"}])
        assert r.model == "fake-base:legal"

        assert c.get(base + "/health").status_code == 200  # no API key needed for probes
        open(served["unhealthy"], "w").close()
        try:
            _err(c.get(base + "/health"), 503, code="unhealthy", needle="dead")
            with pytest.raises(RuntimeError, match="dead"):
                handle.check_health.remote().result()
        finally:
            os.remove(served["unhealthy"])
        assert c.get(base + "/health").status_code == 200
        handle.check_health.remote().result()


def test_build_app_args_and_config_path(tmp_path):
    from ray.serve.deployment import Application

    from expertpool.platform.app import build_app

    with pytest.raises(ValueError, match="engine_factori"):
        build_app({"config": {}, "engine_factori": "x:y"})
    with pytest.raises(ValueError, match="serving.max_seq_len"):
        build_app({"config": {"serving": {"max_seq_len": 0}}})
    with pytest.raises(ValueError, match="missing.yaml"):
        build_app({"config": str(tmp_path / "missing.yaml")})
    (tmp_path / "cluster.yaml").write_text("serving:\n  max_seq_len: 64\n")
    assert isinstance(build_app({"config": str(tmp_path / "cluster.yaml")}), Application)


@pytest.mark.ray
def test_metrics_reach_prometheus_export(served):
    """Last on purpose: by now the replica has served requests. The per-expert gauge is only ever set by
    the replica's background stats task, so seeing it proves that task runs inside Serve."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    app_name = served["app_name"]
    dashboard = _serve_llm_dashboard_metrics()
    assert len(dashboard) >= 15, dashboard  # the file still lists the vLLM series
    wanted = sorted(dashboard) + ["ray_expertpool_requests_total", "ray_expertpool_expert_tokens",
                                  "ray_vllm_inter_token_latency_seconds_bucket"]
    deadline, missing, lines = time.time() + 60, wanted, []  # Ray exports every few seconds
    while time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        lines = [ln for ln in text.splitlines() if ln.startswith(("ray_expertpool_", "ray_vllm_"))]
        missing = [w for w in wanted if not any(ln.startswith(w + "{") for ln in lines)]
        if not any('status="404"' in ln for ln in lines):
            missing.append('requests_total{status="404"}')
        if not any('expert="7"' in ln for ln in lines):
            missing.append('expert_tokens{expert="7"}')
        # The session's cluster also exports other test apps' series (model_name="tiny"), so every series
        # must carry both labels and this app's must be among them.
        vllm = [ln for ln in lines if ln.startswith("ray_vllm_")]
        if not all(re.search(r'model_name="[^"]+"', ln) and 'engine="expertpool"' in ln for ln in vllm):
            missing.append("model_name and engine labels on every ray_vllm_ series")
        if not any('model_name="fake-base' in ln for ln in vllm):
            missing.append('ray_vllm_ series of this app (model_name="fake-base...")')
        if not missing:
            break
        time.sleep(1)
    assert not missing, f"not exported after 60 s: {missing} (app {app_name}); got {lines[:5]}"


# vLLM series of Ray Serve LLM's dashboard for features this engine does not have: an external
# (connector) prefix cache, KV offloading to CPU, NIXL transfers (prefill/decode disaggregation).
NOT_APPLICABLE = ("external_prefix_cache", "kv_offload", "nixl")


def _serve_llm_dashboard_metrics() -> set[str]:
    """The ``ray_vllm_*`` series the installed Ray's Serve LLM Grafana dashboard queries (histograms as
    their ``_bucket``/``_sum`` series), less those of features we do not have."""
    import re

    import ray.dashboard.modules.metrics.dashboards.serve_llm_dashboard_panels as panels

    src = open(panels.__file__).read()
    names = set(re.findall(r"ray_vllm_[a-z0-9_]+", src))
    hist = set(re.findall(r'_(?:histogram_panels|percentile_with_join|mean_with_join)\(\s*"(ray_vllm_[a-z0-9_]+)"',
                          src))
    out = {n for n in names - hist if not any(k in n for k in NOT_APPLICABLE)}
    return out | {h + "_bucket" for h in hist if not any(k in h for k in NOT_APPLICABLE)}


def test_prefix_and_speculative_metrics_follow_the_engine_counters():
    m = ServerMetrics(replica="r1", model_name="m", counter=_Recorder, gauge=_Recorder, histogram=_Recorder)
    base = {"running": 0, "waiting": 0, "kv_usage": 0.0, "expert_tokens": []}
    m.update_from_stats({**base, "prefix_cache_queries": 100, "prefix_cache_hits": 64, "spec_decode_num_drafts": 10,
                         "spec_decode_num_draft_tokens": 20, "spec_decode_num_accepted_tokens": 13,
                         "spec_decode_num_accepted_tokens_per_pos": [8, 5]})
    m.update_from_stats({**base, "prefix_cache_queries": 150, "prefix_cache_hits": 64, "spec_decode_num_drafts": 12,
                         "spec_decode_num_draft_tokens": 24, "spec_decode_num_accepted_tokens": 16,
                         "spec_decode_num_accepted_tokens_per_pos": [10, 6]})
    assert [v for v, _ in m.prefix_queries.values] == [100, 50] and [v for v, _ in m.prefix_hits.values] == [64]
    assert [v for v, _ in m.spec_accepted.values] == [13, 3]
    assert [(v, t["position"]) for v, t in m.spec_accepted_per_pos.values] == [(8, "0"), (5, "1"), (2, "0"), (1, "1")]


def test_a_replica_whose_constructor_failed_stops_without_a_second_error():
    """Serve calls the replica's ``__del__`` even when its constructor raised (a bad model path, say):
    with no engine there is nothing to stop, and no AttributeError buries the first error in the logs."""
    import types

    from expertpool.platform.app import ExpertPoolServer
    ours = next(c for c in ExpertPoolServer.func_or_class.__mro__
                if getattr(vars(c).get("__del__"), "__qualname__", "") == "ExpertPoolServer.__del__")
    asyncio.run(vars(ours)["__del__"](types.SimpleNamespace()))  # raised AttributeError: no 'engine'
    stopped = []

    async def shutdown():
        stopped.append(True)
    asyncio.run(vars(ours)["__del__"](types.SimpleNamespace(engine=types.SimpleNamespace(shutdown=shutdown))))
    assert stopped == [True]
