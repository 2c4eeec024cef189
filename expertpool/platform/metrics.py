"""Serving metrics through ``ray.util.metrics``, scraped by Prometheus from Ray's metrics export.

Ray prefixes every name with ``ray_`` and counters get ``_total``: the request counter below is
``ray_expertpool_requests_total{model,status}``. Tokens/s is ``rate(ray_expertpool_generated_tokens_total)``.

Two kinds of updates:
  * per request, from the HTTP layer: request count (by model and HTTP status; 499 = the client went
    away), time to first token, inter-token latency, end-to-end latency, prompt and generated tokens;
  * periodic, from ``engine.stats()``: running and waiting requests, KV cache usage, and the
    cumulative token count of every routed expert (gauge tagged ``expert``), plus the balancedness
    (mean / max expert load since the previous update; 1.0 = perfectly even); and self-healing:
    expert actor failures, recoveries and replayed tokens (counters fed by the growth of the
    engine's cumulative counts) and the duration of each recovery (histogram). The HTTP layer calls
    ``update_from_stats`` from a background task, never on the request path.

``ray.util.metrics`` records are no-ops when Ray is not initialised, so the API logic runs in plain
unit tests; tests that need to see the values inject recording metric classes instead.
"""

from typing import Any, Callable

from ray.util import metrics as ray_metrics

TTFT_BUCKETS_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
ITL_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]
E2E_BUCKETS_S = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
RECOVERY_BUCKETS_S = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]


class ServerMetrics:
    """All metrics of one Serve replica. ``replica`` tags every series so replicas don't overwrite
    each other's gauges. ``counter``/``gauge``/``histogram`` are injectable for tests."""

    def __init__(self, replica: str = "", *, counter: Callable[..., Any] = ray_metrics.Counter,
                 gauge: Callable[..., Any] = ray_metrics.Gauge,
                 histogram: Callable[..., Any] = ray_metrics.Histogram):
        r = ("replica",)
        tags = {"replica": replica}
        self.requests = counter("expertpool_requests", description="HTTP requests finished, by model and status.",
                                tag_keys=r + ("model", "status")).set_default_tags(tags)
        self.ttft = histogram("expertpool_time_to_first_token_seconds", description="Request arrival to first token.",
                              boundaries=TTFT_BUCKETS_S, tag_keys=r + ("model",)).set_default_tags(tags)
        self.itl = histogram("expertpool_inter_token_latency_seconds", description="Time per output token after "
                             "the first.", boundaries=ITL_BUCKETS_S, tag_keys=r + ("model",)).set_default_tags(tags)
        self.e2e = histogram("expertpool_request_latency_seconds", description="Request arrival to last token.",
                             boundaries=E2E_BUCKETS_S, tag_keys=r + ("model",)).set_default_tags(tags)
        self.generated_tokens = counter("expertpool_generated_tokens", description="Output tokens generated.",
                                        tag_keys=r + ("model",)).set_default_tags(tags)
        self.prompt_tokens = counter("expertpool_prompt_tokens", description="Prompt tokens admitted.",
                                     tag_keys=r + ("model",)).set_default_tags(tags)
        self.running = gauge("expertpool_requests_running", description="Requests in the running batch.",
                             tag_keys=r).set_default_tags(tags)
        self.waiting = gauge("expertpool_requests_waiting", description="Requests waiting for admission.",
                             tag_keys=r).set_default_tags(tags)
        self.kv_usage = gauge("expertpool_kv_cache_usage", description="Fraction of KV cache blocks in use (0..1).",
                              tag_keys=r).set_default_tags(tags)
        self.expert_tokens = gauge("expertpool_expert_tokens", description="Cumulative tokens routed to each "
                                   "global expert.", tag_keys=r + ("expert",)).set_default_tags(tags)
        self.expert_balancedness = gauge("expertpool_expert_balancedness", description="Mean / max tokens per "
                                         "expert since the previous update (1 = even).",
                                         tag_keys=r).set_default_tags(tags)
        self.actor_failures = counter("expertpool_actor_failures", description="Expert actors found dead (each "
                                      "triggers a recovery).", tag_keys=r).set_default_tags(tags)
        self.recoveries = counter("expertpool_recoveries", description="Completed recoveries of the expert-parallel "
                                  "group (replacement started, group re-formed).", tag_keys=r).set_default_tags(tags)
        self.recovery_seconds = histogram("expertpool_recovery_seconds", description="Failure detected to group "
                                          "restored.", boundaries=RECOVERY_BUCKETS_S, tag_keys=r).set_default_tags(tags)
        self.replayed_tokens = counter("expertpool_replayed_tokens", description="Tokens re-prefilled because their "
                                       "KV cache lived on a dead actor.", tag_keys=r).set_default_tags(tags)
        self._last_expert_tokens: list[int] | None = None
        self._seen: dict[str, int] = {}

    def request_done(self, model: str, status: int) -> None:
        self.requests.inc(1, tags={"model": model, "status": str(status)})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model": model})

    def tokens(self, model: str, n: int, seconds_since_last: float | None) -> None:
        """``n`` new tokens arrived ``seconds_since_last`` after the previous ones (None for the first)."""
        if n <= 0:
            return
        self.generated_tokens.inc(n, tags={"model": model})
        if seconds_since_last is not None:
            self.itl.observe(seconds_since_last / n, tags={"model": model})

    def request_latency(self, model: str, seconds: float, prompt_tokens: int) -> None:
        self.e2e.observe(seconds, tags={"model": model})
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens, tags={"model": model})

    def update_from_stats(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_usage.set(stats["kv_usage"])
        counts = list(stats["expert_tokens"])
        for e, c in enumerate(counts):
            self.expert_tokens.set(c, tags={"expert": str(e)})
        last = self._last_expert_tokens
        if last is not None and len(last) == len(counts):
            delta = [c - p for c, p in zip(counts, last)]
            if counts and max(delta) > 0:
                self.expert_balancedness.set(sum(delta) / len(delta) / max(delta))
        self._last_expert_tokens = counts
        for key, metric in (("actor_failures", self.actor_failures), ("recoveries", self.recoveries),
                            ("replayed_tokens", self.replayed_tokens)):
            grew = stats.get(key, 0) - self._seen.get(key, 0)
            if grew > 0:
                metric.inc(grew)
            self._seen[key] = stats.get(key, 0)
        durations = stats.get("recovery_seconds", [])
        for d in durations[self._seen.get("recovery_seconds", 0):]:
            self.recovery_seconds.observe(d)
        self._seen["recovery_seconds"] = len(durations)
