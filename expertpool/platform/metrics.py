"""Serving metrics through ``ray.util.metrics``, scraped by Prometheus from Ray's metrics export.

Engine and request metrics carry vLLM's names in Ray's underscore form, with label ``model_name``
(and ``engine="expertpool"``), so Ray Serve LLM's Grafana dashboard and TTFT-based autoscaling read
them unchanged. Ray prefixes ``ray_`` and counters get ``_total``: ``vllm_generation_tokens`` is
scraped as ``ray_vllm_generation_tokens_total``. The names are those the dashboard of the installed
Ray queries (``ray/dashboard/modules/metrics/dashboards/serve_llm_dashboard_panels.py``):

  gauges      vllm_num_requests_running, vllm_num_requests_waiting, vllm_num_requests_swapped (always
              0: nothing is swapped here), vllm_kv_cache_usage_perc (0..1)
  counters    vllm_prompt_tokens, vllm_generation_tokens, vllm_request_success{finished_reason},
              vllm_num_preemptions
  histograms  vllm_time_to_first_token_seconds, vllm_inter_token_latency_seconds,
              vllm_request_time_per_output_token_seconds, vllm_e2e_request_latency_seconds,
              vllm_request_queue_time_seconds, vllm_request_prefill_time_seconds,
              vllm_request_decode_time_seconds, vllm_request_prompt_tokens, vllm_request_generation_tokens

Ray Serve LLM's ``TTFTAutoscalingPolicy`` (``ray.serve.llm.autoscaling``, Ray after 2.60) scales on
``histogram_quantile(0.99, sum(rate(ray_vllm_time_to_first_token_seconds_bucket[1m])) by (le))``,
which the TTFT histogram here answers.

Times are measured where the client sees them (the HTTP layer): TTFT from request arrival; queue
time from the engine (arrival to first scheduled); prefill = TTFT - queue time; decode = last token
- first token. Metrics no peer has keep the ``expertpool_`` prefix: HTTP requests by status
(``expertpool_requests{model,status}``, 499 = the client went away), the cumulative token count of
every routed expert (gauge tagged ``expert``) and the balancedness (mean / max expert load since
the previous update; 1.0 = perfectly even), and self-healing: expert actor failures, recoveries and
replayed tokens (counters fed by the growth of the engine's cumulative counts) and the duration of
each recovery (histogram).

Two kinds of updates: per request from the HTTP layer, and periodic from ``engine.stats()`` (a
background task of the HTTP layer calls ``update_from_stats``, never on the request path).
``ray.util.metrics`` records are no-ops when Ray is not initialised, so the API logic runs in plain
unit tests; tests that need to see the values inject recording metric classes instead.
"""

from typing import Any, Callable

from ray.util import metrics as ray_metrics

TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # vLLM's
ITL_BUCKETS_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0]  # vLLM's
LATENCY_BUCKETS_S = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                     240.0, 480.0, 960.0, 1920.0, 7680.0]  # vLLM's request-latency buckets
TOKEN_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
RECOVERY_BUCKETS_S = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
STALL_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]
ENGINE = "expertpool"


class ServerMetrics:
    """All metrics of one Serve replica. ``replica`` tags every series so replicas don't overwrite
    each other's gauges; ``model_name`` is the base model (the gauges' label; request metrics carry
    the requested model id). ``counter``/``gauge``/``histogram`` are injectable for tests."""

    def __init__(self, replica: str = "", model_name: str = "", *, counter: Callable[..., Any] = ray_metrics.Counter,
                 gauge: Callable[..., Any] = ray_metrics.Gauge,
                 histogram: Callable[..., Any] = ray_metrics.Histogram):
        r = ("replica",)
        tags = {"replica": replica}
        v = ("replica", "model_name", "engine")
        vtags = {"replica": replica, "engine": ENGINE}
        self.model_name = model_name

        def vhist(name, description, buckets):
            return histogram(name, description=description, boundaries=buckets, tag_keys=v).set_default_tags(vtags)

        def vcount(name, description, extra=()):
            return counter(name, description=description, tag_keys=v + extra).set_default_tags(vtags)

        def mcount(name, description, extra=()):  # counters fed from engine stats: one model per replica
            return counter(name, description=description, tag_keys=v + extra).set_default_tags(
                {**vtags, "model_name": model_name})

        def vgauge(name, description):
            return gauge(name, description=description, tag_keys=v).set_default_tags(
                {**vtags, "model_name": model_name})

        self.requests = counter("expertpool_requests", description="HTTP requests finished, by model and status.",
                                tag_keys=r + ("model", "status")).set_default_tags(tags)
        self.ttft = vhist("vllm_time_to_first_token_seconds", "Request arrival to first token.", TTFT_BUCKETS_S)
        self.itl = vhist("vllm_inter_token_latency_seconds", "Time per output token after the first.", ITL_BUCKETS_S)
        self.tpot = vhist("vllm_request_time_per_output_token_seconds", "Per request: (last token - first token) / "
                          "(output tokens - 1).", ITL_BUCKETS_S)
        self.e2e = vhist("vllm_e2e_request_latency_seconds", "Request arrival to last token.", LATENCY_BUCKETS_S)
        self.queue_time = vhist("vllm_request_queue_time_seconds", "Engine arrival to first scheduled.",
                                LATENCY_BUCKETS_S)
        self.prefill_time = vhist("vllm_request_prefill_time_seconds", "First scheduled to first token.",
                                  LATENCY_BUCKETS_S)
        self.decode_time = vhist("vllm_request_decode_time_seconds", "First token to last token.", LATENCY_BUCKETS_S)
        self.request_prompt_tokens = vhist("vllm_request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.request_generation_tokens = vhist("vllm_request_generation_tokens", "Output tokens per request (all "
                                               "n choices).", TOKEN_BUCKETS)
        self.generated_tokens = vcount("vllm_generation_tokens", "Output tokens generated.")
        self.prompt_tokens = vcount("vllm_prompt_tokens", "Prompt tokens of finished requests.")
        self.success = vcount("vllm_request_success", "Requests finished, by finish reason of each choice.",
                              ("finished_reason",))
        self.preemptions = mcount("vllm_num_preemptions", "Sequences preempted (KV cache full) for recompute.")
        self.prefix_queries = mcount("vllm_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = mcount("vllm_prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled "
                                  "again).")
        self.spec_drafts = mcount("vllm_spec_decode_num_drafts", "Decode steps that verified MTP draft tokens.")
        self.spec_draft_tokens = mcount("vllm_spec_decode_num_draft_tokens", "MTP draft tokens verified.")
        self.spec_accepted = mcount("vllm_spec_decode_num_accepted_tokens", "MTP draft tokens accepted.")
        self.spec_accepted_per_pos = mcount("vllm_spec_decode_num_accepted_tokens_per_pos", "MTP draft tokens "
                                            "accepted, by draft position (0 = the first).", ("position",))
        self.running = vgauge("vllm_num_requests_running", "Sequences in the running batch.")
        self.waiting = vgauge("vllm_num_requests_waiting", "Sequences waiting for admission.")
        self.swapped = vgauge("vllm_num_requests_swapped", "Always 0: sequences are recomputed, never swapped.")
        self.kv_usage = vgauge("vllm_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")
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
        self.group_width = gauge("expertpool_group_width", description="Expert-parallel actors in this replica's "
                                 "group now.", tag_keys=r).set_default_tags(tags)
        self.actor_balancedness = gauge("expertpool_actor_balancedness", description="Mean / max tokens per actor "
                                        "under the current expert placement, over the EPLB window (1 = even).",
                                        tag_keys=r).set_default_tags(tags)
        self.rebalances = counter("expertpool_eplb_rebalances", description="Expert placements switched by EPLB.",
                                  tag_keys=r).set_default_tags(tags)
        self.layout_seconds = histogram("expertpool_layout_change_seconds", description="A layout change (EPLB "
                                        "rebalance, resize, widening back after degraded mode): start to switch.",
                                        boundaries=RECOVERY_BUCKETS_S, tag_keys=r).set_default_tags(tags)
        self.layout_stall_seconds = histogram("expertpool_layout_change_stall_seconds", description="Steps paused "
                                              "by a layout change (the switch at a step boundary).",
                                              boundaries=STALL_BUCKETS_S, tag_keys=r).set_default_tags(tags)
        self.degraded = counter("expertpool_degraded_shrinks", description="Actor losses served on by the "
                                "survivors (every expert had a copy there) instead of waiting for a replacement.",
                                tag_keys=r).set_default_tags(tags)
        self._last_expert_tokens: list[int] | None = None
        self._seen: dict[str, int] = {}

    def request_done(self, model: str, status: int) -> None:
        self.requests.inc(1, tags={"model": model, "status": str(status)})

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.observe(seconds, tags={"model_name": model})

    def tokens(self, model: str, n: int, seconds_since_last: float | None) -> None:
        """``n`` new tokens arrived ``seconds_since_last`` after the previous ones (None for the first)."""
        if n <= 0:
            return
        self.generated_tokens.inc(n, tags={"model_name": model})
        if seconds_since_last is not None:
            self.itl.observe(seconds_since_last / n, tags={"model_name": model})

    def request_latency(self, model: str, seconds: float, prompt_tokens: int) -> None:
        self.e2e.observe(seconds, tags={"model_name": model})
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens, tags={"model_name": model})

    def request_finished(self, model: str, stream: Any, finish_reasons: list[str | None]) -> None:
        """Per-request histograms and the success counter of a request that ran to its end.
        ``stream``: the ``streams.GenerationStream`` (t_arrival, t_first, t_last, token counts, queue_s)."""
        t = {"model_name": model}
        for reason in finish_reasons:
            self.success.inc(1, tags={**t, "finished_reason": reason or "abort"})
        self.request_prompt_tokens.observe(stream.prompt_tokens, tags=t)
        self.request_generation_tokens.observe(stream.completion_tokens, tags=t)
        if stream.queue_s is not None:
            self.queue_time.observe(stream.queue_s, tags=t)
        if stream.t_first is not None:
            ttft = stream.t_first - stream.t_arrival
            self.prefill_time.observe(max(0.0, ttft - (stream.queue_s or 0.0)), tags=t)
            self.decode_time.observe(stream.t_last - stream.t_first, tags=t)
            n = max(c.completion_tokens for c in stream.choices)
            if n > 1:
                self.tpot.observe((stream.t_last - stream.t_first) / (n - 1), tags=t)

    def update_from_stats(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.swapped.set(0)
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
                            ("replayed_tokens", self.replayed_tokens), ("preempted", self.preemptions),
                            ("prefix_cache_queries", self.prefix_queries), ("prefix_cache_hits", self.prefix_hits),
                            ("spec_decode_num_drafts", self.spec_drafts),
                            ("spec_decode_num_draft_tokens", self.spec_draft_tokens),
                            ("spec_decode_num_accepted_tokens", self.spec_accepted),
                            ("rebalances", self.rebalances), ("degraded_shrinks", self.degraded)):
            grew = stats.get(key, 0) - self._seen.get(key, 0)
            if grew > 0:
                metric.inc(grew)
            self._seen[key] = stats.get(key, 0)
        for pos, n in enumerate(stats.get("spec_decode_num_accepted_tokens_per_pos", [])):
            key = f"spec_pos_{pos}"
            if n > self._seen.get(key, 0):
                self.spec_accepted_per_pos.inc(n - self._seen.get(key, 0), tags={"position": str(pos)})
            self._seen[key] = n
        for key, hist in (("recovery_seconds", self.recovery_seconds), ("rebalance_seconds", self.layout_seconds),
                          ("rebalance_stall_seconds", self.layout_stall_seconds)):
            durations = stats.get(key, [])
            for d in durations[self._seen.get(key, 0):]:
                hist.observe(d)
            self._seen[key] = len(durations)
        if stats.get("width") is not None:
            self.group_width.set(stats["width"])
        if stats.get("actor_balancedness") is not None:
            self.actor_balancedness.set(stats["actor_balancedness"])
