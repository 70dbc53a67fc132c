"""`SparseAdapterMixture`: the public facade — a thin async shell over the library, router and engine.

::

    query ──► Router.route ──► Route(ids, scores, weights)
                                  │
                                  ▼
               AdapterLibrary.flatten / get_weights (LRU cache, lazy loads)  ──► Mixture [(LoraWeights, w), ...]
                                  │
                                  ▼
                         InferenceEngine.forward / generate (base model + exact per-row LoRA mixtures)

Every public coroutine has a synchronous twin with the suffix ``_sync`` (``create_adapter`` /
``create_adapter_sync``) for callers without an event loop. Quick operations run inline; model work (forward,
generate, training) and bulk writes run in a worker thread so the event loop keeps serving queries.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoa.adapter.profile import BaseProfile, profile_from_model, resolve_profile
from smoa.adapter.spec import Adapter
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity, AdapterSpecialization, RoutingStrategy, SMoAConfig
from smoa.errors import ConfigError, InvalidInputError, ProfileMismatchError
from smoa.library import AdapterLibrary, AdapterSpec
from smoa.routing.route import Route

Mixture = list[tuple[tuple[str, int], LoraWeights, float]]  # ((adapter id, version), weights, mixing weight)


class SparseAdapterMixture:
    """A library of LoRA adapters, a router over it and (optionally) a base model to apply them to.

    Args:
        config: the configuration; ``None`` -> defaults.
        base_model: an optional ``torch.nn.Module`` (e.g. a HF causal LM); its linear modules become the profile.
        tokenizer: the model's tokenizer, for text inputs.
        target_modules: PEFT-style filter of the model modules that can carry adapters.
    """

    def __init__(
        self,
        config: SMoAConfig | None = None,
        base_model: torch.nn.Module | None = None,
        tokenizer: Any | None = None,
        target_modules: str | Sequence[str] | None = None,
    ) -> None:
        if config is not None and not isinstance(config, SMoAConfig):
            raise ConfigError(f"`config` must be an SMoAConfig, got {type(config).__name__}")
        self.config = config or SMoAConfig()
        self._lock = threading.RLock()  # library + router changes and routing
        self._engine_lock = threading.Lock()  # one forward at a time per attached model
        self._engine: Any = None
        profile: BaseProfile = resolve_profile(self.config.base_profile)
        if base_model is not None:
            profile = profile_from_model(base_model, target_modules=target_modules)
        self.library = AdapterLibrary(self.config, profile)
        try:
            from smoa.routing.router import Router

            index_dir = None if self.library._temporary else self.library.directory / "index"
            self.router = Router(self.config, index_dir, resolve_ids=self.library.ids_for_keys)
            self.router.sync(self.library.routing_rows, self.library.generation)
            if base_model is not None:
                self.attach(base_model, tokenizer, target_modules)
        except BaseException:
            self.library.close()
            raise
        self._background: asyncio.Task[None] | None = None
        self._optimizations = 0
        self._last_optimization: Any = None
        self._closed = False

    # == adapters ==============================================================================================
    async def create_adapter(self, **kwargs: Any) -> Adapter:
        """Create one adapter; see :meth:`create_adapter_sync` for the arguments."""
        self._start_background()
        return self.create_adapter_sync(**kwargs)

    def create_adapter_sync(
        self,
        specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM,
        domain_tags: Sequence[str] = (),
        skill_tags: Sequence[str] = (),
        granularity: AdapterGranularity | str = AdapterGranularity.NANO,
        rank: int = 2,
        *,
        description: str = "",
        examples: Sequence[str] = (),
        weights: LoraWeights | Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        alpha: float | None = None,
        target_modules: Sequence[str] | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        pinned: bool = False,
    ) -> Adapter:
        """Create one adapter: fresh LoRA factors (A random, B zero) sized by ``granularity`` unless ``weights``.

        Args:
            specialization, domain_tags, skill_tags, granularity, rank: as in the guide.
            description: free text used for routing.
            examples: example texts of what the adapter is for; its routing key moves toward their centroid.
            weights: initial factors ``{module: (A [r, d_in], B [d_out, r])}`` or a :class:`LoraWeights`.
            alpha: LoRA alpha (default ``default_alpha_ratio * rank``).
            target_modules: explicit modules (PEFT-style) instead of the granularity's choice.
            metadata: JSON-serialisable extra fields, stored with the adapter.
            pinned: never pruned, kept loaded.
        """
        spec = AdapterSpec(
            specialization=specialization, domain_tags=domain_tags, skill_tags=skill_tags, granularity=granularity,
            rank=rank, alpha=alpha, description=description, examples=examples, weights=weights,
            target_modules=target_modules, metadata=metadata or {}, pinned=pinned,
        )  # fmt: skip
        return self.create_adapters_sync([spec])[0]

    async def create_adapters(self, specs: Sequence[AdapterSpec | Mapping[str, Any]], learn_keys: bool = False) -> list[Adapter]:
        """Bulk create (one transaction, batched routing-key encoding); all or nothing."""
        self._start_background()
        return await asyncio.to_thread(self.create_adapters_sync, specs, learn_keys)

    def create_adapters_sync(self, specs: Sequence[AdapterSpec | Mapping[str, Any]], learn_keys: bool = False) -> list[Adapter]:
        """Bulk create. ``learn_keys=True``: the routing keys of the adapters given ``examples`` are trained jointly
        to separate each other's examples (see ``Router.routing_keys``) — better routing for a batch of siblings."""
        from smoa.library import validate_spec
        from smoa.routing.router import RoutingText

        parsed = [_as_spec(s, i) for i, s in enumerate(specs)]
        parsed = [validate_spec(s, where=f"adapter {i}" if len(parsed) > 1 else "") for i, s in enumerate(parsed)]
        with self._lock:
            texts = []
            for s in parsed:
                d, sk = list(s.domain_tags), list(s.skill_tags)
                if s.specialization is AdapterSpecialization.COMPOSITE and not (d or sk or s.description):
                    d, sk = self._member_tags(s.members or [])
                texts.append(RoutingText(domain_tags=d, skill_tags=sk, description=s.description, examples=list(s.examples)))
            vectors = self.router.routing_keys(texts, learn=learn_keys) if parsed else np.zeros((0, 1), np.float32)
            adapters = self.library.create_many(parsed, vectors)
            self.router.add(
                np.array([a.key for a in adapters], dtype=np.int64), vectors,
                [(t.domain_tags, t.skill_tags) for t in texts], self.library.generation,
            )  # fmt: skip
        return adapters

    async def compose_adapters(self, adapter_ids: Sequence[str], weights: Sequence[float] | None = None, **kwargs: Any) -> Adapter:
        """Create a COMPOSITE adapter ("adapter of adapters"); see :meth:`compose_adapters_sync`."""
        return self.compose_adapters_sync(adapter_ids, weights, **kwargs)

    def compose_adapters_sync(
        self,
        adapter_ids: Sequence[str],
        weights: Sequence[float] | None = None,
        *,
        domain_tags: Sequence[str] = (),
        skill_tags: Sequence[str] = (),
        description: str = "",
        materialize: str | None = None,
        rank: int | None = None,
    ) -> Adapter:
        """A routable COMPOSITE entry of members with weights (uniform by default), nestable, flattened at load.

        With ``materialize`` (a merge method: "cat", "svd", "linear", "ties", ...) a plain adapter holding the
        combined update is created instead.
        """
        ids = list(adapter_ids)
        if not ids:
            raise InvalidInputError("`adapter_ids` must name at least one adapter")
        w = [1.0 / len(ids)] * len(ids) if weights is None else [float(x) for x in weights]
        if len(w) != len(ids):
            raise InvalidInputError(f"`weights` has {len(w)} values for {len(ids)} adapters")
        if materialize is not None:
            from smoa.compose.merge import combine

            leaves = [leaf for i, wi in zip(ids, w) for leaf in ((j, wi * wj) for j, wj in self.library.flatten(i))]
            merged = combine([self.library.get_weights(i) for i, _ in leaves], [x for _, x in leaves],
                             method=materialize, rank=rank)  # fmt: skip
            d, s = (list(domain_tags), list(skill_tags)) if (domain_tags or skill_tags) else self._member_tags(list(zip(ids, w)))
            return self.create_adapter_sync(AdapterSpecialization.CUSTOM, d, s, weights=merged, description=description,
                                            metadata={"materialized_from": ids, "method": materialize})  # fmt: skip
        spec = AdapterSpec(specialization=AdapterSpecialization.COMPOSITE, domain_tags=domain_tags,
                           skill_tags=skill_tags, description=description, members=list(zip(ids, w)))  # fmt: skip
        return self.create_adapters_sync([spec])[0]

    def _member_tags(self, members: Sequence[tuple[str, float]]) -> tuple[list[str], list[str]]:
        d: dict[str, None] = {}
        s: dict[str, None] = {}
        for mid, _ in members:
            ad = self.library.get_adapter(mid)
            d.update(dict.fromkeys(ad.domain_tags))
            s.update(dict.fromkeys(ad.skill_tags))
        return list(d)[:64], list(s)[:64]

    async def delete_adapter(self, adapter_id: str) -> Adapter:
        return self.delete_adapter_sync(adapter_id)

    def delete_adapter_sync(self, adapter_id: str) -> Adapter:
        """Delete an adapter (refused while a composite lists it); routes and caches forget it at once."""
        with self._lock:
            adapter = self.library.delete(adapter_id)
            self.router.remove([adapter.key], self.library.generation)
        return adapter

    async def update_adapter_weights(self, adapter_id: str, weights: LoraWeights) -> Adapter:
        return self.update_adapter_weights_sync(adapter_id, weights)

    def update_adapter_weights_sync(self, adapter_id: str, weights: LoraWeights) -> Adapter:
        """New weights for an adapter: version bumped, cached copies dropped, cached routes invalidated."""
        with self._lock:
            adapter = self.library.update_weights(adapter_id, weights)
            self._reindex([adapter])
        return adapter

    def reindex(self, adapter_ids: Sequence[str]) -> None:
        """Tell the router these adapters changed (re-added with their stored keys, or dropped if not active)."""
        with self._lock:
            keys = [self.library.get_adapter(a).key for a in adapter_ids]
            self._reindex_keys(keys)

    def _reindex(self, adapters: Sequence[Adapter]) -> None:
        self._reindex_keys([a.key for a in adapters])

    def _reindex_keys(self, keys: Sequence[int]) -> None:
        rows = [self.library.routing_row(k) for k in keys]
        live = [r for r in rows if r is not None]
        self.router.remove(list(keys), self.library.generation)
        if live:
            self.router.add(
                np.array([r[0] for r in live], np.int64), np.stack([r[1] for r in live]),
                [(r[2], r[3]) for r in live], self.library.generation,
            )  # fmt: skip

    # == PEFT interop ==========================================================================================
    async def import_peft(self, directory: str | Path, **fields: Any) -> Adapter:
        """Import a PEFT LoRA directory; see :meth:`import_peft_sync`."""
        return await asyncio.to_thread(self.import_peft_sync, directory, **fields)

    def import_peft_sync(
        self,
        directory: str | Path,
        *,
        specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM,
        domain_tags: Sequence[str] = (),
        skill_tags: Sequence[str] = (),
        description: str = "",
        examples: Sequence[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> Adapter:
        """Import ``adapter_config.json`` + ``adapter_model.safetensors`` (untrusted: strictly checked, never
        unpickled; every problem in one :class:`~smoa.errors.UnsafeAdapterFileError`) as a new adapter."""
        from smoa.interop.peft import read_peft_dir

        imported = read_peft_dir(directory, self.library.profile)
        for message in imported.warnings:
            warnings.warn(f"{directory}: {message}", stacklevel=2)
        meta = {"imported_from": "peft", "base_model_name_or_path": imported.base_model_name_or_path, **(metadata or {})}
        return self.create_adapter_sync(
            specialization, domain_tags, skill_tags, weights=imported.weights, alpha=imported.alpha,
            description=description, examples=examples, metadata=meta,
        )  # fmt: skip

    async def export_peft(self, adapter_id: str, directory: str | Path, overwrite: bool = False) -> Path:
        return await asyncio.to_thread(self.export_peft_sync, adapter_id, directory, overwrite)

    def export_peft_sync(self, adapter_id: str, directory: str | Path, overwrite: bool = False) -> Path:
        """Write an adapter (a composite: its exact ``cat`` materialisation) as a PEFT LoRA directory."""
        from smoa.interop.peft import write_peft_dir

        base = None
        if self._engine is not None:
            cfg = getattr(self._engine.model, "config", None)
            base = getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None)
        return write_peft_dir(self.library.get_weights(adapter_id), directory,
                              base_model_name_or_path=base or self.library.profile.name, overwrite=overwrite)  # fmt: skip

    # == routing ===============================================================================================
    async def query_adapters(
        self, query: str, metadata: Mapping[str, Any] | None = None, strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:  # fmt: skip
        """Route a query to at most ``k`` (default ``max_active_adapters``) adapters."""
        self._start_background()
        return self.query_adapters_sync(query, metadata, strategy, k)

    def query_adapters_sync(
        self, query: str, metadata: Mapping[str, Any] | None = None, strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:  # fmt: skip
        t0 = time.perf_counter()
        with self._lock:
            route = self.router.route(query, metadata, strategy, k)
        self.library.record_usage(route.adapter_ids)
        return dataclasses.replace(route, routing_latency_ms=(time.perf_counter() - t0) * 1000.0)

    # == applying adapters =====================================================================================
    def attach(self, model: torch.nn.Module, tokenizer: Any | None = None, target_modules: str | Sequence[str] | None = None) -> Any:
        """Attach a base model; its profile must match the library's. Returns the inference engine."""
        from smoa.inject.engine import InferenceEngine

        engine = InferenceEngine(model, tokenizer, target_modules=target_modules, device=None,
                                 cache_bytes=self.config.cache_max_bytes)  # fmt: skip
        missing = [m for m in self.library.profile.module_names if m not in engine.profile]
        if missing or any(engine.profile.shape(m) != self.library.profile.shape(m) for m in self.library.profile.module_names):
            engine.detach()
            raise ProfileMismatchError(
                f"the model does not fit this library's profile {self.library.profile.name!r}: "
                f"{len(missing)} module(s) missing (e.g. {missing[:2]}) or shapes differ"
            )
        self._engine = engine
        return engine

    @property
    def engine(self) -> Any:
        if self._engine is None:
            raise InvalidInputError(
                "no base model attached: pass `base_model=` to SparseAdapterMixture or call `attach(model, tokenizer)`"
            )
        return self._engine

    def mixture_for(self, route: Route | Sequence[tuple[str, float]]) -> Mixture:
        """The weights of a route (composites flattened to leaves, weights multiplied along the way).

        Items are ``((id, version), LoraWeights, weight)``: the engine reuses stacked factors per key, and a new
        version is a new key, so a changed adapter is never mixed from stale factors.
        """
        pairs = list(zip(route.adapter_ids, route.weights)) if isinstance(route, Route) else list(route)
        out: Mixture = []
        for aid, w in pairs:
            for leaf, lw in self.library.flatten(aid):
                _key, version, _status = self.library.catalog.version_of(leaf)
                out.append(((leaf, version), self.library.get_weights(leaf), float(w) * lw))
        return out

    @contextlib.contextmanager
    def use_route(self, route: Route | Sequence[tuple[str, float]]) -> Iterator[Any]:
        """Run any model code under one route's mixture (restored on exit)."""
        with self.engine.use(self.mixture_for(route)):
            yield self.engine.model

    async def forward(self, inputs: Sequence[str] | Any, metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
                      routes: Sequence[Route] | None = None, strategy: RoutingStrategy | str | None = None) -> Any:  # fmt: skip
        """Route each text (unless ``routes`` given) and run one forward with every row's own mixture."""
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        mixtures = [self.mixture_for(r) for r in routes]
        return await asyncio.to_thread(self._engine_call, "forward", inputs, mixtures)

    def forward_sync(self, inputs: Any, metadata: Any = None, routes: Sequence[Route] | None = None,
                     strategy: RoutingStrategy | str | None = None) -> Any:  # fmt: skip
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        return self._engine_call("forward", inputs, [self.mixture_for(r) for r in routes])

    async def generate(self, inputs: Sequence[str], metadata: Any = None, routes: Sequence[Route] | None = None,
                       strategy: RoutingStrategy | str | None = None, **gen_kwargs: Any) -> Any:  # fmt: skip
        """Route each prompt and generate with every row's own mixture."""
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        mixtures = [self.mixture_for(r) for r in routes]
        return await asyncio.to_thread(self._engine_call, "generate", inputs, mixtures, **gen_kwargs)

    def generate_sync(self, inputs: Sequence[str], metadata: Any = None, routes: Sequence[Route] | None = None,
                      strategy: RoutingStrategy | str | None = None, **gen_kwargs: Any) -> Any:  # fmt: skip
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        return self._engine_call("generate", inputs, [self.mixture_for(r) for r in routes], **gen_kwargs)

    def _route_rows(self, inputs: Any, metadata: Any, strategy: RoutingStrategy | str | None) -> list[Route]:
        if not isinstance(inputs, (list, tuple)) or not all(isinstance(x, str) for x in inputs):
            raise InvalidInputError("routing needs text inputs; for token ids pass `routes=` explicitly")
        metas = list(metadata) if isinstance(metadata, (list, tuple)) else [metadata] * len(inputs)
        if len(metas) != len(inputs):
            raise InvalidInputError(f"`metadata` has {len(metas)} entries for {len(inputs)} inputs")
        return [self.query_adapters_sync(text, m, strategy) for text, m in zip(inputs, metas)]

    def _engine_call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        engine = self.engine
        with self._engine_lock:
            return getattr(engine, method)(*args, **kwargs)

    # == training ==============================================================================================
    async def train_adapter(self, adapter_or_spec: Any, data: Sequence[Any], **kwargs: Any) -> Any:
        """Train an adapter's factors on ``data`` (texts or (input, target) pairs) with the base model frozen;
        see :func:`smoa.train.train_adapter` for the arguments. Returns a ``TrainResult``."""
        return await asyncio.to_thread(self.train_adapter_sync, adapter_or_spec, data, **kwargs)

    def train_adapter_sync(self, adapter_or_spec: Any, data: Sequence[Any], **kwargs: Any) -> Any:
        from smoa.train.api import train_adapter

        return train_adapter(self, adapter_or_spec, data, **kwargs)  # holds the engine lock while it trains

    # == optimisation ==========================================================================================
    async def optimize_library(self, **kwargs: Any) -> Any:
        """Merge near-duplicates and prune unused adapters (per config); returns the report."""
        return await asyncio.to_thread(self.optimize_library_sync, **kwargs)

    def optimize_library_sync(self, **kwargs: Any) -> Any:
        from smoa.optimize.optimizer import optimize_library

        report = optimize_library(self, **kwargs)
        self._optimizations += 1
        self._last_optimization = report
        return report

    def _start_background(self) -> None:
        """With `enable_auto_optimization`, run optimize_library every `auto_optimize_interval_s` (in a thread)."""
        if not self.config.enable_auto_optimization or self._background is not None or self._closed:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def loop_forever() -> None:
            while not self._closed:
                await asyncio.sleep(self.config.auto_optimize_interval_s)
                if self._closed:
                    return
                try:
                    await asyncio.to_thread(self.optimize_library_sync)
                except Exception as exc:  # noqa: BLE001 - background work must never kill the loop
                    self._last_optimization = exc

        self._background = loop.create_task(loop_forever())

    # == statistics / lifecycle ================================================================================
    def get_statistics(self) -> dict[str, Any]:
        """``library`` (total/loaded adapters, ...), ``cache`` (hits, misses, evictions, load ms), ``routing``."""
        stats: dict[str, Any] = {
            "library": self.library.statistics(),
            "cache": self.library.cache.statistics(),
            "routing": self.router.statistics(),
            "optimization": {
                "runs": self._optimizations,
                "last": dataclasses.asdict(self._last_optimization)
                if dataclasses.is_dataclass(self._last_optimization) and not isinstance(self._last_optimization, type)
                else (repr(self._last_optimization) if self._last_optimization is not None else None),
                "auto": self.config.enable_auto_optimization,
            },
        }
        return stats

    def close(self) -> None:
        """Flush statistics, persist indexes, release the library (a temporary library is deleted)."""
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._background.cancel()
        try:
            self.router.save()
            self.router.close()
        finally:
            if self._engine is not None:
                self._engine.detach()
            self.library.close()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> SparseAdapterMixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SparseAdapterMixture:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _as_spec(value: AdapterSpec | Mapping[str, Any], index: int) -> AdapterSpec:
    if isinstance(value, AdapterSpec):
        return value
    if not isinstance(value, Mapping):
        raise InvalidInputError(f"adapter {index}: expected an AdapterSpec or a mapping, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(AdapterSpec)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise InvalidInputError(f"adapter {index}: unknown field(s) {unknown}; known: {sorted(known)}")
    return AdapterSpec(**value)


def create_sparse_adapter_mixture(**kwargs: Any) -> SparseAdapterMixture:
    """Build a :class:`SparseAdapterMixture` from keyword arguments (every :class:`SMoAConfig` field, plus
    ``base_model``, ``tokenizer`` and ``target_modules``). Unknown names raise :class:`ConfigError`."""
    model = kwargs.pop("base_model", None)
    tokenizer = kwargs.pop("tokenizer", None)
    target_modules = kwargs.pop("target_modules", None)
    return SparseAdapterMixture(SMoAConfig(**kwargs), base_model=model, tokenizer=tokenizer, target_modules=target_modules)
