"""Executors: run one engine step on the workers, and keep the group of them whole.

``LocalExecutor`` drives one in-process ``ModelRunner`` (no expert parallelism, nothing to recover).
``RayExecutor`` drives the replica's group of ``ExpertWorker`` actors: start-up (create the actors in
their placement-group bundles, load, size the KV cache, rendezvous and join the process group, warm
up on scratch blocks), steps (every rank together: MoE layers are collectives), failure detection and
recovery (replace dead actors, re-form the group), and the elastic layouts the engine asks for
(``prepare`` beside the serving one, ``commit`` at a step boundary, ``shrink`` for degraded mode).
The engine decides when; the executor only carries it out.
"""

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import ray

from expertpool.platform.placement import Placement
from expertpool.platform.scheduler import StepItem
from expertpool.platform.step_channel import ChannelClient
from expertpool.platform.worker import CONTROL, PREPARE, ExpertWorker, WorkerSpec, expert_span

log = logging.getLogger(__name__)


def warmup_steps(spec: WorkerSpec, world: int, on_gpu: bool) -> list[list[StepItem]]:
    """The steps every worker runs before the replica reports ready, all on the scratch blocks: one
    decode step per batch bucket (compiles the Triton variants of each size; the first step of a
    group also creates the NCCL communicator) and one prefill chunk (the large-M variants). On CPU
    there is nothing to compile: one decode and a short chunk check the group, which keeps the
    warm-up of a replacement actor short inside the recovery bound."""
    from expertpool.model.decode_graphs import decode_buckets
    from expertpool.model.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=1, temperature=0)
    bs, scratch = spec.block_size, list(range(spec.num_blocks, spec.num_blocks + spec.scratch_blocks))
    per_worker = -(-spec.max_batch_size // world)
    buckets = decode_buckets(per_worker) if on_gpu else [1]
    # the sampled token and the speculative drafts chained after a chunk stay inside the scratch blocks too
    room = spec.scratch_blocks * bs - 1 - spec.spec_tokens
    chunk = max(1, min(spec.max_num_batched_tokens, room, spec.max_seq_len - 1 if on_gpu else 16))
    steps = [[StepItem(f"warmup-d{b}-{i}", [1], 0, scratch, True, greedy) for i in range(b)] for b in buckets]
    steps.append([StepItem("warmup-p", [1] * chunk, 0, scratch, True, greedy)])
    return steps


class LocalExecutor:
    """One in-process ModelRunner (no expert parallelism). The sync methods call the runner on the
    caller's thread (torch runs ~1.5x slower on a secondary thread here, measured); the async ones
    go through one worker thread, in submission order, as actor tasks do, so pipelined steps,
    releases and patch loads never overlap. Use one mode per executor. Nothing to recover."""

    world = 1

    def __init__(self, runner, model_dir: str | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.runner = runner
        self.model_dir = model_dir
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="expertpool-runner")
        self._async = False

    def run(self, items_per_worker):
        return [self.runner.step(items_per_worker[0])]

    def release(self, finished):
        if finished:
            ids = [s for _, s in finished]
            if self._async:
                self._thread.submit(self.runner.release, ids)
            else:
                self.runner.release(ids)

    def expert_load(self) -> dict[int, list[int]]:
        return self.runner.expert_load()

    async def run_async(self, items_per_worker):
        return await self.submit_many([items_per_worker])[0]

    def submit_many(self, steps: list[list[list[StepItem]]]) -> list[asyncio.Future]:
        """Consecutive steps, queued at once on the runner's thread (which runs them in order)."""
        self._async = True
        return [asyncio.wrap_future(self._thread.submit(lambda it=items[0]: [self.runner.step(it)])) for items in steps]

    async def find_dead(self) -> set[int]:
        return set()

    async def load_patch(self, patch_dir: str) -> int:
        return await asyncio.wrap_future(self._thread.submit(self.runner.load_patch, patch_dir, self.model_dir))

    async def expert_load_async(self):
        return await asyncio.wrap_future(self._thread.submit(self.runner.expert_load))


class StepFailed(Exception):
    """A group step did not complete; ``errors`` maps rank -> what that rank's step raised (ranks
    whose step was still stuck after the bound are in ``stuck``)."""

    def __init__(self, errors: dict[int, BaseException], stuck: set[int]):
        self.errors, self.stuck = errors, stuck
        first = next(iter(errors.values()), None)
        super().__init__(f"step failed on ranks {sorted(errors)}" + (f", stuck on {sorted(stuck)}" if stuck else "")
                         + (f": {type(first).__name__}: {first}" if first is not None else ""))


class RecoveryFailed(Exception):
    """The group could not be restored within its bound (a replacement did not start, or a second
    failure hit the recovery); the engine stops and answers 503 until Serve replaces the replica."""


class RecoveryHooks(Protocol):
    """Fault-injection points of a recovery (tests pass one to ``build_engine``; production passes none)."""

    async def before_replace(self, executor: "RayExecutor", rank: int) -> None: ...


@dataclass
class _Slot:
    """Where rank r's actor goes (its Ray options: resources, placement-group bundle) and what runs there."""
    options: dict[str, Any]
    actor: Any = None
    info: dict[str, Any] = field(default_factory=dict)  # what ExpertWorker.load returned
    channel: tuple | None = None  # ((host, port), token) of the actor's step channel listener


class RayExecutor:
    """The replica's expert-parallel actor group; every actor steps together (MoE layers are collectives).

    Steps and releases go over each actor's step channel (``platform.step_channel``: one TCP connection
    per actor; ~0.06 ms round trip and ~0.06 ms of CPU per step against ~1.1 ms and ~1.2 ms for a Ray
    actor task, 2 CPUs); ``EXPERTPOOL_STEP_CHANNEL=0``, or a channel that cannot be opened (logged),
    keeps Ray actor tasks. Channels are connected at the first step after the group forms, and closed
    when it changes.

    Failure handling: a step waits for every rank's result; when one fails (a dead actor's call
    raises ``ActorDiedError`` within about a second; its peers' collectives then fail on the closed
    connection, or time out), the others get ``settle_s`` to finish, stuck ones get ``abort_group``,
    and ``StepFailed`` says which ranks raised. ``recover`` then kills the dead, starts replacements
    in their placement-group bundles (they load their experts while the survivors wait), replays the
    published patches on them, and re-forms the process group on every rank under a new generation.
    """

    def __init__(self, spec: WorkerSpec, slot_options: list[dict[str, Any]], hooks: RecoveryHooks | None = None,
                 ping_timeout_s: float = 10.0, placement: Placement | None = None):
        """``slot_options``: Ray options of every actor the group may have (one placement-group bundle
        each, up to the widest width); the first ``placement.world`` are used at start, the rest are
        spares a wider group takes. ``placement``: which experts each rank holds (default: contiguous
        ranges over all ``slot_options``)."""
        self.spec = spec
        world = placement.world if placement is not None else len(slot_options)
        assert world <= len(slot_options), f"{world} ranks but {len(slot_options)} actor bundles"
        self.placement = placement
        self.world = world
        self.slots = [_Slot(o) for o in slot_options[:world]]
        self.spare_options = list(slot_options[world:])  # bundles no actor uses now
        self.hooks = hooks
        self.ping_timeout_s = ping_timeout_s
        self.settle_s = spec.collective_timeout_s + 5.0
        self._expert_cost: float | None = None  # rank 0's measurement, on first use (``expert_cost``)
        self.generation = 0
        self._cls = ray.remote(concurrency_groups={CONTROL: 1, PREPARE: 1})(ExpertWorker)
        # "1" (default): the group steps over the step channels; "0": Ray actor tasks
        self.channel_mode = os.environ.get("EXPERTPOOL_STEP_CHANNEL", "1").strip() or "1"
        if self.channel_mode not in ("0", "1"):
            raise ValueError(f"EXPERTPOOL_STEP_CHANNEL={self.channel_mode!r}: "
                             "use 1 (step channels) or 0 (Ray actor tasks)")
        self._channels: list[ChannelClient] | None = None  # connected at the first step of a group
        self._channels_failed = False  # a channel of this group would not open: Ray actor tasks until it changes

    @property
    def actors(self) -> list:
        return [s.actor for s in self.slots]

    def _spawn(self, rank: int):
        return self._cls.options(**self.slots[rank].options).remote(rank, self.world)

    def _experts(self, rank: int, placement: Placement | None = None):
        """What rank ``rank`` holds under ``placement`` (default: the current one), in the workers' form."""
        placement = placement or self.placement
        return _worker_form(placement.experts_of(rank)) if placement is not None else None

    def _replicas(self):
        return self.placement.copies() if self.placement is not None else None

    async def _form_group(self) -> None:
        """Every rank (re-)joins under a new generation with the current placement's copies table."""
        self._close_channels("the group is re-formed")
        await self._open_channel_listeners()
        self.generation += 1
        replicas = self._replicas()
        await asyncio.gather(*[_await(s.actor.commit_placement.remote(r, self.world, replicas))
                               for r, s in enumerate(self.slots)])
        addr, port = await _await(self.actors[0].rendezvous_address.remote())
        await asyncio.gather(*[_await(a.join.remote(addr, port, self.generation)) for a in self.actors])

    def start(self, size_kv=None) -> None:
        """Create every actor, load all of them at once, size the KV cache when the spec leaves it open
        (``size_kv(load infos) -> blocks per worker``: it depends on the resolved dtype and on the memory
        free after the load), form the group, warm up (blocking; replica start-up)."""
        for r, slot in enumerate(self.slots):
            slot.actor = self._spawn(r)
        loads = [s.actor.load.remote(self.spec, self._experts(r)) for r, s in enumerate(self.slots)]
        for slot, info in zip(self.slots, ray.get(loads)):
            slot.info = info
        if self.spec.num_blocks is None:
            n = size_kv([s.info for s in self.slots])
            self.spec = replace(self.spec, num_blocks=n)  # a replacement actor allocates the same
            ray.get([s.actor.allocate_cache.remote(n) for s in self.slots])
        replicas = self._replicas()
        ray.get([s.actor.commit_placement.remote(r, self.world, replicas) for r, s in enumerate(self.slots)])
        addr, port = ray.get(self.slots[0].actor.rendezvous_address.remote())
        ray.get([s.actor.join.remote(addr, port, self.generation) for s in self.slots])
        if self.use_channels:
            for slot, where in zip(self.slots, ray.get([s.actor.open_step_channel.remote() for s in self.slots])):
                slot.channel = where
        self.warmup()
        for slot, how in zip(self.slots, ray.get([s.actor.enable_decode_graphs.remote() for s in self.slots])):
            slot.info["decode"] = how

    async def expert_cost(self) -> float:
        """The rows one expert weight read costs as much as, for EPLB's load model when
        ``pool.eplb.expert_cost`` is unset: rank 0 times one expert (``ExpertWorker.expert_cost``, 12
        calls, between two of its steps) the first time the load model asks, not at start-up, so a
        replica whose load model never runs does not pay for it. Kept from then on, across group
        re-formations too (a resize or a replacement runs the same model on the same kind of device).
        Two first callers at once both measure; the first answer is kept."""
        if self._expert_cost is None:
            cost = await _await(self.slots[0].actor.expert_cost.remote())
            if self._expert_cost is None:
                self._expert_cost = cost
        return self._expert_cost

    def warmup(self) -> float:
        """Run ``warmup_steps`` on every worker (they only touch scratch blocks, so live sequences'
        caches are safe during a recovery); returns the seconds it took."""
        t0 = time.time()
        on_gpu = any(str(s.info.get("device", "cpu")).startswith("cuda") for s in self.slots)
        for items in warmup_steps(self.spec, self.world, on_gpu):
            self.run([items] * self.world)
            self.release([(w, it.seq_id) for w in range(self.world) for it in items])
        dt = time.time() - t0
        log.info("expert group warmed up in %.1fs", dt)
        return dt

    def experts_of(self, rank: int) -> str:
        return expert_span(self.slots[rank].info.get("experts") or [])

    def describe(self) -> list[dict[str, Any]]:
        """Rank, pid, node, device and expert range of every actor (engine stats; operators and tests)."""
        return [{**s.info, "experts": self.experts_of(r)} for r, s in enumerate(self.slots)]

    # ---- the step channels
    @property
    def use_channels(self) -> bool:
        """Whether this group steps over the step channels (``EXPERTPOOL_STEP_CHANNEL``, default 1)."""
        return self.channel_mode == "1"

    async def _open_channel_listeners(self) -> None:
        """Ask the actors that have none yet for their step channel (a new actor: start, recovery, resize)."""
        if not self.use_channels:
            return
        new = [s for s in self.slots if s.channel is None]
        for slot, where in zip(new, await asyncio.gather(*[_await(s.actor.open_step_channel.remote()) for s in new])):
            slot.channel = where

    def _connected(self) -> list[ChannelClient] | None:
        """The group's channels, connected now if they are not yet (on the replica's event loop); None:
        use Ray actor tasks (switched off, or a channel of this group would not open). A channel that
        has closed stays in place: its steps fail at once, and the recovery that follows re-forms the
        group on new connections."""
        if self._channels is not None:
            return self._channels
        if not self.use_channels or self._channels_failed or any(s.channel is None for s in self.slots):
            return None
        chans: list[ChannelClient] = []
        try:
            for r, s in enumerate(self.slots):
                address, token = s.channel
                chans.append(ChannelClient(address, token, r))
        except OSError as e:
            for c in chans:
                c.close()
            self._channels_failed = True
            log.warning("could not connect the step channel of rank %d (%s:%d): %s; this group steps through "
                        "Ray actor tasks (check that the replica can reach the actors' nodes on any port)",
                        len(chans), *s.channel[0], e)
            return None
        self._channels = chans
        log.info("step channels connected to %d actors", len(chans))
        return chans

    def _close_channels(self, why: str) -> None:
        """Close the group's channels (steps in flight on them fail); the next step connects again."""
        if self._channels is not None:
            for c in self._channels:
                c.close(why)
        self._channels = None
        self._channels_failed = False

    # ---- steps
    def run(self, items_per_worker):
        """One step as Ray actor tasks, blocking (start-up and recovery warm-up, off the event loop)."""
        return ray.get([a.step.remote(items) for a, items in zip(self.actors, items_per_worker)])

    async def run_async(self, items_per_worker):
        return await self.submit_many([items_per_worker])[0]

    def submit_many(self, steps: list[list[list[StepItem]]]) -> list[asyncio.Future]:
        """Consecutive steps (each: items per worker), all submitted now. An actor runs the tasks of one
        caller in submission order, so it goes from one step to the next without a round trip to the
        replica; a decode's ``PLACEHOLDER`` token is the one the actor sampled in the step before.
        Returns one future per step, in order, each resolving to that step's per-worker results (or
        raising ``StepFailed`` as ``run_async``). When a step fails, the later steps still queued on the
        actors are dropped (channels) or cancelled (Ray tasks), so a surviving rank does not run them
        against a broken group."""
        chans = self._connected()
        if chans is not None:
            futs = [[c.submit(items) for c, items in zip(chans, per_worker)] for per_worker in steps]

            async def over_channels(j: int):
                try:
                    return await self._settle(futs[j])
                except StepFailed:
                    self._drop_queued(chans)
                    raise
            return [asyncio.ensure_future(over_channels(j)) for j in range(len(futs))]
        refs = [[a.step.remote(items) for a, items in zip(self.actors, per_worker)] for per_worker in steps]

        async def one(j: int):
            try:
                return await self._settle([asyncio.ensure_future(_await(r)) for r in refs[j]])
            except StepFailed:
                for later in refs[j + 1:]:
                    for ref in later:
                        try:
                            ray.cancel(ref)  # a queued actor task is dropped; a running one finishes
                        except Exception:  # already finished, or its actor is gone
                            pass
                raise
        return [asyncio.ensure_future(one(j)) for j in range(len(refs))]

    async def _settle(self, futs: list[asyncio.Future]):
        """One step's per-rank results, or ``StepFailed`` once a failed rank's peers have had their bound."""
        done, pending = await asyncio.wait(futs, return_when=asyncio.FIRST_EXCEPTION)
        if all(f.exception() is None for f in done) and not pending:
            return [f.result() for f in futs]
        if pending:  # a rank failed: give the others a bound to fail (or finish) in turn
            _, pending = await asyncio.wait(pending, timeout=self.settle_s)
        if pending:
            stuck = {futs.index(f) for f in pending}
            await asyncio.gather(*[_bounded(self.actors[r].abort_group.remote(), self.ping_timeout_s) for r in stuck],
                                 return_exceptions=True)
            _, pending = await asyncio.wait(pending, timeout=self.ping_timeout_s)
        stuck = {futs.index(f) for f in pending}
        errors = {r: f.exception() for r, f in enumerate(futs) if f.done() and f.exception() is not None}
        raise StepFailed(errors, stuck)

    def _drop_queued(self, chans: list[ChannelClient]) -> None:
        """After a failed step: every actor answers the steps still queued on its channel without running
        them (``drop_steps``, over Ray's control group), then the channels close, which fails the steps
        in flight on them. The group is re-formed (or the steps resubmitted) on new connections."""
        for a, c in zip(self.actors, chans):
            try:
                a.drop_steps.remote(c.conn_id)
            except Exception:  # its actor is gone
                pass
        if self._channels is chans:
            self._close_channels("a step of the group failed")

    def release(self, finished):
        """Free finished sequences' state on their workers: over the step channels when connected (in
        order with the steps), else as Ray actor tasks (ordered after this caller's earlier step tasks)."""
        by_worker: dict[int, list[str]] = {}
        for w, s in finished:
            by_worker.setdefault(w, []).append(s)
        chans = self._channels if self._channels is not None and not any(c.closed for c in self._channels) else None
        for w, ids in by_worker.items():
            if chans is not None:
                chans[w].release(ids)
            else:
                self.actors[w].release.remote(ids)

    # ---- liveness and recovery
    async def find_dead(self, stuck: set[int] = frozenset()) -> set[int]:
        """Ranks whose actor is gone (its ping raises) or unresponsive (no answer within the bound;
        pings run in their own concurrency group, so a long step does not delay them). ``stuck``
        ranks (a step that never returned) count as dead: they are killed and replaced."""
        res = await asyncio.gather(*[_bounded(a.ping.remote(), self.ping_timeout_s) for a in self.actors],
                                   return_exceptions=True)
        return {r for r, x in enumerate(res) if isinstance(x, BaseException)} | set(stuck)

    async def check_health(self) -> None:
        dead = await self.find_dead()
        if dead:
            raise RuntimeError(f"expert actors {sorted(dead)} of the group are dead")

    async def recover(self, dead: set[int], patches: list[str]) -> None:
        """Replace the ``dead`` ranks and re-form the group on every rank (bounded by the caller)."""
        self._close_channels("the group is recovering")
        for r in sorted(dead):
            ray.kill(self.slots[r].actor, no_restart=True)
            self.slots[r].channel = None
        for r in sorted(dead):
            if self.hooks is not None:
                await self.hooks.before_replace(self, r)
            self.slots[r].actor = self._spawn(r)
        await self._load_new([self.slots[r] for r in sorted(dead)], sorted(dead), patches)
        await self._form_group()
        await asyncio.to_thread(self.warmup)  # the replacement compiles its kernels (and NCCL its communicator)
        for r in sorted(dead):  # then captures its decode graphs, as at start
            self.slots[r].info["decode"] = await _await(self.slots[r].actor.enable_decode_graphs.remote())

    async def _load_new(self, slots: list[_Slot], ranks: list[int], patches: list[str],
                        placement: Placement | None = None) -> None:
        """Load fresh actors of ``slots`` as ``ranks`` of ``placement`` (default: the current one), with
        the served patches (the same patches in the same order: variant indices agree across ranks)."""
        placement = placement or self.placement
        loaded = await asyncio.gather(*[_await(s.actor.load.remote(self.spec, self._experts(r, placement)))
                                        for s, r in zip(slots, ranks)])
        for s, info in zip(slots, loaded):
            s.info = info
            for p in patches:
                await _await(s.actor.load_patch.remote(p))

    # ---- elastic expert parallelism
    async def prepare(self, placement: Placement, keep: list[int | None], patches: list[str]) -> list[_Slot]:
        """Get a new layout ready while the current one serves: rank i of ``placement`` is current
        rank ``keep[i]`` (its actor and KV cache) or a new actor (None) in a spare bundle. Kept actors
        whose experts change load them beside the ones in use (their prepare concurrency group);
        new actors start and load. Returns the new slots, for ``commit``. Nothing changes for the
        running group until ``commit``."""
        assert len(keep) == placement.world
        if sum(k is None for k in keep) > len(self.spare_options):
            raise RuntimeError(f"widening to {placement.world} actors needs {sum(k is None for k in keep)} more "
                               f"placement-group bundles; {len(self.spare_options)} are free (raise "
                               "pool.actors_per_replica.max)")
        spares = list(self.spare_options)
        new_slots: list[_Slot] = []
        for i, k in enumerate(keep):
            if k is None:
                slot = _Slot(spares.pop(0))
                slot.actor = self._cls.options(**slot.options).remote(i, placement.world)
            else:
                slot = self.slots[k]
            new_slots.append(slot)
        fresh = [(s, i) for i, (s, k) in enumerate(zip(new_slots, keep)) if k is None]
        try:
            await self._load_new([s for s, _ in fresh], [i for _, i in fresh], patches, placement)
            moved = [(new_slots[i], i) for i, k in enumerate(keep)
                     if k is not None and self._experts(i, placement) != self.slots[k].info.get("experts")]
            await asyncio.gather(*[_await(s.actor.prepare_experts.remote(self._experts(i, placement)))
                                   for s, i in moved])
        except BaseException:
            for s, _ in fresh:
                ray.kill(s.actor, no_restart=True)
            raise
        return new_slots

    async def commit(self, placement: Placement, new_slots: list[_Slot]) -> None:
        """At a step boundary, with nothing in flight: the prepared layout becomes the group (actors
        no longer in it are stopped and their bundles freed), the process group is re-formed."""
        gone = [s for s in self.slots if all(s is not n for n in new_slots)]
        for s in gone:
            ray.kill(s.actor, no_restart=True)
        used = {id(s.options) for s in new_slots}
        self.spare_options = [o for o in self.spare_options if id(o) not in used] + [s.options for s in gone]
        same_group = len(new_slots) == len(self.slots) and all(a is b for a, b in zip(new_slots, self.slots))
        self.slots, self.placement, self.world = new_slots, placement, placement.world
        for r, s in enumerate(self.slots):
            s.info["experts"] = self._experts(r)
            s.info["rank"] = r
        if same_group:  # a rebalance: the process group stays, only the experts and the copies table change
            replicas = self._replicas()
            await asyncio.gather(*[_await(s.actor.commit_placement.remote(r, self.world, replicas, False))
                                   for r, s in enumerate(self.slots)])
            return
        await self._form_group()
        if any("decode" not in s.info for s in self.slots):  # new actors: compile (GPU), check the group
            await asyncio.to_thread(self.warmup)
            for s in self.slots:
                if "decode" not in s.info:
                    s.info["decode"] = await _await(s.actor.enable_decode_graphs.remote())

    async def shrink(self, dead: set[int]) -> Placement:
        """Degraded mode: drop the ``dead`` ranks at once, the survivors keep their experts (the
        placement covers every expert without them) and re-form a smaller group. Returns the old
        placement, which ``prepare`` can restore once replacements are up."""
        old = self.placement
        assert old is not None and old.covers_without(dead)
        for r in sorted(dead):
            ray.kill(self.slots[r].actor, no_restart=True)
        await self.commit(old.without(dead), [s for r, s in enumerate(self.slots) if r not in dead])
        return old

    def shutdown(self) -> None:
        self._close_channels("the replica shuts down")
        for s in self.slots:
            if s.actor is not None:
                ray.kill(s.actor, no_restart=True)

    # ---- patches and load statistics
    async def load_patch(self, patch_dir: str) -> int:
        idx = set(await asyncio.gather(*[_await(a.load_patch.remote(patch_dir)) for a in self.actors]))
        assert len(idx) == 1, f"actors disagree on the variant index: {idx}"
        return idx.pop()

    async def expert_load_async(self) -> dict[int, list[int]]:
        """Cumulative tokens routed to each logical expert, per MoE layer id, over every actor."""
        loads = await asyncio.gather(*[_await(a.expert_load.remote()) for a in self.actors])
        return {layer: [sum(x) for x in zip(*(load[layer] for load in loads))] for layer in loads[0]} if loads else {}


def _worker_form(experts: tuple[list[int], dict[int, list[int]]]):
    """``Placement.experts_of`` as a worker takes it (``model.moe.ExpertIds``): a plain list when every
    layer holds the same experts."""
    rest, per_layer = experts
    return (rest, per_layer) if per_layer else rest


async def _await(ref):
    return await ref


async def _bounded(ref, timeout_s: float):
    return await asyncio.wait_for(_await(ref), timeout=timeout_s)
