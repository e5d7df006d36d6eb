"""Prometheus metrics, named as vLLM names them where a counterpart exists (prefix `seekserve:`), so
existing dashboards need only the prefix changed. Engine gauges are read at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from seekserve.engine.engine import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        s = self.stats()
        if s is None:
            return
        yield GaugeMetricFamily("seekserve:num_requests_running", "Sequences in the running batch",
                                value=s.num_running)
        yield GaugeMetricFamily("seekserve:num_requests_waiting", "Sequences waiting for a slot", value=s.num_waiting)
        yield GaugeMetricFamily("seekserve:kv_cache_usage_perc", "KV cache usage, 0 to 1 (1 = full)",
                                value=s.kv_cache_usage)
        yield CounterMetricFamily("seekserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=s.num_prefix_queries)
        yield CounterMetricFamily("seekserve:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                  value=s.num_prefix_hits)
        yield CounterMetricFamily("seekserve:num_preemptions", "Sequences preempted (paused with their KV kept, or recomputed later)",
                                  value=s.num_preemptions)


class ServerMetrics:
    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("seekserve:time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("seekserve:e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("seekserve:inter_token_latency_seconds", "Time between output tokens", ["model"],
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("seekserve:prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("seekserve:generation_tokens", "Tokens generated", ["model"], registry=r)
        self.request_success = Counter("seekserve:request_success", "Finished completions by finish reason",
                                       ["model", "finished_reason"], registry=r)
        self.http_requests = Counter("seekserve:http_requests", "HTTP requests by route and status",
                                     ["method", "route", "status"], registry=r)
        r.register(_EngineCollector(stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
