"""Prometheus metrics of the server (``GET /metrics``), every name prefixed ``smoa_``.

Each app gets its own registry (several servers can live in one process, e.g. in tests). Library-side
counters (route cache, weight cache, loaded adapters) are read from ``get_statistics()`` at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE", "ServeMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _LibraryCollector(Collector):
    """Reads the library's statistics at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            s = self._stats()
        except Exception:  # noqa: BLE001 - a scrape never fails because the library is busy or closed
            s = None
        if not s:
            return
        routing, cache, library = s.get("routing", {}), s.get("cache", {}), s.get("library", {})
        for name, doc, value in (
            ("smoa_route_cache_hits", "Routes served from the route cache.", routing.get("cache_hits", 0)),
            ("smoa_route_cache_misses", "Routes computed (route cache misses).", routing.get("cache_misses", 0)),
            ("smoa_weight_cache_hits", "Adapter weight loads served from the cache.", cache.get("hits", 0)),
            ("smoa_weight_cache_misses", "Adapter weights read from storage.", cache.get("misses", 0)),
            ("smoa_weight_cache_evictions", "Adapter weights evicted from the cache.", cache.get("evictions", 0)),
        ):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], float(value or 0))
            yield c
        for name, doc, value in (
            ("smoa_loaded_adapters", "Adapters whose weights are in the cache.",
             cache.get("loaded_adapters", library.get("loaded_adapters", 0))),
            ("smoa_adapters", "Adapters in the library (active).", library.get("active_adapters", 0)),
        ):  # fmt: skip
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value or 0))
            yield g


class ServeMetrics:
    """The server's metrics; also the scheduler's :class:`~smoa.serve.scheduler.SchedulerObserver`."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None] | None = None) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("smoa_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)  # fmt: skip
        self.request_duration = Histogram("smoa_request_duration_seconds", "Request wall time by endpoint.",
                                          ["endpoint"], buckets=_LATENCY, registry=r)  # fmt: skip
        self.queue_duration = Histogram("smoa_queue_duration_seconds", "Time a sequence waited for admission.",
                                        buckets=_LATENCY, registry=r)  # fmt: skip
        self.inference_duration = Histogram("smoa_inference_duration_seconds", "Wall time of one forward step.",
                                            buckets=_LATENCY, registry=r)  # fmt: skip
        self.ttft = Histogram("smoa_time_to_first_token_seconds", "Arrival to first token.", buckets=_LATENCY,
                              registry=r)  # fmt: skip
        self.generated_tokens = Counter("smoa_generated_tokens", "Tokens generated.", registry=r)
        self.prompt_tokens = Counter("smoa_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.route_latency = Histogram("smoa_route_latency_seconds", "Routing + mixture resolution time.",
                                       buckets=_FAST, registry=r)  # fmt: skip
        self.batch_size = Histogram("smoa_batch_size", "Rows of each decode step.", buckets=_BATCH, registry=r)
        self.queue_depth = Gauge("smoa_queue_depth", "Sequences waiting for admission.", registry=r)
        self.running = Gauge("smoa_running_sequences", "Sequences in the running batch.", registry=r)
        self.merge_cache_hits = Counter("smoa_merge_cache_hits", "LoRAX merged adapters served from the cache.",
                                        registry=r)  # fmt: skip
        if stats is not None:
            r.register(_LibraryCollector(stats))

    # -- SchedulerObserver --------------------------------------------------------------------------------------
    def on_admitted(self, queue_seconds: float) -> None:
        self.queue_duration.observe(queue_seconds)

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_step(self, batch_size: int, seconds: float, new_tokens: int) -> None:
        self.inference_duration.observe(seconds)
        self.batch_size.observe(batch_size)
        self.generated_tokens.inc(new_tokens)

    def on_queue_depth(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    # -- requests -----------------------------------------------------------------------------------------------
    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_duration.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
