"""The serving engine: a declared ``Engine`` interface, ``AsyncEngine`` over the scheduler, ``build_engine``.

- ``Engine`` (a Protocol) is what the HTTP layer and the Serve replica use; ``AsyncEngine`` and the
  test fake (``tests/platform/fake_engine.py``) implement it.
- ``AsyncEngine``: ``generate`` is an async iterator of ``TokenEvent``s (closing it aborts the request
  and frees its cache blocks); one background task drives ``scheduler.EngineCore`` step by step.
- Self-healing: when a step fails because an expert actor died (or its group broke), the loop stops
  scheduling, rolls back the steps in flight, finds the dead ranks, and has the executor start
  replacements in the freed placement-group bundles and re-form the process group. Sequences whose
  cache lived on a dead actor are re-prefilled from prompt + generated tokens; the others keep their
  caches (see ``scheduler``). Streams see a pause and then the remaining tokens, never an error or a
  repeated token. Between steps a liveness check pings the actors, so a death while idle is repaired
  before the next request needs the group. A recovery is bounded (``pool.recovery.timeout_s``) and at
  most ``max_attempts`` run back to back without a successful step in between; past either bound,
  or on a second failure during a recovery, every open request ends with ``EngineUnavailable`` (HTTP
  503 with Retry-After) and the health check fails, so Serve replaces the replica.
- Elastic expert parallelism (degraded mode, ``resize``, EPLB ``rebalance``, width autoscaling) is
  decided and carried out by ``elastic.ElasticGroup``, which the engine calls at named points; the
  engine keeps the width-autoscaling loop, which reads its step times and idle time.
- ``build_engine(cfg)`` starts the replica's actor group; ``local_engine`` and ``generate`` run the
  same scheduler in process (``expertpool generate``, tests).
"""

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ray.exceptions import RayError

from expertpool.model.sampling import SamplingParams
from expertpool.platform.elastic import ElasticGroup, ElasticPolicy, first_line, width_decision
from expertpool.platform.executor import LocalExecutor, StepFailed
from expertpool.platform.placement import summed
from expertpool.platform.scheduler import EngineCore, EngineUnavailable, TokenEvent
from expertpool.platform.step_trace import StepTrace
from expertpool.platform.worker import ModelRunner

log = logging.getLogger(__name__)


@runtime_checkable
class Engine(Protocol):
    """What the OpenAI layer (``api.OpenAIServer``) and the Serve replica need from an engine.
    ``generate`` yields the events of all ``params.n`` completions (``TokenEvent.index``) and ends
    when each has had its final event."""

    max_seq_len: int

    def model_ids(self) -> list[str]: ...

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 model: str | None = None) -> AsyncIterator[TokenEvent]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> dict: ...

    async def check_health(self) -> None: ...

    async def load_patch(self, domain: str, patch_dir: str) -> str: ...


@dataclass(frozen=True)
class RecoveryPolicy:
    enabled: bool = True
    timeout_s: float = 300.0          # one recovery: replacements started, loaded, group re-formed
    liveness_check_s: float = 5.0     # idle ping period
    max_attempts: int = 3             # recoveries in a row without a successful step


class _WorkersLost(Exception):
    def __init__(self, dead: set[int]):
        super().__init__(f"expert actors {sorted(dead)} are gone")
        self.dead = dead


class AsyncEngine:
    """Serving facade over EngineCore; one background task drives the steps."""

    def __init__(self, core: EngineCore, model_id: str, max_seq_len: int, model_dir: str | None = None,
                 async_scheduling: bool = False, recovery: RecoveryPolicy = RecoveryPolicy(),
                 elastic: ElasticPolicy | None = None, scheduler_steps: int = 1):
        self.core = core
        self.depth = 2 if async_scheduling else 1  # steps in flight at once
        self.scheduler_steps = scheduler_steps     # steps planned and submitted together (multi-step)
        self.model_dir = model_dir
        self.max_seq_len = max_seq_len
        self.base_model_id = model_id
        self.recovery = recovery
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._refresh_task: asyncio.Task | None = None
        self._expert_tokens: list[int] = []
        self._failed: BaseException | None = None
        self._variants: dict[str, int] = {}
        self._patch_dirs: list[str] = []    # in load order: a replacement actor replays them
        self._step_lock = asyncio.Lock()
        self._recovering = False
        self._attempts = 0                  # recoveries since the last successful step
        self.actor_failures = 0
        self.recoveries = 0
        self.recovery_seconds: list[float] = []
        self.elastic = elastic
        self._ops: deque = deque()          # (coroutine function, future): run between steps, nothing in flight
        self.steps = 0                      # completed engine steps
        # layout changes (degraded mode, resize, EPLB): the engine calls it, it runs them
        self.elastic_group = ElasticGroup(core, elastic, self._patch_dirs, self.between_steps, lambda: self.steps)
        self._autoscale_task: asyncio.Task | None = None
        self.step_seconds = 0.0             # summed duration of completed steps (width autoscaling)
        self.last_request = time.monotonic()
        self.width_changes = 0
        self.trace = StepTrace.from_env()   # EXPERTPOOL_STEP_TRACE (platform/step_trace.py), else None

    def model_ids(self) -> list[str]:
        return [self.base_model_id] + list(self._variants)

    async def load_patch(self, domain: str, patch_dir: str) -> str:
        """Serve an ESFT expert patch as ``BASE:DOMAIN`` beside the base, without a restart. The swap
        happens between engine steps; running requests (base or other variants) are unaffected.

        An MTP patch (kind ``mtp``) instead overwrites the MTP module of the base in place on every
        actor (the speculative drafts of every request use it from the next step on; the main model is
        untouched) and returns the base's id. Like expert patches it is replayed, in load order, on a
        replacement actor after a recovery, so the last one loaded wins everywhere."""
        from expertpool.model.patch import read_patch
        model_id = f"{self.base_model_id}:{domain}"
        if model_id in self._variants:
            return model_id
        patch = read_patch(patch_dir, base_model_dir=self.model_dir)  # validate (clear error) before the actors
        if patch.kind == "mtp":
            if not getattr(self.core, "spec_tokens", 0):
                raise ValueError(f"{patch_dir} is an MTP patch (the speculative-decoding draft module), but this "
                                 "engine does not decode speculatively; set serving.speculative "
                                 "{method: mtp, num_speculative_tokens: 1} or do not load it")
            async with self._step_lock:
                await self.core.executor.load_patch(patch_dir)
                self._patch_dirs.append(patch_dir)
            log.info("MTP module of %s replaced in place from %s", self.base_model_id, patch_dir)
            return self.base_model_id
        async with self._step_lock:
            self._variants[model_id] = await self.core.executor.load_patch(patch_dir)
            self._patch_dirs.append(patch_dir)
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
        if self._failed is None and (self._task is None or self._task.done()):
            self._task = loop.create_task(self._run(), context=contextvars.Context())
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = loop.create_task(self._refresh_loop(), context=contextvars.Context())
        if self.elastic is not None and self.elastic.autoscale and (self._autoscale_task is None
                                                                    or self._autoscale_task.done()):
            self._autoscale_task = loop.create_task(self._autoscale_loop(), context=contextvars.Context())

    async def _refresh_loop(self):
        """Per-expert token counts for observability, pulled from the workers about once a second."""
        while self._failed is None:
            if not self._recovering:
                try:
                    await self.refresh_expert_tokens()
                except Exception as e:  # a dead worker is the step loop's to handle; keep metrics going
                    log.warning("could not refresh expert token counts: %r", e)
            await asyncio.sleep(1.0)

    def _unavailable(self) -> EngineUnavailable:
        f = self._failed
        return f if isinstance(f, EngineUnavailable) else EngineUnavailable(f"engine failed: {f!r}")

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       model: str | None = None):
        if self._failed is not None:
            raise self._unavailable()
        variant = self._variant_of(model)
        self._ensure_loop()
        self.last_request = time.monotonic()
        self.core.add_request(request_id, prompt_token_ids, params, variant)
        ids = self.core.completion_ids(request_id, params.n)
        q: asyncio.Queue = asyncio.Queue()
        for sid in ids:  # n > 1: one queue for the request's n sequences; events carry their index
            self._queues[sid] = q
        self._wake.set()
        running = set(range(params.n))
        try:
            while running:
                ev = await q.get()
                if isinstance(ev, BaseException):
                    raise ev
                if ev.finish_reason is not None:
                    running.discard(ev.index)
                yield ev
        finally:
            for sid in ids:
                self._queues.pop(sid, None)
            if running:
                for i in running:
                    self.core.abort(ids[i])
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    async def between_steps(self, fn):
        """Run ``await fn()`` in the step loop at a step boundary with nothing in flight (a layout
        change); returns its result."""
        fut = asyncio.get_running_loop().create_future()
        self._ops.append((fn, fut))
        self._ensure_loop()
        self._wake.set()
        return await fut

    async def _idle(self) -> None:
        """Wait for work; every ``liveness_check_s`` without any, ping the group."""
        if self._ops:
            return
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.recovery.liveness_check_s)
        except asyncio.TimeoutError:
            dead = await self.core.executor.find_dead()
            if dead:
                raise _WorkersLost(dead) from None

    async def _run(self):
        """The step loop. With ``async_scheduling`` it is pipelined two deep: step k+1 is planned and
        submitted while step k runs, so the workers never wait for this replica (result transfer,
        scheduling, detokenizing and streaming all overlap the next step's compute). A decode in
        step k+1 whose token comes out of step k carries ``PLACEHOLDER``; the worker fills it in.
        When step k ends a sequence (EOS, stop id), its decode in step k+1 was computed ahead for
        nothing and is dropped. Without it (depth 1) the replica and the workers take turns: step k's
        result is applied and step k+1 planned from it, but step k+1 is submitted before step k's
        tokens go to their streams (``held``), so the streams' work (detokenizing, SSE framing, the
        writes) runs while the workers compute, not in the gap between steps. A stream that a stop
        string ends has one more token computed (the step already submitted), which it drops. With
        ``scheduler_steps`` > 1 a turn is a chain of steps planned and submitted together
        (``_submit_chain``), streamed step by step."""
        core = self.core
        inflight: deque = deque()  # (plans, future of per-worker results), oldest first
        held: dict[str, TokenEvent] = {}  # the last step's events, streamed once the next step is submitted
        while True:
            events: dict[str, TokenEvent] = {}
            try:
                if held and (self._ops or not core.has_work()):  # no next step to submit first
                    self._emit(held)
                    held = {}
                if self._ops and not inflight:  # a layout change: at a step boundary, nothing in flight
                    fn, fut = self._ops.popleft()
                    try:
                        fut.set_result(await fn())
                    except (StepFailed, RayError) as e:  # the group broke while changing: recover it
                        fut.set_exception(e)
                        raise
                    except Exception as e:
                        fut.set_exception(e)
                    continue
                if not inflight and not core.has_work():
                    if self.trace is not None:
                        self.trace.flush()  # complete whenever the engine is idle
                    await self._idle()
                    continue
                async with self._step_lock:  # a patch load runs between submissions
                    if self._ops:  # drain what is in flight first
                        submitted = False
                    elif self.scheduler_steps > 1:
                        submitted = not inflight and self._submit_chain(events, inflight)
                    else:
                        t_plan = time.monotonic()
                        plans, items = core.begin_step(events)
                        submitted = any(items)
                        if submitted:
                            inflight.append((plans, asyncio.ensure_future(core.executor.run_async(items))))
                            if self.trace is not None:
                                self.trace.submitted(t_plan, time.monotonic(), items)
                if held:  # the next step is on its way: stream the last one's tokens while it runs
                    self._emit(held)
                    held = {}
                if inflight and (len(inflight) >= self.depth or not submitted):
                    done_plans, fut = inflight[0]
                    t_step = time.monotonic()
                    results = await fut
                    t_done = time.monotonic()
                    if self.trace is not None:
                        self.trace.finished(t_step, t_done)
                    self.step_seconds += t_done - t_step
                    inflight.popleft()
                    core.end_step(done_plans, results, events)
                    self._attempts = 0
                    self.steps += 1
                elif not submitted and not events:  # requests wait for blocks: let finishing streams free some
                    await asyncio.sleep(0.005)
            except (StepFailed, RayError, _WorkersLost) as e:
                self._emit(held)
                held = {}
                async with self._step_lock:
                    ok = await self._recover(e, inflight)
                inflight.clear()
                if not ok:
                    self._emit(events)
                    return
            except Exception as e:  # a bug, not a lost worker: fail every request, loudly
                self._emit(held)
                held = {}
                log.exception("engine step failed")
                self._fail(EngineUnavailable(f"engine step failed: {type(e).__name__}: {e}"), inflight)
                return
            if events and self.depth == 1 and self.scheduler_steps == 1 and not inflight and core.has_work():
                held = events  # streamed after the next step's submission, at the top of the next turn
            else:
                self._emit(events)
            await asyncio.sleep(0)

    def _submit_chain(self, events: dict[str, TokenEvent], inflight: deque) -> bool:
        """Multi-step: plan up to ``scheduler_steps`` consecutive steps now (a decode in step j + 1 takes
        its input token from step j on the worker: ``PLACEHOLDER``; a sequence predicted to reach
        max_tokens is not planned past it) and submit them all at once (``executor.submit_many``):
        the actors run them back to back. Their results arrive step by step and are streamed as they
        come. A request that arrives meanwhile is admitted when the chain ends; a sequence that ends
        early (EOS, stop id, stop string, abort) has its remaining steps computed and dropped."""
        chain = []
        t_plan = time.monotonic()
        for _ in range(self.scheduler_steps):
            plans, items = self.core.begin_step(events)
            if not any(items):
                break
            chain.append((plans, items))
        if not chain:
            return False
        futs = self.core.executor.submit_many([items for _, items in chain])
        inflight.extend((plans, fut) for (plans, _), fut in zip(chain, futs))
        if self.trace is not None:
            t = time.monotonic()
            for _, items in chain:
                self.trace.submitted(t_plan, t, items)
        return True

    def _emit(self, events: dict[str, TokenEvent]) -> None:
        for rid, ev in events.items():
            q = self._queues.get(rid)
            if q is not None:
                q.put_nowait(ev)

    def _fail(self, err: EngineUnavailable, inflight=()) -> None:
        self._failed = err
        for _, fut in inflight:
            fut.cancel()
        for q in self._queues.values():
            q.put_nowait(err)

    async def _recover(self, err: BaseException, inflight: deque) -> bool:
        """Repair the group after ``err``; False when it could not be (the engine is then failed)."""
        t0 = time.monotonic()
        self._recovering = True
        core, executor = self.core, self.core.executor
        try:
            settled = await asyncio.gather(*[f for _, f in inflight], return_exceptions=True)
            stuck = set().union(*[x.stuck for x in list(settled) + [err] if isinstance(x, StepFailed)])
            core.rollback([p for p, _ in inflight])
            dead = err.dead if isinstance(err, _WorkersLost) else await executor.find_dead(stuck)
            why = first_line(err)
            for r in sorted(dead):
                self.actor_failures += 1
                log.warning("expert actor rank %d (experts %s) failed: %s; recovering", r, executor.experts_of(r), why)
            if not dead:
                log.warning("expert group step failed with every actor alive (%s): re-forming the group", why)
            if not self.recovery.enabled:
                raise RuntimeError("pool.recovery.enabled is false")
            self._attempts += 1
            if self._attempts > self.recovery.max_attempts:
                raise RuntimeError(f"{self.recovery.max_attempts} recoveries in a row without a successful step")
            if dead and self.elastic_group.can_degrade(dead):
                dt = await self.elastic_group.degrade(dead, t0, self.recovery.timeout_s)
                self.recoveries += 1
                self.recovery_seconds.append(dt)
                return True
            lost = core.fail_workers(dead)
            try:
                await asyncio.wait_for(executor.recover(dead, list(self._patch_dirs)), self.recovery.timeout_s)
            except asyncio.TimeoutError:
                raise RuntimeError(f"the group was not restored within pool.recovery.timeout_s="
                                   f"{self.recovery.timeout_s:g} s (a replacement actor could not be scheduled "
                                   "or loaded)") from None
            dt = time.monotonic() - t0
            self.recoveries += 1
            self.recovery_seconds.append(dt)
            log.warning("recovered expert actor rank(s) %s (experts %s) in %.1fs: replaying %d sequences (%d tokens), "
                        "%d kept their caches", sorted(dead), ", ".join(executor.experts_of(r) for r in sorted(dead)),
                        dt, len(lost), sum(len(s.tokens) for s in lost), len(core.running))
            return True
        except Exception as e:
            log.error("recovery of the expert group failed after %.1fs: %s", time.monotonic() - t0, first_line(e))
            self._fail(EngineUnavailable(f"the expert-parallel group failed and could not be recovered ({e}); "
                                         "this replica is being replaced"))
            return False
        finally:
            self._recovering = False

    async def _autoscale_loop(self) -> None:
        """Width autoscaling (``pool.autoscale_width``): every ``interval_s``, ``width_decision`` on the
        interval's mean step time, the KV usage and the time since the last request."""
        el = self.elastic
        steps, busy = self.steps, self.step_seconds
        while self._failed is None:
            await asyncio.sleep(el.interval_s)
            n, t = self.steps - steps, self.step_seconds - busy
            steps, busy = self.steps, self.step_seconds
            width = self.core.executor.world
            idle = 0.0 if self._queues else time.monotonic() - self.last_request
            target = width_decision(width, el, t / n if n else None, self.core.stats()["kv_usage"], idle)
            if target == width or self._recovering or self.elastic_group.busy:
                continue
            log.info("width autoscaling: %d -> %d actors (mean step %s, KV usage %.0f%%, idle %.0fs)", width,
                     target, f"{t / n * 1000:.0f} ms" if n else "-", 100 * self.core.stats()["kv_usage"], idle)
            self.width_changes += 1
            self.elastic_group.start(self.resize(target))
            if target < width:
                self.last_request = time.monotonic()  # narrow one step per idle period

    # ---- elastic expert parallelism (``elastic.ElasticGroup`` runs it)
    async def resize(self, width: int) -> float:
        """Change the group to ``width`` actors while it serves (``expertpool scale``); returns the stall."""
        return await self.elastic_group.resize(width)

    async def rebalance(self, load: list[int] | dict[int, list[int]] | None = None, steps: int | None = None
                        ) -> float | None:
        """EPLB now, for ``load`` (per MoE layer id, or one list for every layer) counted over ``steps``
        engine steps (default: the measured window, per layer); returns the stall, or None when kept."""
        return await self.elastic_group.rebalance(load, steps)

    @property
    def degraded_shrinks(self) -> int:
        return self.elastic_group.degraded_shrinks

    def stats(self) -> dict:
        s = self.core.stats()
        s["expert_tokens"] = list(self._expert_tokens)
        s.update(actor_failures=self.actor_failures, recoveries=self.recoveries,
                 recovery_seconds=list(self.recovery_seconds), recovering=self._recovering,
                 open_streams=len(self._queues), steps=self.steps, width=self.core.executor.world,
                 **self.elastic_group.stats(), width_changes=self.width_changes)
        describe = getattr(self.core.executor, "describe", None)
        if describe is not None:
            s["actors"] = describe()
        return s

    async def refresh_expert_tokens(self) -> list[int]:
        """Pull the cumulative tokens per logical expert from the workers (per MoE layer: EPLB's load
        window); returns their sum over layers (the metrics')."""
        by_layer = await self.core.executor.expert_load_async()
        self._expert_tokens = summed(by_layer)
        await self.elastic_group.track_load(by_layer)
        return self._expert_tokens

    async def check_health(self) -> None:
        """Healthy unless the engine failed: a recovery in progress is bounded and reports itself.
        Actor liveness is the step loop's job (it pings the group when idle)."""
        if self._failed is not None:
            raise self._unavailable()
        self._ensure_loop()

    async def shutdown(self) -> None:
        for t in (self._task, self._refresh_task, self._autoscale_task):
            if t is not None:
                t.cancel()
        if self.trace is not None:
            self.trace.flush()
        self.elastic_group.cancel()
        shutdown = getattr(self.core.executor, "shutdown", None)
        if shutdown is not None:
            shutdown()


def local_engine(model, *, max_batch_size: int = 16, max_seq_len: int = 512, block_size: int = 16,
                 num_blocks: int | None = None, max_num_batched_tokens: int = 256,
                 eos_token_id: int | None = None, tokenizer=None, prefix_caching: bool = True,
                 spec_tokens: int = 0) -> EngineCore:
    """An in-process engine over one model (all experts local): ``expertpool generate`` and tests.
    ``tokenizer`` is needed only for requests with a grammar; ``spec_tokens`` > 0 needs the model's MTP."""
    if num_blocks is None:
        num_blocks = max_batch_size * (-(-max_seq_len // block_size))
    runner = ModelRunner(model, num_blocks, block_size, tokenizer=tokenizer, spec_tokens=spec_tokens)
    eos = model.args.eos_token_id if eos_token_id is None else eos_token_id
    return EngineCore(LocalExecutor(runner), num_blocks=num_blocks, block_size=block_size,
                      max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                      max_num_batched_tokens=max_num_batched_tokens, eos_token_id=eos,
                      vocab_size=model.args.vocab_size, prefix_caching=prefix_caching, spec_tokens=spec_tokens)


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


def kv_blocks_per_worker(cfg, args, infos: list[dict]) -> int:
    """KV-cache blocks per worker, once the workers have loaded (their infos say the compute dtype they
    resolved and, on GPUs, the memory free after the load): ``kv_cache.num_blocks`` or ``memory_gb``
    per replica when set; else on GPUs ``gpu_memory_utilization`` of the free memory less the memory
    plan's headroom (the least over the workers); else, on CPUs, room for ``max_batch_size`` sequences
    of ``max_seq_len``. At least one ``max_seq_len`` sequence per worker."""
    from expertpool.platform import actor_memory as memory_plan

    s, kv = cfg.serving, cfg.serving.kv_cache
    world = len(infos)
    dtypes = {i["dtype"] for i in infos}
    assert len(dtypes) == 1, f"the workers resolved different compute dtypes {dtypes}: set model.dtype explicitly"
    dtype = dtypes.pop()
    per_block = cfg.kv_bytes_per_token(args, dtype) * kv.block_size  # with the MTP layer's own cache when speculative
    one_sequence = -(-s.max_seq_len // kv.block_size)
    free = [i.get("free_bytes") for i in infos]
    if kv.num_blocks is None and kv.memory_gb is None and all(f is not None for f in free):
        plan = memory_plan.plan(args, world, **cfg.plan_inputs(dtype))
        blocks = min(memory_plan.kv_budget(f, kv.gpu_memory_utilization, plan) // per_block for f in free)
        if blocks < one_sequence:
            raise RuntimeError(f"after loading, the KV cache gets {blocks} blocks of {kv.block_size} tokens per actor, "
                               f"fewer than one sequence of serving.max_seq_len ({s.max_seq_len}); lower max_seq_len, "
                               "raise serving.kv_cache.gpu_memory_utilization or use more actors")
        log.info("KV cache: %d blocks (%d tokens, %.1f GiB) per actor = %.0f%% of the %.1f GiB free after loading, "
                 "less %.2f GiB of prefill and communication headroom", blocks, blocks * kv.block_size,
                 blocks * per_block / memory_plan.GIB, 100 * kv.gpu_memory_utilization, min(free) / memory_plan.GIB,
                 plan.headroom / memory_plan.GIB)
        return blocks
    return max(-(-s.num_kv_blocks(per_block // kv.block_size) // world), one_sequence)


def build_engine(cfg, hooks=None) -> AsyncEngine:
    """The engine of one Serve replica: create its expert-parallel actor group and wire the scheduler.

    Actors go into the replica's placement group (bundle ``rank + 1``; bundle 0 holds the replica)
    when there is one, so a replica and its group are scheduled as a unit (gang), and a replacement
    actor takes the bundle its predecessor freed. ``hooks`` (tests only) inject faults into recovery.
    """
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from expertpool.model import storage
    from expertpool.model.args import ModelArgs
    from expertpool.model.embedded import ensure_embedded_model
    from expertpool.model.tokenizer import Tokenizer
    from expertpool.platform.executor import RayExecutor
    from expertpool.platform.worker import WorkerSpec

    t0 = time.time()
    # a checkpoint location: the replica reads its small files, each actor fetches its own shards
    model_dir = str(cfg.model.path or ensure_embedded_model())
    meta_dir = storage.resolve_model(model_dir, weights=False)
    args = ModelArgs.from_dir(meta_dir)
    world = cfg.pool.width
    cfg.validate_against_model(args)
    s = cfg.serving
    spec_tokens = s.speculative.num_speculative_tokens if s.speculative else 0
    pg = ray.util.get_current_placement_group()
    res = cfg.pool.actor_resources
    options = []
    for rank in range(cfg.pool.max_width):  # a bundle for every actor the widest group has; spares wait
        opts = dict(res.ray_options())
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=cfg.pool.actor_bundle_index(rank))
        options.append(opts)
    rec = cfg.pool.recovery
    bs = s.kv_cache.block_size
    spec = WorkerSpec(model_dir, cfg.model.dtype, cfg.model.weight_dtype, None, bs, cfg.pool.backend,
                      max(1, int(res.cpu)) if res.cpu >= 1 else 1, rec.collective_timeout_s,
                      tokenizer_dir=cfg.model.tokenizer, spec_tokens=spec_tokens,
                      scratch_blocks=-(-min(s.max_num_batched_tokens, s.max_seq_len) // bs),
                      max_seq_len=s.max_seq_len, max_num_batched_tokens=s.max_num_batched_tokens,
                      max_batch_size=s.max_batch_size, cuda_graphs=s.cuda_graphs, batch_invariant=s.batch_invariant,
                      triton_cache_dir=cfg.pool.triton_cache_dir, shared_memory=cfg.pool.shared_memory)
    from expertpool.platform.placement import Placement, usable_redundant

    pool = cfg.pool
    E = args.n_routed_experts
    placement = Placement.default(E, world, usable_redundant(E, pool.redundant_experts, world))
    executor = RayExecutor(spec, options, hooks=hooks, placement=placement)
    executor.start(size_kv=lambda infos: kv_blocks_per_worker(cfg, args, infos))
    blocks_per_worker = executor.spec.num_blocks
    tok = Tokenizer.from_dir(storage.resolve_model(cfg.model.tokenizer, weights=False) if cfg.model.tokenizer
                             else meta_dir)
    core = EngineCore(executor, num_blocks=blocks_per_worker, block_size=s.kv_cache.block_size,
                      max_batch_size=s.max_batch_size, max_seq_len=s.max_seq_len,
                      max_num_batched_tokens=s.max_num_batched_tokens,
                      eos_token_id=tok.eos_token_id if tok.eos_token_id is not None else args.eos_token_id,
                      max_queued=s.max_queued_requests if s.max_queued_requests > 0 else 1 << 30,
                      vocab_size=args.vocab_size, prefix_caching=s.prefix_caching, spec_tokens=spec_tokens)
    dtype = executor.slots[0].info.get("dtype")
    log.info("engine ready: %s, %d expert actors x %d experts, %s compute, %d KV blocks of %d tokens (%d tokens) per "
             "actor, %s, in %.1fs", model_dir, world, args.n_routed_experts // world, dtype, blocks_per_worker, bs,
             blocks_per_worker * bs, executor.slots[0].info.get("decode", "eager decode"), time.time() - t0)
    policy = RecoveryPolicy(rec.enabled, rec.timeout_s, rec.liveness_check_s, rec.max_attempts)
    elastic = ElasticPolicy(args.n_routed_experts, pool.redundant_experts, pool.min_width, pool.max_width,
                            pool.eplb.enabled, pool.eplb.window_steps, pool.eplb.rebalance_every_steps,
                            pool.eplb.min_gain, pool.eplb.expert_cost,
                            len(args.moe_layers) + (args.num_nextn_predict_layers if spec_tokens else 0),
                            pool.autoscale_width, **pool.width_autoscaling.model_dump())
    # a remote base's router weights are not on the replica: its actors check a patch's base instead
    return AsyncEngine(core, cfg.model.name, s.max_seq_len, None if storage.is_remote(model_dir) else model_dir,
                       async_scheduling=s.async_scheduling, recovery=policy, elastic=elastic,
                       scheduler_steps=s.num_scheduler_steps)
