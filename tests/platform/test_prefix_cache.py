"""Automatic prefix caching: the block pool, the scheduler against a fake paged cache, and the real
tiny model in process (outputs with and without caching are identical).

The fake executor (``test_scheduler.FakeExecutor``) reads every sequence's context back through its
block table from a physical slot store, so a cache hit that handed out the wrong blocks, or blocks
whose content was overwritten or never written, changes the outputs or trips its assertion.
"""

import pytest
import torch

from expertpool.model.grammar import json_object
from expertpool.model.sampling import SamplingParams
from expertpool.platform.kv_blocks import BlockPool, block_hashes
from expertpool.platform.scheduler import EngineCore
from tests.platform.test_scheduler import V, FakeExecutor, drain, expected

BS = 4


def params(n=6, **kw):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def core_of(world=1, num_blocks=64, budget=64, caching=True, max_seq_len=96, **kw):
    ex = FakeExecutor(world, BS)
    core = EngineCore(ex, num_blocks=num_blocks, block_size=BS, max_batch_size=8, max_seq_len=max_seq_len,
                      max_num_batched_tokens=budget, eos_token_id=None, vocab_size=V, prefix_caching=caching, **kw)
    return core, ex


def prefill_tokens(ex, sid):
    return sum(len(it.tokens) for step in ex.steps for items in step for it in items if it.seq_id == sid)


def run_one(core, sid, prompt, p=None):
    core.add_request(sid, prompt, p or params())
    return drain(core, {})[sid]


# ---- the pool ---------------------------------------------------------------------------------------

def test_block_hashes_chain_and_depend_on_variant():
    a = block_hashes(list(range(10)), BS)
    assert len(a) == 2 and a == block_hashes(list(range(10)) + [99], BS)
    b = block_hashes([0, 1, 2, 3, 9, 9, 9, 9], BS)
    assert b[0] == a[0] and b[1] != a[1]
    assert block_hashes([7, 7, 7, 7] + list(range(4, 8)), BS)[1] != a[1]  # same block, other prefix
    assert block_hashes(list(range(10)), BS, variant=1)[0] != a[0]
    assert block_hashes(list(range(12)), BS, parent=a[1], start=2) == block_hashes(list(range(12)), BS)[2:]


def test_pool_lru_evicts_only_unheld_cached_blocks():
    pool = BlockPool(4)
    held = pool.allocate(2)
    hs = block_hashes(list(range(8)), BS)
    for h, b in zip(hs, held):
        pool.register(h, b)
    pool.release(held[:1])                          # block 0: cached (unheld); block 1: still held
    assert pool.num_available() == 3 and pool.num_used() == 1
    assert pool.lookup(hs) == held
    got = pool.allocate(3)                          # 2 free ones, then the cached one is evicted
    assert held[0] in got and held[1] not in got and pool.evictions == 1
    assert pool.lookup(hs) == []                    # the chain broke at the evicted first block
    pool.release(got + held[1:])
    assert pool.num_available() == 4 and all(r == 0 for r in pool.refs)


# ---- the scheduler -----------------------------------------------------------------------------------

def test_shared_prefix_is_prefilled_once_and_outputs_are_unchanged():
    core, ex = core_of()
    system = [(7 * j) % V for j in range(21)]
    a = run_one(core, "a", system + [1, 2])
    b = run_one(core, "b", system + [3, 4, 5])
    assert a == expected(system + [1, 2], 6) and b == expected(system + [3, 4, 5], 6)
    assert prefill_tokens(ex, "b") == 24 - 20 + 5   # 5 cached blocks (20 tokens); the rest + 5 decodes
    st = core.stats()
    assert st["prefix_cache_hits"] == 20 and st["prefix_cache_queries"] == 23 + 24
    assert core.seqs == {} and core.kv_blocks_used() == 0


def test_whole_prompt_cached_still_computes_its_last_token():
    core, ex = core_of()
    prompt = list(range(1, 17))                     # exactly 4 blocks
    first = run_one(core, "a", prompt)
    again = run_one(core, "b", prompt)
    assert again == first == expected(prompt, 6)
    items = [it for step in ex.steps for items in step for it in items if it.seq_id == "b"]
    assert items[0].start_pos == 12 and items[0].tokens == prompt[12:]  # 3 blocks reused, the 4th recomputed


def test_caching_off_reuses_nothing():
    core, ex = core_of(caching=False)
    prompt = list(range(1, 30))
    run_one(core, "a", prompt)
    run_one(core, "b", prompt)
    assert prefill_tokens(ex, "b") == 29 + 5 and core.stats()["prefix_cache_hits"] == 0


def test_eviction_under_pressure_never_breaks_a_running_stream():
    # 12 blocks of 4: every prompt of 10 tokens + 12 new needs 6 blocks, so at most two run at once and
    # cached blocks of finished requests are evicted for new ones while others still decode
    core, ex = core_of(num_blocks=12, budget=16, max_seq_len=24)
    prompts = {f"r{i}": [(i * 131 + j * 7) % V for j in range(10)] for i in range(8)}
    for sid, p in prompts.items():
        core.add_request(sid, p, params(12))
    outs = drain(core, {})
    assert outs == {sid: expected(p, 12) for sid, p in prompts.items()}
    assert core.stats()["prefix_cache_evictions"] > 0
    assert core.kv_blocks_used() == 0 and all(r == 0 for r in core.allocators[0].refs)


def test_abort_releases_its_references_to_cached_blocks():
    core, ex = core_of()
    prompt = list(range(1, 25))
    run_one(core, "a", prompt)
    core.add_request("b", prompt + [9], params(40))
    core.step()
    shared = core.seqs["b"].blocks[:len(block_hashes(prompt, BS))]  # all 6 of the prompt's full blocks
    assert core.seqs["b"].cached_tokens == 24 and all(core.allocators[0].refs[b] == 1 for b in shared)
    core.abort("b")
    drain(core, {})
    assert core.kv_blocks_used() == 0 and all(r == 0 for r in core.allocators[0].refs)
    assert core.allocators[0].lookup(block_hashes(prompt, BS)) == shared  # still cached, evictable


def test_placement_follows_the_longest_cached_prefix():
    core, ex = core_of(world=2)
    system = list(range(1, 30))
    run_one(core, "a", system)
    w = next(w for w in range(2) if core.allocators[w].index)
    core.add_request("big", list(range(100, 160)), params(30))
    core.step()
    if core.seqs["big"].worker != w:  # make w the fuller worker: room alone would send "b" elsewhere
        pytest.skip("placement tie went the other way")
    core.add_request("b", system + [5], params())
    outs = {sid: list(ev.token_ids) for sid, ev in core.step().items()}
    room = [core.allocators[x].num_available() for x in range(2)]
    assert room[w] < room[1 - w]
    assert core.seqs["b"].worker == w and core.seqs["b"].cached_tokens == 28
    drain(core, outs)
    assert outs["b"] == expected(system + [5], 6)


def test_variants_do_not_share_cache():
    core, ex = core_of()
    prompt = list(range(1, 30))
    core.add_request("a", prompt, params())
    drain(core, {})
    core.add_request("b", prompt, params(), variant=1)
    core.step()
    assert core.seqs["b"].cached_tokens == 0


def test_a_dead_workers_cache_is_forgotten():
    core, ex = core_of(world=1)
    prompt = list(range(1, 30))
    run_one(core, "a", prompt)
    ex.lose(0)
    core.fail_workers({0})
    assert core.allocators[0].index == {}
    assert run_one(core, "b", prompt) == expected(prompt, 6)  # the fake asserts nothing stale is read


def test_grammar_sequences_reuse_prompt_blocks_only():
    core, _ = core_of()
    seq = core.add_request("g", list(range(1, 11)), params(grammar=json_object()))
    seq.output = list(range(50, 70))                # as if replayed after 20 generated tokens
    assert len(core._cacheable(seq)) == 10 // BS
    plain = core.add_request("p", list(range(1, 11)), params())
    plain.output = list(range(50, 70))
    assert len(core._cacheable(plain)) == (30 - 1) // BS


# ---- the real tiny model ----------------------------------------------------------------------------

def test_real_model_greedy_equal_with_and_without_caching():
    from expertpool.platform.engine import generate, local_engine
    from tests.model.helpers import random_model

    m = random_model("tiny")
    g = torch.Generator().manual_seed(3)
    system = torch.randint(5, 500, (37,), generator=g).tolist()
    prompts = [system + torch.randint(5, 500, (k,), generator=g).tolist() for k in (3, 11, 1, 6)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = {}
    for caching in (False, True):
        core = local_engine(m, max_batch_size=4, max_seq_len=128, block_size=8, max_num_batched_tokens=32,
                            prefix_caching=caching)
        generate(core, prompts[:1], sp)             # warm the cache with the shared prefix
        outs[caching] = generate(core, prompts[1:], sp)
        if caching:
            assert core.stats()["prefix_cache_hits"] >= 3 * 32
    assert outs[True] == outs[False]


@pytest.mark.parametrize("seed", [0, 1])
def test_real_model_seeded_sampling_equal_with_and_without_caching(seed):
    from expertpool.platform.engine import generate, local_engine
    from tests.model.helpers import random_model

    m = random_model("tiny")
    prompt = list(range(5, 60))
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True)
    res = []
    for caching in (False, True):
        core = local_engine(m, max_batch_size=2, max_seq_len=128, block_size=8, prefix_caching=caching)
        generate(core, [prompt], sp)
        res.append(generate(core, [prompt], sp))
    assert res[0] == res[1]
