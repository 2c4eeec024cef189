"""In-process continuous batching over the absorbed latent cache (the engine core, no Ray)."""

import pytest
import torch

from expertpool.model.sampling import SamplingParams
from expertpool.platform.engine import generate, local_engine
from tests.model.helpers import random_model


def _greedy_reference(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_continuous_batching_greedy_equals_full_forward():
    m = random_model("tiny")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (3, 9, 1, 30, 6)]
    # tiny token budget forces chunked prefill interleaved with running decodes
    core = local_engine(m, max_batch_size=3, max_seq_len=64, block_size=4, max_num_batched_tokens=8)
    outs = generate(core, prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == _greedy_reference(m, p, 10)
    st = core.stats()
    assert st["max_batch_seen"] > 1 and st["running"] == 0 and st["kv_blocks_used"] == 0


def test_preemption_under_cache_pressure_keeps_results():
    m = random_model("tiny")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
    # 6 blocks of 4 tokens: three 17-token sequences cannot all fit, so the scheduler must preempt
    core = local_engine(m, max_batch_size=3, max_seq_len=24, block_size=4, num_blocks=6)
    outs = generate(core, prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == _greedy_reference(m, p, 10)
    assert core.kv_blocks_used() == 0


def test_sampling_seed_stop_and_length():
    m = random_model("tiny")
    core = local_engine(m, max_batch_size=4, max_seq_len=64)
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7, ignore_eos=True)
    a = generate(core, [[3, 4, 5]], sp)[0]
    b = generate(core, [[3, 4, 5]], sp)[0]
    assert a == b and len(a) == 8
    greedy = generate(core, [[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    stop = greedy[3]
    cut = generate(core, [[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,),
                                                     ignore_eos=True))[0]
    assert cut == greedy[: greedy.index(stop) + 1]
    # max_seq_len bounds the total length
    core2 = local_engine(m, max_batch_size=1, max_seq_len=6)
    assert len(generate(core2, [[3, 4, 5]], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))[0]) == 3


def test_abort_frees_blocks():
    m = random_model("tiny")
    core = local_engine(m, max_batch_size=2, max_seq_len=64, block_size=4)
    core.add_request("a", list(range(2, 20)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    core.step()
    core.step()
    assert core.kv_blocks_used() > 0
    core.abort("a")
    ev = core.step()
    assert ev["a"].finish_reason == "abort" and core.kv_blocks_used() == 0 and not core.has_work()


# ---- the serving loop: AsyncEngine pipelines steps two deep (PLACEHOLDER tokens, dropped run-ahead)

def _serve(core, prompts, params, async_scheduling=True, scheduler_steps=1):
    """Run prompts concurrently through AsyncEngine's serving loop; returns outputs and finish reasons."""
    import asyncio

    from expertpool.platform.engine import AsyncEngine

    async def main():
        engine = AsyncEngine(core, "m", core.max_seq_len, async_scheduling=async_scheduling,
                             scheduler_steps=scheduler_steps)

        async def one(i, p):
            toks, reason = [], None
            async for ev in engine.generate(f"r{i}", p, params):
                toks += ev.token_ids
                reason = ev.finish_reason
            return toks, reason
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    return asyncio.run(main())


@pytest.mark.parametrize("async_scheduling,scheduler_steps", [(True, 1), (False, 1), (False, 4)],
                         ids=["async", "turns", "multi-step"])
def test_serving_loop_greedy_equals_full_forward_with_chunked_prefill_and_preemption(async_scheduling,
                                                                                     scheduler_steps):
    m = random_model("tiny")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (3, 9, 1, 30, 6, 13)]
    for kw, preempts in ((dict(max_batch_size=3, max_seq_len=64, block_size=4, max_num_batched_tokens=8), False),
                         (dict(max_batch_size=3, max_seq_len=48, block_size=4, num_blocks=12), True)):
        core = local_engine(m, **kw)
        outs = _serve(core, prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), async_scheduling,
                      scheduler_steps)
        for p, (o, reason) in zip(prompts, outs):
            assert o == _greedy_reference(m, p, 10) and reason == "length"
        assert core.kv_blocks_used() == 0 and not core.has_work()
        assert (core.stats()["preempted"] > 0) == preempts
        # with async scheduling nearly every decode was planned before its input token was known, and
        # with multi-step all but the first of a chain's: the outputs above prove the placeholder path exact
        assert core.max_batch_seen > 1


@pytest.mark.parametrize("scheduler_steps", [1, 4])
def test_pipelined_loop_stop_token_drops_the_run_ahead_token(scheduler_steps):
    m = random_model("tiny")
    core = local_engine(m, max_batch_size=4, max_seq_len=64)
    greedy = _greedy_reference(m, [3, 4, 5], 8)
    stop = greedy[1]
    (toks, reason), = _serve(core, [[3, 4, 5]], SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(stop,),
                                                                ignore_eos=True),
                             async_scheduling=scheduler_steps == 1, scheduler_steps=scheduler_steps)
    # the steps after the stop token were already submitted (the next one, or the rest of the chain);
    # their tokens must not reach the client
    assert toks == greedy[: greedy.index(stop) + 1] and reason == "stop"
    assert core.kv_blocks_used() == 0 and not core.has_work()


def test_multi_step_chains_stream_every_step_and_a_closed_stream_frees_its_blocks():
    """Multi-step (``serving.num_scheduler_steps``): a chain's steps are all submitted at once, yet each
    step's tokens reach their streams as that step ends, one token per stream per step; a stream the
    client closes mid-chain is aborted when the chain ends, and the others finish exactly."""
    import asyncio

    from expertpool.platform.engine import AsyncEngine

    m = random_model("tiny")
    core = local_engine(m, max_batch_size=4, max_seq_len=64, block_size=4)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(core, "m", core.max_seq_len, scheduler_steps=5)
        seen: list[tuple[int, int]] = []  # (engine steps completed, tokens in the event) per event received

        async def one(i, p, keep):
            toks = []
            async for ev in engine.generate(f"r{i}", p, params):
                seen.append((engine.steps, len(ev.token_ids)))
                toks += ev.token_ids
                if len(toks) >= keep:
                    break  # the client goes away: the generator's close aborts the sequence
            return toks
        outs = await asyncio.gather(*[one(i, p, 12 if i != 1 else 3) for i, p in enumerate(prompts)])
        for _ in range(100):  # the abort lands when the chain in flight ends
            if not core.has_work():
                break
            await asyncio.sleep(0.01)
        return outs, seen, engine.steps
    outs, seen, steps = asyncio.run(main())
    assert outs[0] == _greedy_reference(m, prompts[0], 12) and outs[2] == _greedy_reference(m, prompts[2], 12)
    assert outs[1] == _greedy_reference(m, prompts[1], 3)
    assert all(n == 1 for _, n in seen)  # one token per event: each step streamed on its own
    assert len({s for s, _ in seen}) == 12  # and in 12 distinct engine steps, not in a chain's burst
    assert steps == 12  # the closed stream added no step: the chains ran as long as the longest streams
    assert core.kv_blocks_used() == 0 and not core.has_work()


def test_static_decode_buffers_and_warmup_leave_results_and_live_caches_alone():
    """The graphed decode path without a GPU: decode steps run from static buffers updated in place
    (padded to their bucket, the padding on a scratch block) and give the full forward's greedy
    tokens; the warm-up steps touch only scratch blocks, so a sequence's cache survives them (as
    during a recovery's warm-up)."""
    from expertpool.model.decode_graphs import DecodeGraphs
    from expertpool.platform.scheduler import EngineCore
    from expertpool.platform.executor import LocalExecutor, warmup_steps
    from expertpool.platform.worker import ModelRunner, WorkerSpec

    m = random_model("tiny")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 512, (n,), generator=g).tolist() for n in (3, 9, 1, 7, 5)]
    runner = ModelRunner(m, num_blocks=64, block_size=4, scratch_blocks=2)
    how = runner.enable_decode_graphs([1, 2, 4], max_seq_len=32, capture=False)
    assert isinstance(runner.graphs, DecodeGraphs) and "static buffers" in how
    table = runner.graphs.table
    core = EngineCore(LocalExecutor(runner), num_blocks=64, block_size=4, max_batch_size=3, max_seq_len=32,
                      max_num_batched_tokens=16, eos_token_id=None, vocab_size=m.args.vocab_size)
    outs = generate(core, prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    for p, o in zip(prompts, outs):
        assert o == _greedy_reference(m, p, 10)
    assert runner.graphs.table is table  # the block table was updated in place, never reallocated
    # warm-up steps (as a recovery runs them) on the scratch blocks only: a live cache is untouched
    spec = WorkerSpec("unused", "float32", None, 64, 4, scratch_blocks=2, max_seq_len=32, max_num_batched_tokens=16,
                      max_batch_size=3)
    live = runner.cache.kv_LPC[:, :64 * 4].clone()
    for items in warmup_steps(spec, world=1, on_gpu=True):
        runner.step(items)
        runner.release([it.seq_id for it in items])
    assert torch.equal(runner.cache.kv_LPC[:, :64 * 4], live)


@pytest.mark.parametrize("on_gpu", [False, True])
def test_warmup_steps_fit_the_scratch_blocks_with_speculative_drafts(on_gpu):
    """The warm-up's chunk leaves room in the scratch blocks for its sampled token and the drafts
    chained after it (2 MTP drafts per step here; the chunk was 16 tokens in 16 slots before)."""
    from expertpool.platform.executor import warmup_steps
    from expertpool.platform.worker import ModelRunner, WorkerSpec

    m = random_model("tiny")
    assert len(m.model.mtp)
    runner = ModelRunner(m, num_blocks=8, block_size=8, spec_tokens=2, scratch_blocks=2)
    spec = WorkerSpec("unused", "float32", None, 8, 8, scratch_blocks=2, max_seq_len=64, max_num_batched_tokens=128,
                      max_batch_size=2, spec_tokens=2)
    live = runner.cache.kv_LPC[:, :8 * 8].clone()
    for items in warmup_steps(spec, world=1, on_gpu=on_gpu):
        assert all(it.start_pos + len(it.tokens) + spec.spec_tokens <= len(it.block_table) * 8 for it in items)
        runner.step(items)
        runner.release([it.seq_id for it in items])
    assert torch.equal(runner.cache.kv_LPC[:, :8 * 8], live)


def _run(core, prompts, params, lose_after: int | None = None):
    """Drive ``core`` to completion: per prompt, its (token, logprob) pairs. ``lose_after``: after that
    many steps the worker's cache is lost (overwritten with noise, as a replacement actor holds nothing
    of these sequences) and every sequence is replayed from prompt + output."""
    for i, p in enumerate(prompts):
        core.add_request(f"r{i}", p, params)
    out = {f"r{i}": [] for i in range(len(prompts))}
    steps = 0
    while core.has_work():
        for rid, ev in core.step().items():
            out[rid] += [(t, lp.logprob) for t, lp in zip(ev.token_ids, ev.logprobs)]
        steps += 1
        if steps == lose_after:
            core.executor.runner.cache.kv_LPC.normal_()
            assert core.fail_workers({0})
    return [out[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture
def batch_invariant():
    from expertpool import kernels
    kernels.set_batch_invariant(True)
    yield
    kernels.set_batch_invariant(False)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_replay_continues_bit_for_bit_in_bfloat16(temperature, batch_invariant):
    """After the worker's cache is lost mid-stream (at three points: prompts still prefilling, all
    decoding, late), the replayed sequences emit exactly the tokens and logprobs of the run without a
    fault, in bfloat16 with ``serving.batch_invariant``: prompts (some longer than the token budget,
    so prefilled in several chunks) are prefilled in block-aligned chunks, output tokens run as decode
    rows, as when they were generated, and no row's result depends on its batch."""
    model = random_model("tiny").to(torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 41, 70, 23, 17, 50)]
    params = SamplingParams(max_tokens=24, temperature=temperature, seed=11, ignore_eos=True, logprobs=0)

    def engine():
        return local_engine(model, max_num_batched_tokens=32, prefix_caching=False)
    want = _run(engine(), prompts, params)
    assert all(len(w) == 24 for w in want)
    for lose_after in (3, 12, 21):
        assert _run(engine(), prompts, params, lose_after=lose_after) == want, lose_after


def test_turns_submit_the_next_step_before_streaming_the_last_steps_tokens():
    """Depth 1 (no async scheduling): step k + 1 goes to the workers before step k's tokens reach their
    streams, so the streaming overlaps the next step's compute; the last step's tokens are streamed at
    once (nothing to submit first), and every token arrives, in order, exactly once."""
    import asyncio

    from expertpool.platform.engine import AsyncEngine

    m = random_model("tiny")
    core = local_engine(m, max_batch_size=4, max_seq_len=64)
    log: list[tuple] = []
    run_async = core.executor.run_async

    async def logged(items):
        log.append(("submit", sum(len(w) for w in items)))
        return await run_async(items)
    core.executor.run_async = logged
    n_new = 6
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    params = SamplingParams(max_tokens=n_new, temperature=0, ignore_eos=True)

    async def main():
        engine = AsyncEngine(core, "m", core.max_seq_len, async_scheduling=False)

        async def one(i, p):
            toks = []
            async for ev in engine.generate(f"r{i}", p, params):
                toks += ev.token_ids
                log.append(("token", i, len(toks), ev.finish_reason))
            return toks
        return await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)])
    outs = asyncio.run(main())
    for p, o in zip(prompts, outs):
        assert o == _greedy_reference(m, p, n_new)
    submits = [k for k, e in enumerate(log) if e[0] == "submit"]
    assert len(submits) == n_new  # one prefill step for both prompts, then a decode step per token
    for i in range(len(prompts)):
        got = [k for k, e in enumerate(log) if e[0] == "token" and e[1] == i]
        assert [log[k][2] for k in got] == list(range(1, n_new + 1))
        for j, k in enumerate(got[:-1]):  # token j + 1 comes out of step j; step j + 1 was submitted first
            assert submits[j + 1] < k, log
        assert log[got[-1]][3] == "length" and got[-1] > submits[-1]
    assert core.kv_blocks_used() == 0 and not core.has_work()


def test_step_trace_records_every_step_and_summarises_the_loop(tmp_path, monkeypatch):
    """EXPERTPOOL_STEP_TRACE: one submit and one result line per step (platform/step_trace.py), and the
    summary accounts for the prompt step, the decode steps with their batch, and the gaps."""
    import asyncio

    from expertpool.platform.engine import AsyncEngine
    from expertpool.platform.step_trace import ENV, read, steps, summarize

    monkeypatch.setenv(ENV, str(tmp_path))
    m = random_model("tiny")
    core = local_engine(m, max_batch_size=4, max_seq_len=64)
    n_new = 5

    async def main():
        engine = AsyncEngine(core, "m", core.max_seq_len)

        async def one(i, p):
            return [t async for ev in engine.generate(f"r{i}", p, SamplingParams(
                max_tokens=n_new, temperature=0, ignore_eos=True)) for t in ev.token_ids]
        outs = await asyncio.gather(*[one(i, p) for i, p in enumerate([[3, 4, 5], [6, 7, 8, 9]])])
        await engine.shutdown()
        return outs
    outs = asyncio.run(main())
    assert [len(o) for o in outs] == [n_new, n_new]
    (records,) = read(tmp_path)
    pairs = steps(records)
    assert len(pairs) == n_new == core.steps  # one prompt step (both prompts), then a decode step per token
    assert [(s["tokens"], s["decodes"], s["seqs"]) for s, _ in pairs] == [(7, 0, 2)] + [(2, 2, 2)] * (n_new - 1)
    assert all(s["plan"] <= s["t"] <= r["wait"] <= r["t"] for s, r in pairs)
    summary = summarize(pairs)
    assert summary["prompt"]["count"] == 1 and summary["decode"]["count"] == n_new - 1
    assert summary["decode"]["mean_batch"] == 2 and summary["gap"]["count"] == n_new - 1
    parts = summary["decode"]["seconds"] + summary["prompt"]["seconds"] + summary["gap"]["seconds"]
    assert 0 < parts <= summary["span_s"] + 1e-9
