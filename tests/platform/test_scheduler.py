"""The scheduler (``EngineCore``) against a fake executor: no model, no Ray (vLLM's test_scheduler style).

``FakeExecutor`` keeps a per-worker "cache" of token ids per sequence and checks every StepItem
against it: the item starts where the cache ends (or rewrites it, after a rollback), its block table
covers the positions, PLACEHOLDER is only used when the worker sampled a token for that sequence.
The token it "samples" is a hash of the whole cached prefix, so an output is right only if every
token before it reached the cache in order: a replay that skipped, repeated or reordered anything
would change every later token.
"""

import asyncio

import pytest

from expertpool.model.sampling import SamplingParams
from expertpool.platform.scheduler import PLACEHOLDER, EngineCore, EngineOverloaded, RequestTooLong

V = 1000
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def next_token(prefix: list[int]) -> int:
    h = 7
    for t in prefix:
        h = (h * 1_000_003 + t) % 2_147_483_647
    return h % V


class FakeExecutor:
    """Workers with a physical paged cache: each slot (block * block_size + offset) holds the token
    written there. A sequence's context is read back through its block table, so a block shared by
    forks or taken from the prefix cache is right only if it really holds that prefix."""

    def __init__(self, world: int = 1, block_size: int = 4):
        self.world = world
        self.block_size = block_size
        self.slots: list[dict[int, int]] = [{} for _ in range(world)]
        self.last: list[dict[str, int]] = [{} for _ in range(world)]
        self.steps: list[list[list]] = []
        self.released: list[tuple[int, str]] = []

    def context(self, w: int, block_table: list[int], n: int) -> list[int]:
        bs = self.block_size
        out = [self.slots[w].get(block_table[p // bs] * bs + p % bs) for p in range(n)]
        assert None not in out, f"position {out.index(None)} was never written"
        return out

    def run(self, items_per_worker):
        self.steps.append(items_per_worker)
        out = []
        for w, items in enumerate(items_per_worker):
            res = []
            for it in items:
                bs = self.block_size
                end = it.start_pos + len(it.tokens)
                assert len(it.block_table) >= -(-end // bs), "block table too short"
                toks = [self.last[w][it.seq_id] if t == PLACEHOLDER else t for t in it.tokens]
                for p, t in zip(range(it.start_pos, end), toks):
                    self.slots[w][it.block_table[p // bs] * bs + p % bs] = t
                if it.sample:
                    tok = next_token(self.context(w, it.block_table, end))
                    self.last[w][it.seq_id] = tok
                    res.append(tok)
                else:
                    res.append(None)
            out.append(res)
        return out

    def release(self, finished):
        self.released += finished
        for w, s in finished:
            self.last[w].pop(s, None)

    def lose(self, w: int) -> None:
        self.slots[w], self.last[w] = {}, {}


def expected(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(next_token(seq))
    return seq[len(prompt):]


def make_core(world=1, num_blocks=64, block_size=4, max_batch_size=8, max_seq_len=64, budget=16, **kw):
    ex = FakeExecutor(world, block_size)
    core = EngineCore(ex, num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, max_num_batched_tokens=budget, eos_token_id=None, vocab_size=V, **kw)
    return core, ex


def drain(core, outs, max_steps=10_000):
    for _ in range(max_steps):
        if not core.has_work():
            return outs
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
    raise AssertionError("the engine did not finish")


def prompts(n, lengths=(3, 9, 1, 30, 6, 14, 2, 21)):
    return {f"r{i}": [(i * 37 + j * 11) % V for j in range(lengths[i % len(lengths)])] for i in range(n)}


def test_outputs_follow_every_prefix_with_chunked_prefill():
    core, ex = make_core(world=2, budget=8)
    ps = prompts(6)
    for sid, p in ps.items():
        core.add_request(sid, p, GREEDY)
    outs = drain(core, {})
    assert outs == {sid: expected(p, 8) for sid, p in ps.items()}
    assert core.kv_blocks_used() == 0 and not core.seqs
    # the 30-token prompt was split into chunks no larger than the per-worker token budget
    chunks = [len(it.tokens) for step in ex.steps for items in step for it in items if it.seq_id == "r3"]
    assert max(chunks) <= core.token_budget and sum(c for c in chunks if c > 1) >= 30 - 1
    assert all(sum(len(it.tokens) for it in items) <= core.token_budget for step in ex.steps for items in step)


def test_admission_waits_for_free_blocks():
    # 4 blocks of 4 tokens per worker: a 9-token prompt needs 3 blocks (prompt + first token), so two
    # such requests cannot run at once on one worker
    core, ex = make_core(world=1, num_blocks=4, max_seq_len=16, budget=32)
    core.add_request("a", list(range(9)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    core.add_request("b", list(range(10, 19)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    outs = {sid: ev.token_ids for sid, ev in core.step().items()}
    assert [s.seq_id for s in core.running] == ["a"] and [s.seq_id for s in core.waiting] == ["b"]
    drain(core, outs)
    assert outs["a"] == expected(list(range(9)), 4) and outs["b"] == expected(list(range(10, 19)), 4)


def test_preemption_recomputes_and_keeps_outputs():
    # 5 blocks of 4: three sequences growing to 4 + 12 tokens cannot all fit, so the youngest is
    # preempted, re-queued and recomputed from prompt + output
    core, ex = make_core(world=1, num_blocks=5, max_seq_len=20, budget=32, max_batch_size=3)
    ps = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11, 12]}
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    for sid, p in ps.items():
        core.add_request(sid, p, sp)
    outs = drain(core, {})
    assert core.preempted > 0
    assert outs == {sid: expected(p, 12) for sid, p in ps.items()}
    assert core.kv_blocks_used() == 0


def test_async_placeholders_and_run_ahead_drop():
    """Two steps in flight: the second step's decodes carry PLACEHOLDER and the worker fills them in;
    a token computed ahead for a sequence the first step ended is dropped."""
    core, ex = make_core(world=1, budget=32)
    stop_after = expected([4, 5, 6], 3)[2]
    core.add_request("s", [4, 5, 6], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(stop_after,)))
    core.add_request("g", [7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    inflight = []
    saw_placeholder = False
    for _ in range(100):
        events: dict = {}
        plans, items = core.begin_step(events)
        if any(items):
            saw_placeholder |= any(t == PLACEHOLDER for w in items for it in w for t in it.tokens)
            inflight.append((plans, ex.run(items)))
        if inflight and (len(inflight) == 2 or not any(items)):
            p, r = inflight.pop(0)
            core.end_step(p, r, events)
        for sid, ev in events.items():
            outs.setdefault(sid, []).extend(ev.token_ids)
        if not core.has_work() and not inflight:
            break
    assert saw_placeholder
    assert outs["s"] == expected([4, 5, 6], 3)  # stopped on the stop id, nothing after it
    assert outs["g"] == expected([7, 8], 6)
    assert core.kv_blocks_used() == 0


def test_abort_frees_blocks_and_worker_state():
    core, ex = make_core(world=2)
    core.add_request("x", list(range(12)), SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    core.add_request("y", [1, 2], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(3):
        core.step()
    assert core.kv_blocks_used() > 0
    core.abort("x")
    events = core.step()
    assert events["x"].finish_reason == "abort"
    drain(core, {})
    assert core.kv_blocks_used() == 0 and core.aborted == 1
    assert {s for _, s in ex.released} == {"x", "y"}
    assert not any(ex.last[w] for w in range(2))


def test_request_validation():
    core, _ = make_core(max_seq_len=8, max_queued=1)
    with pytest.raises(RequestTooLong):
        core.add_request("long", list(range(8)), GREEDY)
    with pytest.raises(RequestTooLong):
        core.add_request("empty", [], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.add_request("oov", [V], GREEDY)
    core.add_request("a", [1], GREEDY)
    with pytest.raises(EngineOverloaded):
        core.add_request("b", [1], GREEDY)


def test_unseeded_sampling_requests_get_a_seed():
    core, _ = make_core()
    seq = core.add_request("a", [1, 2], SamplingParams(temperature=0.7))
    assert seq.params.seed is not None
    assert core.add_request("b", [1, 2], GREEDY).params.seed is None


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dead", [{0}, {1}, {0, 1}, set()])
def test_recovery_replays_lost_sequences_and_keeps_survivors(depth, dead):
    """A failure with ``depth`` steps in flight: they are rolled back, the dead workers' sequences are
    re-prefilled from prompt + output, the survivors keep their cache, and every output equals the
    no-fault run (no token lost, repeated or changed)."""
    core, ex = make_core(world=2, budget=8)
    ps = prompts(6)
    for sid, p in ps.items():
        core.add_request(sid, p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    for _ in range(6):  # some sequences decoding, some still in prefill
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
    on_dead = {s.seq_id for s in core.running if s.worker in dead}
    lost = []
    for _ in range(depth):  # submitted, and the workers ran them (partly), but their results are lost
        plans, items = core.begin_step({})
        ex.run(items)
        lost.append(plans)
    core.rollback(lost)
    for w in dead:
        ex.lose(w)
    replayed = core.fail_workers(dead)
    assert {s.seq_id for s in replayed} == on_dead
    assert all(s.worker == -1 and s.num_cached == 0 and not s.blocks for s in replayed)
    for s in core.running:  # survivors' cache positions match what their worker really holds
        assert ex.context(s.worker, s.blocks, s.num_cached) == s.tokens[:s.num_cached] and s.pending == 0
    assert core.replayed_tokens == sum(len(s.tokens) for s in replayed)
    kept = {s.seq_id: s.num_cached for s in core.running if s.num_cached > 0}
    assert bool(kept) == (dead != {0, 1})
    n_before = len(ex.steps)
    drain(core, outs)
    assert outs == {sid: expected(p, 10) for sid, p in ps.items()}
    assert core.kv_blocks_used() == 0
    for sid, pos in kept.items():  # a survivor's sequence continued from its cache, not from position 0
        starts = [it.start_pos for step in ex.steps[n_before:] for items in step for it in items if it.seq_id == sid]
        assert min(starts) == pos


def test_recovery_of_a_preempted_sequence_with_a_token_in_flight():
    core, ex = make_core(world=1, num_blocks=5, max_seq_len=20, budget=32, max_batch_size=3)
    ps = {"a": [1, 2, 3, 4], "b": [5, 6, 7, 8], "c": [9, 10, 11, 12]}
    for sid, p in ps.items():
        core.add_request(sid, p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    lost = []
    while core.preempted == 0:
        events: dict = {}
        plans, items = core.begin_step(events)
        lost = [plans]  # keep the newest step unapplied: a preemption may hit a sequence with a token in flight
        if core.preempted:
            break
        core.end_step(plans, ex.run(items), events)
        for sid, ev in events.items():
            outs.setdefault(sid, []).extend(ev.token_ids)
    core.rollback(lost)
    ex.lose(0)
    core.fail_workers({0})
    drain(core, outs)
    assert outs == {sid: expected(p, 12) for sid, p in ps.items()}


# ---- the async engine's recovery loop against a fake actor group (no Ray) -------------------------

class FlakyGroup(FakeExecutor):
    """An async executor whose step ``fail_at`` raises StepFailed after running (a rank died mid-step)."""

    def __init__(self, world=2, fail_at=(), dead=frozenset({1}), recover_error=None, recover_delay=0.0):
        super().__init__(world)
        self.fail_at = set(fail_at)
        self.dead = set(dead)
        self.recover_error = recover_error
        self.recover_delay = recover_delay
        self.recovered: list[set[int]] = []
        self.n = 0
        self.down: set[int] = set()  # ranks dead since the last failed step, until recovered

    async def run_async(self, items):
        from expertpool.platform.executor import StepFailed

        await asyncio.sleep(0)
        self.n += 1
        res = self.run(items)
        if self.n in self.fail_at:
            self.down = set(self.dead)
        if self.down:
            raise StepFailed({min(self.down): RuntimeError("actor died")}, set())
        return res

    def submit_many(self, steps):
        return [asyncio.ensure_future(self.run_async(items)) for items in steps]

    async def find_dead(self, stuck=frozenset()):
        return set(self.down)

    async def recover(self, dead, patches):
        await asyncio.sleep(self.recover_delay)
        if self.recover_error is not None:
            raise self.recover_error
        for w in dead:
            self.lose(w)
        self.down -= dead
        self.recovered.append(set(dead))

    def experts_of(self, rank):
        return f"{rank * 4}..{rank * 4 + 3}"

    async def expert_load_async(self):
        return {}


async def _collect(engine, ps, params):
    async def one(sid, p):
        toks, reasons = [], []
        async for ev in engine.generate(sid, p, params):
            toks += ev.token_ids
            reasons.append(ev.finish_reason)
        return toks, reasons[-1]
    return dict(zip(ps, await asyncio.gather(*[one(s, p) for s, p in ps.items()], return_exceptions=True)))


def _async_engine(group, **policy):
    from expertpool.platform.engine import AsyncEngine, RecoveryPolicy

    core = EngineCore(group, num_blocks=64, block_size=4, max_batch_size=8, max_seq_len=64,
                      max_num_batched_tokens=8, eos_token_id=None, vocab_size=V)
    return AsyncEngine(core, "m", 64, async_scheduling=policy.pop("async_scheduling", False),
                       scheduler_steps=policy.pop("scheduler_steps", 1), recovery=RecoveryPolicy(**policy))


@pytest.mark.parametrize("async_scheduling,scheduler_steps", [(False, 1), (True, 1), (False, 4)])
def test_async_engine_recovers_and_streams_continue(async_scheduling, scheduler_steps):
    group = FlakyGroup(fail_at={5, 9})
    engine = _async_engine(group, async_scheduling=async_scheduling, scheduler_steps=scheduler_steps)
    ps = prompts(6)
    res = asyncio.run(_collect(engine, ps, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert {sid: r for sid, r in res.items()} == {sid: (expected(p, 10), "length") for sid, p in ps.items()}
    st = engine.stats()
    assert st["recoveries"] == 2 and st["actor_failures"] == 2 and len(st["recovery_seconds"]) == 2
    assert group.recovered == [{1}, {1}]


def test_async_engine_gives_up_cleanly_when_recovery_fails():
    from expertpool.platform.scheduler import EngineUnavailable

    group = FlakyGroup(fail_at={4}, recover_error=RuntimeError("no bundle"))
    engine = _async_engine(group)
    res = asyncio.run(_collect(engine, prompts(4), SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert all(isinstance(r, EngineUnavailable) for r in res.values()), res

    async def after():
        with pytest.raises(EngineUnavailable):
            await engine.check_health()
        with pytest.raises(EngineUnavailable):
            async for _ in engine.generate("late", [1, 2], GREEDY):
                pass
    asyncio.run(after())


def test_async_engine_recovery_timeout_is_bounded():
    from expertpool.platform.scheduler import EngineUnavailable

    group = FlakyGroup(fail_at={3}, recover_delay=30.0)
    engine = _async_engine(group, timeout_s=0.5)

    async def run():
        return await asyncio.wait_for(_collect(engine, prompts(3), GREEDY), timeout=10)
    res = asyncio.run(run())
    assert all(isinstance(r, EngineUnavailable) and "timeout_s" in str(r) for r in res.values()), res


def test_async_engine_stops_after_max_attempts():
    from expertpool.platform.scheduler import EngineUnavailable

    group = FlakyGroup(fail_at=set(range(1, 100)))  # every step fails: recovery never makes progress
    engine = _async_engine(group, max_attempts=2)
    res = asyncio.run(_collect(engine, prompts(2), GREEDY))
    assert all(isinstance(r, EngineUnavailable) and "in a row" in str(r) for r in res.values()), res
    assert len(group.recovered) == 2


def test_async_engine_idle_liveness_check_repairs_a_dead_actor():
    group = FlakyGroup()
    group.down = {0}  # dies while the engine is idle
    engine = _async_engine(group, liveness_check_s=0.05)

    async def run():
        await engine.check_health()  # starts the loop, which pings while idle
        for _ in range(100):
            if group.recovered:
                break
            await asyncio.sleep(0.02)
        return await _collect(engine, {"a": [1, 2, 3]}, GREEDY)
    res = asyncio.run(run())
    assert group.recovered == [{0}]
    assert res["a"] == (expected([1, 2, 3], 8), "length")


@pytest.mark.parametrize("keep", [[0, 1, None, None], [1], [None, 0], [1, 0]])
def test_resize_keeps_kept_caches_and_replays_the_rest(keep):
    """Elastic width: new worker i inherits old worker keep[i] (None: a fresh one); sequences of
    workers not kept are re-prefilled; every output equals the run without the resize."""
    core, ex = make_core(world=2, budget=8)
    ps = prompts(6)
    for sid, p in ps.items():
        core.add_request(sid, p, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    outs: dict[str, list[int]] = {}
    for _ in range(6):
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
    on = {s.seq_id: s.worker for s in core.running}
    old_slots, old_last = ex.slots, ex.last
    lost = core.resize(keep)
    assert {s.seq_id for s in lost} == {sid for sid, w in on.items() if w not in keep}
    # the fake workers follow the same mapping (what the executor does with real actors)
    ex.world = len(keep)
    ex.slots = [old_slots[k] if k is not None else {} for k in keep]
    ex.last = [old_last[k] if k is not None else {} for k in keep]
    assert core.world == len(keep) and len(core.allocators) == len(keep)
    for s in core.running:
        assert keep[s.worker] == on[s.seq_id]
    drain(core, outs)
    assert outs == {sid: expected(p, 10) for sid, p in ps.items()}
    assert core.kv_blocks_used() == 0
