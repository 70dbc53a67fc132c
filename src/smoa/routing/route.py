"""The result of routing one query."""

from __future__ import annotations

from dataclasses import dataclass, field

from smoa.config import RoutingStrategy


@dataclass(frozen=True)
class Route:
    """Adapters chosen for one query, best first.

    Attributes:
        adapter_ids: at most ``max_active_adapters`` ids, best first (ties broken by id).
        routing_scores: score of each id on the strategy's scale (see ``docs/sparse_mixture_adapters.md``).
        weights: mixing weights (softmax of the scores at ``routing_temperature``), summing to 1; empty route
            -> empty weights (the base model alone).
        routing_latency_ms: wall time of the whole ``query_adapters`` call.
        strategy: the strategy that produced the route.
        timings_ms: the parts (``encode``, ``search``, ``fuse``) in milliseconds.
        cache_hit: served from the route cache.
        degraded: a stage was skipped to honour ``routing_latency_budget_ms``.
        library_version: the library version the route was computed against.
        query_truncated: the query was longer than the router's cap and only its head was routed.
        confidence: calibrated probability that the best adapter is the right one (``smoa.routing.calibrate``);
            an empty route (no adapter fits: the base model alone) carries the confidence of its best candidate.
        escalated: the static fast path was unsure and the main encoder decided the route (cascade).
    """

    adapter_ids: list[str]
    routing_scores: list[float]
    weights: list[float]
    routing_latency_ms: float
    strategy: RoutingStrategy
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    degraded: bool = False
    library_version: int = 0
    query_truncated: bool = False
    confidence: float = 0.0
    escalated: bool = False

    def __len__(self) -> int:
        return len(self.adapter_ids)
