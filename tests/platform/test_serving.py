"""Expert-parallel serving end to end: the embedded tiny model behind Ray Serve, real actors
(gloo all-to-all between them), real HTTP, the official openai client.

One Serve instance hosts two apps: the tiny model with 2 expert actors per replica (/ep2) and with 4
(/ep4, with multi-step scheduling: chains of 4 steps). fp32 compute, so greedy outputs must equal the
in-process model's greedy tokens exactly.
"""

import asyncio
import functools
import itertools
from pathlib import Path
import threading
import time

import httpx
import pytest
import torch
from tests.ports import free_port

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.ray
MAX_SEQ_LEN = 2048  # long enough that a 1500-token stream is still running when its client leaves
API_KEY = "sk-test-ep4"  # the 4-actor app requires a bearer token



@pytest.fixture(scope="module")
def tiny_dir():
    from expertpool.model.embedded import ensure_embedded_model
    return ensure_embedded_model()


@pytest.fixture(scope="module")
def served(ray_cluster, tiny_dir):
    """Both apps deployed from their Serve configs, declaratively, as `expertpool serve` and `serve
    deploy` do: `expertpool publish` edits a declarative app's user_config."""
    from ray import serve

    from expertpool.platform.config import parse_config
    from expertpool.platform.patches import apply_app

    port = free_port()
    apps = {}
    for key, actors in ((2, 2), (4, 4), ("spec", 2)):  # "spec": MTP speculative decoding, 2 drafts per step
        name = f"ep{actors}" if key != "spec" else "spec2"
        cfg = parse_config({
            "model": {"dtype": "float32"},  # greedy parity with the fp32 reference model
            # ep2 may change width (test_scale_...): a range, bundles reserved up to 3 actors
            "pool": {"actors_per_replica": {"min": 1, "max": 3, "initial": 2} if name == "ep2" else actors,
                     "actor_resources": {"cpu": 0.25}},
            "serving": {"app_name": name, "route_prefix": f"/{name}", "max_seq_len": MAX_SEQ_LEN,
                        "max_batch_size": 32, "max_num_batched_tokens": 128, "health_check_period_s": 600,
                        "kv_cache": {"block_size": 8, "num_blocks": 1024},
                        "api_key": API_KEY if actors == 4 else None,
                        "num_scheduler_steps": 4 if key == 4 else 1,
                        "speculative": {"num_speculative_tokens": 2} if key == "spec" else None}})
        apply_app(cfg.serve_app_config(), http_options={"host": "127.0.0.1", "port": port})
        apps[key] = name
    deadline = time.time() + 240
    while time.time() < deadline:
        st = serve.status().applications
        if all(st.get(n) is not None and st[n].status == "RUNNING" for n in apps.values()):
            break
        time.sleep(1)
    else:
        raise RuntimeError(f"apps did not come up: {serve.status()}")
    base = f"http://127.0.0.1:{port}"
    yield {"base": base, "apps": apps,
           "client": {k: openai.OpenAI(base_url=f"{base}/{n}/v1", api_key=API_KEY if k == 4 else "none",
                                       max_retries=0, timeout=120)
                      for k, n in apps.items()}}
    for n in apps.values():
        serve.delete(n)
    serve.shutdown()


def _stats(app_name: str) -> dict:
    from ray import serve
    return serve.get_deployment_handle("ExpertPool", app_name).stats.remote().result()


@functools.cache
def _reference_model(tiny_dir):
    from expertpool.model.checkpoint import load_checkpoint
    return load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)


def _reference_greedy(tiny_dir, prompt_ids, n):
    m = _reference_model(tiny_dir)
    seq = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt_ids):]


@pytest.mark.parametrize("actors", [2, 4])
def test_openai_client_chat_and_completions(served, actors):
    c = served["client"][actors]
    assert [m.id for m in c.models.list().data] == ["expertpool-tiny"]
    r = c.chat.completions.create(model="expertpool-tiny", messages=[{"role": "user", "content": "Hello!"}],
                                  max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    chunks = list(c.chat.completions.create(model="expertpool-tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 10
    assert any(ch.choices and ch.choices[0].finish_reason == "length" for ch in chunks)
    r = c.completions.create(model="expertpool-tiny", prompt="The quick brown fox", max_tokens=8, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8
    s = "".join(ch.choices[0].text for ch in c.completions.create(
        model="expertpool-tiny", prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices)
    assert s == r.choices[0].text


@pytest.mark.parametrize("actors", [2, 4])
def test_greedy_equals_in_process_model(served, tiny_dir, actors):
    from expertpool.model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_dir)
    c = served["client"][actors]
    for prompt in ["Hello, how are you today?", "def add(a, b):", "The capital of France"]:
        ids = tok.encode(prompt)
        ref = _reference_greedy(tiny_dir, ids, 16)
        r = c.completions.create(model="expertpool-tiny", prompt=ids, max_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode(ref), prompt


def test_shared_system_prompt_is_cached_from_the_second_request(served, tiny_dir):
    """A 200-token system prompt: from the second request on, usage reports cached prompt tokens, and
    every answer still equals the in-process model's greedy tokens over the whole prompt."""
    from expertpool.model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_dir)
    system = (tok.encode("You are a terse assistant for an expert-parallel serving platform. ", add_bos=True)
              * 40)[:200]
    c = served["client"][2]
    before = _stats(served["apps"][2])["prefix_cache_hits"]
    cached = []
    for q in ["What is MLA?", "Why route tokens?", "How many experts?"]:
        ids = system + tok.encode(q, add_bos=False)
        r = c.completions.create(model="expertpool-tiny", prompt=ids, max_tokens=8, temperature=0,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode(_reference_greedy(tiny_dir, ids, 8)), q
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    assert cached[1] >= 192 and cached[2] >= 192, cached  # the 200-token prefix in whole 8-token blocks
    assert _stats(served["apps"][2])["prefix_cache_hits"] - before >= sum(cached[1:])


def test_speculative_decoding_with_2_expert_actors_equals_the_model(served, tiny_dir):
    """MTP drafts on 2 expert actors (the module's MoE goes through the all-to-all): greedy output of
    8 concurrent streams equals the in-process model's, and the decode steps verified drafts."""
    from expertpool.model.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(tiny_dir)
    c = served["client"]["spec"]
    prompts = [tok.encode(f"speculative stream {i}: the experts") for i in range(8)]

    async def run():
        ac = openai.AsyncOpenAI(base_url=c.base_url, api_key="none", max_retries=0, timeout=120)
        async with ac:
            rs = await asyncio.gather(*[ac.completions.create(
                model="expertpool-tiny", prompt=p, max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
                for p in prompts])
        return [r.choices[0].text for r in rs]
    texts = asyncio.run(run())
    for p, text in zip(prompts, texts):
        assert text == tok.decode(_reference_greedy(tiny_dir, p, 20))
    st = _stats(served["apps"]["spec"])
    # every decode step after the first verified a draft: 2 tokens, fewer only near max_tokens
    assert st["spec_decode_num_drafts"] >= 8 * 15 and st["spec_decode_num_draft_tokens"] > 1.5 * st[
        "spec_decode_num_drafts"]


def test_32_concurrent_streams_with_continuous_batching(served):
    c = served["client"][2]
    before = _stats(served["apps"][2])["max_batch_seen"]
    lengths = [4 + (i % 7) * 3 for i in range(32)]

    async def one(i, ac):
        n = 0
        stream = await ac.completions.create(model="expertpool-tiny", prompt=f"request {i}: tell me a story",
                                             max_tokens=lengths[i], temperature=0.7, seed=i, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
        usage = None
        async for ch in stream:
            if ch.choices and ch.choices[0].text:
                n += 1
            if ch.usage:
                usage = ch.usage
        return usage.completion_tokens

    async def main():
        ac = openai.AsyncOpenAI(base_url=c.base_url, api_key="none", max_retries=0, timeout=300)
        return await asyncio.gather(*[one(i, ac) for i in range(32)])

    got = asyncio.run(main())
    assert got == lengths
    st = _stats(served["apps"][2])
    assert max(st["max_batch_seen"], before) > 1 and st["running"] == 0 and st["kv_blocks_used"] == 0
    assert sum(st["expert_tokens"]) > 0  # per-expert token counts pulled from the actors


def test_bad_inputs_get_specific_4xx_and_server_keeps_serving(served):
    url = f"{served['base']}/ep2/v1"
    chat = url + "/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (httpx.post(chat, content=b"{not json", headers={"Content-Type": "application/json"}), 400, "JSON"),
        (httpx.post(chat, json={"model": "expertpool-tiny"}), 400, "messages"),
        (httpx.post(chat, json={"model": "expertpool-tiny", "messages": msgs, "max_tokens": -3}), 400, "max_tokens"),
        (httpx.post(chat, json={"model": "expertpool-tiny", "messages": msgs, "temperature": 7}), 400, "temperature"),
        (httpx.post(chat, json={"model": "nope", "messages": msgs}), 404, "nope"),
        (httpx.post(url + "/completions", json={"model": "expertpool-tiny", "prompt": "word " * 2100}), 400,
         "max_seq_len"),
        (httpx.post(url + "/completions", json={"model": "expertpool-tiny", "prompt": [1, 99999]}), 400, "vocabulary"),
    ]
    for r, code, needle in cases:
        assert r.status_code == code, (r.status_code, r.text)
        err = r.json()["error"]
        assert needle.lower() in err["message"].lower(), err
    chat4 = f"{served['base']}/ep4/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(chat4, json={"model": "expertpool-tiny", "messages": msgs}, headers=headers)
        assert r.status_code == 401 and "api key" in r.json()["error"]["message"].lower(), r.text
    # answered by Serve's proxy itself (no such application): still OpenAI JSON (platform/proxy.py)
    r = httpx.get(f"{served['base']}/no-such-app/v1/models")
    assert r.status_code == 404 and r.headers["content-type"] == "application/json", r.text
    assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    ok = httpx.post(chat, json={"model": "expertpool-tiny", "messages": msgs, "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_proxy_back_pressure_is_an_openai_503_with_retry_after(served):
    """More requests than max_ongoing + max_queued: Serve's proxy sheds the rest with 503; clients
    get OpenAI error JSON and Retry-After, and the app keeps serving."""
    from ray import serve

    from expertpool.platform.app import build_app_from_config
    from expertpool.platform.config import parse_config
    name = "epq"
    cfg = parse_config({
        "model": {"dtype": "float32"},  # greedy parity with the fp32 reference model
        "pool": {"actors_per_replica": 1, "actor_resources": {"cpu": 0.25}},
        "serving": {"app_name": name, "route_prefix": f"/{name}", "max_seq_len": MAX_SEQ_LEN,
                    "health_check_period_s": 600, "kv_cache": {"block_size": 8, "num_blocks": 256},
                    "max_ongoing_requests": 1, "max_queued_requests": 1,
                    "autoscaling": {"target_ongoing_requests": 1}}})
    serve.run(build_app_from_config(cfg), name=name, route_prefix=f"/{name}", blocking=False)  # returns once up
    url = f"{served['base']}/{name}/v1/completions"
    body = {"model": "expertpool-tiny", "prompt": "busy", "max_tokens": 150, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*[c.post(url, json=body) for _ in range(6)])
    try:
        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) <= {200, 503}, codes
        for r in rs:
            if r.status_code == 503:
                assert r.headers["content-type"] == "application/json" and int(r.headers["retry-after"]) >= 1
                err = r.json()["error"]
                assert err["type"] == "server_overloaded" and "retry" in err["message"].lower(), err
            else:
                assert r.json()["usage"]["completion_tokens"] == 150
        ok = httpx.post(url, json={**body, "max_tokens": 3}, timeout=60)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        serve.delete(name)


def test_client_disconnect_mid_stream_releases_cache_blocks(served):
    app = served["apps"][4]
    url = f"{served['base']}/ep4/v1/completions"
    body = {"model": "expertpool-tiny", "prompt": "a long story", "max_tokens": 1500, "stream": True,
            "temperature": 0, "ignore_eos": True}
    aborted_before = _stats(app)["aborted"]
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        with client.stream("POST", url, json=body) as r:
            # islice(), not a for loop with a break: leaving the for loop closes the line iterator, and
            # httpcore closes the connection with it, so the server could see the disconnect (and free
            # the blocks) before the stats call below (a CI run once read 0 blocks that way)
            it = r.iter_lines()  # named: a dropped iterator is closed, and the connection with it
            lines = list(itertools.islice(it, 7))
            assert r.status_code == 200 and len(lines) == 7, (r.status_code, lines)
            st = _stats(app)
            assert st["kv_blocks_used"] > 0 and st["running"] >= 1, (lines, st)
    deadline = time.time() + 20
    while time.time() < deadline and (_stats(app)["kv_blocks_used"] or _stats(app)["running"]):
        time.sleep(0.2)
    st = _stats(app)
    assert st["kv_blocks_used"] == 0 and st["running"] == 0
    assert st["aborted"] >= aborted_before + 1  # ended by the disconnect, not by running to completion


def test_health_covers_the_actors(served):
    r = httpx.get(f"{served['base']}/ep2/health", timeout=30)
    assert r.status_code == 200


def _make_patch(tiny_dir, out_dir):
    """A synthetic ESFT patch: half of the routed experts of every MoE layer, perturbed (training
    itself is covered by tests/jobs; here only the hand-off to serving matters)."""
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.patch import save_patch
    m = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)
    g = torch.Generator().manual_seed(0)
    experts = {}
    for moe in m.moe_layers():
        ex = moe.experts
        experts[moe.layer_id] = {e: (ex.w13_weight[e] * 3 + 0.2 * torch.randn(ex.w13_weight[e].shape, generator=g),
                                     ex.w2_weight[e] * 3) for e in range(0, ex.num_local, 2)}
    return save_patch(out_dir, base_model_dir=tiny_dir, domain="legal", experts=experts)


def test_patch_hot_swap_serves_base_and_variant(served, tiny_dir, tmp_path):
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.patch import apply_patch, read_patch
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.patches import publish

    patch_dir = _make_patch(tiny_dir, tmp_path / "patch")
    tok = Tokenizer.from_dir(tiny_dir)
    ids = tok.encode("The contract shall be governed by")
    c = served["client"][2]
    base_ref = _reference_greedy(tiny_dir, ids, 12)
    patched = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)
    apply_patch(patched, read_patch(patch_dir), base_model_dir=tiny_dir)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(12):
            seq.append(int(patched(torch.tensor([seq]))[0, -1].argmax()))
    patched_ref = seq[len(ids):]
    assert patched_ref != base_ref

    # a long base stream runs across the swap and must finish unharmed
    base_stream: dict = {}

    def stream_base():
        text, n = "", 0
        for ch in c.completions.create(model="expertpool-tiny", prompt=ids, max_tokens=150, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True}):
            if ch.choices:
                text += ch.choices[0].text
            if ch.usage:
                n = ch.usage.completion_tokens
        base_stream.update(text=text, n=n)

    t = threading.Thread(target=stream_base)
    t.start()
    time.sleep(0.5)
    model_id = publish(served["apps"][2], str(patch_dir))
    t.join(timeout=120)
    assert model_id == "expertpool-tiny:legal"
    assert base_stream["n"] == 150 and base_stream["text"].startswith(tok.decode(base_ref))
    assert [m.id for m in c.models.list().data] == ["expertpool-tiny", "expertpool-tiny:legal"]
    r_var = c.completions.create(model=model_id, prompt=ids, max_tokens=12, temperature=0,
                                 extra_body={"ignore_eos": True})
    r_base = c.completions.create(model="expertpool-tiny", prompt=ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r_var.choices[0].text == tok.decode(patched_ref)
    assert r_base.choices[0].text == tok.decode(base_ref)
    # the declaration is the deployment's user_config: in the app's Serve config, not in an actor
    from expertpool.platform.patches import declared_app
    (dep,) = declared_app(served["apps"][2])["deployments"]
    assert dep["user_config"] == {"patches": {"legal": str(patch_dir)}}  # no actors: the width it started with


def test_scale_changes_the_group_width_while_it_serves_base_and_variant(served, tiny_dir, tmp_path):
    """`expertpool scale` (its ``scale``) declares 3 actors in the running app's user_config: the replica
    widens its group while a long stream runs (new actor loads its experts and the published patch,
    kept actors re-shard), the stream finishes unharmed, base and variant answers are unchanged;
    then back to 2."""
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.patches import declared_app, scale

    app, c = served["apps"][2], served["client"][2]
    tok = Tokenizer.from_dir(tiny_dir)
    ids = tok.encode("The contract shall be governed by")

    def answers():
        return [c.completions.create(model=m, prompt=ids, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
                for m in ("expertpool-tiny", "expertpool-tiny:legal")]

    before = answers()  # the variant was published by the hot-swap test
    assert before[0] == tok.decode(_reference_greedy(tiny_dir, ids, 12))
    for width in (3, 2):
        stream: dict = {}

        def long_stream():
            chunks = c.completions.create(model="expertpool-tiny", prompt=ids, max_tokens=120, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True})
            stream["text"] = "".join(ch.choices[0].text for ch in chunks if ch.choices)

        t = threading.Thread(target=long_stream)
        t.start()
        time.sleep(0.5)
        assert scale(app, width, timeout_s=240) == 1
        t.join(timeout=180)
        assert stream["text"].startswith(before[0])
        stats = _stats(app)
        assert stats["width"] == width and len(stats["actors"]) == width, stats
        assert answers() == before, width
    (dep,) = declared_app(app)["deployments"]
    assert dep["user_config"]["actors"] == 2


def test_published_s3_patch_reaches_replicas_started_later(served, tiny_dir, tmp_path, s3):
    """`expertpool publish --patch s3://...` against the loopback S3 server; a replica started after the
    publish (here: the autoscaling floor raised to 2) loads the declared patch before it serves."""
    from ray import serve

    from expertpool.model.storage import upload_dir
    from expertpool.platform.patches import apply_app, declared_app, publish

    app = served["apps"][4]
    s3.create_bucket("patches")
    upload_dir(_make_patch(tiny_dir, tmp_path / "patch"), "s3://patches/legal-v1", last=["manifest.json"])
    assert publish(app, "s3://patches/legal-v1", domain="law") == "expertpool-tiny:law"
    config = declared_app(app)
    (dep,) = config["deployments"]
    assert dep["user_config"] == {"patches": {"law": "s3://patches/legal-v1"}}
    dep["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    apply_app(config)  # a lightweight update: the running replica stays, a second one starts
    handle = serve.get_deployment_handle("ExpertPool", app)
    seen: dict[str, dict] = {}
    deadline = time.time() + 300
    while len(seen) < 2 and time.time() < deadline:
        stats = handle.stats.remote().result(timeout_s=120)
        seen[stats["replica_id"]] = stats["patches"]
        time.sleep(0.2)
    assert len(seen) == 2 and all(p == {"law": "expertpool-tiny:law"} for p in seen.values()), seen
    r = served["client"][4].completions.create(model="expertpool-tiny:law", prompt="The contract", max_tokens=4,
                                               temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    dep["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    apply_app(config)


def test_autoscaling_adds_a_whole_expert_parallel_group(served):
    """Under load, Serve autoscaling starts a second replica; it comes up with its own actor group
    (the replica's placement group holds the replica and its actors) and serves correctly."""
    from ray import serve

    from expertpool.platform.app import build_app_from_config
    from expertpool.platform.config import parse_config
    name = "epauto"
    cfg = parse_config({
        "model": {"dtype": "float32"},  # greedy parity with the fp32 reference model
        "pool": {"actors_per_replica": 2, "actor_resources": {"cpu": 0.25}},
        "serving": {"app_name": name, "route_prefix": f"/{name}", "max_seq_len": MAX_SEQ_LEN,
                    "health_check_period_s": 600, "kv_cache": {"block_size": 8, "num_blocks": 512},
                    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                    "upscale_delay_s": 1, "downscale_delay_s": 600,
                                    "metrics_interval_s": 0.5, "look_back_period_s": 1}}})
    opts = cfg.serve_deployment_options()
    assert opts["placement_group_bundles"][1:] == [{"CPU": 0.25}, {"CPU": 0.25}]
    serve.run(build_app_from_config(cfg), name=name, route_prefix=f"/{name}", blocking=False)
    client = openai.OpenAI(base_url=f"{served['base']}/{name}/v1", api_key="none", max_retries=0, timeout=300)

    def running():
        app = serve.status().applications.get(name)
        return 0 if app is None else sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())

    deadline = time.time() + 120
    while running() < 1 and time.time() < deadline:
        time.sleep(0.5)
    stop = threading.Event()

    def load():
        while not stop.is_set():
            client.completions.create(model="expertpool-tiny", prompt="keep busy", max_tokens=60, temperature=0,
                                      extra_body={"ignore_eos": True})

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.time() + 180
        while running() < 2 and time.time() < deadline:
            time.sleep(1)
        assert running() == 2, serve.status().applications.get(name)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    r = client.completions.create(model="expertpool-tiny", prompt="hello", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5
    serve.delete(name)


def test_finetune_job_publishes_its_patch_into_the_running_app(served, tmp_path):
    """The job -> serving hand-off: an ESFT job with publish_to ends with the variant served."""
    import yaml

    from expertpool.jobs.finetune import main as finetune_main
    root = Path(__file__).resolve().parents[2]
    cfg = {"serving": {"app_name": served["apps"][2]}, "train": {"jobs": {"bikes": {
        "dataset": {"path": str(root / "data" / "demo_domain.jsonl")}, "mode": "esft",
        "esft": {"scoring": "token", "p": 0.2, "score_tokens": 512}, "lr": 1e-2, "steps": 2, "batch_size": 2,
        "seq_len": 128, "workers": 1, "checkpoint_every": 0, "output_dir": str(tmp_path / "out"),
        "publish_to": served["apps"][2], "domain": "bikes"}}}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert finetune_main(["--config", str(path), "--job", "bikes", "--local"]) == 0
    c = served["client"][2]
    assert "expertpool-tiny:bikes" in [m.id for m in c.models.list().data]
    r = c.completions.create(model="expertpool-tiny:bikes", prompt="My bike chain", max_tokens=4, temperature=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_structured_output_logprobs_and_n_across_two_expert_actors(served):
    """The grammar mask and logprobs are computed on the actor that samples, inside the
    expert-parallel group (2 actors, gloo all-to-all); n=3 forks share one prefill."""
    import json

    import jsonschema

    from tests.platform.test_openai_features import SCHEMA, TIME

    c = served["client"][2]
    r = c.chat.completions.create(
        model="expertpool-tiny", messages=[{"role": "user", "content": "A person as JSON"}], n=3, seed=21,
        temperature=1.0, max_tokens=200, logprobs=True, top_logprobs=2,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    assert len(r.choices) == 3
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch
        jsonschema.validate(json.loads(ch.message.content), SCHEMA)
        assert all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in ch.logprobs.content)
    assert sum(len(ch.logprobs.content) for ch in r.choices) == r.usage.completion_tokens
    t = c.chat.completions.create(
        model="expertpool-tiny", messages=[{"role": "user", "content": "Time?"}], tools=[TIME], seed=4,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False, max_tokens=300)
    call = t.choices[0].message.tool_calls[0]
    assert t.choices[0].finish_reason == "tool_calls" and call.function.name == "get_time"
    assert json.loads(call.function.arguments)["zone"] in ("UTC", "CET")
    assert _stats(served["apps"][2])["kv_blocks_used"] == 0


def test_replica_and_actor_logs_show_startup_at_info(served):
    """Serve configures only its own logger; ours must still reach the replica's log file, and the
    actors' INFO lines their worker logs: one line per checkpoint shard, an 'engine ready' line."""
    import glob
    import os
    import re

    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    replica = "".join(open(f, errors="replace").read() for f in glob.glob(os.path.join(logs, "serve", "replica_ep2_*")))
    assert re.search(r"engine ready: .* 2 expert actors x 128 experts, .* in \d+\.\d ?s", replica), replica[-2000:]
    workers = "".join(open(f, errors="replace").read() for f in glob.glob(os.path.join(logs, "worker-*.err")))
    assert re.search(r"loading shard model\.safetensors \(1 of 1\)", workers)
    assert re.search(r"worker 1/2 loaded experts 128\.\.255", workers)
