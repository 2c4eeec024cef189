"""Continuous-batching engine over a (possibly expert-parallel) group of model workers.

- ``EngineCore`` (sync, no Ray): the scheduler. It owns the waiting queue, per-worker paged KV block
  accounting and the sequences. Each ``step`` admits waiting requests while a batch slot and cache
  blocks are free (attention is data-parallel: a sequence lives on the worker with the most free
  blocks), gives every running decode one token, spends the rest of the per-worker token budget
  (``max_num_batched_tokens``) on prefill chunks so a long prompt never stalls running streams, runs
  all workers together, and turns sampled tokens into events. When a decode needs a block and none
  is free, the youngest sequence on that worker is preempted (blocks freed, recomputed later):
  requests wait, nothing crashes.
- Executors run one step on the workers: ``LocalExecutor`` (in-process ``ModelRunner``) and
  ``RayExecutor`` (the expert-parallel actor group; all actors step together).
- ``AsyncEngine``: the serving facade (``generate`` async iterator, ``abort``, ``stats``,
  ``check_health``); a background task drives ``EngineCore.step``. Closing the iterator aborts the
  request and frees its cache blocks.
"""

import asyncio
import contextvars
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from expertpool.model.sampling import SamplingParams
from expertpool.platform.worker import StepItem

log = logging.getLogger(__name__)


PLACEHOLDER = -1  # StepItem token: "the token you sampled for this sequence in the previous step"


class EngineOverloaded(Exception):
    def __init__(self, msg: str, retry_after_s: float = 1.0):
        super().__init__(msg)
        self.retry_after_s = retry_after_s


class RequestTooLong(ValueError):
    pass


@dataclass
class TokenEvent:
    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class Sequence:
    seq_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.monotonic)
    output: list[int] = field(default_factory=list)
    worker: int = -1
    blocks: list[int] = field(default_factory=list)
    num_cached: int = 0        # tokens written to the KV cache, counting steps still in flight
    pending: int = 0           # sampled tokens in flight (their step is submitted, not yet applied)
    finish_reason: str | None = None
    aborted: bool = False
    variant: int = 0

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


class BlockAllocator:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free = list(range(num_blocks - 1, -1, -1))

    def allocate(self, n: int) -> list[int]:
        assert n <= len(self.free)
        return [self.free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


class EngineCore:
    def __init__(self, executor, *, num_blocks: int, block_size: int, max_batch_size: int, max_seq_len: int,
                 max_num_batched_tokens: int, eos_token_id: int | None, max_queued: int = 1 << 30,
                 vocab_size: int | None = None):
        self.executor = executor
        self.world = executor.world
        self.block_size, self.max_seq_len = block_size, max_seq_len
        self.max_batch_size = max_batch_size
        self.per_worker_batch = -(-max_batch_size // self.world)
        self.token_budget = max(max_num_batched_tokens, self.per_worker_batch + block_size)
        self.eos = eos_token_id
        self.vocab_size = vocab_size
        self.max_queued = max_queued
        if num_blocks * block_size < max_seq_len:
            raise ValueError(f"KV cache of {num_blocks} blocks x {block_size} tokens cannot hold one sequence of "
                             f"max_seq_len={max_seq_len}; raise serving.kv_cache or lower max_seq_len")
        self.allocators = [BlockAllocator(num_blocks) for _ in range(self.world)]
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.steps = 0
        self.aborted = 0
        self.preempted = 0
        self.max_batch_seen = 0
        self.finished_ids: list[tuple[int, str]] = []

    # ---- requests
    def add_request(self, seq_id: str, prompt: list[int], params: SamplingParams, variant: int = 0) -> Sequence:
        if seq_id in self.seqs:
            raise ValueError(f"duplicate request id {seq_id}")
        if not prompt:
            raise RequestTooLong("the prompt is empty")
        if len(prompt) >= self.max_seq_len:
            raise RequestTooLong(f"the prompt has {len(prompt)} tokens; the maximum sequence length is "
                                 f"{self.max_seq_len}, leaving room for at least one new token")
        if self.vocab_size is not None:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:  # caught here: inside a worker step it would fail the whole batch
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if len(self.waiting) >= self.max_queued:
            raise EngineOverloaded(f"{len(self.waiting)} requests are already waiting; retry later")
        seq = Sequence(seq_id, list(prompt), params, variant=variant)
        self.seqs[seq_id] = seq
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: str) -> None:
        seq = self.seqs.get(seq_id)
        if seq is not None and seq.finish_reason is None:
            seq.aborted = True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- blocks
    def _blocks_needed(self, seq: Sequence, upto: int) -> int:
        return max(0, -(-upto // self.block_size) - len(seq.blocks))

    def _free_seq(self, seq: Sequence) -> None:
        if seq.worker >= 0:
            self.allocators[seq.worker].release(seq.blocks)
            self.finished_ids.append((seq.worker, seq.seq_id))
        seq.blocks, seq.num_cached = [], 0

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._free_seq(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:  # preempted while its last token was in flight
            self.waiting.remove(seq)
        self.seqs.pop(seq.seq_id, None)

    def kv_blocks_used(self) -> int:
        return sum(a.num_blocks - len(a.free) for a in self.allocators)

    def kv_blocks_total(self) -> int:
        return sum(a.num_blocks for a in self.allocators)

    # ---- scheduling
    def _drop_aborted(self, events: dict) -> None:
        for seq in [s for s in itertools.chain(self.running, self.waiting) if s.aborted]:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._finish(seq, "abort")
            self.aborted += 1
            events[seq.seq_id] = TokenEvent([], "abort", len(seq.prompt), len(seq.output))

    def _preempt(self, seq: Sequence) -> None:
        log.info("KV cache full on worker %d: preempting %s (%d tokens) for recompute", seq.worker, seq.seq_id,
                 len(seq.tokens))
        self.preempted += 1
        self._free_seq(seq)
        seq.worker = -1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _make_room(self, seq: Sequence, need: int) -> bool:
        """Free blocks on seq's worker by preempting sequences younger than seq (not yet planned this
        step, since planning goes oldest first); if none is younger, seq itself waits."""
        alloc = self.allocators[seq.worker]
        while need > len(alloc.free):
            younger = [s for s in self.running if s.worker == seq.worker and s.arrival > seq.arrival]
            if not younger:
                self._preempt(seq)
                return False
            self._preempt(max(younger, key=lambda s: s.arrival))
        return True

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.pending:  # preempted with a token in flight: re-admit once its tokens are all known
                return
            per_worker = [sum(1 for s in self.running if s.worker == w) for w in range(self.world)]
            cands = [w for w in range(self.world) if per_worker[w] < self.per_worker_batch]
            need = self._blocks_needed(seq, min(len(seq.tokens) + 1, self.max_seq_len))
            # blocks still owed to admitted sequences whose prompt is not fully cached yet
            owed = [sum(self._blocks_needed(s, min(len(s.tokens) + 1, self.max_seq_len))
                        for s in self.running if s.worker == w) for w in range(self.world)]
            room = [len(self.allocators[w].free) - owed[w] for w in range(self.world)]
            cands = [w for w in cands if room[w] >= need]
            if not cands:
                return
            w = max(cands, key=lambda w: (room[w], -per_worker[w]))
            self.waiting.popleft()
            seq.worker = w
            self.running.append(seq)

    def schedule(self) -> list[list[tuple[Sequence, StepItem]]]:
        self._admit()
        plans: list[list[tuple[Sequence, StepItem]]] = [[] for _ in range(self.world)]
        budget = [self.token_budget] * self.world
        # decodes first: one token each, growing the block table when a block fills
        # (with a step in flight, a sequence's newest token is not known yet: the item carries
        # PLACEHOLDER and the worker feeds it the token it sampled for that sequence last step)
        for seq in sorted(self.running, key=lambda s: s.arrival):
            n_known = len(seq.tokens) + seq.pending
            if seq.worker < 0 or seq.num_cached != n_known - 1:
                continue
            if len(seq.output) + seq.pending >= seq.params.max_tokens or n_known >= self.max_seq_len:
                continue  # the in-flight token ends it ("length"): nothing more to compute
            need = self._blocks_needed(seq, seq.num_cached + 1)
            if not self._make_room(seq, need):
                continue
            seq.blocks += self.allocators[seq.worker].allocate(need)
            tok = PLACEHOLDER if seq.pending else seq.tokens[-1]
            plans[seq.worker].append((seq, StepItem(seq.seq_id, [tok], seq.num_cached,
                                                    list(seq.blocks), True, seq.params, seq.variant)))
            seq.num_cached += 1
            seq.pending += 1
            budget[seq.worker] -= 1
        # prefill chunks with the remaining per-worker budget
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.worker < 0 or seq.num_cached >= len(seq.tokens) - 1:
                continue
            w = seq.worker
            chunk = min(len(seq.tokens) - seq.num_cached, budget[w])
            if chunk <= 0:
                continue
            alloc = self.allocators[w]
            need = self._blocks_needed(seq, seq.num_cached + chunk)
            if need > len(alloc.free):
                chunk = min(chunk, len(seq.blocks) * self.block_size + len(alloc.free) * self.block_size
                            - seq.num_cached)
                need = self._blocks_needed(seq, seq.num_cached + chunk)
                if chunk <= 0:
                    continue
            seq.blocks += alloc.allocate(need)
            done = seq.num_cached + chunk == len(seq.tokens)
            plans[w].append((seq, StepItem(seq.seq_id, seq.tokens[seq.num_cached:seq.num_cached + chunk],
                                           seq.num_cached, list(seq.blocks), done, seq.params, seq.variant)))
            seq.num_cached += chunk
            seq.pending += int(done)
            budget[w] -= chunk
        return plans

    def process(self, plans, results) -> dict[str, TokenEvent]:
        events: dict[str, TokenEvent] = {}
        for plan, res in zip(plans, results):
            for (seq, item), tok in zip(plan, res):
                if tok is None:
                    continue
                seq.pending -= 1
                if seq.aborted or seq.finish_reason is not None:
                    continue  # computed ahead for a sequence that has ended since: dropped
                seq.output.append(tok)
                reason = None
                p = seq.params
                if not p.ignore_eos and tok == self.eos:
                    reason = "stop"
                elif tok in p.stop_token_ids:
                    reason = "stop"
                elif len(seq.output) >= p.max_tokens or len(seq.tokens) >= self.max_seq_len:
                    reason = "length"
                events[seq.seq_id] = TokenEvent([tok], reason, len(seq.prompt), len(seq.output))
                if reason:
                    self._finish(seq, reason)
        return events

    def pop_finished(self) -> list[tuple[int, str]]:
        out, self.finished_ids = self.finished_ids, []
        return out

    def begin_step(self, events: dict[str, TokenEvent]):
        """Settle aborts (their final events go into ``events``), free finished sequences on the
        workers, and plan the next step: per worker, the StepItems to run (all empty = nothing to do)."""
        self._drop_aborted(events)
        self.executor.release(self.pop_finished())
        plans = self.schedule()
        return plans, [[it for _, it in p] for p in plans]

    def end_step(self, plans, results, events: dict[str, TokenEvent]) -> None:
        """Apply one step's sampled tokens (``results`` per worker) and release what finished."""
        self.steps += 1
        self.max_batch_seen = max(self.max_batch_seen, sum(len(p) for p in plans))
        events.update(self.process(plans, results))
        self.executor.release(self.pop_finished())

    def step(self) -> dict[str, TokenEvent]:
        """Synchronous step (in-process generation)."""
        events: dict[str, TokenEvent] = {}
        plans, items = self.begin_step(events)
        if any(items):
            self.end_step(plans, self.executor.run(items), events)
        return events

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting),
                "kv_blocks_used": self.kv_blocks_used(), "kv_blocks_total": self.kv_blocks_total(),
                "kv_usage": self.kv_blocks_used() / max(1, self.kv_blocks_total()),
                "steps": self.steps, "max_batch_seen": self.max_batch_seen, "aborted": self.aborted,
                "preempted": self.preempted}


class LocalExecutor:
    """One in-process ModelRunner (no expert parallelism). The sync methods call the runner on the
    caller's thread (torch runs ~1.5x slower on a secondary thread here, measured); the async ones
    go through one worker thread, in submission order, as actor tasks do, so pipelined steps,
    releases and patch loads never overlap. Use one mode per executor."""

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

    def expert_load(self) -> list[int]:
        return self.runner.expert_load()

    async def run_async(self, items_per_worker):
        self._async = True
        return [await asyncio.wrap_future(self._thread.submit(self.runner.step, items_per_worker[0]))]

    async def check_health(self):
        return None

    async def load_patch(self, patch_dir: str) -> int:
        return await asyncio.wrap_future(self._thread.submit(self.runner.load_patch, patch_dir, self.model_dir))

    async def expert_load_async(self):
        return await asyncio.wrap_future(self._thread.submit(self.runner.expert_load))


class RayExecutor:
    """The replica's expert-parallel actor group; every actor steps together (MoE layers are collectives)."""

    def __init__(self, actors):
        self.actors = actors
        self.world = len(actors)

    def run(self, items_per_worker):
        import ray
        return ray.get([a.step.remote(items) for a, items in zip(self.actors, items_per_worker)])

    async def run_async(self, items_per_worker):
        return await asyncio.gather(*[a.step.remote(items) for a, items in zip(self.actors, items_per_worker)])

    def release(self, finished):
        by_worker: dict[int, list[str]] = {}
        for w, s in finished:
            by_worker.setdefault(w, []).append(s)
        for w, ids in by_worker.items():
            self.actors[w].release.remote(ids)

    async def check_health(self):
        await asyncio.wait_for(asyncio.gather(*[a.ping.remote() for a in self.actors]), timeout=30)

    async def load_patch(self, patch_dir: str) -> int:
        idx = set(await asyncio.gather(*[a.load_patch.remote(patch_dir) for a in self.actors]))
        assert len(idx) == 1, f"actors disagree on the variant index: {idx}"
        return idx.pop()

    async def expert_load_async(self) -> list[int]:
        loads = await asyncio.gather(*[a.expert_load.remote() for a in self.actors])
        return [sum(x) for x in zip(*loads)] if loads else []


class AsyncEngine:
    """Serving facade over EngineCore; one background task drives the steps."""

    def __init__(self, core: EngineCore, model_id: str, max_seq_len: int, model_dir: str | None = None,
                 async_scheduling: bool = False):
        self.core = core
        self.depth = 2 if async_scheduling else 1  # steps in flight at once
        self.model_dir = model_dir
        self.max_seq_len = max_seq_len
        self.base_model_id = model_id
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self._expert_tokens: list[int] = []
        self._failed: BaseException | None = None
        self._variants: dict[str, int] = {}
        self._step_lock = asyncio.Lock()

    def model_ids(self) -> list[str]:
        return [self.base_model_id] + list(self._variants)

    async def load_patch(self, domain: str, patch_dir: str) -> str:
        """Serve an ESFT expert patch as ``BASE:DOMAIN`` beside the base, without a restart. The swap
        happens between engine steps; running requests (base or other variants) are unaffected."""
        from expertpool.model.patch import read_patch
        model_id = f"{self.base_model_id}:{domain}"
        if model_id in self._variants:
            return model_id
        read_patch(patch_dir, base_model_dir=self.model_dir)  # validate (clear error) before touching actors
        async with self._step_lock:
            self._variants[model_id] = await self.core.executor.load_patch(patch_dir)
        log.info("serving %s from %s (variant %d)", model_id, patch_dir, self._variants[model_id])
        return model_id

    def _variant_of(self, model: str | None) -> int:
        if model is None or model == self.base_model_id:
            return 0
        if model not in self._variants:
            raise KeyError(f"model {model!r} is not served here; available: {self.model_ids()}")
        return self._variants[model]

    def _ensure_loop(self):
        # Fresh contextvars: a task created while handling a request would otherwise inherit Ray's
        # per-request task context, and Ray's recursive cancellation on client disconnect would then
        # cancel the actor steps this loop submits later, leaving the group's collectives half-run.
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = loop.create_task(self._refresh_loop(), context=contextvars.Context())

    async def _refresh_loop(self):
        """Per-expert token counts for observability, pulled from the workers about once a second."""
        while self._failed is None:
            try:
                await self.refresh_expert_tokens()
            except Exception as e:  # a slow or dead worker shows up in check_health; keep metrics going
                log.warning("could not refresh expert token counts: %r", e)
            await asyncio.sleep(1.0)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       model: str | None = None):
        if self._failed is not None:
            raise RuntimeError(f"engine failed: {self._failed!r}")
        variant = self._variant_of(model)
        self._ensure_loop()
        self.core.add_request(request_id, prompt_token_ids, params, variant)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        self._wake.set()
        finished = False
        try:
            while True:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    raise RuntimeError(f"engine step failed: {ev!r}") from ev
                finished = ev.finish_reason is not None
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self.core.abort(request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    async def _run(self):
        """The step loop. With ``async_scheduling`` it is pipelined two deep: step k+1 is planned and
        submitted while step k runs, so the workers never wait for this replica (result transfer,
        scheduling, detokenizing and streaming all overlap the next step's compute). A decode in
        step k+1 whose token comes out of step k carries ``PLACEHOLDER``; the worker fills it in.
        When step k ends a sequence (EOS, stop id), its decode in step k+1 was computed ahead for
        nothing and is dropped. Without it (depth 1) each step's tokens are streamed before the next
        step is planned: the replica and the workers take turns."""
        core = self.core
        inflight: deque = deque()  # (plans, future of per-worker results), oldest first
        while True:
            events: dict[str, TokenEvent] = {}
            try:
                if not inflight and not core.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                async with self._step_lock:  # a patch load runs between submissions
                    plans, items = core.begin_step(events)
                    submitted = any(items)
                    if submitted:
                        inflight.append((plans, asyncio.ensure_future(core.executor.run_async(items))))
                if inflight and (len(inflight) >= self.depth or not submitted):
                    done_plans, fut = inflight.popleft()
                    core.end_step(done_plans, await fut, events)
                elif not submitted and not events:  # requests wait for blocks: let finishing streams free some
                    await asyncio.sleep(0.005)
            except Exception as e:  # a dead worker: fail every in-flight request, loudly
                log.exception("engine step failed")
                self._failed = e
                for _, fut in inflight:
                    fut.cancel()
                for q in self._queues.values():
                    q.put_nowait(e)
                return
            for rid, ev in events.items():
                q = self._queues.get(rid)
                if q is not None:
                    q.put_nowait(ev)
            await asyncio.sleep(0)

    def stats(self) -> dict:
        s = self.core.stats()
        s["expert_tokens"] = list(self._expert_tokens)
        return s

    async def refresh_expert_tokens(self) -> list[int]:
        self._expert_tokens = await self.core.executor.expert_load_async()
        return self._expert_tokens

    async def check_health(self) -> None:
        if self._failed is not None:
            raise RuntimeError(f"engine failed: {self._failed!r}")
        await self.core.executor.check_health()


def local_engine(model, *, max_batch_size: int = 16, max_seq_len: int = 512, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 256,
                 eos_token_id: int | None = None) -> EngineCore:
    """An in-process engine over one model (all experts local): ``expertpool generate`` and tests."""
    from expertpool.platform.worker import ModelRunner
    if num_blocks is None:
        num_blocks = max_batch_size * (-(-max_seq_len // block_size))
    runner = ModelRunner(model, num_blocks, block_size)
    eos = model.args.eos_token_id if eos_token_id is None else eos_token_id
    return EngineCore(LocalExecutor(runner), num_blocks=num_blocks, block_size=block_size,
                      max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                      max_num_batched_tokens=max_num_batched_tokens, eos_token_id=eos,
                      vocab_size=model.args.vocab_size)


def generate(core: EngineCore, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             on_token=None) -> list[list[int]]:
    """Run prompts to completion with continuous batching; ``on_token(i, token_id)`` streams tokens."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    index = {sid: i for i, sid in enumerate(ids)}
    outs: list[list[int]] = [[] for _ in prompts]
    for sid, p, sp in zip(ids, prompts, plist):
        core.add_request(sid, p, sp)
    while core.has_work():
        for sid, ev in core.step().items():
            i = index[sid]
            outs[i] += ev.token_ids
            if on_token is not None:
                for t in ev.token_ids:
                    on_token(i, t)
    return outs


def build_engine(cfg) -> AsyncEngine:
    """The engine of one Serve replica: create its expert-parallel actor group and wire the scheduler.

    Actors go into the replica's placement group (bundle ``rank + 1``; bundle 0 holds the replica)
    when there is one, so a replica and its group are scheduled as a unit (gang). Rank 0 offers the
    torch.distributed rendezvous address; all ranks then join and load their expert shards at once.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from expertpool.model.args import ModelArgs
    from expertpool.model.attention import PagedLatentCache
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.worker import DTYPES, ExpertWorker

    t0 = time.time()
    model_dir = str(cfg.model.path or ensure_embedded_model())
    args = ModelArgs.from_dir(model_dir)
    world = cfg.pool.actors_per_replica
    cfg.validate_against_model(args.n_routed_experts, max_position_embeddings=args.max_position_embeddings)
    s = cfg.serving
    bytes_per_token = PagedLatentCache.bytes_per_token(args, args.num_hidden_layers, DTYPES[cfg.model.dtype])
    total_blocks = s.num_kv_blocks(bytes_per_token)
    blocks_per_worker = max(-(-total_blocks // world), -(-s.max_seq_len // s.kv_cache.block_size))
    pg = ray.util.get_current_placement_group()
    res = cfg.pool.actor_resources
    actor_cls = ray.remote(ExpertWorker)
    actors = []
    for rank in range(world):
        opts = dict(res.ray_options())
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=cfg.pool.actor_bundle_index(rank))
        actors.append(actor_cls.options(**opts).remote(rank, world))
    addr, port = ray.get(actors[0].rendezvous_address.remote())
    threads = max(1, int(res.cpu)) if res.cpu >= 1 else 1
    ray.get([a.setup.remote(model_dir, addr, port, cfg.model.dtype, cfg.model.weight_dtype, blocks_per_worker,
                            s.kv_cache.block_size, cfg.pool.backend, threads) for a in actors])
    tok = Tokenizer.from_dir(cfg.model.tokenizer or model_dir)
    core = EngineCore(RayExecutor(actors), num_blocks=blocks_per_worker, block_size=s.kv_cache.block_size,
                      max_batch_size=s.max_batch_size, max_seq_len=s.max_seq_len,
                      max_num_batched_tokens=s.max_num_batched_tokens,
                      eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else args.eos_token_id,
                      max_queued=s.max_queued_requests if s.max_queued_requests > 0 else 1 << 30,
                      vocab_size=args.vocab_size)
    log.info("engine ready: %s, %d expert actors x %d experts, %d KV blocks of %d tokens per actor, in %.1fs",
             model_dir, world, args.n_routed_experts // world, blocks_per_worker, s.kv_cache.block_size,
             time.time() - t0)
    return AsyncEngine(core, cfg.model.name, s.max_seq_len, model_dir, async_scheduling=s.async_scheduling)
