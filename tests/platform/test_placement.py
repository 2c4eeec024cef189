"""Expert placement and EPLB (pure: no model, no Ray)."""

import math
import random

import pytest

from expertpool.platform.placement import (
    TOKENS,
    LoadModel,
    Placement,
    PlacementError,
    rebalance,
    slots_per_rank,
    summed,
)


def test_default_is_todays_contiguous_split():
    p = Placement.default(256, 4)
    assert p.slots == tuple(tuple(range(r * 64, (r + 1) * 64)) for r in range(4))
    assert p.redundant == 0 and all(len(r) == 1 for r in p.replicas())


@pytest.mark.parametrize("world", [2, 4])
def test_redundant_equal_to_experts_gives_every_expert_two_copies_on_two_ranks(world):
    p = Placement.default(256, world, redundant=256)
    assert all(len(reps) == 2 for reps in p.replicas())
    assert all(p.covers_without({r}) for r in range(world))
    assert not Placement.default(256, world).covers_without({0})


def test_uneven_widths_are_a_placement_question():
    assert slots_per_rank(256, 0, 3) == [85, 85, 86]  # today's ranges r*E//W
    p = Placement.default(256, 3)
    assert [len(s) for s in p.slots] == [85, 85, 86]
    p2 = Placement.default(256, 3, redundant=4)
    assert [len(s) for s in p2.slots] == [87, 86, 87]
    p2.check()


def test_invalid_placements_name_the_problem():
    with pytest.raises(PlacementError, match="no slot"):
        Placement(4, ((0, 1), (1, 2)))
    with pytest.raises(PlacementError, match="twice"):
        Placement(4, ((0, 0, 1), (2, 3)))
    with pytest.raises(PlacementError, match="outside"):
        Placement(4, ((0, 1, 9), (2, 3)))
    with pytest.raises(PlacementError, match="two copies"):
        Placement.default(8, 2, redundant=9)


def skewed_load(E=64, hot=6, seed=0):
    rng = random.Random(seed)
    load = [rng.randint(1, 20) for _ in range(E)]
    for e in rng.sample(range(E), hot):
        load[e] += 1000
    return load


@pytest.mark.parametrize("world,redundant", [(2, 0), (4, 0), (4, 4), (4, 64), (3, 5)])
def test_rebalance_covers_everything_and_lowers_the_peak(world, redundant):
    load = skewed_load()
    before = Placement.default(64, world, redundant)
    after = rebalance(load, world, redundant)
    after.check()
    assert [len(s) for s in sorted(after.slots, key=len)] == sorted(slots_per_rank(64, redundant, world))
    assert max(after.rank_loads(load)) <= max(before.rank_loads(load))
    assert after.balancedness(load) >= before.balancedness(load)
    if redundant >= 6:  # enough copies to split every hot expert: near even
        assert after.balancedness(load) > 0.9
    assert abs(sum(after.rank_loads(load)) - sum(load)) < 1e-6  # the load is only moved, never lost


def test_rebalance_gives_extra_copies_to_the_heaviest_experts():
    load = [100.0, 1.0, 1.0, 1.0, 50.0, 1.0, 1.0, 1.0]
    p = rebalance(load, 4, redundant=4)
    copies = [len(r) for r in p.replicas()]
    assert copies[0] >= 3 and copies[4] >= 2 and sum(copies) == 12


def test_rebalance_never_puts_two_copies_on_one_rank_even_when_cornered():
    # 2 ranks, every expert twice: each rank must hold every expert exactly once
    load = skewed_load(E=16, hot=3, seed=1)
    p = rebalance(load, 2, redundant=16)
    assert all(set(s) == set(range(16)) for s in p.slots)
    for seed in range(20):
        rng = random.Random(seed)
        E, W = rng.randint(8, 40), rng.randint(2, 6)
        R = rng.randint(0, E * (W - 1))
        rebalance([rng.random() * 100 for _ in range(E)], W, R).check()


def test_without_renumbers_the_survivors():
    p = Placement.default(8, 4, redundant=8)
    q = p.without({1})
    assert q.world == 3 and q.slots == (p.slots[0], p.slots[2], p.slots[3])


def test_width_decision_widens_on_load_and_narrows_when_idle():
    from expertpool.platform.elastic import ElasticPolicy, width_decision

    p = ElasticPolicy(n_experts=8, min_width=2, max_width=4, autoscale=True, step_time_high_s=0.5,
                      kv_usage_high=0.9, idle_s=60)
    assert width_decision(2, p, mean_step_s=0.8, kv_usage=0.1, idle_s=0) == 3       # slow steps
    assert width_decision(3, p, mean_step_s=0.1, kv_usage=0.95, idle_s=0) == 4      # KV nearly full
    assert width_decision(4, p, mean_step_s=0.9, kv_usage=0.95, idle_s=0) == 4      # at max
    assert width_decision(3, p, mean_step_s=None, kv_usage=0.0, idle_s=61) == 2     # idle: one fewer
    assert width_decision(2, p, mean_step_s=None, kv_usage=0.0, idle_s=600) == 2    # at min
    assert width_decision(3, p, mean_step_s=0.2, kv_usage=0.5, idle_s=10) == 3      # neither


def test_load_model_counts_tokens_plus_the_chance_of_a_weight_read():
    model = LoadModel(passes=100, expert_cost=30)
    assert TOKENS.copy_cost(60, 2) == 30
    assert LoadModel(passes=100, expert_cost=0).copy_cost(60, 2) == 30  # no weight cost: tokens only
    # 0.3 tokens per pass on each copy: a read in 1 - e^-0.3 of the passes, each worth 30 rows
    assert model.copy_cost(60, 2) == pytest.approx(30 + 100 * 30 * (1 - math.exp(-0.3)))
    assert model.copy_cost(1e6, 1) == pytest.approx(1e6 + 100 * 30)  # a read every pass, no more
    assert model.copy_cost(0, 1) == 0


def test_weight_bound_rebalance_spreads_hot_experts_instead_of_copying_them():
    """Small-batch decode: 8 hot experts of 64 at ~8 tokens per pass, the rest at 0.5. Token
    balancing (DeepSeek's) spends 16 extra slots on second copies of the hot ones, so each rank reads
    all 8 every step; with a weight-read cost the copies go to cold experts and each rank holds 4."""
    passes = 1000
    load = [0.5 * passes] * 64
    for e in range(8, 16):
        load[e] = 8.4 * passes
    model = LoadModel(passes, expert_cost=30)
    by_tokens, by_cost = rebalance(load, 2, 16), rebalance(load, 2, 16, model)
    assert [len(by_tokens.replicas()[e]) for e in range(8, 16)] == [2] * 8
    assert [len(by_cost.replicas()[e]) for e in range(8, 16)] == [1] * 8
    assert sorted(sum(8 <= e < 16 for e in s) for s in by_cost.slots) == [4, 4]
    default = Placement.default(64, 2, 16)
    assert max(by_cost.rank_loads(load, model)) < max(by_tokens.rank_loads(load, model))
    assert max(by_cost.rank_loads(load, model)) < max(default.rank_loads(load, model))
    assert by_cost.balancedness(load, model) > 0.99


def test_weight_bound_rebalance_still_splits_an_expert_too_heavy_for_one_rank():
    """One expert carries most of the load, far beyond the weight-read cost: a second copy lowers
    the peak, so it is made even though it adds a read."""
    passes = 100
    load = [passes * 400.0] + [passes * 1.0] * 15
    model = LoadModel(passes, expert_cost=30)
    p = rebalance(load, 2, 2, model)
    assert len(p.replicas()[0]) == 2
    assert p.balancedness(load, model) > 0.9


@pytest.mark.parametrize("cost", [0.0, 5.0, 100.0])
def test_rebalance_with_a_load_model_is_always_a_valid_placement(cost):
    for seed in range(20):
        rng = random.Random(seed)
        E, W = rng.randint(8, 40), rng.randint(2, 6)
        R = rng.randint(0, E * (W - 1))
        load = [rng.random() * 1000 for _ in range(E)]
        p = rebalance(load, W, R, LoadModel(passes=50, expert_cost=cost))
        p.check()
        assert [len(s) for s in sorted(p.slots, key=len)] == sorted(slots_per_rank(E, R, W))


def test_per_layer_rebalance_balances_layers_a_shared_layout_cannot():
    # three MoE layers, two ranks of two slots: expert 0 is hot in every layer, with 1, 2 and 3 beside it.
    # A step waits for each layer's most loaded rank (balancedness: sum of means over sum of maxima);
    # one layout for all layers can split expert 0 from at most two of the three, each layer on its own all
    E, W = 4, 2
    load = {layer: [40.0 if e in (0, layer) else 1.0 for e in range(E)] for layer in (1, 2, 3)}
    shared = rebalance(summed(load), W)
    per_layer = rebalance(load, W)
    assert not shared.layers and [layer for layer, _ in per_layer.layers] == [1, 2, 3]
    # at best 2 layers even (41 / 41) and one with both hot experts on a rank (80 / 2): 123 / 162
    assert shared.balancedness(load) <= 123 / 162 + 1e-9
    assert Placement.default(E, W).balancedness(load) <= 123 / 162 + 1e-9
    assert per_layer.balancedness(load) == 1.0
    for layer, counts in load.items():  # each layer is balanced on its own, and holds every expert
        assert per_layer.layer(layer).balancedness(counts) == 1.0
        assert sorted(e for s in per_layer.layer(layer).slots for e in s) == list(range(E))
    assert per_layer.layer(7).slots == per_layer.slots  # a layer EPLB saw no load for: the base layout
    rest, mine = per_layer.experts_of(1)
    assert rest == list(per_layer.slots[1]) and mine == {layer: list(p.slots[1]) for layer, p in per_layer.layers}
    base_copies, layer_copies = per_layer.copies()
    assert base_copies == per_layer.base.replicas() and set(layer_copies) == {1, 2, 3}


def test_per_layer_placements_degrade_only_when_every_layer_is_covered():
    E, W = 8, 4
    base = Placement.default(E, W, redundant=E)  # every expert twice, in the base layout
    narrow = Placement(E, ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3), (4, 5, 6, 7)))
    lone = Placement(E, ((0, 1, 2, 3), (0, 4, 5, 6), (0, 1, 2, 3), (4, 5, 6, 7)))  # expert 7: rank 3 only
    p = Placement(E, base.slots, ((1, narrow), (2, lone)))
    assert p.redundant == E and all(base.covers_without({r}) for r in range(W))
    assert p.covers_without({0}) and not p.covers_without({3})  # layer 2 would lose expert 7
    q = p.without({0})
    assert q.world == 3 and q.layer(1).slots == narrow.slots[1:] and q.layer(2).slots == lone.slots[1:]
    with pytest.raises(PlacementError, match="layer 3"):  # a layer must give each rank as many slots
        Placement(E, base.slots, ((3, Placement.default(E, W)),))


def test_eplb_loop_plans_each_layer_from_the_measured_window():
    """``ElasticGroup.track_load`` as the engine's refresh loop calls it (cumulative counts per MoE layer):
    the window keeps the layers apart, and the rebalance it starts when due places each layer on its own."""
    import asyncio
    from types import SimpleNamespace

    from expertpool.platform.elastic import ElasticGroup, ElasticPolicy

    class Executor:
        world = 2

        def __init__(self):
            self.placement, self.committed = Placement.default(4, 2), []

        async def prepare(self, placement, keep, patches):
            return []

        async def commit(self, placement, slots):
            self.placement = placement
            self.committed.append(placement)

    async def between_steps(fn):
        return await fn()

    ex, step = Executor(), [0]
    policy = ElasticPolicy(n_experts=4, eplb=True, window_steps=100, rebalance_every_steps=10, expert_cost=0.0,
                           moe_layers=3)
    group = ElasticGroup(SimpleNamespace(executor=ex, resize=lambda keep: []), policy, [], between_steps,
                         lambda: step[0])
    per_snapshot = {layer: [40 if e in (0, layer) else 1 for e in range(4)] for layer in (1, 2, 3)}

    async def serve():
        cumulative = {layer: [0] * 4 for layer in per_snapshot}
        for s in range(0, 30, 5):  # a snapshot every 5 steps; a rebalance is due at step 10 (and 20)
            step[0] = s
            cumulative = {layer: [a + b for a, b in zip(c, per_snapshot[layer])] for layer, c in cumulative.items()}
            await group.track_load(cumulative)
            while group.busy:
                await asyncio.sleep(0)

    asyncio.run(serve())
    # a layout change restarts the window: snapshots at steps 15, 20 and 25 remain
    assert group.window_steps() == 10
    assert group.window_load() == {layer: [2 * x for x in c] for layer, c in per_snapshot.items()}
    assert group.rebalances == 1 and len(ex.committed) == 1  # at step 20 the placement was already even
    assert [layer for layer, _ in ex.placement.layers] == [1, 2, 3]
    assert group.actor_balancedness == 1.0  # the last window, under the per-layer placement
