"""The router: encoder + indexes + strategy -> :class:`~smoa.routing.route.Route`.

::

    query ──normalise/cap──► route cache (query, metadata terms, strategy, k, generation) ──hit──► Route
       │ miss
       ├─ encode (LRU of query embeddings) ──► q [dim]
       ├─ search: SEMANTIC      ANN top-C by cos(q, key)  ∪  members of small groups near q, scored exactly
       │          TASK_BASED    tag index (metadata terms, else query words found among the tags)
       │          HYBRID        SEMANTIC's candidates  ∪  tag top-C among the adapters holding the query's
       │                        rarest terms (at most TAG_SCAN_LIMIT postings), each candidate scored on both
       │          HIERARCHICAL  best groups by centroid cos, then ANN restricted to their members
       └─ fuse: scores -> threshold -> top-k (ties by id) -> softmax(score / temperature) weights

Bad input: a non-string query or non-mapping metadata, a metadata value that is not a string (or list of
strings) -> :class:`~smoa.errors.InvalidInputError` naming it; unknown metadata keys are ignored. An empty (or
all-blank) query routes by its metadata alone (TASK_BASED); with no usable metadata either it returns the empty
route (the base model alone). A query longer than ``MAX_QUERY_CHARS`` is cut to that length and the route says
so (``query_truncated``); the encoder further truncates to 256 tokens.

Small groups (the ANN's blind spot): an HNSW graph built over a million keys can leave a small group of keys
that sits apart from the rest (a new domain's handful of adapters among a million others) with no edge leading
into it, so the greedy walk never reaches it. When the index is approximate, SEMANTIC and HYBRID therefore also
take, among the groups (domain tags, or clusters of untagged keys) with at most ``SMALL_GROUP_LIMIT`` members,
the ``RESCUE_GROUPS`` whose centroids are nearest to the query, and score every member exhaustively (on its
8-bit code, like the graph). Large groups are dense enough for the graph. Cost: one ``[groups, dim]`` product
and at most ``RESCUE_GROUPS * SMALL_GROUP_LIMIT`` decoded keys per query.

Latency budget: when encode + search already took ``routing_latency_budget_ms``, HYBRID skips the tag side
(cosine only) and HIERARCHICAL falls back to plain ANN; the route is marked ``degraded`` and counted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from smoa.config import RoutingStrategy, SMoAConfig, coerce_enum
from smoa.errors import ConfigError, InvalidInputError
from smoa.routing.encoders import CachedEncoder, Encoder, get_encoder
from smoa.routing.index import GroupIndex, IndexParams, StaleIndexError, TagIndex, VectorIndex
from smoa.routing.index.store import load_indexes, save_indexes
from smoa.routing.index.tags import query_terms_from_metadata
from smoa.routing.keys import TEXT_WEIGHT, blend_keys, example_centroids, refine_keys, routing_text
from smoa.routing.route import Route
from smoa.routing.strategies import METADATA_TAG_WEIGHT, TEXT_TAG_WEIGHT, fuse, select_top, softmax_weights

logger = logging.getLogger(__name__)

MAX_QUERY_CHARS = 2048
N_GROUPS = 3
EXACT_GROUP_LIMIT = 20_000  # HIERARCHICAL scores the chosen groups' members exactly up to this many
LEARN_TEMPERATURE = 0.05  # refine_keys' softmax temperature, chosen on a held-out fifth of CLINC150 train
TAG_SCAN_LIMIT = 500  # postings HYBRID's tag side scans for extra candidates (rarest query terms first)
RESCUE_GROUPS = 3  # SEMANTIC / HYBRID: nearest groups whose members are scored exactly when the group is small
SMALL_GROUP_LIMIT = 256


@dataclass
class RoutingText:
    """What an adapter is routed by (its key is computed from this by :meth:`Router.routing_keys`)."""

    domain_tags: list[str]
    skill_tags: list[str]
    description: str = ""
    examples: list[str] = field(default_factory=list)


def _candidates(k: int, strategy: RoutingStrategy) -> int:
    return max(2 * k, 10) if strategy is RoutingStrategy.SEMANTIC else max(4 * k, 32)


class Router:
    """Routes queries over a library of adapter keys (see the module docstring).

    Args:
        config: routing fields of :class:`SMoAConfig` (strategy, k, threshold, temperature, budget, caches).
        index_dir: where the indexes persist (beside the catalog); ``None`` = memory only.
        resolve_ids: catalog keys -> adapter ids (same order).
        encoder: an :class:`Encoder` to use instead of ``get_encoder(config.encoder)``.
        params: vector-index knobs.
    """

    def __init__(
        self,
        config: SMoAConfig,
        index_dir: Path | None,
        resolve_ids: Callable[[Sequence[int]], list[str]],
        encoder: Encoder | None = None,
        params: IndexParams | None = None,
    ) -> None:
        self.config = config
        inner = encoder or get_encoder(config.encoder)
        self.encoder = CachedEncoder(inner, config.embedding_cache_size)
        self.dim = int(inner.dim)
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._resolve = resolve_ids
        self._params = params or IndexParams()
        self._vectors = VectorIndex(self.dim, self._params)
        self._tags = TagIndex()
        self._groups = GroupIndex(self.dim)
        self._generation = 0
        self._dirty = False
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple, Route] = OrderedDict()
        self._latencies: deque[float] = deque(maxlen=10_000)
        self._counts = {"queries": 0, "cache_hits": 0, "cache_misses": 0, "degraded": 0, "truncated": 0}

    # ------------------------------------------------------------------ keys
    def routing_keys(self, items: Sequence[RoutingText], learn: bool = False) -> np.ndarray:
        """Routing keys of ``items`` (batch encoded), float32 ``[n, dim]``, unit norm (see :mod:`.keys`).

        ``learn=True`` (bulk ingestion of adapters with examples): the keys of the items that have examples are
        then trained jointly to separate each other's examples (:func:`~smoa.routing.keys.refine_keys`); on
        CLINC150 this lifts top-1 from ~91.5 % to ~95.8 % (``docs/bench_routing.md``). Cost ~O(examples x items).
        """
        n = len(items)
        if n == 0:
            return np.zeros((0, self.dim), np.float32)
        texts = [routing_text(it.domain_tags, it.skill_tags, it.description) for it in items]
        text_vecs = self.encoder.encode_batch(texts)
        examples = [ex for it in items for ex in it.examples]
        owner = np.repeat(np.arange(n), [len(it.examples) for it in items])
        has = np.array([bool(it.examples) for it in items])
        ex_vecs = self.encoder.encode_batch(examples)
        cents = example_centroids(ex_vecs, owner, n) if examples else text_vecs
        keys = blend_keys(text_vecs, cents, has, TEXT_WEIGHT)
        if learn and has.sum() >= 2:
            keys = refine_keys(keys, ex_vecs, owner, temperature=LEARN_TEMPERATURE)
        return keys

    # ------------------------------------------------------------------ library changes
    def add(
        self,
        keys: np.ndarray,
        vectors: np.ndarray,
        tags: Sequence[tuple[list[str], list[str]]],
        generation: int,
    ) -> None:
        """Insert or replace adapters: ``keys`` int64 ``[n]``, ``vectors`` ``[n, dim]``, ``(domain, skill)`` tags."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(len(keys), -1)
        if len(tags) != len(keys) or vectors.shape[1] != self.dim:
            raise InvalidInputError(
                f"`keys` [{len(keys)}], `vectors` {tuple(vectors.shape)} and `tags` [{len(tags)}] must agree "
                f"(dim {self.dim})"
            )
        with self._lock:
            old_keys, old_vecs = self._vectors.vectors_of(keys)
            for k, v in zip(old_keys, old_vecs):
                self._groups.remove(int(k), v)
            self._vectors.add(keys, vectors)
            for k, (d, s) in zip(keys, tags):
                self._tags.add(int(k), d, s)
            self._groups.add_many(keys, vectors, [list(d) for d, _ in tags])
            self._changed(generation)

    def remove(self, keys: Sequence[int], generation: int) -> None:
        """Remove adapters by key (unknown keys are ignored)."""
        keys = np.asarray(list(keys), np.int64).reshape(-1)
        with self._lock:
            old_keys, old_vecs = self._vectors.vectors_of(keys)
            for k, v in zip(old_keys, old_vecs):
                self._groups.remove(int(k), v)
            self._vectors.remove(keys)
            for k in keys:
                self._tags.remove(int(k))
            self._changed(generation)

    def _changed(self, generation: int) -> None:
        self._generation = int(generation)
        self._cache.clear()
        self._dirty = True

    def sync(
        self,
        rows: Callable[[], Iterable[tuple[int, np.ndarray, list[str], list[str]]]],
        generation: int,
    ) -> None:
        """At open: load the persisted indexes if they reflect ``generation``, else rebuild from ``rows()``."""
        with self._lock:
            if self.index_dir is not None:
                try:
                    vectors, tags = load_indexes(self.index_dir, generation, self.encoder.name, self.dim, self._params)
                except StaleIndexError as exc:
                    reason = str(exc)
                else:
                    self._install(vectors, tags, generation)
                    self._dirty = False
                    return
            else:
                reason = ""
            n = self._rebuild(rows(), generation)
            if self.index_dir is not None and (n or not reason.startswith("no index")):
                logger.warning("smoa routing: rebuilt the index of %d adapters from the catalog (%s)", n, reason)
            if self.index_dir is not None:
                self.save()

    def _rebuild(self, rows: Iterable[tuple[int, np.ndarray, list[str], list[str]]], generation: int) -> int:
        keys: list[int] = []
        vecs: list[np.ndarray] = []
        tags = TagIndex()
        for key, vec, domain, skill in rows:
            keys.append(int(key))
            vecs.append(np.asarray(vec, np.float32).reshape(-1))
            tags.add(int(key), domain, skill)
        matrix = np.stack(vecs) if vecs else np.zeros((0, self.dim), np.float32)
        self._install(VectorIndex.build(self.dim, np.asarray(keys, np.int64), matrix, self._params), tags, generation)
        return len(keys)

    def _install(self, vectors: VectorIndex, tags: TagIndex, generation: int) -> None:
        self._vectors, self._tags = vectors, tags
        keys, vecs = vectors.items()
        self._groups = GroupIndex(self.dim)
        domains = [list((tags.tags_of(int(k)) or ((), ()))[0]) for k in keys]
        self._groups.add_many(keys, vecs, domains)
        self._changed(generation)

    # ------------------------------------------------------------------ routing
    def route(
        self,
        query: str,
        metadata: Mapping[str, Any] | None = None,
        strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:
        """Route one query (see the module docstring for strategies, scores, bad input and the budget)."""
        t0 = time.perf_counter()
        text, truncated, terms, strat, k = self._validate(query, metadata, strategy, k)
        with self._lock:
            self._counts["queries"] += 1
            self._counts["truncated"] += truncated
            cache_key = (text, tuple(sorted(terms)), strat, k, self._generation)
            cached = self._cache.get(cache_key) if self.config.enable_caching else None
            if cached is not None:
                self._cache.move_to_end(cache_key)
                self._counts["cache_hits"] += 1
                ms = (time.perf_counter() - t0) * 1e3
                self._latencies.append(ms)
                return replace(cached, cache_hit=True, routing_latency_ms=ms, timings_ms={"total": ms})
            self._counts["cache_misses"] += 1
            route = self._compute(text, terms, strat, k, t0)
            route = replace(route, query_truncated=truncated)
            if self.config.enable_caching and self.config.route_cache_size > 0:
                self._cache[cache_key] = route
                while len(self._cache) > self.config.route_cache_size:
                    self._cache.popitem(last=False)
            self._latencies.append(route.routing_latency_ms)
            self._counts["degraded"] += route.degraded
            return route

    def _validate(
        self, query: Any, metadata: Any, strategy: Any, k: Any
    ) -> tuple[str, bool, list[tuple[str, int]], RoutingStrategy, int]:
        if not isinstance(query, str):
            raise InvalidInputError(f"`query` must be a string, got {query!r} ({type(query).__name__})")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidInputError(f"`metadata` must be a mapping or None, got {metadata!r}")
        terms = query_terms_from_metadata(metadata or {})
        try:
            strat = coerce_enum(RoutingStrategy, strategy or self.config.routing_strategy, "strategy")
        except ConfigError as exc:
            raise InvalidInputError(str(exc)) from None
        k = self.config.max_active_adapters if k is None else k
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 1024:
            raise InvalidInputError(f"`k` must be an int in [1, 1024], got {k!r}")
        truncated = len(query) > MAX_QUERY_CHARS
        text = " ".join(query[:MAX_QUERY_CHARS].split())
        return text, truncated, terms, strat, k

    def _compute(self, text: str, terms: list[tuple[str, int]], strat: RoutingStrategy, k: int, t0: float) -> Route:
        timings = {"encode": 0.0, "search": 0.0, "fuse": 0.0}
        degraded = False
        if not text or len(self._vectors) == 0:
            if not text and terms and len(self._tags):
                strat = RoutingStrategy.TASK_BASED
            else:
                return self._finish([], strat, timings, False, t0)
        if strat is RoutingStrategy.TASK_BASED:
            t = time.perf_counter()
            use = terms or self._tags.match_text(text)
            scores = self._tags.score(use)
            timings["search"] = (time.perf_counter() - t) * 1e3
        else:
            t = time.perf_counter()
            q = self.encoder.encode([text])[0]  # [dim]
            timings["encode"] = (time.perf_counter() - t) * 1e3
            scores, degraded = self._semantic_side(q, text, terms, strat, k, timings, t0)
        t = time.perf_counter()
        chosen = select_top(scores, k, self.config.routing_threshold, self._resolve)
        timings["fuse"] += (time.perf_counter() - t) * 1e3
        return self._finish(chosen, strat, timings, degraded, t0)

    def _over_budget(self, t0: float) -> bool:
        return (time.perf_counter() - t0) * 1e3 > self.config.routing_latency_budget_ms

    def _semantic_side(
        self,
        q: np.ndarray,
        text: str,
        terms: list[tuple[str, int]],
        strat: RoutingStrategy,
        k: int,
        timings: dict[str, float],
        t0: float,
    ) -> tuple[dict[int, float], bool]:
        """Scores of the candidate keys for SEMANTIC / HYBRID / HIERARCHICAL, and whether it degraded."""
        n_cand = _candidates(k, strat)
        t = time.perf_counter()
        allowed = None
        degraded = False
        if strat is RoutingStrategy.HIERARCHICAL and len(self._groups) > 1:
            if self._over_budget(t0):
                degraded = True
            else:
                groups = self._groups.top_groups(q, N_GROUPS)
                allowed = np.concatenate([self._groups.members(g) for g, _ in groups])
        if allowed is not None and len(allowed) <= EXACT_GROUP_LIMIT:
            # few members: score them exactly (a filtered HNSW walk can miss a small, remote group)
            found, vecs = self._vectors.vectors_of(allowed)
            cos = {int(key): float(s) for key, s in zip(found, vecs @ q)}
        else:
            sims, keys = self._vectors.search(q[None, :], n_cand, allowed=allowed)
            cos = {int(key): float(s) for key, s in zip(keys[0], sims[0]) if key >= 0}
            if allowed is None and self._vectors.kind != "flat":
                cos.update(self._small_group_scores(q))
        timings["search"] = (time.perf_counter() - t) * 1e3
        if strat is not RoutingStrategy.HYBRID:
            return cos, degraded
        t = time.perf_counter()
        lam = METADATA_TAG_WEIGHT if terms else TEXT_TAG_WEIGHT
        terms = terms or self._tags.match_text(text)
        if not terms:
            timings["fuse"] = (time.perf_counter() - t) * 1e3
            return cos, degraded
        if self._over_budget(t0):
            timings["fuse"] = (time.perf_counter() - t) * 1e3
            return cos, True
        tag = self._tags.score_keys(terms, cos)
        rare, budget = [], TAG_SCAN_LIMIT
        for term in sorted(terms, key=lambda tf: self._tags.posting_total([tf])):
            budget -= self._tags.posting_total([term])
            if budget < 0:
                break
            rare.append(term)
        if rare:  # tag-side candidates: the adapters holding the query's rarest tags (bounded scan)
            extra = [key for key in self._tags.score(rare, limit=n_cand) if key not in cos]
            if extra:
                found, vecs = self._vectors.vectors_of(np.asarray(extra, np.int64))
                cos.update({int(key): float(s) for key, s in zip(found, vecs @ q)})
                tag.update(self._tags.score_keys(terms, found))
        scores = fuse(cos, tag, lam)
        timings["fuse"] = (time.perf_counter() - t) * 1e3
        return scores, degraded

    def _small_group_scores(self, q: np.ndarray) -> dict[int, float]:
        """Exact ``cos(q, key)`` of every member of the small groups nearest to ``q`` (module docstring)."""
        if len(self._groups) < 2:
            return {}
        small = [g for g, _ in self._groups.top_groups(q, RESCUE_GROUPS, max_size=SMALL_GROUP_LIMIT)]
        if not small:
            return {}
        found, vecs = self._vectors.vectors_of(np.concatenate([self._groups.members(g) for g in small]))
        return {int(key): float(s) for key, s in zip(found, vecs @ q)}

    def _finish(
        self, chosen: list[tuple[str, float]], strat: RoutingStrategy, timings: dict[str, float], degraded: bool, t0: float
    ) -> Route:
        scores = [s for _, s in chosen]
        return Route(
            adapter_ids=[i for i, _ in chosen],
            routing_scores=scores,
            weights=softmax_weights(scores, self.config.routing_temperature),
            routing_latency_ms=(time.perf_counter() - t0) * 1e3,
            strategy=strat,
            timings_ms=timings,
            cache_hit=False,
            degraded=degraded,
            library_version=self._generation,
        )

    # ------------------------------------------------------------------ bookkeeping
    def statistics(self) -> dict[str, Any]:
        """Counters, latency percentiles (ms, over the last 10,000 routes) and index facts."""
        with self._lock:
            lat = np.asarray(self._latencies) if self._latencies else np.zeros(1)
            return {
                **self._counts,
                "latency_p50_ms": float(np.percentile(lat, 50)),
                "latency_p99_ms": float(np.percentile(lat, 99)),
                "index_kind": self._vectors.kind,
                "index_size": len(self._vectors),
                "index_bytes": self._vectors.memory_bytes(),
                "tag_index_size": len(self._tags),
                "groups": len(self._groups),
                "encoder": self.encoder.name,
                "embedding_cache": self.encoder.stats(),
                "route_cache_size": len(self._cache),
                "generation": self._generation,
            }

    @property
    def generation(self) -> int:
        return self._generation

    def save(self) -> None:
        """Persist the indexes (no-op in memory or when nothing changed since the last save)."""
        with self._lock:
            if self.index_dir is not None and self._dirty:
                save_indexes(self.index_dir, self._vectors, self._tags, self._generation, self.encoder.name)
                self._dirty = False

    def close(self) -> None:
        """Save and drop the route cache."""
        self.save()
        with self._lock:
            self._cache.clear()


__all__ = ["MAX_QUERY_CHARS", "RESCUE_GROUPS", "SMALL_GROUP_LIMIT", "Router", "RoutingText"]
