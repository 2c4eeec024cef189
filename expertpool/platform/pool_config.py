"""The ``pool:`` section of ``cluster.yaml``: one replica's expert-parallel actor group.

Its width (a number, or a range the group changes within while it serves: ``expertpool scale``,
width autoscaling), redundant expert slots and EPLB, the actors' resources and placement-group
bundles, the torch.distributed backend and self-healing. Derived values are methods here
(``placement_group_bundles``, ``placement_problem``, ``resolved_backend``). Import these names from
``expertpool.platform.config``, which re-exports the whole schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, model_validator

from expertpool.platform.config_base import ActorResources, Closed, rule_error


class RecoveryConfig(Closed):
    enabled: bool = Field(True, description="Replace a dead expert actor inside the replica and replay its "
                          "sequences, so streams continue after a pause. false = fail the replica's requests "
                          "and let Serve's health check replace the whole replica.")
    timeout_s: float = Field(300.0, gt=0, description="Most seconds one recovery may take (replacement actor "
                             "scheduled and loaded, process group re-formed). Past it, open requests get HTTP 503 "
                             "with Retry-After and Serve replaces the replica. Size it to the load time of one "
                             "actor's shard.")
    collective_timeout_s: float = Field(60.0, gt=0, description="Most seconds a collective waits for a peer "
                                        "(torch.distributed timeout), so a hung or vanished peer is detected.")
    liveness_check_s: float = Field(5.0, gt=0, description="Seconds between pings of the actors while the "
                                    "engine is idle, so a death is repaired before the next request needs the group.")
    max_attempts: int = Field(3, ge=1, description="Recoveries in a row without a successful step before the "
                              "engine gives up.")


class PoolActorResources(ActorResources):
    gpu_memory_gb: float | None = Field(None, gt=0, description="Memory of each actor's GPU in GiB (e.g. 79.6 for "
                                        "an H100 80GB, 139.8 for an H200). Declared, `expertpool validate` and "
                                        "deploy check the per-actor memory plan against it before anything starts; "
                                        "None = each GPU actor checks against its device's size at start-up.")

    @model_validator(mode="after")
    def _gpu_memory(self) -> PoolActorResources:
        if self.gpu_memory_gb is not None and self.gpu <= 0:
            raise rule_error("gpu_memory_gb", "is set but the actor reserves no GPU (gpu is 0)",
                             "set gpu (e.g. 1) or remove gpu_memory_gb")
        return self


class WidthRange(Closed):
    min: int = Field(ge=1, description="Fewest expert-parallel actors of a replica.")
    max: int = Field(ge=1, description="Most expert-parallel actors of a replica; a placement bundle is reserved for "
                     "each, so the group can widen without a redeploy.")
    initial: int | None = Field(None, ge=1, description="Actors at start. None = min.")

    @model_validator(mode="after")
    def _check(self) -> WidthRange:
        if self.max < self.min:
            raise rule_error("max", f"({self.max}) is below min ({self.min})", f"set max to at least {self.min}")
        if self.initial is None:
            self.initial = self.min
        if not self.min <= self.initial <= self.max:
            raise rule_error("initial", f"({self.initial}) is outside [{self.min}, {self.max}]",
                             "set initial within the range or remove it")
        return self


class EplbConfig(Closed):
    enabled: bool = Field(False, description="Expert-parallel load balancing: measure tokens per expert of each "
                          "MoE layer and periodically move and replicate experts, each layer on its own, so the most "
                          "loaded actor carries less.")
    window_steps: int = Field(1000, ge=1, description="Engine steps of per-expert token counts a rebalance plans "
                              "from (the most recent ones).")
    rebalance_every_steps: int = Field(3000, ge=1, description="Engine steps between rebalance plans.")
    min_gain: float = Field(0.05, ge=0, description="Apply a new placement only when it raises balancedness "
                            "(mean / max actor load over the window) by at least this much.")
    expert_cost: float | None = Field(None, ge=0, description="The rows one weight read of an expert costs as much "
                                      "as, in the load model EPLB balances: 0 counts tokens only (DeepSeek's EPLB, "
                                      "right when experts are compute-bound); unset: measured by the first actor when "
                                      "the load model is first used (the first load window with traffic), not at "
                                      "start-up (small-batch decode is bound by weight reads, so extra copies of a "
                                      "hot expert can cost more than they save).")


class WidthAutoscalingConfig(Closed):
    interval_s: float = Field(10.0, gt=0, description="Seconds between width decisions.")
    step_time_high_s: float = Field(0.5, gt=0, description="Widen when the mean engine step time over the last "
                                    "interval stays above this (the most loaded actor sets it).")
    kv_usage_high: float = Field(0.9, gt=0, le=1, description="Widen when the KV cache usage stays above this "
                                 "fraction (more actors, more cache).")
    idle_s: float = Field(120.0, gt=0, description="Narrow by one actor after this many seconds with no requests.")


def _width_kind(v: Any) -> str:
    return "[range]" if isinstance(v, (dict, WidthRange)) else "[count]"


# A number or a range, tagged so that a bad range reports only the range's problem (not also "not an
# integer"). The tags are bracketed: error paths drop bracketed parts (see ``config._explain``).
Width = Annotated[Annotated[int, Tag("[count]")] | Annotated[WidthRange, Tag("[range]")], Discriminator(_width_kind)]


class PoolConfig(Closed):
    actors_per_replica: Width = Field(2, description="Expert-parallel actors per Serve replica: a number, "
                                                 "or a range {min, max, initial} the group can change within while "
                                                 "it serves (expertpool scale, width autoscaling). Every width must "
                                                 "hold n_routed_experts + redundant_experts expert slots (a "
                                                 "single actor ignores redundant_experts), each "
                                                 "actor at most one copy of an expert.")
    redundant_experts: int = Field(0, ge=0, description="Extra physical expert slots per replica, holding second "
                                   "copies of experts (EPLB puts them on the most loaded experts; with as many as "
                                   "n_routed_experts every expert has two copies, so the group can lose an actor and "
                                   "keep serving on the survivors). Each costs one expert's weights of memory.")
    eplb: EplbConfig = Field(default_factory=EplbConfig, description="Expert-parallel load balancing.")
    autoscale_width: bool = Field(False, description="Widen the group when its step time or KV usage stays high "
                                  "and narrow it when idle, within actors_per_replica's range.")
    width_autoscaling: WidthAutoscalingConfig = Field(default_factory=WidthAutoscalingConfig,
                                                      description="Thresholds of width autoscaling.")
    actor_resources: PoolActorResources = Field(default_factory=PoolActorResources, description="Resources "
                                                "reserved by each expert-parallel actor (one placement bundle each).")
    replica_cpu: float = Field(0.1, gt=0, description="Logical CPUs reserved for the Serve replica process itself "
                               "(placement bundle 0). It mostly waits on its actors, so a fraction suffices.")
    placement_strategy: Literal["PACK", "STRICT_PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for one replica's bundles (PACK keeps a replica's actors "
        "on one node when they fit, which keeps all-to-all traffic local).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend between the "
                                                     "actors of a replica. auto = nccl when actors have GPUs, else "
                                                     "gloo. With nccl, `actor_resources.gpu` must be a whole number "
                                                     ">= 1.")
    shared_memory: bool = Field(True, description="On CPU (gloo), when all actors of a replica share a host and "
                                "its /dev/shm, pass the MoE layers' token rows between them through a shared-memory "
                                "segment instead of gloo's TCP (40-80 us instead of 270-480 us per exchange, measured "
                                "on two 1-CPU actors; three exchanges per MoE layer). The group keeps gloo when they "
                                "do not, or when /dev/shm has no room for the segment (8 MiB for 2 actors, at most "
                                "32 MiB); the actors log which. false = always gloo.")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig, description="Self-healing when an expert "
                                     "actor dies.")
    triton_cache_dir: str | None = Field(None, description="Directory where the actors keep compiled Triton kernels "
                                         "(TRITON_CACHE_DIR), e.g. a volume mounted into every pod, so a restarted "
                                         "actor does not compile again. None = Triton's default (~/.triton/cache).")

    @model_validator(mode="after")
    def _check(self) -> PoolConfig:
        if isinstance(self.actors_per_replica, int) and self.actors_per_replica < 1:
            raise rule_error("actors_per_replica", f"must be >= 1, got {self.actors_per_replica}",
                             "set a positive number of actors or a range {min, max}")
        gpu = self.actor_resources.gpu
        if self.backend == "nccl" and gpu <= 0:
            raise rule_error("backend", "nccl needs GPUs but actor_resources.gpu is 0",
                        "set pool.actor_resources.gpu (e.g. 1) or set pool.backend to gloo or auto")
        if self.resolved_backend() == "nccl" and (gpu < 1 or gpu != int(gpu)):
            raise rule_error("actor_resources.gpu", f"is {gpu:g}, but NCCL needs each rank on whole GPUs of its own "
                             "(two ranks on one device cannot form a communicator)",
                             "set pool.actor_resources.gpu to a whole number >= 1, or pool.backend to gloo to "
                             "share GPUs between actors")
        if self.autoscale_width and self.min_width == self.max_width:
            raise rule_error("autoscale_width", "needs room to change: actors_per_replica is a single width",
                             "set actors_per_replica to a range {min, max} or autoscale_width to false")
        return self

    @property
    def width(self) -> int:
        """Actors a replica starts with."""
        a = self.actors_per_replica
        return a if isinstance(a, int) else a.initial

    @property
    def min_width(self) -> int:
        a = self.actors_per_replica
        return a if isinstance(a, int) else a.min

    @property
    def max_width(self) -> int:
        a = self.actors_per_replica
        return a if isinstance(a, int) else a.max

    def placement_problem(self, n_routed_experts: int) -> str | None:
        """Why some width of the range cannot place the experts (None when every width can)."""
        E, R = n_routed_experts, self.redundant_experts
        if self.max_width > E + R:
            return (f"{self.max_width} actors exceed the {E + R} expert slots ({E} experts + {R} redundant), so some "
                    f"would hold none; use at most {E + R} actors or more redundant_experts")
        if R > E * (self.max_width - 1):
            return (f"{R} redundant slots over at most {self.max_width} actors would give an actor two copies of one "
                    f"expert; set redundant_experts to at most {E * (self.max_width - 1)}")
        return None

    def resolved_backend(self) -> Literal["gloo", "nccl"]:
        if self.backend != "auto":
            return self.backend
        return "nccl" if self.actor_resources.gpu > 0 else "gloo"

    def placement_group_bundles(self) -> list[dict[str, float]]:
        """Bundles of one replica: bundle 0 hosts the replica actor itself (Serve places the replica in the
        FIRST bundle, so its ``ray_actor_options`` must fit there), bundles 1..N host expert-parallel actor
        ``rank`` at index :meth:`actor_bundle_index` ``(rank)``."""
        return [{"CPU": self.replica_cpu}] + [self.actor_resources.bundle() for _ in range(self.max_width)]

    def replica_actor_options(self) -> dict[str, Any]:
        """``ray_actor_options`` of the replica; a subset of bundle 0 by construction."""
        return {"num_cpus": self.replica_cpu}

    @staticmethod
    def actor_bundle_index(rank: int) -> int:
        return rank + 1
