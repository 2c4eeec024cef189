"""The ``serving:`` section of ``cluster.yaml``: the Serve application, the engine's limits, the paged
KV cache, speculative decoding, replica autoscaling and the served patches.

``num_kv_blocks`` derives the KV cache size from the one dial that is set. Import these names from
``expertpool.platform.config``, which re-exports the whole schema.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from expertpool.model import storage
from expertpool.platform.config_base import DOMAIN, GIB, Closed, rule_error

API_KEY_ENV = "EXPERTPOOL_API_KEY"


class KVCacheConfig(Closed):
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block (paged attention page).")
    num_blocks: int | None = Field(None, ge=1, description="KV-cache blocks per replica. Set this or memory_gb, "
                                   "not both; neither = enough for max_batch_size full sequences of max_seq_len.")
    memory_gb: float | None = Field(None, gt=0, description="KV-cache memory budget per replica in GiB; the block "
                                    "count is derived from the model's bytes per cached token.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU actors, when neither num_blocks nor "
                                          "memory_gb is set: the KV cache takes this fraction of the device memory "
                                          "free after loading the weights, less the prefill-activation and "
                                          "communication headroom of the memory plan (vLLM's name). CPU actors "
                                          "ignore it.")

    @model_validator(mode="after")
    def _check(self) -> KVCacheConfig:
        if self.num_blocks is not None and self.memory_gb is not None:
            raise rule_error("num_blocks", "num_blocks and memory_gb are both set, and they disagree in general",
                        "set only one of serving.kv_cache.num_blocks or serving.kv_cache.memory_gb")
        return self

    def resolve_num_blocks(self, bytes_per_token: int | None, max_batch_size: int, max_seq_len: int) -> int:
        """Blocks per replica: explicit, else from the memory budget, else max_batch_size * max_seq_len tokens."""
        if self.num_blocks is not None:
            return self.num_blocks
        if self.memory_gb is not None:
            if not bytes_per_token:
                raise ValueError("kv_cache.memory_gb needs the model's KV bytes per token to derive num_blocks")
            return int(self.memory_gb * GIB) // (bytes_per_token * self.block_size)
        return math.ceil(max_batch_size * max_seq_len / self.block_size)


class AutoscalingConfig(Closed):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas (expert-parallel groups); 0 allows scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Most replicas; on Kubernetes also bounds the pool worker group.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time. None = min_replicas.")
    target_ongoing_requests: float = Field(16.0, gt=0, description="Ongoing requests per replica the autoscaler "
                                           "steers toward (Ray Serve `target_ongoing_requests`).")
    upscale_delay_s: float = Field(30.0, ge=0, description="Seconds the load must stay high before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Seconds the load must stay low before removing "
                                     "replicas.")
    metrics_interval_s: float = Field(10.0, gt=0, description="Seconds between replica load reports.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window in seconds over which load is averaged.")

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise rule_error("max_replicas", f"must be >= min_replicas ({self.min_replicas})",
                        f"set max_replicas to at least {self.min_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise rule_error("initial_replicas", f"must be between min_replicas ({self.min_replicas}) and max_replicas "
                        f"({self.max_replicas}), got {self.initial_replicas}",
                        f"set initial_replicas within [{self.min_replicas}, {self.max_replicas}] or remove it")
        return self

    def ray_autoscaling_config(self) -> dict[str, Any]:
        """The Ray Serve 2.60 ``autoscaling_config`` dict (field names of ``ray.serve.config.AutoscalingConfig``)."""
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
        }
        if self.initial_replicas is not None:
            out["initial_replicas"] = self.initial_replicas
        return out


class SpeculativeConfig(Closed):
    method: Literal["mtp"] = Field("mtp", description="Draft source: `mtp`, the checkpoint's multi-token-prediction "
                                   "module (DeepSeek-V3's `model.layers.{num_hidden_layers}`).")
    num_speculative_tokens: int = Field(1, ge=1, le=8, description="Draft tokens per decode step; 1 is DeepSeek's "
                                        "setting, more chain the module. Each step verifies them in one forward of "
                                        "the main model and emits up to this many + 1 tokens.")


class ServingConfig(Closed):
    app_name: str = Field("expertpool", min_length=1, description="Serve application name (also the target of "
                          "train.jobs.*.publish_to).")
    route_prefix: str = Field("/", description="HTTP route prefix of the application; starts with '/'.")
    host: str = Field("127.0.0.1", description="Serve HTTP proxy bind address for local runs (Kubernetes "
                      "manifests always bind 0.0.0.0 inside the pod).")
    port: int = Field(8000, ge=1, le=65535, description="Serve HTTP proxy port.")
    max_batch_size: int = Field(32, ge=1, description="Most sequences running at once in one replica's engine.")
    max_seq_len: int = Field(512, ge=1, description="Longest sequence (prompt + completion tokens) a replica accepts.")
    max_num_batched_tokens: int = Field(256, ge=1, description="Most tokens per engine step; bounds prefill "
                                        "chunking. Must be >= max_batch_size so every running sequence can decode.")
    kv_cache: KVCacheConfig = Field(default_factory=KVCacheConfig, description="Paged KV cache of one replica.")
    reasoning_parser: Literal["deepseek_r1"] | None = Field(None, description="Split `<think>` output of chat "
                                                             "completions into `reasoning_content` (streaming too), "
                                                             "as vLLM's parser of the same name; off for a request "
                                                             "that sets `chat_template_kwargs.thinking: false`. None "
                                                             "= leave it in `content`.")
    batch_invariant: bool = Field(False, description="CPU actors: compute every row's result the same in any "
                                  "batch (whole 16-row GEMM tiles), so that a sequence replayed after an actor's "
                                  "death or a preemption continues bit for bit in bfloat16 too (float32 replays "
                                  "are exact without it in our tests). Costs decode speed: bench-mini bf16 decode "
                                  "steps 1.5x slower at batch 16, 1.35x at batch 1.")
    cuda_graphs: bool = Field(True, description="GPU actors: capture decode steps in CUDA graphs, one per batch "
                              "bucket (powers of two up to the per-actor batch), after the warm-up. Applies where "
                              "the decode forward never reads the device back: FP8 experts on the Triton path and one "
                              "actor per replica (the all-to-all reads split sizes); elsewhere decode runs eagerly.")
    async_scheduling: bool = Field(False, description="Plan and submit engine step k+1 while step k runs (vLLM's "
                                   "--async-scheduling, SGLang's overlap scheduler), so the expert actors never wait "
                                   "for the replica. Turn it on when the replica has CPU of its own (GPU actors, or "
                                   "CPU actors on other cores); where replica and actors share the same few cores, "
                                   "the overlapped replica work slows the actors' compute more than it saves.")
    num_scheduler_steps: int = Field(1, ge=1, le=64, description="Multi-step scheduling (vLLM's "
                                     "--num-scheduler-steps): plan this many consecutive engine steps at once and "
                                     "submit them to the expert actors together; each step's tokens still stream "
                                     "to the clients as soon as it ends. The actors then run the steps back to back "
                                     "without waiting for the replica. A request that arrives meanwhile waits for "
                                     "the chain to end (up to this many steps more to its first token), and a "
                                     "sequence that ends early (EOS, stop) is computed to the chain's end and "
                                     "dropped. Cannot be combined with async_scheduling or speculative. 1 = off. "
                                     "Measured on a 2-core CPU machine (bench-mini, 16 streams), 8 steps against "
                                     "1: with one actor of 2 CPUs no consistent difference (3 of 5 alternated "
                                     "pairs won, mean -1%); with one actor of 1 CPU, which leaves the replica a "
                                     "core, +7.5% and +29% tok/s (2 pairs). TTFT p50 0.04-0.15 s longer.")
    speculative: SpeculativeConfig | None = Field(None, description="Speculative decoding with the MTP module: "
                                                  "drafts verified in one forward, exact greedy output and the same "
                                                  "sampling distribution. null = off. Needs async_scheduling off.")
    prefix_caching: bool = Field(True, description="Automatic prefix caching: full KV blocks are indexed by a hash "
                                 "of their tokens and everything before them, so a prompt that starts like an earlier "
                                 "one (a shared system prompt, a chat's history) prefills only the rest. Unheld "
                                 "cached blocks are evicted least recently used first.")
    ingress: Literal["proxy", "haproxy"] = Field("proxy", description="How HTTP reaches a replica. `proxy`: "
                                                  "Serve's Python HTTP proxy, which forwards each request and every "
                                                  "streamed chunk to the replica over Ray. `haproxy`: Ray Serve's "
                                                  "HAProxy ingress (Ray Serve LLM's direct streaming): HAProxy "
                                                  "forwards the connection to an HTTP server inside the replica, one "
                                                  "hop less per token (bench-mini, 16 streams on 2 cores: 1.08-1.29x "
                                                  "the tok/s of `proxy`, 4 alternated pairs). A setting of the cluster "
                                                  "(`RAY_SERVE_ENABLE_HA_PROXY=1` in every Ray process's environment "
                                                  "before it starts): `expertpool serve` sets it when it starts its "
                                                  "own Ray, the KubeRay manifests on every pod; a replica on a "
                                                  "cluster started otherwise logs a warning. A replica behind HAProxy "
                                                  "drains at least 30 s before it stops, so that HAProxy stops routing "
                                                  "to it first (`RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S`). "
                                                  "Experimental in Ray 2.60.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests in flight per replica before Serve queues "
                                      "them at the caller (Ray Serve `max_ongoing_requests`).")
    max_queued_requests: int = Field(128, description="Requests queued per caller before HTTP 503; "
                                     "-1 = unbounded (Ray Serve `max_queued_requests`).")
    api_key: str | None = Field(None, description=f"Bearer token required on the HTTP API. None = env "
                                f"{API_KEY_ENV} if set, else no authentication. Keep it out of files you commit.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between replica health checks.")
    health_check_timeout_s: float = Field(30.0, gt=0, description="Seconds before a health check counts as failed.")
    graceful_shutdown_timeout_s: float = Field(120.0, ge=0, description="When Serve removes a replica (downscale, "
                                               "redeploy), it stops routing to it and waits up to this long for "
                                               "its in-flight requests and streams to finish before it exits.")
    patches: dict[str, str] = Field(default_factory=dict, description="ESFT patches served beside the base, as "
                                    "`<model.name>:<domain>`: domain -> patch directory (a path every node can read, "
                                    "or s3:// / gs://). They go into the deployment's user_config, not its args, so "
                                    "a change loads them into the running replicas (Serve `reconfigure`) without a "
                                    "restart; `expertpool publish` adds one to a running app. An MTP patch (from "
                                    "a `mode: mtp` job) instead replaces the base's MTP module in place (needs "
                                    "serving.speculative); patches load in declaration order, the last MTP one "
                                    "wins.")

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/"):
            raise rule_error("", f"must start with '/', got '{v}'", f"set route_prefix to '/{v}'")
        return v

    @field_validator("patches")
    @classmethod
    def _patches(cls, v: dict[str, str]) -> dict[str, str]:
        for domain, where in v.items():
            if not DOMAIN.match(domain):
                raise rule_error(domain, "has characters outside [A-Za-z0-9._-]",
                                 "name the domain with letters, digits, '.', '_' or '-'")
            try:
                storage.check(where)
            except storage.StorageError as e:
                raise rule_error(domain, str(e), "point it at a patch directory") from None
        return v

    @field_validator("max_queued_requests")
    @classmethod
    def _queue(cls, v: int) -> int:
        if v < 1 and v != -1:
            raise rule_error("", f"must be >= 1 or -1 (unbounded), got {v}",
                        "set max_queued_requests to a positive number of requests, or -1")
        return v

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.max_num_batched_tokens < self.max_batch_size:
            raise rule_error("max_num_batched_tokens", f"({self.max_num_batched_tokens}) is below max_batch_size "
                        f"({self.max_batch_size}), so a full batch cannot take one decode step",
                        f"set max_num_batched_tokens to at least {self.max_batch_size}")
        if self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            raise rule_error("autoscaling.target_ongoing_requests", f"({self.autoscaling.target_ongoing_requests}) "
                        f"exceeds max_ongoing_requests ({self.max_ongoing_requests}), so the target is unreachable",
                        f"set it to at most {self.max_ongoing_requests}")
        if self.speculative is not None and self.async_scheduling:
            raise rule_error("speculative", "speculative decoding needs the accepted tokens of a step before the "
                             "next is planned, which async scheduling does not wait for",
                             "turn off serving.async_scheduling or serving.speculative")
        if self.num_scheduler_steps > 1 and (self.speculative is not None or self.async_scheduling):
            other = "speculative" if self.speculative is not None else "async_scheduling"
            raise rule_error("num_scheduler_steps", f"multi-step scheduling ({self.num_scheduler_steps} steps) "
                             f"cannot be combined with serving.{other}",
                             f"set num_scheduler_steps to 1 or turn off serving.{other}")
        kv = self.kv_cache
        if kv.num_blocks is not None and kv.num_blocks * kv.block_size < self.max_seq_len:
            raise rule_error("kv_cache.num_blocks", f"{kv.num_blocks} blocks x {kv.block_size} tokens cannot hold one "
                        f"sequence of max_seq_len ({self.max_seq_len})",
                        f"set num_blocks to at least {math.ceil(self.max_seq_len / kv.block_size)} "
                        "or lower serving.max_seq_len")
        return self

    def num_kv_blocks(self, bytes_per_token: int | None = None) -> int:
        """KV-cache blocks per replica (see :meth:`KVCacheConfig.resolve_num_blocks`)."""
        return self.kv_cache.resolve_num_blocks(bytes_per_token, self.max_batch_size, self.max_seq_len)

    def resolve_api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The API key: ``api_key`` if set, else env ``EXPERTPOOL_API_KEY`` (empty = unset), else None."""
        if self.api_key:
            return self.api_key
        env = os.environ if environ is None else environ
        return env.get(API_KEY_ENV) or None
