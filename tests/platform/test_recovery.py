"""Self-healing serving end to end: real Ray, real Serve, real HTTP, real ``kill -9``.

The kill tests' app runs MTP speculative decoding, so replay covers the draft state too.

An expert actor is killed under concurrent streams; every stream must complete with all its tokens,
no error event and the same text as without the fault (greedy, and seeded sampling). Then: a kill
during a long chunked prefill, each rank in turn and twice in a row, a replacement that cannot be
scheduled (503 JSON within the bound, nothing hangs), a downscale while streams run, and a dead
replica whose queued requests Serve sends to the other replica.
"""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
from tests.ports import free_port

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MAX_TOKENS = 160



def _cfg(name: str, **serving):
    from expertpool.platform.config import parse_config

    recovery = serving.pop("recovery", {})
    return parse_config({
        "model": {"dtype": "float32"},  # greedy parity with the fp32 reference model
        "pool": {"actors_per_replica": 2, "actor_resources": {"cpu": 0.25}, "recovery": recovery},
        "serving": {"app_name": name, "route_prefix": f"/{name}", "max_seq_len": 2048, "max_batch_size": 16,
                    "max_num_batched_tokens": 32, "health_check_period_s": 2,
                    "kv_cache": {"block_size": 16, "num_blocks": 512}, **serving}})


def _wait_running(names, timeout=240):
    from ray import serve

    deadline = time.time() + timeout
    while time.time() < deadline:
        st = serve.status().applications
        if all(st.get(n) is not None and st[n].status == "RUNNING" for n in names):
            return
        time.sleep(0.5)
    raise RuntimeError(f"apps {names} did not come up: {serve.status()}")


@pytest.fixture(scope="module")
def serve_base(ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _deploy(cfg, factory=None, **options):
    """Deploy ``cfg``; ``options`` (e.g. num_replicas) replace its autoscaling, with the same init args,
    so a later call with another num_replicas is a pure scale change."""
    from ray import serve

    from expertpool.platform.app import ExpertPoolServer, build_app_from_config

    if options:
        opts = {**cfg.serve_deployment_options(), "autoscaling_config": None, **options}
        app = ExpertPoolServer.options(**opts).bind(cfg.model_dump(mode="json"), factory, None)
    else:
        app = build_app_from_config(cfg, engine_factory=factory)
    serve.run(app, name=cfg.serving.app_name, route_prefix=cfg.serving.route_prefix, blocking=False)
    _wait_running([cfg.serving.app_name])


@pytest.fixture(scope="module")
def heal(serve_base):
    """The app every kill test uses. It speculates (MTP, 1 draft per step), so a replay must also
    rebuild the drafts and the draft module's cache; the other apps here do not."""
    from ray import serve

    cfg = _cfg("heal", speculative={"num_speculative_tokens": 1})
    _deploy(cfg)
    yield f"{serve_base}/heal"
    serve.delete("heal")


def _stats(app: str) -> dict:
    from ray import serve
    return serve.get_deployment_handle("ExpertPool", app).stats.remote().result()


async def _astats(app: str) -> dict:
    from ray import serve
    return await serve.get_deployment_handle("ExpertPool", app).stats.remote()


async def _kill_rank(app: str, rank: int) -> int:
    pid = (await _astats(app))["actors"][rank]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


async def _stream(client, prompt, times=None, **kw):
    """One streaming completion: (text, finish_reason, usage, error, token arrival times); ``times``: the
    list to record arrivals in as they come (default: a new one)."""
    text, finish, usage, times = [], None, None, [] if times is None else times
    try:
        stream = await client.completions.create(model="expertpool-tiny", prompt=prompt, stream=True,
                                                 stream_options={"include_usage": True}, **kw)
        async for ch in stream:
            if ch.usage is not None:
                usage = ch.usage.completion_tokens
            if ch.choices:
                if ch.choices[0].text:
                    text.append(ch.choices[0].text)
                    times.append(time.monotonic())
                finish = ch.choices[0].finish_reason or finish
    except Exception as e:  # an error event ends the stream with an APIError
        return "".join(text), finish, usage, e, times
    return "".join(text), finish, usage, None, times


def _prompts(n):
    return [f"stream {i}: the history of expert parallelism, part {i}" for i in range(n)]


async def _run(base, prompts, kw_of, faults=None):
    """Run the streams; ``faults`` (an async callable taking each stream's token arrival times so far)
    runs beside them."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    arrivals = [[] for _ in prompts]

    async with client:
        tasks = [asyncio.ensure_future(_stream(client, p, arrivals[i], **kw_of(i))) for i, p in enumerate(prompts)]
        if faults is not None:
            await faults(arrivals)
        return await asyncio.gather(*tasks)


def _greedy(i):
    return dict(max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})


def _seeded(i):
    return dict(max_tokens=MAX_TOKENS, temperature=0.8, seed=1000 + i, extra_body={"ignore_eos": True})


def _wait_for(pred, timeout=60.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


async def _after_tokens(app, rank):
    """Kill ``rank`` once the streams are well under way (the engine has run some decode steps)."""
    steps0 = (await _astats(app))["steps"]
    while (await _astats(app))["steps"] < steps0 + 20:
        await asyncio.sleep(0.1)
    return await _kill_rank(app, rank)


def _assert_complete_and_equal(faulty, reference):
    for i, ((text, finish, usage, err, _), (rtext, _, _, _, _)) in enumerate(zip(faulty, reference)):
        assert err is None, f"stream {i} ended with an error: {err!r}"
        assert finish == "length" and usage == MAX_TOKENS, (i, finish, usage)
        assert text == rtext, f"stream {i} differs from the run without a fault"


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_actor_killed_under_8_streams_loses_nothing(heal, kind):
    kw = _greedy if kind == "greedy" else _seeded
    prompts = _prompts(8)
    reference = asyncio.run(_run(heal, prompts, kw))
    _assert_complete_and_equal(reference, reference)
    before = _stats("heal")

    async def fault(_):
        await _after_tokens("heal", 1)
    faulty = asyncio.run(_run(heal, prompts, kw, fault))
    _assert_complete_and_equal(faulty, reference)
    after = _stats("heal")
    assert after["recoveries"] == before["recoveries"] + 1 and after["actor_failures"] == before["actor_failures"] + 1
    assert after["replayed_tokens"] > before["replayed_tokens"]
    assert after["kv_blocks_used"] == 0 and after["running"] == 0
    assert after["actors"][1]["pid"] != before["actors"][1]["pid"]


def test_kill_during_a_long_chunked_prefill(heal):
    """A 1,500-token prompt prefills in 32-token chunks; the rank that holds its cache dies midway."""
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(ensure_embedded_model())
    ids = (tok.encode("A long document about mixture-of-experts serving. ") * 200)[:1500]
    kw = dict(max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    # the reference comes from the model in process: a request to the app would put this prompt in
    # its prefix cache, and the interrupted request would then not prefill it
    import torch

    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.engine import generate, local_engine
    model = load_checkpoint(ensure_embedded_model(), dtype=torch.float32, with_mtp=False)
    core = local_engine(model, max_batch_size=1, max_seq_len=2048, max_num_batched_tokens=512)
    reference = tok.decode(generate(core, [ids], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0])
    before = _stats("heal")

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{heal}/v1", api_key="none", max_retries=0, timeout=300)
        async with aclient:
            return await interrupted(aclient)

    async def interrupted(aclient):
        task = asyncio.ensure_future(_stream(aclient, ids, **kw))
        while True:  # the prefill has started: some blocks are in use on one rank
            used = (await _astats("heal"))["kv_blocks_used_per_worker"]
            if any(used):
                break
            await asyncio.sleep(0.05)
        rank = max(range(2), key=lambda r: used[r])
        t_kill = time.monotonic()
        await _kill_rank("heal", rank)
        return await task, t_kill
    (text, finish, usage, err, times), t_kill = asyncio.run(run())
    assert err is None and finish == "length" and usage == 24
    assert times[0] > t_kill, "the first token arrived before the kill: the prefill was not interrupted"
    assert text == reference
    assert _stats("heal")["recoveries"] == before["recoveries"] + 1


def test_each_rank_in_turn_and_two_kills_in_a_row(heal):
    prompts = _prompts(6)
    reference = asyncio.run(_run(heal, prompts, _greedy))
    r0 = _stats("heal")["recoveries"]

    async def faults(_):
        for n, rank in enumerate((0, 1, 0)):  # rank 0 hosts the rendezvous; then two back to back
            await _after_tokens("heal", rank)
            while (await _astats("heal"))["recoveries"] < r0 + n + 1:
                await asyncio.sleep(0.1)
    faulty = asyncio.run(_run(heal, prompts, _greedy, faults))
    _assert_complete_and_equal(faulty, reference)
    st = _stats("heal")
    assert st["recoveries"] == r0 + 3 and not st["recovering"]
    assert all(s > 0 for s in st["recovery_seconds"][-3:])


@pytest.fixture(scope="module")
def no_room(serve_base):
    from ray import serve

    cfg = _cfg("noroom", recovery={"timeout_s": 8})
    _deploy(cfg, "tests.platform.fault_hooks:engine_without_room_for_a_replacement")
    yield f"{serve_base}/noroom"
    serve.delete("noroom")


def test_replacement_that_cannot_be_scheduled_ends_in_503(no_room):
    """The freed bundle is taken before the replacement starts: within the recovery bound every
    request gets a clean 503 (JSON body, Retry-After), streams an error event; nothing hangs; then
    Serve's health check replaces the replica and serving resumes."""
    kw = dict(max_tokens=400, temperature=0)

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{no_room}/v1", api_key="none", max_retries=0, timeout=120)
        async with aclient, httpx.AsyncClient(timeout=120) as h:
            streams = [asyncio.ensure_future(_stream(aclient, p, **kw, extra_body={"ignore_eos": True}))
                       for p in _prompts(3)]
            plain = [asyncio.ensure_future(h.post(f"{no_room}/v1/completions", json={
                "model": "expertpool-tiny", "prompt": p, **kw, "ignore_eos": True})) for p in _prompts(2)]
            await _after_tokens("noroom", 1)
            t_kill = time.monotonic()
            got = await asyncio.wait_for(asyncio.gather(*streams, *plain), timeout=60)
            late = await h.post(f"{no_room}/v1/completions", json={"model": "expertpool-tiny", "prompt": "x",
                                                                    "max_tokens": 4})
        return got, time.monotonic() - t_kill, late
    got, elapsed, late = asyncio.run(run())
    assert elapsed < 8 + 20, f"requests ended {elapsed:.0f}s after the kill (recovery bound 8 s)"
    for text, finish, usage, err, _ in got[:3]:
        assert isinstance(err, openai.APIError) and "unavailable" in str(err), err
    for r in got[3:]:
        assert r.status_code == 503 and r.headers.get("retry-after"), r.text
        assert r.json()["error"]["code"] == "engine_unavailable"
    assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable" and \
        late.headers.get("retry-after")

    def serving_again():
        try:
            return httpx.post(f"{no_room}/v1/completions", json={"model": "expertpool-tiny", "prompt": "x",
                                                                 "max_tokens": 2}, timeout=30).status_code == 200
        except httpx.HTTPError:
            return False
    _wait_for(serving_again, timeout=120, what="Serve to replace the failed replica")


def _replica_count(app: str) -> int:
    from ray import serve
    dep = serve.status().applications[app].deployments["ExpertPool"]
    return dep.replica_states.get("RUNNING", 0)


def test_downscale_2_to_1_finishes_every_stream(serve_base):
    from ray import serve

    cfg = _cfg("down", graceful_shutdown_timeout_s=120)
    _deploy(cfg, num_replicas=2)
    base = f"{serve_base}/down"
    try:
        _wait_for(lambda: _replica_count("down") == 2, what="2 replicas")

        downscaled = []

        async def faults(arrivals):
            while min(len(a) for a in arrivals) < 5:  # every stream under way (on both replicas)
                await asyncio.sleep(0.01)
            downscaled.append(time.monotonic())
            _deploy(cfg, num_replicas=1)
        res = asyncio.run(_run(base, _prompts(8), lambda i: dict(max_tokens=400, temperature=0,
                                                                   extra_body={"ignore_eos": True}), faults))
        for text, finish, usage, err, times in res:
            assert err is None and finish == "length" and usage == 400
            assert times[-1] > downscaled[0], "a stream ended before the downscale: nothing was drained"
        _wait_for(lambda: _replica_count("down") == 1, what="the downscale to 1 replica")
    finally:
        serve.delete("down")


def test_dead_replica_queued_requests_go_to_the_other(serve_base):
    """A whole replica process dies: its in-flight requests are lost (their state lived there), but
    requests that had not started yet run on the other replica."""
    from ray import serve

    cfg = _cfg("twin", max_ongoing_requests=2, autoscaling={"target_ongoing_requests": 1})
    _deploy(cfg, num_replicas=2)
    base = f"{serve_base}/twin"
    try:
        _wait_for(lambda: _replica_count("twin") == 2, what="2 replicas")
        handle = serve.get_deployment_handle("ExpertPool", "twin")
        victim = handle.stats.remote().result()["replica_pid"]

        async def run():
            async with httpx.AsyncClient(timeout=180) as h:
                reqs = [asyncio.ensure_future(h.post(f"{base}/v1/completions", json={
                    "model": "expertpool-tiny", "prompt": p, "max_tokens": 120, "temperature": 0,
                    "ignore_eos": True})) for p in _prompts(12)]
                await asyncio.sleep(1.5)  # 4 running (2 per replica), 8 queued at the proxy
                os.kill(victim, signal.SIGKILL)
                return await asyncio.wait_for(asyncio.gather(*reqs, return_exceptions=True), timeout=170)
        res = asyncio.run(run())
        ok = [r for r in res if isinstance(r, httpx.Response) and r.status_code == 200]
        assert len(ok) >= 12 - 2, [getattr(r, "status_code", r) for r in res]
        assert all(r.json()["usage"]["completion_tokens"] == 120 for r in ok)
    finally:
        serve.delete("twin")


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def test_replay_rebuilds_grammar_forks_and_logprobs(heal):
    """Every piece of per-sequence state survives a kill: a JSON-schema stream (its grammar matcher is
    rebuilt from the accepted tokens), n=2 forks (they share the prompt's blocks), logprobs, beside
    long plain streams that keep the group busy. Outputs equal the run without the fault."""
    import jsonschema

    async def batch(fault):
        client = openai.AsyncOpenAI(base_url=f"{heal}/v1", api_key="none", max_retries=0, timeout=300)
        async with client:
            reqs = [
                client.chat.completions.create(
                    model="expertpool-tiny", messages=[{"role": "user", "content": "Who are you?"}], max_tokens=120,
                    temperature=0.9, seed=4, response_format={"type": "json_schema", "json_schema": {
                        "name": "p", "schema": SCHEMA}}),
                client.completions.create(model="expertpool-tiny", prompt="fork me " * 20, max_tokens=120, n=2,
                                          temperature=0.8, seed=9, extra_body={"ignore_eos": True}),
                client.completions.create(model="expertpool-tiny", prompt="logprobs please", max_tokens=120,
                                          temperature=0, logprobs=2, extra_body={"ignore_eos": True}),
            ] + [_stream(client, p, **_greedy(i)) for i, p in enumerate(_prompts(4))]
            tasks = [asyncio.ensure_future(r) for r in reqs]
            if fault:
                await _after_tokens("heal", 0)
            return await asyncio.gather(*tasks)

    reference = asyncio.run(batch(False))
    r0 = _stats("heal")["recoveries"]
    faulty = asyncio.run(batch(True))
    assert _stats("heal")["recoveries"] == r0 + 1
    (js, fork, lp), (rjs, rfork, rlp) = faulty[:3], reference[:3]
    assert js.choices[0].message.content == rjs.choices[0].message.content
    jsonschema.validate(json.loads(js.choices[0].message.content), SCHEMA)
    assert [c.text for c in fork.choices] == [c.text for c in rfork.choices] and fork.choices[0].text != \
        fork.choices[1].text
    assert lp.choices[0].text == rlp.choices[0].text and lp.usage.completion_tokens == 120
    # a replayed token's logprob comes from a recomputed prefill (other matmul shapes): equal to fp32 rounding
    got, want = lp.choices[0].logprobs.token_logprobs, rlp.choices[0].logprobs.token_logprobs
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4
    _assert_complete_and_equal(faulty[3:], reference[3:])
