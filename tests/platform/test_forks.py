"""n > 1 completions: the prompt's whole blocks are prefilled once and shared (``EngineCore`` forks).

``BlockExecutor`` is a fake worker whose "KV cache" is the block pool itself: an item writes its
tokens into the slots its block table names, and the sampled token is a hash of every slot from
position 0 to the item's end, read back through the block table. So a fork whose shared blocks did
not hold the prompt, or a block freed while a fork still used it and then overwritten, changes the
output.
"""

from expertpool.model.sampling import SamplingParams
from expertpool.platform.scheduler import PLACEHOLDER, EngineCore
from tests.platform.test_scheduler import V, expected, next_token


class BlockExecutor:
    def __init__(self, num_blocks: int, block_size: int, world: int = 1):
        self.world, self.bs = world, block_size
        self.slots = [[[None] * block_size for _ in range(num_blocks)] for _ in range(world)]
        self.last: list[dict[str, int]] = [{} for _ in range(world)]
        self.computed = 0  # positions run through the "model"

    def run(self, items_per_worker):
        out = []
        for w, items in enumerate(items_per_worker):
            res = []
            for it in items:
                toks = [self.last[w][it.seq_id] if t == PLACEHOLDER else t for t in it.tokens]
                for k, t in enumerate(toks):
                    p = it.start_pos + k
                    self.slots[w][it.block_table[p // self.bs]][p % self.bs] = t
                self.computed += len(toks)
                if it.sample:
                    end = it.start_pos + len(toks)
                    seen = [self.slots[w][it.block_table[p // self.bs]][p % self.bs] for p in range(end)]
                    assert None not in seen, f"{it.seq_id} reads a slot nobody wrote"
                    self.last[w][it.seq_id] = next_token(seen)
                    res.append(self.last[w][it.seq_id])
                else:
                    res.append(None)
            out.append(res)
        return out

    def release(self, finished):
        for w, s in finished:
            self.last[w].pop(s, None)


def make(num_blocks=64, block_size=4, max_batch_size=8, world=1, budget=64, max_seq_len=128):
    ex = BlockExecutor(num_blocks, block_size, world)
    core = EngineCore(ex, num_blocks=num_blocks, block_size=block_size, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, max_num_batched_tokens=budget, eos_token_id=None, vocab_size=V)
    return core, ex


def run(core, max_steps=2000):
    outs, reasons = {}, {}
    for _ in range(max_steps):
        if not core.has_work():
            return outs, reasons
        for sid, ev in core.step().items():
            outs.setdefault(sid, []).extend(ev.token_ids)
            if ev.finish_reason:
                reasons[sid] = ev.finish_reason
    raise AssertionError("did not finish")


def test_n_completions_share_the_prompt_blocks_and_prefill_once():
    core, ex = make()
    prompt = [(7 * j) % V for j in range(23)]  # 5 whole blocks of 4 are shared, 3 tail tokens each
    core.add_request("r", prompt, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, n=3))
    assert len(core.waiting) == 1 and len(core.waiting[0].forks) == 2
    outs, reasons = run(core)
    want = expected(prompt, 6)
    assert outs == {"r#0": want, "r#1": want, "r#2": want}
    assert set(reasons.values()) == {"length"}
    # prompt once + two tails of 3, then 5 decodes each (the 6th token needs no input)
    assert ex.computed == 23 + 2 * 3 + 3 * 5
    assert core.kv_blocks_used() == 0 and all(r == 0 for r in core.allocators[0].refs)


def test_forks_survive_the_first_finisher_and_preemption():
    """A completion that ends first releases only its references; a tight cache preempts forks,
    which recompute alone (fresh blocks) and still produce the right tokens."""
    core, ex = make(num_blocks=14, block_size=4, budget=16, max_seq_len=48)
    prompt = [(5 * j + 1) % V for j in range(17)]
    core.add_request("a", prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, n=3))
    core.add_request("b", [3, 4, 5], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    outs, _ = run(core)
    want = expected(prompt, 20)
    assert [outs[f"a#{i}"] for i in range(3)] == [want] * 3
    assert outs["b"] == expected([3, 4, 5], 2)
    assert core.preempted > 0, "the test meant to exercise preemption of forks"
    assert core.kv_blocks_used() == 0


def test_short_prompt_has_nothing_to_share_and_seeds_differ_per_completion():
    core, _ = make()
    seq = core.add_request("s", [1, 2], SamplingParams(max_tokens=3, temperature=0.8, seed=41, n=2))
    assert seq.forks == [] and len(core.waiting) == 2
    assert [s.params.seed for s in core.waiting] == [41, 42] and all(s.params.n == 1 for s in core.waiting)
    assert [s.index for s in core.waiting] == [0, 1]


def test_abort_ends_the_leader_and_its_forks_before_the_fork():
    core, _ = make(budget=4)
    core.add_request("x", list(range(2, 30)), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, n=2))
    core.step()  # prefill under way, forks not made yet
    for sid in core.completion_ids("x", 2):
        core.abort(sid)
    events = core.step()
    assert {sid: ev.finish_reason for sid, ev in events.items()} == {"x#0": "abort", "x#1": "abort"}
    assert {ev.index for ev in events.values()} == {0, 1}
    assert not core.has_work() and core.kv_blocks_used() == 0


def test_n_larger_than_one_workers_batch_is_refused():
    core, _ = make(max_batch_size=4, world=2)
    try:
        core.add_request("big", [1, 2, 3], SamplingParams(n=3))
    except ValueError as e:
        assert "n=3" in str(e) and "lower n" in str(e)
    else:
        raise AssertionError("n above the per-worker batch was accepted")
