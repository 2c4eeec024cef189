"""Fault injection for the recovery tests: engine and hook objects a Serve app is built with
(``engine_factory`` import paths), never reachable from production configs."""

import ray

from expertpool.platform.engine import build_engine


@ray.remote
class Squatter:
    """Holds a placement-group bundle so that a replacement actor cannot be scheduled there."""

    def ready(self) -> bool:
        return True


class TakeTheBundle:
    """``RecoveryHooks``: before a dead rank is replaced, another actor takes its freed bundle."""

    def __init__(self):
        self.squatters = []

    async def before_replace(self, executor, rank: int) -> None:
        squatter = Squatter.options(**executor.slots[rank].options).remote()
        await squatter.ready.remote()
        self.squatters.append(squatter)


def engine_without_room_for_a_replacement(cfg):
    return build_engine(cfg, hooks=TakeTheBundle())
