"""Elastic expert parallelism of one replica: when and how its group changes layout while it serves.

``AsyncEngine`` owns one ``ElasticGroup`` and calls it at named points: ``track_load`` after each
refresh of the per-expert token counts (the EPLB load window; a rebalance is due every
``rebalance_every_steps``), ``can_degrade`` / ``degrade`` when actors die, ``resize`` for
``expertpool scale`` and width autoscaling (``width_decision`` decides, the engine's loop asks),
``rebalance`` for EPLB. Every change goes the same way, ``apply_placement``: the executor prepares
the new layout beside the serving one (new actors start, kept ones load the experts they newly hold,
steps go on), then, at a step boundary with nothing in flight (``between_steps``), the scheduler
moves its sequences and the executor commits. One layout change runs at a time, as a background
task; a failed one is logged and the group keeps its layout.

Degraded mode: when every expert of the dead ranks has a copy on a survivor, the survivors re-form a
smaller group at once and serve on, and replacements start in the background; the group widens back
to the full layout once they are loaded.

Not here: steps, recovery of a group that cannot degrade, streams (``engine``); starting, loading and
re-forming actors (``executor``); the placement algorithms (``placement``).
"""

import asyncio
import contextvars
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from expertpool.platform.placement import LoadModel
from expertpool.platform.scheduler import EngineCore

log = logging.getLogger(__name__)


@dataclass
class ElasticPolicy:
    """Elastic expert parallelism of one replica (``pool`` in cluster.yaml)."""
    n_experts: int = 0
    redundant: int = 0                # pool.redundant_experts
    min_width: int = 1
    max_width: int = 1
    eplb: bool = False                # pool.eplb.enabled
    window_steps: int = 1000
    rebalance_every_steps: int = 3000
    min_gain: float = 0.05
    expert_cost: float | None = None  # pool.eplb.expert_cost; None: the executor's, measured on first use
    moe_layers: int = 1               # MoE layers run per engine step (EPLB's load model)
    autoscale: bool = False           # pool.autoscale_width, thresholds from pool.width_autoscaling
    interval_s: float = 10.0
    step_time_high_s: float = 0.5
    kv_usage_high: float = 0.9
    idle_s: float = 120.0


def width_decision(width: int, policy: ElasticPolicy, mean_step_s: float | None, kv_usage: float,
                   idle_s: float) -> int:
    """Width autoscaling, one decision per interval: one actor more when the last interval's mean
    step time (set by the most loaded actor) or the KV usage is above its threshold, one fewer after
    ``idle_s`` without requests, within [min_width, max_width]; else unchanged."""
    if (mean_step_s is not None and mean_step_s > policy.step_time_high_s) or kv_usage > policy.kv_usage_high:
        return min(width + 1, policy.max_width)
    if idle_s >= policy.idle_s:
        return max(width - 1, policy.min_width)
    return width


def first_line(e: BaseException) -> str:
    """An exception for a log line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


class ElasticGroup:
    """The layout changes of one engine's expert group. ``policy`` None: a fixed group (nothing
    degrades, ``resize`` refuses, no load window). ``patch_dirs`` is the engine's list of loaded
    patches (new actors load them, in order); ``between_steps(fn)`` runs ``fn`` in the engine's step
    loop at a step boundary with nothing in flight; ``steps()`` counts the engine's completed steps."""

    def __init__(self, core: EngineCore, policy: ElasticPolicy | None, patch_dirs: list[str],
                 between_steps: Callable[[Callable[[], Awaitable]], Awaitable], steps: Callable[[], int]):
        self.core = core
        self.policy = policy
        self.patch_dirs = patch_dirs
        self.between_steps = between_steps
        self.steps = steps
        self.degraded_shrinks = 0
        self.rebalances = 0
        self.rebalance_seconds: list[float] = []      # prepare to switch
        self.rebalance_stall_seconds: list[float] = []  # the switch: steps paused
        self.actor_balancedness: float | None = None  # mean / max actor load over the last window
        self._load_snapshots: deque = deque()  # (step, cumulative tokens per expert)
        self._last_rebalance_step = 0
        self._task: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        """A layout change is under way."""
        return self._task is not None and not self._task.done()

    def stats(self) -> dict:
        return dict(degraded_shrinks=self.degraded_shrinks, rebalances=self.rebalances,
                    rebalance_seconds=list(self.rebalance_seconds),
                    rebalance_stall_seconds=list(self.rebalance_stall_seconds),
                    actor_balancedness=self.actor_balancedness)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # ---- degraded mode
    def can_degrade(self, dead: set[int]) -> bool:
        placement = getattr(self.core.executor, "placement", None)
        return (placement is not None and len(dead) < placement.world and placement.covers_without(dead)
                and self.policy is not None)

    async def degrade(self, dead: set[int], t0: float, timeout_s: float) -> float:
        """Degraded mode (see the module docstring): the survivors re-form a smaller group now, and
        replacements start in the background. Returns the seconds since ``t0`` (the failure)."""
        core, executor = self.core, self.core.executor
        survivors = [r for r in range(executor.world) if r not in dead]
        lost = core.resize(survivors)
        old = await asyncio.wait_for(executor.shrink(dead), timeout_s)
        self._load_snapshots.clear()
        dt = time.monotonic() - t0
        self.degraded_shrinks += 1
        log.warning("expert actor rank(s) %s lost; serving on the %d survivors (every expert has a copy there) after "
                    "%.1fs, replaying %d sequences; replacements are starting", sorted(dead), len(survivors), dt,
                    len(lost))
        self.start(self._widen_back(old, survivors))
        return dt

    async def _widen_back(self, old, survivors: list[int]) -> None:
        """Start replacements for a degraded group and switch back to the full layout ``old``."""
        executor = self.core.executor
        world_then = executor.world
        keep = [survivors.index(r) if r in survivors else None for r in range(old.world)]
        await self.apply_placement(old, keep, expect_world=world_then)
        log.info("expert group widened back to %d actors after degraded mode", old.world)

    # ---- layout changes
    def start(self, coro) -> None:
        """Run a layout change in the background, replacing one still under way."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._guard(coro), context=contextvars.Context())

    async def _guard(self, coro) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.error("elastic layout change failed: %s (the group keeps its current layout)", first_line(e))

    async def apply_placement(self, placement, keep: list[int | None], expect_world: int | None = None) -> float:
        """Change the group's layout while it serves: new actors start and kept ones load the experts
        they newly hold (steps go on), then at a step boundary the scheduler moves its sequences
        (those of removed actors are re-prefilled), the actors swap experts and the group re-forms.
        Returns the stall (seconds the steps paused)."""
        executor = self.core.executor
        t0 = time.monotonic()
        new_slots = await executor.prepare(placement, keep, list(self.patch_dirs))

        async def switch() -> float:
            if expect_world is not None and executor.world != expect_world:
                raise RuntimeError("the group changed while the new layout loaded; dropping it")
            t1 = time.monotonic()
            self.core.resize(keep)
            await executor.commit(placement, new_slots)
            self._load_snapshots.clear()  # new actors count from zero
            return time.monotonic() - t1

        stall = await self.between_steps(switch)
        self.rebalance_seconds.append(time.monotonic() - t0)
        self.rebalance_stall_seconds.append(stall)
        return stall

    async def resize(self, width: int) -> float:
        """Grow or shrink every rank's share to ``width`` actors (``expertpool scale``), keeping the
        existing actors (and their caches) as the first ranks. Returns the stall."""
        from expertpool.platform.placement import Placement, usable_redundant

        el = self.policy
        if el is None:
            raise RuntimeError("this engine has no elastic expert-parallel group")
        if not el.min_width <= width <= el.max_width:
            raise ValueError(f"{width} actors is outside pool.actors_per_replica's range [{el.min_width}, "
                             f"{el.max_width}]; widen the range in cluster.yaml and redeploy")
        world = self.core.executor.world
        if width == world:
            return 0.0
        placement = Placement.default(el.n_experts, width, usable_redundant(el.n_experts, el.redundant, width))
        stall = await self.apply_placement(placement, [i if i < world else None for i in range(width)])
        log.info("expert group resized %d -> %d actors (stall %.2fs)", world, width, stall)
        return stall

    # ---- EPLB
    def window_load(self) -> dict[int, list[int]] | None:
        """Tokens per logical expert over the last ``window_steps`` steps (the oldest snapshot within),
        per MoE layer id."""
        if len(self._load_snapshots) < 2:
            return None
        (_, first), (_, last) = self._load_snapshots[0], self._load_snapshots[-1]
        n = self.policy.n_experts
        return {layer: [b - a for a, b in zip(first.get(layer, [0] * n)[:n], counts[:n])]
                for layer, counts in last.items()}

    def window_steps(self) -> int:
        """Engine steps the window's load was counted over."""
        return self._load_snapshots[-1][0] - self._load_snapshots[0][0] if len(self._load_snapshots) > 1 else 0

    async def load_model(self, steps: int, load: list[int] | dict[int, list[int]] | None = None) -> LoadModel:
        """EPLB's load model (``placement.LoadModel``) for ``load`` counted over ``steps`` engine steps:
        a load per MoE layer ran once a step, a load summed over the layers ``moe_layers`` times. Its
        expert cost is ``pool.eplb.expert_cost``, else the executor's (``RayExecutor.expert_cost``:
        measured by actor 0 on the first call; 0 for an executor without one)."""
        el = self.policy
        cost = el.expert_cost
        if cost is None:
            measured = getattr(self.core.executor, "expert_cost", None)
            cost = await measured() if measured is not None else 0.0
        return LoadModel(passes=steps * (1 if isinstance(load, dict) else el.moe_layers), expert_cost=cost)

    async def rebalance(self, load: list[int] | dict[int, list[int]] | None = None, steps: int | None = None
                        ) -> float | None:
        """EPLB: plan a placement for ``load`` (default: the measured window, per MoE layer, which places
        each layer on its own; a list: one layout for every layer), counted over ``steps`` engine steps
        (default: the window's), and apply it when it raises the actor balancedness by ``min_gain``.
        Returns the stall, or None when kept."""
        from expertpool.platform.placement import rebalance

        if load is None:
            load, steps = self.window_load(), self.window_steps()
        executor, el = self.core.executor, self.policy
        total = sum(sum(c) for c in load.values()) if isinstance(load, dict) else sum(load or [])
        if not load or not total or executor.placement is None:
            return None
        model = await self.load_model(steps if steps is not None else 0, load)
        now = executor.placement.balancedness(load, model)
        plan = rebalance(load, executor.world, executor.placement.redundant, model)
        gain = plan.balancedness(load, model) - now
        self._last_rebalance_step = self.steps()
        if gain < el.min_gain:
            log.info("EPLB: keeping the placement (balancedness %.3f, a new one would give %.3f)", now, now + gain)
            return None
        stall = await self.apply_placement(plan, list(range(executor.world)))
        self.rebalances += 1
        log.info("EPLB: new placement, balancedness %.3f -> %.3f over the window, switched in %.3fs", now,
                 now + gain, stall)
        return stall

    async def track_load(self, counts: dict[int, list[int]]) -> None:
        """A new snapshot of the cumulative tokens per expert, per MoE layer id: slide the window,
        update the actor balancedness, start a rebalance when one is due."""
        el = self.policy
        if el is None or not counts:
            return
        steps = self.steps()
        self._load_snapshots.append((steps, {layer: list(c) for layer, c in counts.items()}))
        while len(self._load_snapshots) > 2 and self._load_snapshots[1][0] <= steps - el.window_steps:
            self._load_snapshots.popleft()
        load, placement = self.window_load(), getattr(self.core.executor, "placement", None)
        if load and any(map(sum, load.values())) and placement is not None:
            self.actor_balancedness = placement.balancedness(load, await self.load_model(self.window_steps(), load))
        if el.eplb and steps - self._last_rebalance_step >= el.rebalance_every_steps and not self.busy:
            self._last_rebalance_step = steps
            self.start(self.rebalance())
