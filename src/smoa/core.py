"""`LibraryCore`: the one owner of a library's truth (catalog, weight store, caches, usage, routing index).

::

    caller ──► LibraryCore.<mutation>(...)            one lock held from validation to the last cache drop
                 1. validate (nothing touched yet)
                 2. write weight files                 (content-addressed; an orphan at worst)
                 3. commit the catalog transaction     (bumps the generation; triggers log (generation, key))
                 4. catch up from the change log       (directory + routing index apply exactly the logged keys)
                 5. invalidate caches                  (weights keyed by (id, version); routes by generation)

    route(query) ──► generation check (in memory) ──► router ──► ids via the in-memory directory
    mixture(route) ──► directory (id -> key, version, status, leaves) ──► weight cache (id, version)

Step 4 is the *same* code whatever wrote the catalog: a mutation of this core, a write that went around it, or
another process (:meth:`LibraryCore.refresh` reads the committed generation). So the index can never stay behind
the catalog: every :meth:`route` compares the catalog generation this process knows with the generation the
index reflects and, if behind, applies the change log — not a rebuild (a rebuild only when the log was trimmed).

The warm hot path (route -> mixture) reads no SQL: ids, versions, statuses and composite leaves come from the
directory, weights from the cache under ``(id, version)``; a cache miss reads bytes and version in one statement.
Usage is counted by key in memory and written in batches.

The library records what it was built with (``encoder``, ``encoder_dim``, ``key_format``, ``profile``): opened
with another encoder it re-encodes every routing key from the stored routing texts (tags, description,
examples) in one transaction before routing anything; another base-model profile is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from smoa.adapter.profile import BaseProfile
from smoa.adapter.spec import Adapter, AdapterSpec, validate_spec
from smoa.adapter.weights import LoraWeights
from smoa.cache.lru import LRUCache
from smoa.config import AdapterSpecialization, RoutingStrategy, SMoAConfig
from smoa.errors import (
    AdapterNotFoundError,
    CompositionError,
    InvalidAdapterError,
    InvalidInputError,
    SmoaError,
    StorageError,
)
from smoa.library import AdapterLibrary
from smoa.routing.route import Route
from smoa.storage.base import KEY_FORMAT, RoutingRow

NEGATIVES_META = "routing_negatives"  # catalog meta key: the user's negative examples (JSON list of texts)

logger = logging.getLogger(__name__)

Mixture = list[tuple[tuple[str, int], LoraWeights, float]]  # ((adapter id, version), weights, mixing weight)
_ENCODE_BATCH = 1024
_CREATE_CHUNK = 2000
_APPLY_CHUNK = 2000


@dataclass(frozen=True, slots=True)
class Entry:
    """One adapter in the in-memory directory (a snapshot of its catalog row, per generation)."""

    key: int
    id: str
    version: int
    status: str
    members: tuple[tuple[str, float], ...]
    pinned: bool


class LibraryCore:
    """The synchronous core: every read and every mutation of one library goes through it.

    Args:
        config: the validated configuration.
        profile: the base-model profile (default ``config.base_profile``).
        encoder: an encoder to use instead of ``config.encoder`` (tests).
        progress: show a progress bar while re-encoding keys after an encoder change.

    Raises:
        StorageError: the directory cannot be opened (the message says why and how to recover).
        ProfileMismatchError: the library was built for another base-model profile.
    """

    def __init__(
        self, config: SMoAConfig, profile: BaseProfile | None = None, *, encoder: Any | None = None,
        progress: bool = False,
    ) -> None:  # fmt: skip
        self.config = config
        self._lock = threading.RLock()
        self._closed = True
        self.store: AdapterLibrary | None = None
        self.router: Any = None
        self._by_id: dict[str, Entry] = {}
        self._by_key: dict[int, Entry] = {}
        self._aliases: dict[str, str] = {}
        self._leaves: dict[str, tuple[tuple[str, float], ...]] = {}
        self._applied = -1
        self._composites: LRUCache[tuple[Any, ...], LoraWeights] = LRUCache(
            max_items=max(1, config.max_loaded_adapters), max_bytes=config.cache_max_bytes, size_of=lambda w: w.nbytes
        )
        self.reencoded = 0
        try:
            self.store = AdapterLibrary(config, profile)
            self._open(encoder, progress)
        except BaseException:
            self._release()
            raise
        self._closed = False
        if self.store._temporary:  # a temporary library whose close() is never called still goes away
            self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.store.directory), True)

    def _open(self, encoder: Any | None, progress: bool) -> None:
        from smoa.routing.router import Router

        store = self._store
        index_dir = store.directory / "index" if store.persistent_index else None
        self.router = Router(self.config, index_dir, resolve_ids=self._ids_for_keys, encoder=encoder)
        self._reload_directory()
        self._check_encoder(progress)
        self._open_index()
        if not self.config.lazy_loading:
            self._warm()

    def _release(self) -> None:
        if self.router is not None:
            with contextlib.suppress(Exception):
                self.router.close()
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.close()

    # == reads ==================================================================================================
    @property
    def _store(self) -> AdapterLibrary:
        if self.store is None:
            raise InvalidInputError("the library is closed")
        return self.store

    @property
    def profile(self) -> BaseProfile:
        return self._store.profile

    @property
    def directory(self) -> Path:
        return self._store.directory

    @property
    def catalog(self) -> Any:
        """The catalog backend (read it freely; write only through this core)."""
        return self._store.catalog

    @property
    def cache(self) -> Any:
        return self._store.cache

    @property
    def queries(self) -> int:
        return self._store.queries

    @property
    def generation(self) -> int:
        return int(self._store.catalog.generation)

    @property
    def total_adapters(self) -> int:
        return self._store.total_adapters

    def __len__(self) -> int:
        return self._store.total_adapters

    @property
    def loaded_adapters(self) -> int:
        return self._store.loaded_adapters

    def __contains__(self, adapter_id: object) -> bool:
        if not isinstance(adapter_id, str):
            return False
        with self._lock:
            self._catch_up()
            entry = self._by_id.get(self._resolve(adapter_id))
            return entry is not None and entry.status != "merged"

    def resolve(self, adapter_id: str) -> str:
        """The current id for ``adapter_id`` (merge aliases followed, in memory)."""
        self._check_open()
        _check_id(adapter_id)
        with self._lock:
            self._catch_up()
            return self._resolve(adapter_id)

    def get_adapter(self, adapter_id: str) -> Adapter:
        """Metadata of an adapter (an alias of a merged adapter resolves to the merged one)."""
        return self._store.catalog.get(self.resolve(adapter_id))

    def get_weights(self, adapter_id: str) -> LoraWeights:
        """An adapter's factors; a COMPOSITE's exact ``cat`` materialisation (built once, cached per versions)."""
        leaves = self.flatten(adapter_id)
        entry = self._entry(self.resolve(adapter_id))
        if not entry.members:
            return self._load(entry)[1]
        loaded = [(self._load(self._entry(leaf)), w) for leaf, w in leaves]
        cache_key = (entry.id, tuple((leaf, v) for (leaf, _), ((v, _), _) in zip(leaves, loaded)))
        with self._lock:
            hit = self._composites.get(cache_key)
        if hit is not None:
            return hit
        from smoa.compose.merge import combine

        merged = combine([wt for (_, wt), _ in loaded], [w for _, w in loaded], method="cat")
        with self._lock:
            self._composites.put(cache_key, merged)
        return merged

    def flatten(self, adapter_id: str) -> list[tuple[str, float]]:
        """Leaf adapters and their effective weights (itself at 1.0 unless composite), from the directory."""
        with self._lock:
            self._catch_up()
            return list(self._flatten(self._resolve(adapter_id)))

    def iter_adapters(self, statuses: Sequence[str] = ("active", "archived")) -> Iterator[Adapter]:
        return self._store.iter_adapters(statuses)

    def iter_weights(self, adapter_ids: Sequence[str]) -> Iterator[tuple[str, LoraWeights]]:
        """Weights read past the cache (a library-wide scan must not evict the working set)."""
        return self._store.iter_weights(adapter_ids)

    def list_adapters(
        self, filter: str | None = None, offset: int = 0, limit: int = 100, status: str | Sequence[str] = ("active", "archived")
    ) -> list[Adapter]:  # fmt: skip
        """A page of adapters by creation order; ``filter`` keeps those holding that tag (normalised)."""
        for name, value, hi in (("offset", offset, 10**12), ("limit", limit, 100_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= hi:
                raise InvalidInputError(f"`{name}` must be an int in [0, {hi}], got {value!r:.100}")
        statuses = [status] if isinstance(status, str) else list(status)
        bad = [s for s in statuses if s not in ("active", "archived", "merged")]
        if bad or not statuses:
            raise InvalidInputError(f"`status` must be among 'active', 'archived', 'merged', got {status!r:.100}")
        tag = None
        if filter is not None:
            from smoa.adapter.tags import normalize_tags

            tag = normalize_tags([filter], "filter")[0]
        return self._store.catalog.page(statuses, offset, limit, tag)

    def routing_keys_of(self, adapter_id: str) -> np.ndarray | None:
        """The adapter's stored routing keys, float32 ``[P, dim]`` (None when it has none)."""
        entry = self._entry(self.resolve(adapter_id))
        row = next(iter(self._store.catalog.routing_rows([entry.key])), None)
        if row is None or not row.embedding:
            return None
        return np.frombuffer(row.embedding, np.float32).reshape(-1, int(self.router.dim))

    def routing_row(self, key: int) -> tuple[int, np.ndarray, list[str], list[str]] | None:
        """``(key, first routing key [dim], domain_tags, skill_tags)`` of an active adapter with a key (older API)."""
        row = next(iter(self._store.catalog.routing_rows([int(key)])), None)
        if row is None or row.status != "active" or not row.embedding:
            return None
        return row.key, np.frombuffer(row.embedding, np.float32)[: int(self.router.dim)], row.domain_tags, row.skill_tags

    def ids_for_keys(self, keys: Sequence[int]) -> list[str]:
        return self._ids_for_keys(keys)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            stats = self._store.statistics()
            stats.update(encoder=self.router.encoder.name, encoder_dim=int(self.router.dim), key_format=KEY_FORMAT,
                         index_generation=self._applied, directory_size=len(self._by_id),
                         reencoded_keys=self.reencoded)  # fmt: skip
            return stats

    def cache_statistics(self) -> dict[str, Any]:
        """Every cache this core owns: weights (two tiers), composites, routes, query embeddings."""
        with self._lock:
            c = self._composites.stats()
            return {
                "weights": self._store.cache.statistics(),
                "composites": {"hits": c.hits, "misses": c.misses, "evictions": c.evictions, "items": c.items,
                               "bytes": c.bytes, "max_bytes": self.config.cache_max_bytes},  # fmt: skip
                "routes": {"items": int(self.router.statistics().get("route_cache_size", 0)),
                           "max_items": self.config.route_cache_size},
                "embeddings": self.router.encoder.stats(),
            }

    # == routing and mixing (the hot path) ======================================================================
    def route(
        self, query: str, metadata: Mapping[str, Any] | None = None, strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:  # fmt: skip
        """Route a query; the index first catches up if the catalog moved on. Usage is counted by key."""
        with self._lock:
            self._check_open()
            self._catch_up()
            route = self.router.route(query, metadata, strategy, k)
            keep = [(i, s, w) for i, s, w in zip(route.adapter_ids, route.routing_scores, route.weights)
                    if (e := self._by_id.get(i)) is not None and e.status == "active"]  # fmt: skip
            if len(keep) != len(route.adapter_ids):  # an invariant: the index never names an inactive adapter
                logger.error("smoa core: route named inactive adapters %s", set(route.adapter_ids) - {i for i, _, _ in keep})
                route = replace(route, adapter_ids=[i for i, _, _ in keep], routing_scores=[s for _, s, _ in keep],
                                weights=[w for _, _, w in keep])  # fmt: skip
            keys = [self._by_id[i].key for i in route.adapter_ids]
        self._store.record_usage_keys(keys)
        return route

    def mixture(self, route: Route | Sequence[tuple[str, float]], *, skip_missing: bool | None = None) -> Mixture:
        """``[((leaf id, version), weights, weight)]`` of a route (composites flattened, weights multiplied).

        For a :class:`Route` an adapter deleted or archived since it was routed is left out (never served
        stale); for explicit ``(id, weight)`` pairs an unknown id raises :class:`AdapterNotFoundError`.
        """
        skip = isinstance(route, Route) if skip_missing is None else skip_missing
        pairs = list(zip(route.adapter_ids, route.weights)) if isinstance(route, Route) else list(route)
        plan: list[tuple[Entry, float]] = []
        with self._lock:
            self._check_open()
            self._catch_up()
            for item in pairs:
                if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                    raise InvalidInputError(f"a mixture item must be (adapter_id, weight), got {item!r:.100}")
                aid, w = item
                rid = self._resolve(aid)
                entry = self._by_id.get(rid)
                if entry is None or (skip and entry.status != "active"):
                    if skip:
                        continue
                    raise AdapterNotFoundError(f"no adapter with id {aid!r}")
                for leaf, lw in self._flatten(rid):
                    plan.append((self._by_id[leaf], float(w) * lw))
        out: Mixture = []
        for entry, w in plan:  # weights outside the lock: a miss reads bytes + version in one statement
            try:
                version, weights = self._load(entry)
            except AdapterNotFoundError:
                if skip:
                    continue
                raise
            out.append(((entry.id, version), weights, w))
        return out

    def refresh(self) -> int:
        """Read the committed generation (other processes' writes) and catch up; returns the generation."""
        with self._lock:
            self._check_open()
            self._store.catalog.read_generation()
            self._catch_up()
            return self._applied

    def record_usage(self, adapter_ids: Sequence[str], *, query: bool = True) -> None:
        with self._lock:
            keys = [e.key for i in adapter_ids if (e := self._by_id.get(self._resolve(i))) is not None]
        self._store.record_usage_keys(keys, query=query)

    def flush_usage(self) -> None:
        self._store.flush_usage()

    # == mutations ==============================================================================================
    def create(self, spec: AdapterSpec | Mapping[str, Any]) -> Adapter:
        return self.create_many([spec])[0]

    def create_many(self, specs: Sequence[AdapterSpec | Mapping[str, Any]], learn_keys: bool = False) -> list[Adapter]:
        """Create adapters in one transaction (all or none), routing keys encoded in batches; ``[]`` -> ``[]``.

        ``learn_keys=True``: the keys of the adapters given ``examples`` are trained jointly to separate each
        other's examples (:meth:`Router.routing_keys`).
        """
        if isinstance(specs, (str, bytes, Mapping)) or not isinstance(specs, Sequence):
            raise InvalidInputError(f"`specs` must be a list of AdapterSpec or mappings, got {type(specs).__name__}")
        if not isinstance(learn_keys, bool):
            raise InvalidInputError(f"`learn_keys` must be a bool, got {learn_keys!r:.100}")
        if not specs:
            return []
        parsed = [validate_spec(s, where=f"adapter {i}" if len(specs) > 1 else "") for i, s in enumerate(specs)]
        with self._lock:
            self._check_open()
            self._catch_up()
            try:
                if learn_keys:  # keys trained jointly: all at once
                    vectors = self.router.routing_keys([self._routing_text(s) for s in parsed], learn=True)
                    adapters = self._store.create_many(parsed, vectors)
                else:  # keys encoded chunk by chunk while the rows stream into one transaction
                    adapters = self._store.create_many(
                        parsed, embed=lambda part: self.router.encode_keys([self._routing_text(s) for s in part]),
                        chunk=_CREATE_CHUNK,
                    )  # fmt: skip  # [P_i, dim] per adapter (prototypes of its examples)
            finally:
                self._catch_up()
            return adapters

    def update_weights(self, adapter_id: str, weights: LoraWeights | Mapping[str, Any]) -> Adapter:
        """New factors: version bumped, cached copies dropped, cached routes invalidated."""
        from smoa.adapter.spec import coerce_weights

        if not isinstance(weights, LoraWeights):
            try:
                weights = coerce_weights(weights, None, name="weights")
            except InvalidAdapterError:
                raise
            except (TypeError, AttributeError, ValueError) as exc:
                raise InvalidInputError(f"`weights` must be LoraWeights or {{module: (A, B)}}: {exc}") from None
        return self._mutate(lambda: self._store.update_weights(self._live_id(adapter_id), weights))

    def update_adapter(
        self, adapter_id: str, *, domain_tags: Sequence[str] | None = None, skill_tags: Sequence[str] | None = None,
        description: str | None = None, examples: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Adapter:  # fmt: skip
        """Change routing texts (and metadata); the routing key is recomputed from the new texts."""
        with self._lock:
            self._check_open()
            self._catch_up()
            ad = self.get_adapter(adapter_id)
            probe = validate_spec(AdapterSpec(
                domain_tags=ad.domain_tags if domain_tags is None else domain_tags,
                skill_tags=ad.skill_tags if skill_tags is None else skill_tags,
                description=ad.description if description is None else description,
                examples=ad.examples if examples is None else examples,
                metadata=ad.metadata if metadata is None else metadata,
            ))  # fmt: skip
            if ad.is_composite:
                probe = replace(probe, specialization=AdapterSpecialization.COMPOSITE, members=list(ad.members))
            key = self.router.encode_keys([self._routing_text(probe)])[0]  # [P, dim]
            try:
                self._store.catalog.update_fields(
                    ad.key, domain_tags=None if domain_tags is None else probe.domain_tags,
                    skill_tags=None if skill_tags is None else probe.skill_tags,
                    description=None if description is None else probe.description,
                    examples=None if examples is None else probe.examples,
                    metadata=None if metadata is None else dict(probe.metadata),
                    embedding=np.asarray(key, np.float32).tobytes(),
                )  # fmt: skip
            finally:
                self._catch_up()
            return self._store.catalog.get(ad.id)

    def set_routing_keys(self, adapter_id: str, vectors: np.ndarray) -> None:
        """Replace an adapter's routing keys: ``[dim]`` (one key) or ``[P, dim]`` (P prototypes), unit-normalised."""
        arr = np.asarray(vectors, dtype=np.float32)
        dim = int(self.router.dim)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != dim or not 1 <= arr.shape[0] <= 4096 or not np.isfinite(arr).all():
            raise InvalidInputError(f"`vectors` must be finite float32 [dim] or [P, dim] with dim {dim}, got shape {arr.shape}")
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        if (norms < 1e-12).any():
            raise InvalidInputError("`vectors` holds a zero vector; a routing key needs a direction")
        arr = np.ascontiguousarray(arr / norms, np.float32)
        self._mutate(lambda: self._store.catalog.set_embeddings([(self._entry(self._live_id(adapter_id)).key, arr.tobytes())]))

    set_embedding = set_routing_keys  # the name older callers used

    def delete(self, adapter_id: str) -> Adapter:
        """Delete an adapter (an alias after a merge: only that id; see the guide's "Aliases")."""
        return self.delete_many([adapter_id])[0]

    def delete_many(self, adapter_ids: Sequence[str]) -> list[Adapter]:
        """Delete adapters in one transaction (all or nothing)."""
        if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Sequence):
            raise InvalidInputError(f"`adapter_ids` must be a list of ids, got {adapter_ids!r:.100}")
        if not adapter_ids:
            return []
        return self._mutate(lambda: self._store.delete_many(list(adapter_ids)))

    def archive(self, adapter_id: str) -> int:
        """Move the weights to cold storage: not routed, not mixed, restorable. Returns hot bytes freed."""
        return self._mutate(lambda: self._store.archive(self._live_id(adapter_id)))

    def restore(self, adapter_id: str) -> Adapter:
        """Bring an archived adapter back (routed again)."""
        return self._mutate(lambda: self._store.restore(self._live_id(adapter_id)))

    def pin(self, adapter_id: str) -> None:
        """Protect from pruning and keep loaded."""
        self._mutate(lambda: self._store.pin(self._live_id(adapter_id)))

    def unpin(self, adapter_id: str) -> None:
        self._mutate(lambda: self._store.unpin(self._live_id(adapter_id)))

    def merge_into(self, source_ids: Sequence[str], merged_id: str, method: str) -> int:
        """Record that ``source_ids`` were merged into ``merged_id`` (sources' ids become aliases)."""
        return self._mutate(lambda: self._store.merge_into(list(source_ids), merged_id, method))

    def merge(self, source_ids: Sequence[str], spec: AdapterSpec, method: str) -> tuple[Adapter, int]:
        """Create the merged adapter ``spec`` and record the merge, all or nothing under one lock.

        Raises:
            AdapterNotFoundError: a source is gone or no longer active (nothing changed).
        """
        with self._lock:
            self._check_open()
            self._catch_up()
            for sid in source_ids:
                entry = self._by_id.get(self._resolve(sid))
                if entry is None or entry.status != "active":
                    raise AdapterNotFoundError(f"no active adapter with id {sid!r} (deleted or archived meanwhile)")
            new = self.create_many([spec])[0]
            try:
                merge_id = self.merge_into(list(source_ids), new.id, method)
            except BaseException:
                with contextlib.suppress(SmoaError):
                    self.delete(new.id)
                raise
            return self._store.catalog.get(new.id), merge_id

    def undo_merge(self, merge_id: int) -> list[str]:
        """Undo a merge: sources active again, the merged adapter deleted — everything or nothing."""
        return self._mutate(lambda: self._store.undo_merge(merge_id)[0])

    def prune(self, adapter_ids: Sequence[str], action: str = "archive") -> list[tuple[str, int]]:
        """Archive or delete idle adapters, one locked step each; ids gone or inactive meanwhile are skipped.
        Returns ``(id, bytes freed)`` of each adapter pruned."""
        if action not in ("archive", "delete"):
            raise InvalidInputError(f"`action` must be 'archive' or 'delete', got {action!r:.100}")
        done: list[tuple[str, int]] = []
        for aid in adapter_ids:
            with self._lock:
                self._check_open()
                self._catch_up()
                entry = self._by_id.get(self._resolve(aid))
                if entry is None or entry.status != "active" or entry.pinned:
                    continue
                try:
                    if action == "archive":
                        done.append((entry.id, int(self.archive(entry.id))))
                    else:
                        self.delete(entry.id)
                        done.append((entry.id, 0))
                except (AdapterNotFoundError, CompositionError):
                    continue
        return done

    def compact(self) -> int:
        """Reclaim catalog space (VACUUM) and trim the change log the persisted index no longer needs."""
        with self._lock:
            self._check_open()
            self._catch_up()
            self._store.flush_usage()
            self.router.save()
            self._store.catalog.trim_changes(self._applied)
            return int(self._store.catalog.compact())

    def add_negative_examples(self, texts: Sequence[str]) -> int:
        """Out-of-scope texts no adapter should serve (they tune the ``"auto"`` routing threshold); returns how
        many are registered in all."""
        with self._lock:
            self._check_open()
            clean = self.router.clean_negatives(texts)  # raises before anything is written
            if not clean:
                return int(self.router.statistics()["negatives"])
            stored = self._negatives()
            self._store.catalog.set_meta(NEGATIVES_META, json.dumps(stored + clean))  # durable first, then the index
            return int(self.router.add_negative_examples(clean))

    def _negatives(self) -> list[str]:
        """The user's negatives as the catalog holds them (meta ``routing_negatives``, a JSON list of texts)."""
        raw = self._store.catalog.get_meta(NEGATIVES_META)
        try:
            got = json.loads(raw) if raw else []
        except ValueError:
            got = None
        if not isinstance(got, list) or not all(isinstance(t, str) for t in got):
            raise StorageError(f"catalog meta {NEGATIVES_META!r} is not a JSON list of strings: {str(raw)[:80]!r}")
        return got

    def refit_routing(self) -> dict[str, float]:
        """Refit the learned routing keys from every adapter's examples (the router's lock only, not the core's:
        routes keep being served)."""
        self._check_open()
        return dict(self.router.refit())

    def reindex(self, adapter_ids: Sequence[str] = ()) -> None:
        """Kept for older callers: the index always catches up from the change log by itself."""
        with self._lock:
            self._catch_up()

    def close(self) -> None:
        """Flush usage, persist the index at the catalog's generation, release the library."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with contextlib.suppress(StorageError):
                    self._catch_up()
            finally:
                self._release()
                self.store = None

    def __enter__(self) -> LibraryCore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # == internals ==============================================================================================
    def _check_open(self) -> None:
        if self._closed or self.store is None:
            raise InvalidInputError("the library is closed")

    def _mutate(self, change: Any) -> Any:
        """Run one store mutation under the lock, then apply the logged change to directory + index."""
        with self._lock:
            self._check_open()
            self._catch_up()
            try:
                return change()
            finally:
                self._catch_up()

    def _live_id(self, adapter_id: str) -> str:
        _check_id(adapter_id)
        rid = self._resolve(adapter_id)
        if rid not in self._by_id:
            raise AdapterNotFoundError(f"no adapter with id {adapter_id!r}")
        return rid

    def _resolve(self, adapter_id: str) -> str:
        current, seen = adapter_id, 0
        while (target := self._aliases.get(current)) is not None and seen < 32:
            current, seen = target, seen + 1
        return current

    def _entry(self, adapter_id: str) -> Entry:
        entry = self._by_id.get(adapter_id)
        if entry is None:
            raise AdapterNotFoundError(f"no adapter with id {adapter_id!r}")
        return entry

    def _flatten(self, adapter_id: str) -> tuple[tuple[str, float], ...]:
        hit = self._leaves.get(adapter_id)
        if hit is not None:
            return hit
        entry = self._entry(adapter_id)
        if not entry.members:
            leaves: tuple[tuple[str, float], ...] = ((entry.id, 1.0),)
        else:
            from smoa.compose.composite import flatten

            def members_of(aid: str) -> list[tuple[str, float]] | None:
                e = self._entry(self._resolve(aid))
                return [(self._resolve(m), w) for m, w in e.members] if e.members else None

            leaves = tuple(flatten(entry.id, members_of))
        self._leaves[adapter_id] = leaves
        return leaves

    def _load(self, entry: Entry) -> tuple[int, LoraWeights]:
        return self._store.load(entry.id, entry.key, entry.version)

    def _ids_for_keys(self, keys: Sequence[int]) -> list[str]:
        """Router callback: key -> id from the directory (``""`` for a key that is not an active adapter)."""
        out = []
        for k in keys:
            e = self._by_key.get(int(k))
            out.append(e.id if e is not None and e.status == "active" else "")
        return out

    def _routing_text(self, spec: AdapterSpec) -> Any:
        from smoa.routing.router import RoutingText

        d, s = list(spec.domain_tags), list(spec.skill_tags)
        if spec.specialization is AdapterSpecialization.COMPOSITE and not (d or s or spec.description):
            d, s = self._member_tags(spec.members or [])
        return RoutingText(domain_tags=d, skill_tags=s, description=str(spec.description), examples=list(spec.examples))

    def _member_tags(self, members: Sequence[tuple[str, float]]) -> tuple[list[str], list[str]]:
        d: dict[str, None] = {}
        s: dict[str, None] = {}
        for mid, _ in members:
            ad = self._store.catalog.get(self._live_id(mid))
            d.update(dict.fromkeys(ad.domain_tags))
            s.update(dict.fromkeys(ad.skill_tags))
        return list(d)[:64], list(s)[:64]

    # -- directory + index upkeep ------------------------------------------------------------------------------
    def _reload_directory(self) -> None:
        catalog = self._store.catalog
        gen = catalog.generation
        rows = list(catalog.directory_rows())
        self._by_id = {r.id: Entry(r.key, r.id, r.version, r.status, r.members, r.pinned) for r in rows}
        self._by_key = {e.key: e for e in self._by_id.values()}
        self._aliases = catalog.aliases()
        self._leaves = {}
        self._dir_gen = gen

    def _catch_up(self) -> None:
        """Apply every logged change after the generation the index reflects (no-op when up to date)."""
        if self.store is None:
            return
        catalog = self.store.catalog
        gen = int(catalog.generation)
        if gen == self._applied:
            return
        keys = catalog.changes_since(self._applied) if 0 <= self._applied <= gen else None
        if keys is None:
            self._reload_directory()
            self.router.rebuild(self._entries(catalog.routing_rows()), gen)
            self._applied = gen
            return
        if 0 in keys:
            self._aliases = catalog.aliases()
        keys = [k for k in keys if k != 0]
        fresh = {r.key: r for r in catalog.directory_rows(keys)}
        for k in keys:
            old = self._by_key.pop(k, None)
            if old is not None:
                self._by_id.pop(old.id, None)
            row = fresh.get(k)
            if row is not None:
                e = Entry(row.key, row.id, row.version, row.status, row.members, row.pinned)
                self._by_id[e.id], self._by_key[k] = e, e
        self._leaves = {}
        if not keys:  # nothing routed changed (aliases only): the router still moves to this generation
            self.router.apply([], [], gen)
        for i in range(0, len(keys), _APPLY_CHUNK):  # a bulk create's keys in chunks: bounded transient memory
            part = keys[i : i + _APPLY_CHUNK]
            upserts = list(self._entries(catalog.routing_rows(part)))
            live = {e.key for e in upserts}
            self.router.apply(upserts, [k for k in part if k not in live], gen)
        self._applied = gen

    def _entries(self, rows: Any) -> Iterator[Any]:
        """Router entries of the active rows that have keys (vectors ``[P, dim]``)."""
        from smoa.routing.router import KeyEntry

        dim = int(self.router.dim)
        for r in rows:
            if r.status != "active" or r.embedding is None or len(r.embedding) % (4 * dim) or not r.embedding:
                continue
            yield KeyEntry(r.key, np.frombuffer(r.embedding, np.float32).reshape(-1, dim), r.domain_tags, r.skill_tags)

    def _open_index(self) -> None:
        """Persisted index if usable, then catch up from the log; else one rebuild from the catalog."""
        gen = int(self._store.catalog.generation)
        saved = self.router.load(gen)
        if saved is not None and self._store.catalog.changes_since(saved) is not None:
            self._applied = saved
            self._catch_up()
            self._sync_negatives()
            return
        n = self.router.rebuild(self._entries(self._store.catalog.routing_rows()), gen)
        self._applied = gen
        if self.router.index_dir is not None and n:
            logger.info("smoa core: built the routing index of %d adapters from the catalog", n)
        self._sync_negatives()

    def _sync_negatives(self) -> None:
        """The router's negatives = the catalog's (a lost or rebuilt index keeps the user's negatives)."""
        stored = self._negatives()
        if list(self.router.negative_texts()) != stored:
            self.router.set_negative_examples(stored)

    def _check_encoder(self, progress: bool) -> None:
        """Record the encoder at first open; re-encode every key if the library was built with another."""
        catalog = self._store.catalog
        name, dim = self.router.encoder.name, int(self.router.dim)
        stored, stored_dim = catalog.get_meta("encoder"), catalog.get_meta("encoder_dim")
        if stored is None:  # a library from before schema 2: the index's meta.json says which encoder made it
            stored, stored_dim = self._legacy_encoder()
        if stored is not None and (stored != name or int(stored_dim or -1) != dim):
            logger.warning("smoa core: library keys were made by encoder %r (dim %s); re-encoding them with %r (dim %d)",
                           stored, stored_dim, name, dim)  # fmt: skip
            self.reencoded = self._reencode(progress)
        for key, value in (("encoder", name), ("encoder_dim", str(dim)), ("key_format", KEY_FORMAT)):
            if catalog.get_meta(key) != value:
                catalog.set_meta(key, value)

    def _legacy_encoder(self) -> tuple[str | None, str | None]:
        if not self._store.persistent_index:
            return None, None
        try:
            meta = json.loads((self._store.directory / "index" / "meta.json").read_text())
            return str(meta["encoder"]), str(meta["dim"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        sample = next((r for r in self._store.catalog.routing_rows() if r.embedding), None)
        if sample is not None and len(sample.embedding) != 4 * int(self.router.dim):
            return "unknown", str(len(sample.embedding) // 4)
        return None, None

    def _reencode(self, progress: bool) -> int:
        """New keys for every adapter from its stored routing texts: batched, one transaction."""
        from tqdm.auto import tqdm

        from smoa.routing.router import RoutingText

        rows: list[RoutingRow] = list(self._store.catalog.routing_rows())
        items: list[tuple[int, bytes | None]] = []
        with tqdm(total=len(rows), desc="re-encoding routing keys", unit="key", disable=not progress) as bar:
            for s in range(0, len(rows), _ENCODE_BATCH):
                chunk = rows[s : s + _ENCODE_BATCH]
                texts = [RoutingText(r.domain_tags, r.skill_tags, r.description, r.examples) for r in chunk]
                vecs = self.router.encode_keys(texts)  # [P_i, dim] each
                items.extend((r.key, np.ascontiguousarray(v, np.float32).tobytes()) for r, v in zip(chunk, vecs))
                bar.update(len(chunk))
        if items:
            self._store.catalog.set_embeddings(items)
        return len(items)

    def _warm(self) -> None:
        """``lazy_loading=False``: load active adapters' weights up to the cache's item and byte budgets."""
        budget_items = self.config.max_loaded_adapters
        budget_bytes = self.config.cache_max_bytes
        used = 0
        for entry in list(self._by_id.values()):
            if budget_items <= 0:
                break
            if entry.status != "active" or entry.members:
                continue
            try:
                _, w = self._load(entry)
            except SmoaError as exc:
                logger.warning("smoa core: could not preload %s: %s", entry.id, exc)
                continue
            used += w.nbytes
            budget_items -= 1
            if used >= budget_bytes:
                break


def _check_id(adapter_id: object) -> None:
    from smoa.adapter.spec import MAX_ID_CHARS, is_unicode

    if not isinstance(adapter_id, str):
        raise InvalidInputError(f"`adapter_id` must be a string, got {adapter_id!r:.100}")
    if len(adapter_id) > MAX_ID_CHARS or not is_unicode(adapter_id):
        raise InvalidInputError(
            f"`adapter_id` must be valid Unicode of at most {MAX_ID_CHARS} characters, got {adapter_id!r:.100}"
        )


__all__ = ["Entry", "LibraryCore", "Mixture"]
