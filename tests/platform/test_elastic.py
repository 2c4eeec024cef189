"""Elastic expert parallelism on real Ray actors (no Serve: the engine is driven in this process).

One group of the tiny model with every expert twice (R = E) goes through, under 8 concurrent greedy
streams each time: a ``kill -9`` of one actor (degraded mode: the survivor serves on at once, then
the group widens back), a resize 2 -> 4 -> 2, an EPLB rebalance from a skewed workload, and width
autoscaling widening the group under load and narrowing it when idle. Every
stream must finish with exactly the tokens of the single-process reference model, which holds each
expert once: replicated experts, degraded mode, resizes and rebalances never change an output.
"""

import asyncio
import os
import signal
import time

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]
STREAMS, MAX_TOKENS = 8, 48


def _cfg(tiny_dir, **pool):
    from expertpool.platform.config import parse_config

    return parse_config({
        "model": {"path": str(tiny_dir), "dtype": "float32"},
        "pool": {"actor_resources": {"cpu": 0.25}, **pool},
        "serving": {"max_seq_len": 512, "max_batch_size": 16, "max_num_batched_tokens": 64,
                    "kv_cache": {"block_size": 16, "num_blocks": 256}}})


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (int(torch.randint(8, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy continuations of the prompts by the single-process engine (every expert once)."""
    from expertpool.model.checkpoint import load_checkpoint
    from expertpool.model.sampling import SamplingParams
    from expertpool.platform.engine import generate, local_engine

    model = load_checkpoint(tiny_dir, dtype=torch.float32, with_mtp=False)
    prompts = _prompts(STREAMS)
    outs = generate(local_engine(model, max_seq_len=512), prompts,
                    SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    return prompts, outs


GAPS: list[float] = []  # the longest pause between two token events of each stream


async def _stream(engine, rid: str, prompt: list[int], started: asyncio.Event | None = None) -> list[int]:
    from expertpool.model.sampling import SamplingParams

    out, last, gap = [], None, 0.0
    async for ev in engine.generate(rid, prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                                ignore_eos=True)):
        now = time.monotonic()
        if last is not None:
            gap = max(gap, now - last)
        last = now
        out.extend(ev.token_ids)
        if started is not None and len(out) >= 8:
            started.set()
    GAPS.append(gap)
    return out


async def _under_streams(engine, prompts, tag: str, action):
    """Run ``action()`` once the streams are producing; return (their tokens, what action returned)."""
    started = asyncio.Event()
    tasks = [asyncio.create_task(_stream(engine, f"{tag}-{i}", p, started if i == 0 else None))
             for i, p in enumerate(prompts)]
    await asyncio.wait_for(started.wait(), 120)
    result = await action()
    return await asyncio.wait_for(asyncio.gather(*tasks), 300), result


def test_replicated_group_degrades_resizes_and_rebalances_without_changing_outputs(ray_cluster, tiny_dir, reference):
    from expertpool.platform.engine import build_engine

    prompts, want = reference
    E = 256
    engine = build_engine(_cfg(tiny_dir, actors_per_replica={"min": 1, "max": 4, "initial": 2},
                               redundant_experts=E, recovery={"liveness_check_s": 1.0}))

    async def scenario():
        try:
            return await _scenario()
        finally:
            await engine.shutdown()

    async def _scenario():
        ex = engine.core.executor
        assert ex.world == 2 and all(len(r) == 2 for r in ex.placement.replicas())  # two copies of each expert
        assert ex._expert_cost is None  # pool.eplb.expert_cost unset: measured when the load model first runs

        # 1. replicated experts: same tokens as the reference
        got = await asyncio.gather(*[_stream(engine, f"plain-{i}", p) for i, p in enumerate(prompts)])
        assert got == want

        # 2. degraded mode: kill -9 rank 1 under the streams; rank 0 holds a copy of everything
        async def kill():
            os.kill(ex.describe()[1]["pid"], signal.SIGKILL)
        GAPS.clear()
        got, _ = await _under_streams(engine, prompts, "kill", kill)
        assert got == want
        assert engine.degraded_shrinks == 1, engine.stats()
        stall = max(GAPS)  # what a client saw: the longest pause of any stream across the kill
        deadline = time.time() + 120
        while ex.world != 2 and time.time() < deadline:  # the replacement loads, then the group widens back
            await asyncio.sleep(0.5)
        assert ex.world == 2, "the group did not widen back after the replacement loaded"
        got = await asyncio.gather(*[_stream(engine, f"back-{i}", p) for i, p in enumerate(prompts)])
        assert got == want

        # 3. width changes under streams: 2 -> 4 -> 2
        got, _ = await _under_streams(engine, prompts, "w4", lambda: engine.resize(4))
        assert got == want and ex.world == 4

        # 4. EPLB at width 4, each expert twice (a hot expert's copies sit on 2 of the 4 ranks): a skewed
        # workload (a repeated token routes to few experts), then a rebalance from its load measured per
        # MoE layer, which places each layer on its own (the actors then hold other experts per layer)
        before = await ex.expert_load_async()
        skewed = [[7] * 32 + [11] * 8 for _ in range(4)]
        await asyncio.gather(*[_stream(engine, f"skew-{i}", p) for i, p in enumerate(skewed)])
        after = await ex.expert_load_async()
        load = {layer: [b - a for a, b in zip(before[layer], after[layer])] for layer in after}
        assert sorted(load) == [1, 2]  # the tiny model's MoE layers (layer 0 is dense)
        old_balance = ex.placement.balancedness(load)
        rebalance_stall = await engine.rebalance(load)
        new_balance = ex.placement.balancedness(load)
        assert [layer for layer, _ in ex.placement.layers] == sorted(load)
        assert len({tuple(p.slots[0]) for _, p in ex.placement.layers}) > 1, "every layer got the same layout"
        cost = ex._expert_cost
        assert cost is not None and cost >= 0  # the rebalance's load model measured it (or the metric's before)
        got = await asyncio.gather(*[_stream(engine, f"after-{i}", p) for i, p in enumerate(prompts)])
        assert got == want
        got, _ = await _under_streams(engine, prompts, "w2", lambda: engine.resize(2))
        assert got == want and ex.world == 2
        assert ex._expert_cost == cost  # kept across the re-formation

        # 5. width autoscaling end to end: thresholds any load crosses widen the group under the streams
        # (one actor per interval, up to max 4); idle, it narrows one actor per idle period to min 2
        el = engine.elastic
        el.autoscale, el.interval_s, el.step_time_high_s, el.idle_s, el.min_width = True, 0.3, 1e-4, 1.0, 2
        widths = {ex.world}

        async def watch():
            while True:
                widths.add(ex.world)
                await asyncio.sleep(0.05)
        watcher = asyncio.create_task(watch())
        changes, rounds, deadline = engine.width_changes, 0, time.time() + 120
        while max(widths) <= 2 and time.time() < deadline:  # streams keep coming until a widening lands
            got = await asyncio.gather(*[_stream(engine, f"auto{rounds}-{i}", p) for i, p in enumerate(prompts)])
            assert got == want
            rounds += 1
        assert max(widths) > 2 and engine.width_changes > changes, (widths, engine.width_changes)
        deadline = time.time() + 120
        while ex.world != 2 and time.time() < deadline:
            await asyncio.sleep(0.2)
        watcher.cancel()
        assert ex.world == 2, f"the group did not narrow back when idle (width {ex.world})"
        el.step_time_high_s = 1e9  # no more widening: the group stays at 2 for the last check
        got = await asyncio.gather(*[_stream(engine, f"narrow-{i}", p) for i, p in enumerate(prompts)])
        assert got == want

        return stall, old_balance, new_balance, rebalance_stall

    stall, old_balance, new_balance, rebalance_stall = asyncio.run(scenario())
    print(f"degraded stall {stall:.2f}s, balancedness {old_balance:.3f} -> {new_balance:.3f}, "
          f"rebalance stall {rebalance_stall}")
    # the replacement path (test_recovery, docs/benchmarks.md) pauses streams 3.6-5.1 s on this model
    assert stall < 2.0, f"streams paused {stall:.1f}s in degraded mode"
    # the load is deterministic (greedy, fixed prompts): measured 0.812 -> 1.000, a placement per layer
    assert rebalance_stall is not None and new_balance >= 0.95 and new_balance >= 1.15 * old_balance, (
        old_balance, new_balance)
