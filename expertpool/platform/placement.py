"""Expert placement: which logical expert each physical expert slot of each rank holds, and EPLB.

A group of W ranks holds E logical routed experts in E + R physical slots (R = ``pool.redundant_experts``),
rank r getting its share of E as today's ranges split them, plus R // W, one more for the first R % W
ranks (``slots_per_rank``). A ``Placement`` lists,
per rank, the logical expert of each of its slots. It is valid when every logical expert has at
least one slot and no rank holds the same expert twice (a second copy on one rank would carry no
load). The all-to-all dispatcher sends each (token, expert) pair to one of that expert's copies,
spreading a replicated expert's pairs over its copies by pair index; every copy has the same
weights, so outputs do not depend on the placement.

``default`` is today's layout plus R copies: rank r holds its contiguous range [r*E//W, (r+1)*E//W)
and spends its extra slots on the start of the next rank's range, so with R = E every expert has a
second copy on another rank (degraded mode can then lose any one rank).

``rebalance`` is our EPLB (DeepSeek's "global" policy, written from its description): from the
measured load per logical expert, give the R extra copies one at a time to the expert whose load
per copy is highest, then place copies heaviest first (load / copies each) on the least-loaded rank
that has a free slot and no copy of that expert yet (longest-processing-time packing), moving one
copy aside when every free slot sits on a rank that already holds the expert. The objective is the
most loaded rank's load, which sets the step time. DeepSeek's "hierarchical" policy first packs
expert groups onto nodes to keep traffic inside a node; a replica's group is placed PACK on one node
by default, so only the global policy is implemented.

What a rank's "load" is (``LoadModel``): DeepSeek balances token counts, right where experts are
compute-bound (large prefill/decode batches: each row costs the same). In small-batch decode an
expert's cost is mostly reading its weights once per step it runs, whatever its row count (a CPU,
or a GPU below a few hundred rows per expert). A copy of an expert with token rate λ per pass (a
pass: one MoE layer of one engine step) then costs ``expert_cost * (1 - exp(-λ))`` token-equivalents
per pass for the weight read (the chance it gets any token, taking arrivals as Poisson) plus λ for
its rows. Under that model a second copy of a hot expert doubles its weight reads and gains little,
so the copies go where they lower the bound ``max(heaviest copy, total / W)`` on the most loaded
rank: to a heavy expert when splitting it helps, else to the coldest (nearly free). With
``expert_cost = 0`` this is DeepSeek's token balancing exactly.

Per layer (``Placement.layers``): each MoE layer has its own hot experts, and a step waits at every
layer's all-to-all for that layer's most loaded rank, so one layout for all layers can only balance
the sum of the layers (which may look even while every layer is skewed). As DeepSeek's EPLB does,
``rebalance`` of a load per layer places each layer on its own; every layer gives each rank the same
number of slots, so memory stays even. Layers without a placement of their own (the base layout:
``default``, or a layer EPLB saw no load for) use ``slots``.

Pure Python, no torch: the engine plans here and the workers apply the result.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace


class PlacementError(ValueError):
    """A placement that leaves an expert without a slot, or gives a rank two copies of one expert."""


def slots_per_rank(n_experts: int, redundant: int, world: int) -> list[int]:
    """Rank r's slots: its share of the experts as today's ranges split them (r*E//W onward), plus
    its share of the redundant slots (one more for the first R % W ranks)."""
    extra = [redundant // world + (1 if r < redundant % world else 0) for r in range(world)]
    return [(r + 1) * n_experts // world - r * n_experts // world + extra[r] for r in range(world)]


def usable_redundant(n_experts: int, redundant: int, world: int) -> int:
    """The redundant slots a group of ``world`` ranks can use: at most E x (W - 1), since a rank holds
    one copy of an expert at most (a single rank: none)."""
    return min(redundant, n_experts * (world - 1))


@dataclass(frozen=True)
class LoadModel:
    """How a rank's load is counted from tokens per logical expert over a window (module docstring).

    ``passes``: the times each expert could have run over the window (engine steps x MoE layers);
    ``expert_cost``: the rows one weight read of an expert costs as much as (0: count tokens only)."""
    passes: float = 0.0
    expert_cost: float = 0.0

    def copy_cost(self, tokens: float, copies: int) -> float:
        """The window cost of one of ``copies`` copies of an expert that got ``tokens`` over the window."""
        share = tokens / copies
        if self.expert_cost <= 0 or self.passes <= 0:
            return share
        return share + self.passes * self.expert_cost * -math.expm1(-share / self.passes)


TOKENS = LoadModel()


LayerLoad = dict[int, list[float]]  # MoE layer id -> tokens per logical expert


def summed(load: LayerLoad) -> list[float]:
    """Tokens per logical expert summed over the MoE layers of ``load``."""
    return [sum(c) for c in zip(*load.values())]


@dataclass(frozen=True)
class Placement:
    n_experts: int
    slots: tuple[tuple[int, ...], ...]  # per rank: the logical expert of each local slot, ascending
    # (MoE layer id, that layer's own placement), ascending; every other layer uses ``slots``
    layers: tuple[tuple[int, Placement], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "slots", tuple(tuple(sorted(s)) for s in self.slots))
        object.__setattr__(self, "layers", tuple(sorted(self.layers, key=lambda x: x[0])))
        self.check()
        sizes = [len(s) for s in self.slots]
        for layer, p in self.layers:
            if p.layers or p.n_experts != self.n_experts or [len(s) for s in p.slots] != sizes:
                raise PlacementError(f"MoE layer {layer}'s placement must give each of the {self.world} ranks as many "
                                     f"slots of the same {self.n_experts} experts as the others ({sizes})")

    @property
    def world(self) -> int:
        return len(self.slots)

    @property
    def base(self) -> Placement:
        """The layout of every MoE layer without a placement of its own."""
        return Placement(self.n_experts, self.slots) if self.layers else self

    def layer(self, layer_id: int) -> Placement:
        """MoE layer ``layer_id``'s placement."""
        return dict(self.layers).get(layer_id, self.base)

    def experts_of(self, rank: int) -> tuple[list[int], dict[int, list[int]]]:
        """What rank ``rank`` holds: its experts in every layer without its own placement, and per
        layer with one (the workers' form: ``ExpertWorker.load``)."""
        return list(self.slots[rank]), {layer: list(p.slots[rank]) for layer, p in self.layers}

    def copies(self) -> tuple[list[list[int]], dict[int, list[list[int]]]]:
        """The copies tables (``replicas``) of the base layout and of each layer with its own."""
        return self.base.replicas(), {layer: p.replicas() for layer, p in self.layers}

    @property
    def redundant(self) -> int:
        return sum(len(s) for s in self.slots) - self.n_experts

    def check(self) -> None:
        seen = [0] * self.n_experts
        for r, slots in enumerate(self.slots):
            if len(set(slots)) != len(slots):
                raise PlacementError(f"rank {r} holds an expert twice: {sorted(slots)}")
            for e in slots:
                if not 0 <= e < self.n_experts:
                    raise PlacementError(f"rank {r} holds expert {e}, outside [0, {self.n_experts})")
                seen[e] += 1
        missing = [e for e, n in enumerate(seen) if n == 0]
        if missing:
            raise PlacementError(f"experts {missing[:8]}{'...' if len(missing) > 8 else ''} have no slot on any of the "
                                 f"{self.world} ranks")

    def replicas(self) -> list[list[int]]:
        """Per logical expert, the ranks holding a copy (ascending)."""
        out: list[list[int]] = [[] for _ in range(self.n_experts)]
        for r, slots in enumerate(self.slots):
            for e in slots:
                out[e].append(r)
        return out

    def rank_loads(self, load: list[float], model: LoadModel = TOKENS) -> list[float]:
        """Each rank's load from ``load`` (tokens per logical expert): a copy carries tokens / copies,
        plus its weight reads under ``model``."""
        reps = self.replicas()
        return [sum(model.copy_cost(load[e], len(reps[e])) for e in slots) for slots in self.slots]

    def balancedness(self, load: list[float] | LayerLoad, model: LoadModel = TOKENS) -> float:
        """Mean rank load / max rank load (1.0 = even); 1.0 when there is no load. For a load per
        MoE layer, each under its layer's placement: the sum over layers of the mean rank load over
        the sum of the maxima (a step waits for every layer's most loaded rank)."""
        per_layer = load.items() if isinstance(load, dict) else [(None, load)]
        mean = top = 0.0
        for layer, counts in per_layer:
            loads = (self.base if layer is None else self.layer(layer)).rank_loads(counts, model)
            mean, top = mean + sum(loads) / len(loads), top + max(loads)
        return mean / top if top > 0 else 1.0

    def covers_without(self, ranks: set[int]) -> bool:
        """Whether every expert keeps a copy in every layer when ``ranks`` are gone (degraded mode)."""
        return all(any(r not in ranks for r in reps) for p in [self.base] + [p for _, p in self.layers]
                   for reps in p.replicas())

    def without(self, ranks: set[int]) -> Placement:
        """The placement of the surviving ranks, renumbered 0..W'-1 in order (degraded mode)."""
        return Placement(self.n_experts, tuple(s for r, s in enumerate(self.slots) if r not in ranks),
                         tuple((layer, p.without(ranks)) for layer, p in self.layers))

    @classmethod
    def default(cls, n_experts: int, world: int, redundant: int = 0) -> Placement:
        if world < 1 or world > n_experts + redundant:
            raise PlacementError(f"{world} ranks cannot split {n_experts} experts and {redundant} redundant slots")
        sizes = slots_per_rank(n_experts, redundant, world)
        base = [list(range(r * n_experts // world, (r + 1) * n_experts // world)) for r in range(world)]
        slots = []
        for r in range(world):
            own = list(base[r])
            donor = 1
            while len(own) < sizes[r] and donor < world:  # extra slots: copies from the next ranks' ranges
                for e in base[(r + donor) % world]:
                    if len(own) == sizes[r]:
                        break
                    if e not in own:
                        own.append(e)
                donor += 1
            if len(own) != sizes[r]:
                raise PlacementError(f"{redundant} redundant slots over {world} ranks would put two copies of one "
                                     f"expert on a rank; use at most {n_experts * (world - 1)}")
            slots.append(own)
        return cls(n_experts, tuple(tuple(s) for s in slots))


def rebalance(load: list[float] | LayerLoad, world: int, redundant: int = 0, model: LoadModel = TOKENS
              ) -> Placement:
    """A placement for ``load`` (tokens per logical expert, or per MoE layer a list of them) that
    keeps the most loaded rank low under ``model`` (tokens only by default). A load per layer gives
    each layer its own placement, and the base layout (layers not in ``load``) is planned for their
    sum; ``model.passes`` then counts one layer's passes."""
    if isinstance(load, dict):
        base = rebalance(summed(load), world, redundant, replace(model, passes=model.passes * len(load)))
        return Placement(base.n_experts, base.slots,
                         tuple((layer, rebalance(c, world, redundant, model)) for layer, c in load.items()))
    E = len(load)
    sizes = slots_per_rank(E, redundant, world)
    if redundant > E * (world - 1):
        raise PlacementError(f"{redundant} redundant slots need more than one copy of an expert per rank")
    copies = _copies(load, world, redundant, model)
    cost = [model.copy_cost(float(load[e]), copies[e]) for e in range(E)]
    items = sorted(((cost[e], e) for e in range(E) for _ in range(copies[e])), key=lambda x: (-x[0], x[1]))
    held: list[set[int]] = [set() for _ in range(world)]
    rank_load = [0.0] * world
    for w, e in items:
        free = [r for r in range(world) if len(held[r]) < sizes[r] and e not in held[r]]
        if not free:  # every free slot is on a rank holding e: move another copy off a full rank that lacks e
            r1 = next(r for r in range(world) if len(held[r]) < sizes[r])
            r2 = next(r for r in range(world) if e not in held[r])
            x = next(x for x in sorted(held[r2]) if x not in held[r1])
            held[r2].remove(x)
            held[r1].add(x)
            rank_load[r2] -= cost[x]
            rank_load[r1] += cost[x]
            free = [r2]
        r = min(free, key=lambda r: (rank_load[r], r))
        held[r].add(e)
        rank_load[r] += w
    return Placement(E, tuple(tuple(h) for h in held))


def _copies(load: list[float], world: int, redundant: int, model: LoadModel) -> list[int]:
    """Copies per logical expert (one each, plus ``redundant`` more, at most ``world`` each). Each
    extra copy goes where it lowers ``max(heaviest copy, total cost / world)`` most: to the expert
    whose copies are heaviest, or, when splitting it would add more weight reads than it saves, to
    the one whose extra copy costs least. Token counting (no weight cost) always splits the heaviest."""
    E = len(load)
    copies = [1] * E
    cost = [model.copy_cost(float(load[e]), 1) for e in range(E)]
    total = sum(cost)
    heap = [(-cost[e], e) for e in range(E)]  # heaviest copy first
    heapq.heapify(heap)
    for _ in range(redundant):
        while heap and (copies[heap[0][1]] >= world or -heap[0][0] != cost[heap[0][1]]):
            heapq.heappop(heap)  # full, or a stale entry
        h = heap[0][1]

        def grown(e):
            c = model.copy_cost(float(load[e]), copies[e] + 1)
            return c, (copies[e] + 1) * c - copies[e] * cost[e]

        ch, dh = grown(h)
        split = (ch, dh)
        if model.expert_cost > 0:
            cheap = min((e for e in range(E) if copies[e] < world and e != h), key=lambda e: (grown(e)[1], e),
                        default=None)
            if cheap is not None:
                heaviest_rest = max([ch] + [cost[e] for e in range(E) if e != h])
                bound_split = max(heaviest_rest, (total + dh) / world)
                cc, dc = grown(cheap)
                bound_cheap = max(cost[h], (total + dc) / world)
                if bound_cheap < bound_split:
                    h, split = cheap, (cc, dc)
        copies[h] += 1
        cost[h] = split[0]
        total += split[1]
        heapq.heappush(heap, (-cost[h], h))
    return copies

