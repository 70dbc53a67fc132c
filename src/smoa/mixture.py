"""`SparseAdapterMixture`: the public facade — a thin shell over :class:`~smoa.core.LibraryCore` and the engine.

::

    query ──► LibraryCore.route ──► Route(ids, scores, weights)
                                       │
                                       ▼
              LibraryCore.mixture (in-memory directory, weights cached by (id, version)) ──► Mixture
                                       │
                                       ▼
                         InferenceEngine.forward / generate (base model + exact per-row LoRA mixtures)

Every public coroutine has a synchronous twin with the suffix ``_sync`` (``create_adapter`` /
``create_adapter_sync``) taking the same arguments. Coroutines run their work (SQLite, disk, encoders, the model)
in a worker thread, so the event loop keeps serving. All library state lives in the core; this class holds only
the attached model and the background optimiser.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smoa.adapter.profile import BaseProfile, profile_from_model, resolve_profile
from smoa.adapter.spec import Adapter, AdapterSpec
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity, AdapterSpecialization, RoutingStrategy, SMoAConfig
from smoa.core import LibraryCore, Mixture
from smoa.errors import ConfigError, InvalidInputError, ProfileMismatchError
from smoa.routing.route import Route

if TYPE_CHECKING:
    from smoa.inject.engine import InferenceEngine
    from smoa.optimize.optimizer import OptimizationReport
    from smoa.routing.router import Router
    from smoa.train.api import TrainResult

logger = logging.getLogger(__name__)

SpecLike = AdapterSpec | Mapping[str, Any]
WeightsLike = LoraWeights | Mapping[str, tuple[torch.Tensor, torch.Tensor]]


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
        self._engine_lock = threading.Lock()  # one forward at a time per attached model
        self._engine: InferenceEngine | None = None
        self._background: asyncio.Task[None] | None = None
        self._optimizations = 0
        self._last_optimization: OptimizationReport | BaseException | None = None
        self._closed = True
        profile: BaseProfile = resolve_profile(self.config.base_profile)
        if base_model is not None:
            profile = profile_from_model(base_model, target_modules=target_modules)
        self.core = LibraryCore(self.config, profile)
        try:
            if base_model is not None:
                self.attach(base_model, tokenizer, target_modules)
        except BaseException:
            self.core.close()
            raise
        self._closed = False

    @property
    def library(self) -> LibraryCore:
        """The library core (reads, and every mutation — each applied to the routing index at once)."""
        return self.core

    @property
    def router(self) -> Router:
        """The core's router (read-only use: ``routing_keys``, ``encoder``, ``statistics``)."""
        return self.core.router  # type: ignore[no-any-return]

    # == adapters ==============================================================================================
    async def create_adapter(
        self,
        specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM,
        domain_tags: Sequence[str] = (),
        skill_tags: Sequence[str] = (),
        granularity: AdapterGranularity | str = AdapterGranularity.NANO,
        rank: int = 2,
        *,
        description: str = "",
        examples: Sequence[str] = (),
        weights: WeightsLike | None = None,
        alpha: float | None = None,
        target_modules: Sequence[str] | str | None = None,
        metadata: Mapping[str, Any] | None = None,
        pinned: bool = False,
    ) -> Adapter:
        """Create one adapter; see :meth:`create_adapter_sync`."""
        self._start_background()
        return await asyncio.to_thread(
            self.create_adapter_sync, specialization, domain_tags, skill_tags, granularity, rank,
            description=description, examples=examples, weights=weights, alpha=alpha,
            target_modules=target_modules, metadata=metadata, pinned=pinned,
        )  # fmt: skip

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
        weights: WeightsLike | None = None,
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
        return self.core.create_many([spec])[0]

    async def create_adapters(self, specs: Sequence[SpecLike], learn_keys: bool = False) -> list[Adapter]:
        """Bulk create (one transaction, batched routing-key encoding); all or nothing; ``[]`` -> ``[]``."""
        self._start_background()
        return await asyncio.to_thread(self.create_adapters_sync, specs, learn_keys)

    def create_adapters_sync(self, specs: Sequence[SpecLike], learn_keys: bool = False) -> list[Adapter]:
        """Bulk create. ``learn_keys=True``: the routing keys of the adapters given ``examples`` are trained jointly
        to separate each other's examples (see ``Router.routing_keys``) — better routing for a batch of siblings."""
        return self.core.create_many(specs, learn_keys)

    async def compose_adapters(
        self, adapter_ids: Sequence[str], weights: Sequence[float] | None = None, *, domain_tags: Sequence[str] = (),
        skill_tags: Sequence[str] = (), description: str = "", materialize: str | None = None, rank: int | None = None,
    ) -> Adapter:  # fmt: skip
        """Create a COMPOSITE adapter ("adapter of adapters"); see :meth:`compose_adapters_sync`."""
        return await asyncio.to_thread(
            self.compose_adapters_sync, adapter_ids, weights, domain_tags=domain_tags, skill_tags=skill_tags,
            description=description, materialize=materialize, rank=rank,
        )  # fmt: skip

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
        if isinstance(adapter_ids, str) or not isinstance(adapter_ids, Sequence):
            raise InvalidInputError(f"`adapter_ids` must be a list of ids, got {adapter_ids!r:.100}")
        ids = list(adapter_ids)
        if not ids:
            raise InvalidInputError("`adapter_ids` must name at least one adapter")
        try:
            w = [1.0 / len(ids)] * len(ids) if weights is None else [float(x) for x in weights]
        except (TypeError, ValueError):
            raise InvalidInputError(f"`weights` must be numbers, got {weights!r:.100}") from None
        if len(w) != len(ids):
            raise InvalidInputError(f"`weights` has {len(w)} values for {len(ids)} adapters")
        if materialize is not None:
            from smoa.compose.merge import combine

            leaves = [leaf for i, wi in zip(ids, w) for leaf in ((j, wi * wj) for j, wj in self.core.flatten(i))]
            merged = combine([self.core.get_weights(i) for i, _ in leaves], [x for _, x in leaves],
                             method=materialize, rank=rank)  # fmt: skip
            d, s = (list(domain_tags), list(skill_tags)) if (domain_tags or skill_tags) else self.core._member_tags(list(zip(ids, w)))
            return self.create_adapter_sync(AdapterSpecialization.CUSTOM, d, s, weights=merged, description=description,
                                            metadata={"materialized_from": ids, "method": materialize})  # fmt: skip
        spec = AdapterSpec(specialization=AdapterSpecialization.COMPOSITE, domain_tags=domain_tags,
                           skill_tags=skill_tags, description=description, members=list(zip(ids, w)))  # fmt: skip
        return self.core.create_many([spec])[0]

    async def delete_adapter(self, adapter_id: str) -> Adapter:
        return await asyncio.to_thread(self.delete_adapter_sync, adapter_id)

    def delete_adapter_sync(self, adapter_id: str) -> Adapter:
        """Delete an adapter (refused while a composite lists it); routes and caches forget it at once.

        After a merge, deleting an old (alias) id forgets only that id (see the guide's "Aliases")."""
        return self.core.delete(adapter_id)

    async def delete_adapters(self, adapter_ids: Sequence[str]) -> list[Adapter]:
        return await asyncio.to_thread(self.delete_adapters_sync, adapter_ids)

    def delete_adapters_sync(self, adapter_ids: Sequence[str]) -> list[Adapter]:
        """Delete many adapters in one transaction (all or nothing)."""
        return self.core.delete_many(adapter_ids)

    async def update_adapter_weights(self, adapter_id: str, weights: WeightsLike) -> Adapter:
        return await asyncio.to_thread(self.update_adapter_weights_sync, adapter_id, weights)

    def update_adapter_weights_sync(self, adapter_id: str, weights: WeightsLike) -> Adapter:
        """New weights for an adapter: version bumped, cached copies dropped, cached routes invalidated."""
        return self.core.update_weights(adapter_id, weights)

    async def update_adapter(
        self, adapter_id: str, *, domain_tags: Sequence[str] | None = None, skill_tags: Sequence[str] | None = None,
        description: str | None = None, examples: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Adapter:  # fmt: skip
        return await asyncio.to_thread(
            self.update_adapter_sync, adapter_id, domain_tags=domain_tags, skill_tags=skill_tags,
            description=description, examples=examples, metadata=metadata,
        )  # fmt: skip

    def update_adapter_sync(
        self, adapter_id: str, *, domain_tags: Sequence[str] | None = None, skill_tags: Sequence[str] | None = None,
        description: str | None = None, examples: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Adapter:  # fmt: skip
        """Change an adapter's tags, description, examples or metadata (only those given); its routing key is
        recomputed from the new texts and routes see the change at once."""
        return self.core.update_adapter(adapter_id, domain_tags=domain_tags, skill_tags=skill_tags,
                                        description=description, examples=examples, metadata=metadata)  # fmt: skip

    async def archive_adapter(self, adapter_id: str) -> int:
        return await asyncio.to_thread(self.archive_adapter_sync, adapter_id)

    def archive_adapter_sync(self, adapter_id: str) -> int:
        """Move an adapter to cold storage (no longer routed or mixed, restorable); returns hot bytes freed."""
        return self.core.archive(adapter_id)

    async def restore_adapter(self, adapter_id: str) -> Adapter:
        return await asyncio.to_thread(self.restore_adapter_sync, adapter_id)

    def restore_adapter_sync(self, adapter_id: str) -> Adapter:
        """Bring an archived adapter back (routed again)."""
        return self.core.restore(adapter_id)

    async def pin_adapter(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.pin_adapter_sync, adapter_id)

    def pin_adapter_sync(self, adapter_id: str) -> None:
        """Never prune this adapter; keep it loaded."""
        self.core.pin(adapter_id)

    async def unpin_adapter(self, adapter_id: str) -> None:
        await asyncio.to_thread(self.unpin_adapter_sync, adapter_id)

    def unpin_adapter_sync(self, adapter_id: str) -> None:
        self.core.unpin(adapter_id)

    async def get_adapter(self, adapter_id: str) -> Adapter:
        return await asyncio.to_thread(self.get_adapter_sync, adapter_id)

    def get_adapter_sync(self, adapter_id: str) -> Adapter:
        """Metadata of one adapter (an alias resolves to the adapter it was merged into)."""
        return self.core.get_adapter(adapter_id)

    async def list_adapters(
        self, filter: str | None = None, offset: int = 0, limit: int = 100, status: str | Sequence[str] = ("active", "archived")
    ) -> list[Adapter]:  # fmt: skip
        return await asyncio.to_thread(self.list_adapters_sync, filter, offset, limit, status)

    def list_adapters_sync(
        self, filter: str | None = None, offset: int = 0, limit: int = 100, status: str | Sequence[str] = ("active", "archived")
    ) -> list[Adapter]:  # fmt: skip
        """A page of adapters in creation order; ``filter``: only those holding this tag."""
        return self.core.list_adapters(filter, offset, limit, status)

    async def compact(self) -> int:
        return await asyncio.to_thread(self.compact_sync)

    def compact_sync(self) -> int:
        """Reclaim the catalog space of deleted adapters (VACUUM); returns the bytes reclaimed."""
        return self.core.compact()

    async def add_negative_examples(self, texts: Sequence[str]) -> int:
        return await asyncio.to_thread(self.add_negative_examples_sync, texts)

    def add_negative_examples_sync(self, texts: Sequence[str]) -> int:
        """Register out-of-scope queries (no adapter should serve them): they tune the ``"auto"`` routing
        threshold. Returns how many negatives are registered in all."""
        return self.core.add_negative_examples(texts)

    def reindex(self, adapter_ids: Sequence[str] = ()) -> None:
        """Kept for older callers: the routing index catches up from the catalog's change log by itself."""
        self.core.reindex(adapter_ids)

    # == PEFT interop ==========================================================================================
    async def import_peft(
        self, directory: str | Path, *, specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM,
        domain_tags: Sequence[str] = (), skill_tags: Sequence[str] = (), description: str = "",
        examples: Sequence[str] = (), metadata: Mapping[str, Any] | None = None,
    ) -> Adapter:  # fmt: skip
        """Import a PEFT LoRA directory; see :meth:`import_peft_sync`."""
        return await asyncio.to_thread(
            self.import_peft_sync, directory, specialization=specialization, domain_tags=domain_tags,
            skill_tags=skill_tags, description=description, examples=examples, metadata=metadata,
        )  # fmt: skip

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

        imported = read_peft_dir(directory, self.core.profile)
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
        return write_peft_dir(self.core.get_weights(adapter_id), directory,
                              base_model_name_or_path=base or self.core.profile.name, overwrite=overwrite)  # fmt: skip

    # == routing ===============================================================================================
    async def query_adapters(
        self, query: str, metadata: Mapping[str, Any] | None = None, strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:  # fmt: skip
        """Route a query to at most ``k`` (default ``max_active_adapters``) adapters."""
        self._start_background()
        return await asyncio.to_thread(self.query_adapters_sync, query, metadata, strategy, k)

    def query_adapters_sync(
        self, query: str, metadata: Mapping[str, Any] | None = None, strategy: RoutingStrategy | str | None = None,
        k: int | None = None,
    ) -> Route:  # fmt: skip
        t0 = time.perf_counter()
        route = self.core.route(query, metadata, strategy, k)
        return dataclasses.replace(route, routing_latency_ms=(time.perf_counter() - t0) * 1000.0)

    # == applying adapters =====================================================================================
    def attach(
        self, model: torch.nn.Module, tokenizer: Any | None = None, target_modules: str | Sequence[str] | None = None
    ) -> InferenceEngine:  # fmt: skip
        """Attach a base model; its profile must match the library's. Returns the inference engine."""
        from smoa.inject.engine import InferenceEngine

        engine = InferenceEngine(model, tokenizer, target_modules=target_modules, device=None,
                                 cache_bytes=self.config.factor_cache_bytes)  # fmt: skip
        profile = self.core.profile
        missing = [m for m in profile.module_names if m not in engine.profile]
        if missing or any(engine.profile.shape(m) != profile.shape(m) for m in profile.module_names):
            engine.detach()
            raise ProfileMismatchError(
                f"the model does not fit this library's profile {profile.name!r}: "
                f"{len(missing)} module(s) missing (e.g. {missing[:2]}) or shapes differ"
            )
        self._engine = engine
        return engine

    @property
    def engine(self) -> InferenceEngine:
        if self._engine is None:
            raise InvalidInputError(
                "no base model attached: pass `base_model=` to SparseAdapterMixture or call `attach(model, tokenizer)`"
            )
        return self._engine

    @property
    def engine_lock(self) -> threading.Lock:
        """Held while the attached model runs (forward, generate, training)."""
        return self._engine_lock

    def mixture_for(self, route: Route | Sequence[tuple[str, float]]) -> Mixture:
        """The weights of a route (composites flattened to leaves, weights multiplied along the way).

        Items are ``((id, version), LoraWeights, weight)``: the engine reuses stacked factors per key, and a new
        version is a new key, so a changed adapter is never mixed from stale factors. An adapter of a
        :class:`Route` deleted or archived since is left out.
        """
        return self.core.mixture(route)

    @contextlib.contextmanager
    def use_route(self, route: Route | Sequence[tuple[str, float]]) -> Iterator[torch.nn.Module]:
        """Run any model code under one route's mixture (restored on exit)."""
        with self.engine.use(self.mixture_for(route)):
            yield self.engine.model

    async def forward(
        self, inputs: Sequence[str] | Any, metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        routes: Sequence[Route] | None = None, strategy: RoutingStrategy | str | None = None,
    ) -> Any:  # fmt: skip
        """Route each text (unless ``routes`` given) and run one forward with every row's own mixture."""
        return await asyncio.to_thread(self.forward_sync, inputs, metadata, routes, strategy)

    def forward_sync(
        self, inputs: Sequence[str] | Any, metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        routes: Sequence[Route] | None = None, strategy: RoutingStrategy | str | None = None,
    ) -> Any:  # fmt: skip
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        return self._engine_call("forward", inputs, [self.mixture_for(r) for r in routes])

    async def generate(
        self, inputs: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        routes: Sequence[Route] | None = None, strategy: RoutingStrategy | str | None = None,
        max_new_tokens: int = 32, **gen_kwargs: Any,
    ) -> Any:  # fmt: skip
        """Route each prompt and generate with every row's own mixture (``gen_kwargs`` go to HF ``generate``)."""
        return await asyncio.to_thread(self.generate_sync, inputs, metadata, routes, strategy, max_new_tokens, **gen_kwargs)

    def generate_sync(
        self, inputs: Sequence[str], metadata: Sequence[Mapping[str, Any] | None] | Mapping[str, Any] | None = None,
        routes: Sequence[Route] | None = None, strategy: RoutingStrategy | str | None = None,
        max_new_tokens: int = 32, **gen_kwargs: Any,
    ) -> Any:  # fmt: skip
        routes = routes if routes is not None else self._route_rows(inputs, metadata, strategy)
        return self._engine_call("generate", inputs, [self.mixture_for(r) for r in routes],
                                 max_new_tokens=max_new_tokens, **gen_kwargs)  # fmt: skip

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
    async def train_adapter(
        self, adapter_or_spec: str | Adapter | SpecLike, data: Sequence[Any], steps: int = 100, lr: float = 2e-3,
        batch_size: int = 8, seed: int = 0, max_length: int = 128, progress: bool = True, *,
        update_routing_key: bool = True, weight_decay: float = 0.0, warmup: int | None = None, grad_clip: float | None = 1.0,
    ) -> TrainResult:  # fmt: skip
        """Train an adapter's factors on ``data`` (texts or (input, target) pairs) with the base model frozen;
        see :func:`smoa.train.train_adapter`. Returns a :class:`~smoa.train.TrainResult`."""
        return await asyncio.to_thread(
            self.train_adapter_sync, adapter_or_spec, data, steps, lr, batch_size, seed, max_length, progress,
            update_routing_key=update_routing_key, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
        )  # fmt: skip

    def train_adapter_sync(
        self, adapter_or_spec: str | Adapter | SpecLike, data: Sequence[Any], steps: int = 100, lr: float = 2e-3,
        batch_size: int = 8, seed: int = 0, max_length: int = 128, progress: bool = True, *,
        update_routing_key: bool = True, weight_decay: float = 0.0, warmup: int | None = None, grad_clip: float | None = 1.0,
    ) -> TrainResult:  # fmt: skip
        from smoa.train.api import train_adapter

        return train_adapter(self, adapter_or_spec, data, steps, lr, batch_size, seed, max_length, progress,
                             update_routing_key=update_routing_key, weight_decay=weight_decay, warmup=warmup,
                             grad_clip=grad_clip)  # fmt: skip

    # == optimisation ==========================================================================================
    async def optimize_library(
        self, *, merge: bool | None = None, prune: bool | None = None, threshold: float | None = None,
        method: str | None = None, prune_after_queries: int | None = None, prune_after_seconds: float | None = None,
        prune_action: str | None = None, max_merge_error: float = 0.2, dry_run: bool = False,
    ) -> OptimizationReport:  # fmt: skip
        """Merge near-duplicates and prune unused adapters (per config); returns the report."""
        return await asyncio.to_thread(
            self.optimize_library_sync, merge=merge, prune=prune, threshold=threshold, method=method,
            prune_after_queries=prune_after_queries, prune_after_seconds=prune_after_seconds,
            prune_action=prune_action, max_merge_error=max_merge_error, dry_run=dry_run,
        )  # fmt: skip

    def optimize_library_sync(
        self, *, merge: bool | None = None, prune: bool | None = None, threshold: float | None = None,
        method: str | None = None, prune_after_queries: int | None = None, prune_after_seconds: float | None = None,
        prune_action: str | None = None, max_merge_error: float = 0.2, dry_run: bool = False,
    ) -> OptimizationReport:  # fmt: skip
        from smoa.optimize.optimizer import optimize_library

        report = optimize_library(
            self.core, merge=merge, prune=prune, threshold=threshold, method=method,
            prune_after_queries=prune_after_queries, prune_after_seconds=prune_after_seconds,
            prune_action=prune_action, max_merge_error=max_merge_error, dry_run=dry_run,
        )  # fmt: skip
        self._optimizations += 1
        self._last_optimization = report
        return report

    def undo_merge_sync(self, merge_id: int) -> list[str]:
        """Undo a merge (sources back, merged adapter deleted), all or nothing; returns the restored ids."""
        return self.core.undo_merge(merge_id)

    async def undo_merge(self, merge_id: int) -> list[str]:
        return await asyncio.to_thread(self.undo_merge_sync, merge_id)

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
                    if not self._closed:
                        logger.exception("smoa: background optimize_library failed")

        self._background = loop.create_task(loop_forever())

    # == statistics / lifecycle ================================================================================
    def get_statistics(self) -> dict[str, Any]:
        """``library`` (counts, generation, encoder), ``cache`` (weights; ``caches``: every cache with its
        budget), ``routing``, ``optimization``."""
        caches = self.core.cache_statistics()
        if self._engine is not None:
            caches["factors"] = {**self._engine.handle.cache.info(), "max_bytes": self.config.factor_cache_bytes}
        last = self._last_optimization
        return {
            "library": self.core.statistics(),
            "cache": caches["weights"],
            "caches": caches,
            "routing": self.router.statistics(),
            "optimization": {
                "runs": self._optimizations,
                "last": dataclasses.asdict(last) if dataclasses.is_dataclass(last) and not isinstance(last, type)
                else (repr(last) if last is not None else None),
                "auto": self.config.enable_auto_optimization,
            },
        }  # fmt: skip

    def close(self) -> None:
        """Flush statistics, persist indexes, release the library (a temporary library is deleted)."""
        if self._closed:
            return
        self._closed = True
        if self._background is not None:
            self._background.cancel()
        try:
            if self._engine is not None:
                self._engine.detach()
        finally:
            self.core.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> SparseAdapterMixture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> SparseAdapterMixture:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def create_sparse_adapter_mixture(
    config: SMoAConfig | None = None, *, base_model: torch.nn.Module | None = None, tokenizer: Any | None = None,
    target_modules: str | Sequence[str] | None = None, **fields: Any,
) -> SparseAdapterMixture:  # fmt: skip
    """Build a :class:`SparseAdapterMixture` from a config or from keyword arguments (every :class:`SMoAConfig`
    field), plus ``base_model``, ``tokenizer`` and ``target_modules``. Unknown names raise :class:`ConfigError`."""
    if config is not None and fields:
        raise ConfigError(f"pass either `config` or config fields, not both (got {sorted(fields)})")
    return SparseAdapterMixture(config if config is not None else SMoAConfig(**fields), base_model=base_model,
                                tokenizer=tokenizer, target_modules=target_modules)  # fmt: skip


__all__ = ["Mixture", "SparseAdapterMixture", "create_sparse_adapter_mixture"]
