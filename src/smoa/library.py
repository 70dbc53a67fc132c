"""The adapter store: catalog + weight files + weight cache for one base-model profile.

Internal: only :class:`smoa.core.LibraryCore` calls its writes (the core applies each change to the routing
index and its in-memory directory in the same locked step); use the core, or the facade, instead.

``AdapterLibrary`` validates every request up front, turns it into rows and safetensors bytes, and writes each
adapter (or each bulk call) in one catalog transaction. Weights load lazily through the two-tier
:class:`~smoa.cache.tiered.AdapterCache`, keyed by ``(id, version)`` and checked against their sha256 on every
load from storage. Routing keys are computed by the caller (the router) and stored in the ``embedding`` column.

Nothing here knows about routing or models.
"""

from __future__ import annotations

import contextlib
import gc
import os
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoa.adapter.granularity import granularity_of
from smoa.adapter.profile import BaseProfile, resolve_profile
from smoa.adapter.spec import (  # noqa: F401 - MAX_* re-exported for older imports
    MAX_DESCRIPTION_CHARS,
    MAX_ID_CHARS,
    MAX_METADATA_BYTES,
    MAX_TAG_CHARS,
    MAX_TAGS,
    Adapter,
    AdapterSpec,
    is_unicode,
    plan_modules,
    validate_spec,
)
from smoa.adapter.weights import LoraWeights, checksum, weights_from_mapping
from smoa.cache.tiered import AdapterCache
from smoa.config import AdapterGranularity, AdapterSpecialization, SMoAConfig
from smoa.errors import (
    AdapterNotFoundError,
    CapacityError,
    CompositionError,
    ConfigError,
    CorruptAdapterError,
    InvalidAdapterError,
    InvalidInputError,
    ProfileMismatchError,
    StorageError,
)
from smoa.storage.catalog import Catalog, NewAdapterRow
from smoa.storage.base import open_catalog_backend, open_weight_backend, url_scheme
from smoa.storage.files import DirectoryLock, FileStore

_USAGE_FLUSH_EVERY = 2048
_USAGE_FLUSH_SECONDS = 5.0


def new_adapter_ids(n: int) -> list[str]:
    """``n`` fresh ids: ``ad_`` + 16 random hex digits each (never derived from user input)."""
    raw = secrets.token_hex(8 * n)
    return ["ad_" + raw[16 * i : 16 * i + 16] for i in range(n)]


class AdapterLibrary:
    """Persistent adapters of one base-model profile, with lazy, cached weight loading.

    Args:
        config: the validated configuration (``storage_path=None`` -> a temporary directory removed on close).
        profile: the base-model profile; defaults to ``config.base_profile`` (SmolLM2-135M).
    """

    def __init__(self, config: SMoAConfig, profile: BaseProfile | None = None) -> None:
        self.config = config
        self.profile = profile or resolve_profile(config.base_profile)
        self._temporary = config.storage_path is None
        self._closed = True
        self.catalog = None  # type: ignore[assignment]
        self.catalog_url = url_scheme(config.storage_path)  # "postgresql" etc.: a catalog server, no directory
        if self._temporary or self.catalog_url is not None:
            directory = Path(tempfile.mkdtemp(prefix="smoa-"))
        else:
            directory = _library_dir(config.storage_path)
        self.directory = directory
        self.persistent_index = not self._temporary and self.catalog_url is None  # index/ beside a local catalog
        self._dir_lock = DirectoryLock(directory)
        try:
            self._open(directory)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _open(self, directory: Path) -> None:
        """Lock, check, open the catalog, sweep orphans, set up the cache (undone by ``_release`` on failure)."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"`storage_path`={str(directory)!r} cannot be created: {exc.strerror or exc}") from exc
        weights_url = self.config.weights_path
        self.files = open_weight_backend(weights_url, self.config) if weights_url else FileStore(directory)
        if self.catalog_url is not None:  # a catalog server: many processes may share it (no directory lock)
            self.catalog = open_catalog_backend(str(self.config.storage_path), self.config)
            if not weights_url:  # weight files as bytea rows of the same database (never the scratch directory)
                from smoa.storage.postgres import open_blob_store

                self.files = open_blob_store(self.catalog, self.config)
        else:
            self._dir_lock.acquire()
            _refuse_lost_catalog(directory, self.files)
            self.catalog = Catalog(directory / "catalog.sqlite3")
        self._check_profile()
        self.collected_files = (self.files.collect_garbage(self.catalog.all_files())
                                if isinstance(self.files, FileStore) else 0)  # fmt: skip
        self.cache = AdapterCache(
            max_items=self.config.max_loaded_adapters,
            max_bytes=self.config.cache_max_bytes,
            offload_bytes=self.config.offload_max_bytes if self.config.enable_offloading else 0,
            device=self.config.device,
        )
        self._count = self.catalog.count()
        seed = self.config.seed if self.config.seed is not None else secrets.randbits(62)
        try:
            self._gen = torch.Generator().manual_seed(seed)
        except (ValueError, RuntimeError, OverflowError) as exc:
            raise ConfigError(f"`seed` must be an int in [0, 2**64), got {seed!r:.100}") from exc
        self._dtype = getattr(torch, self.config.adapter_dtype)
        self._modules_for: dict[tuple[Any, ...], tuple[list[str], AdapterGranularity, int]] = {}
        self._usage_lock = threading.Lock()
        self._usage: dict[int, int] = {}
        self._last_used: dict[int, tuple[float, int]] = {}
        self._usage_pending = 0
        self._usage_flushed_at = time.monotonic()
        self.queries = int(self.catalog.get_meta("queries") or 0)

    def _release(self) -> None:
        """Give back everything the constructor took (catalog, lock, a temporary directory)."""
        if self.catalog is not None:
            self.catalog.close()
        self._dir_lock.release()
        with contextlib.suppress(Exception):
            self.files.close()
        if self._temporary or self.catalog_url is not None:
            shutil.rmtree(self.directory, ignore_errors=True)

    # -- public reads ------------------------------------------------------------------------------------------
    @property
    def total_adapters(self) -> int:
        """Adapters in the library (active and archived; merged-away sources are not counted)."""
        return self._count

    def __len__(self) -> int:
        return self._count

    def __contains__(self, adapter_id: object) -> bool:
        if not isinstance(adapter_id, str):
            return False
        try:
            self.get_adapter(adapter_id)
        except (AdapterNotFoundError, InvalidInputError):
            return False
        return True

    @property
    def generation(self) -> int:
        """Bumped by every change; routes and caches key on it."""
        return self.catalog.generation

    @property
    def loaded_adapters(self) -> int:
        return len(self.cache)

    def resolve(self, adapter_id: str) -> str:
        """The current id for ``adapter_id`` (following merge aliases)."""
        if not isinstance(adapter_id, str):
            raise InvalidInputError(f"`adapter_id` must be a string, got {adapter_id!r:.100}")
        if len(adapter_id) > MAX_ID_CHARS or not is_unicode(adapter_id):
            raise InvalidInputError(
                f"`adapter_id` must be valid Unicode of at most {MAX_ID_CHARS} characters, got {adapter_id!r:.100}"
            )
        seen = 0
        current = adapter_id
        while (target := self.catalog.resolve_alias(current)) is not None and seen < 32:
            current, seen = target, seen + 1
        return current

    def get_adapter(self, adapter_id: str) -> Adapter:
        """Metadata of an adapter (aliases of merged adapters resolve to the merged one)."""
        return self.catalog.get(self.resolve(adapter_id))

    def get_weights(self, adapter_id: str) -> LoraWeights:
        """The adapter's LoRA factors (``weights[module] -> (A, B)``), via the cache.

        For a COMPOSITE adapter this is the exact ``cat`` materialisation of its flattened members.
        """
        aid = self.resolve(adapter_id)
        ad = self.catalog.get(aid)
        if ad.is_composite:
            from smoa.compose.merge import combine  # lazy: compose depends on nothing here

            leaves = self.flatten(aid)
            return combine([self.get_weights(i) for i, _ in leaves], [w for _, w in leaves], method="cat")
        return self.load(aid, ad.key, ad.version)[1]

    def load(self, adapter_id: str, key: int, version: int | None) -> tuple[int, LoraWeights]:
        """``(version, weights)`` of a plain adapter, read atomically: a cache hit on ``(id, version)``, else one
        catalog read that returns the bytes *with* their version (the weights are cached under that version)."""
        if version is not None:
            hit = self.cache.peek(adapter_id, version)
            if hit is not None:
                return version, hit
        data, stored = self._load_bytes(adapter_id, key)
        return stored, self.cache.get(adapter_id, stored, lambda: data, lambda b: self._parse(adapter_id, b))

    def flatten(self, adapter_id: str) -> list[tuple[str, float]]:
        """Leaf adapters and their effective weights for ``adapter_id`` (itself at 1.0 unless composite)."""
        from smoa.compose.composite import flatten

        def members_of(aid: str) -> list[tuple[str, float]] | None:
            ad = self.get_adapter(aid)
            return list(ad.members) if ad.is_composite else None

        return flatten(self.resolve(adapter_id), members_of)

    def iter_adapters(self, statuses: Sequence[str] = ("active", "archived")) -> Iterator[Adapter]:
        return self.catalog.iter_adapters(statuses)

    def ids_for_keys(self, keys: Sequence[int]) -> list[str]:
        return self.catalog.ids_for_keys(keys)

    def routing_rows(self) -> Iterator[tuple[int, np.ndarray | None, list[str], list[str]]]:
        """``(key, routing key vector, domain_tags, skill_tags)`` of every active adapter (for the router)."""
        for key, emb, d, s in self.catalog.iter_routing_rows():
            yield key, (np.frombuffer(emb, dtype=np.float32) if emb is not None else None), d, s

    def routing_row(self, key: int) -> tuple[int, np.ndarray, list[str], list[str]] | None:
        """``(key, routing key, domain_tags, skill_tags)`` of one adapter if it is active and has a key."""
        row = self.catalog.routing_row(key)
        if row is None:
            return None
        return key, np.frombuffer(row[0], dtype=np.float32), row[1], row[2]

    # -- writes ------------------------------------------------------------------------------------------------
    def create(self, spec: AdapterSpec, embedding: np.ndarray | None = None) -> Adapter:
        return self.create_many([spec], None if embedding is None else embedding[None, :])[0]

    def create_many(
        self, specs: Sequence[AdapterSpec], embeddings: np.ndarray | None = None, *,
        embed: Callable[[Sequence[AdapterSpec]], np.ndarray] | None = None, chunk: int = 2000,
    ) -> list[Adapter]:  # fmt: skip
        """Create adapters in one transaction: all appear, or none (on any error nothing is written).

        Rows are built and inserted ``chunk`` specs at a time inside that one transaction (weights bytes and
        routing keys of one chunk at a time: bulk creation streams). ``embed(chunk specs) -> [n, dim]`` computes
        the routing keys chunk by chunk (else ``embeddings`` gives them all).
        """
        self._check_open()
        specs = [validate_spec(s, where=f"adapter {i}" if len(specs) > 1 else "") for i, s in enumerate(specs)]
        if self._count + len(specs) > self.config.max_adapters:
            raise CapacityError(
                f"`max_adapters`={self.config.max_adapters:,} would be exceeded: the library holds {self._count:,} "
                f"and {len(specs):,} more were requested"
            )
        if embeddings is not None and len(embeddings) != len(specs):
            raise InvalidInputError(f"`embeddings` has {len(embeddings)} rows for {len(specs)} adapters")
        now = time.time()
        written: list[str] = []
        ids = new_adapter_ids(len(specs))
        out: list[Adapter] = []

        def chunks() -> Iterator[list[NewAdapterRow]]:
            for s in range(0, len(specs), chunk):
                part = specs[s : s + chunk]
                fresh = self._fresh_weight_bytes(part)
                vecs = embed(part) if embed is not None else (None if embeddings is None else embeddings[s : s + chunk])
                yield [self._row_for(ids[s + i], sp, now, None if vecs is None else vecs[i], written, fresh.get(i))
                       for i, sp in enumerate(part)]  # fmt: skip

        def keep(keys: list[int], rows: Sequence[NewAdapterRow]) -> None:
            out.extend(self._adapter_from_row(k, r) for k, r in zip(keys, rows))  # the rows' bytes are dropped

        collecting = gc.isenabled()
        gc.disable()  # a bulk call allocates ~20 objects per adapter: no full collections on the way
        try:
            self.catalog.insert_chunks(chunks(), on_chunk=keep)
        except BaseException:
            for rel in written:  # files written for this call; no row references them now
                if not self.catalog.file_referenced(rel):
                    self.files.delete(rel)
            raise
        finally:
            if collecting:
                gc.enable()
        self._count += len(out)
        return out

    def update_weights(self, adapter_id: str, weights: LoraWeights, embedding: np.ndarray | None = None) -> Adapter:
        """Replace an adapter's weights (validated); bumps its version and drops cached copies."""
        self._check_open()
        adapter = self.get_adapter(adapter_id)
        if adapter.is_composite:
            raise CompositionError(f"adapter {adapter.id!r} is COMPOSITE; change its members instead of its weights")
        weights.validate(self.profile, name=f"adapter {adapter.id}")
        # profile order, as create stores them: equal weights give equal bytes (checksum, dedup) either way
        weights = LoraWeights({m: weights.factors[m] for m in self.profile.module_names if m in weights.factors},
                              weights.alpha, weights.rank)  # fmt: skip
        ad_meta = {**row_meta(adapter), "version": adapter.version + 1, "rank": weights.rank, "alpha": weights.alpha,
                   "num_parameters": weights.num_parameters}  # fmt: skip
        canonical = weights.to_bytes()
        data = self._stamp(canonical, ad_meta)
        blob, file = self._place(data)
        try:
            old_file = self.catalog.read_weights(adapter.key)[1]
            self.catalog.replace_weights(
                adapter.key, blob, file, checksum(canonical), len(data),
                None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
            )  # fmt: skip
        except BaseException:
            self._discard_unused(file)  # the new file no row references: no orphan left by a failed update
            raise
        self.cache.invalidate(adapter.id)
        self._discard_unused(old_file, keep=file)
        return self.catalog.get(adapter.id)

    def set_embedding(self, adapter_id: str, embedding: np.ndarray) -> None:
        self.catalog.set_embedding(self.get_adapter(adapter_id).key, np.asarray(embedding, np.float32).tobytes())

    def delete(self, adapter_id: str) -> Adapter:
        """Delete an adapter; refused while a COMPOSITE adapter lists it as a member.

        An id that was merged away (an alias) deletes only that id: its alias and its retained pre-merge copy.
        The adapter it was merged into, and the other sources, are untouched (see ``docs`` "Aliases").
        """
        self._check_open()
        return self.delete_many([adapter_id])[0]

    def delete_many(self, adapter_ids: Sequence[str]) -> list[Adapter]:
        """Delete adapters in one transaction (all or nothing; see :meth:`delete` for aliases)."""
        self._check_open()
        plain: list[Adapter] = []
        aliases: list[Adapter] = []
        bad = [a for a in adapter_ids if not isinstance(a, str)]
        if bad:
            raise InvalidInputError(f"`adapter_ids` must hold strings, got {bad[0]!r:.100}")
        for aid in dict.fromkeys(adapter_ids):
            self.resolve(aid)  # validates the id (length, Unicode)
            own = self._own_row(aid)
            if own is not None and own.status == "merged":
                aliases.append(own)
                continue
            ad = self.get_adapter(aid)
            if ad.id not in {p.id for p in plain}:
                plain.append(ad)
        gone = {a.id for a in plain}
        for ad in plain:
            users = [u for u in self.catalog.composites_containing(ad.id) if u not in gone]
            if users:
                raise CompositionError(
                    f"adapter {ad.id!r} is a member of composite adapter(s) {users}; delete or change those first"
                )
        unused = self.catalog.delete([a.key for a in plain]) if plain else []
        for ad in aliases:
            unused += self.catalog.delete_alias(ad.id)
        for ad in plain + aliases:
            self.cache.invalidate(ad.id)
        self._count -= len(plain)
        for rel in unused:
            self.files.delete(rel)
        return plain + aliases

    def _own_row(self, adapter_id: str) -> Adapter | None:
        """The row stored under exactly this id (no alias following), or None."""
        try:
            return self.catalog.get(adapter_id)
        except AdapterNotFoundError:
            return None

    def pin(self, adapter_id: str) -> None:
        """Protect from pruning and keep loaded in the cache."""
        adapter = self.get_adapter(adapter_id)
        if not adapter.is_composite:  # loaded and pinned first: a full cache refuses before the catalog changes
            data, stored = self._load_bytes(adapter.id, adapter.key)
            self.cache.get(adapter.id, stored, lambda: data, lambda b: self._parse(adapter.id, b), pin=True)
        try:
            self.catalog.set_pinned(adapter.key, True)
        except BaseException:
            if not adapter.pinned:  # as it was
                self.cache.unpin(adapter.id)
            raise

    def unpin(self, adapter_id: str) -> None:
        adapter = self.get_adapter(adapter_id)
        self.catalog.set_pinned(adapter.key, False)
        self.cache.unpin(adapter.id)

    def archive(self, adapter_id: str) -> int:
        """Move an adapter's weights to cold storage (not routed, still restorable); returns hot bytes freed."""
        adapter = self.get_adapter(adapter_id)
        if adapter.status == "archived":
            return 0
        data, _ = self._load_bytes(adapter.id, adapter.key)  # verified: never archive a corrupt copy
        rel = self.files.write("cold", checksum(data), data)
        try:
            old = self.catalog.set_status(adapter.key, "archived", blob=None, file=rel)
        except BaseException:
            self._discard_unused(rel)
            raise
        self.cache.invalidate(adapter.id)
        self._discard_unused(old, keep=rel)
        return len(data)

    def restore(self, adapter_id: str) -> Adapter:
        """Bring an archived adapter back (weights inline again, routable)."""
        adapter = self.get_adapter(adapter_id)
        if adapter.status != "archived":
            return adapter
        data, _ = self._load_bytes(adapter.id, adapter.key)  # verified, wherever it is kept
        blob, new_file = self._place(data)
        try:
            old = self.catalog.set_status(adapter.key, "active", blob=blob, file=new_file)
        except BaseException:
            self._discard_unused(new_file)
            raise
        self._discard_unused(old, keep=new_file)
        return self.catalog.get(adapter.id)

    def _discard_unused(self, rel: str | None, keep: str | None = None) -> None:
        """Delete weight file ``rel`` if no row references it (best effort after a commit: a read failing here
        leaves the file to the collection at the next open instead of reporting a completed change as failed)."""
        if not rel or rel == keep:
            return
        try:
            if not self.catalog.file_referenced(rel):
                self.files.delete(rel)
        except StorageError:
            pass

    def record_usage(self, adapter_ids: Sequence[str], *, query: bool = True) -> None:
        """Count a use of each adapter (by id; one catalog read per id — the core uses :meth:`record_usage_keys`)."""
        keys = []
        for aid in adapter_ids:
            try:
                keys.append(self.catalog.key_of(aid))
            except AdapterNotFoundError:
                continue
        self.record_usage_keys(keys, query=query)

    def record_usage_keys(self, keys: Sequence[int], *, query: bool = True) -> None:
        """Count a use of each adapter key; written to the catalog in batches, not per query (no SQL here)."""
        now = time.time()
        with self._usage_lock:
            if query:
                self.queries += 1
            for key in keys:
                self._usage[key] = self._usage.get(key, 0) + 1
                self._last_used[key] = (now, self.queries)
            self._usage_pending += 1
            due = self._usage_pending >= _USAGE_FLUSH_EVERY or time.monotonic() - self._usage_flushed_at > _USAGE_FLUSH_SECONDS
        if due:
            self.flush_usage()

    def merge_into(self, source_ids: Sequence[str], merged_id: str, method: str) -> int:
        """Record that ``source_ids`` were merged into ``merged_id``: the sources' weights move to cold storage
        (kept for :meth:`undo_merge`), their status becomes ``merged`` (not routed, not counted) and their ids
        resolve to ``merged_id`` from now on — in one transaction. Returns the merge id."""
        self._check_open()
        target = self.get_adapter(merged_id)
        sources = [self.get_adapter(s) for s in source_ids]
        if any(s.id == target.id for s in sources) or len({s.id for s in sources}) != len(sources):
            raise CompositionError(f"`source_ids` {list(source_ids)} must be distinct and differ from {merged_id!r}")
        moves, old_files = [], []
        try:
            for ad in sources:  # files first, rows second
                file = self.catalog.read_weights(ad.key)[1]
                data, _ = self._load_bytes(ad.id, ad.key)
                moves.append((ad.key, ad.id, self.files.write("cold", checksum(data), data)))
                if file:
                    old_files.append(file)
            merge_id = self.catalog.record_merge(moves, target.id, method)
        except BaseException:
            for _, _, cold in moves:  # the cold copies no row references: no orphan left by a failed merge
                self._discard_unused(cold)
            raise
        for ad in sources:  # in-memory state first: nothing after the commit may leave it behind
            self.cache.invalidate(ad.id)
        self._count -= sum(1 for ad in sources if ad.status != "merged")
        for rel in old_files:
            self._discard_unused(rel)
        return merge_id

    def undo_merge(self, merge_id: int) -> tuple[list[str], str]:
        """Undo :meth:`merge_into`, all or nothing: the sources still held become active again (weights back
        from cold storage), their aliases go and the merged adapter is deleted — in one transaction. Returns
        ``(restored source ids, merged id)``. Nothing changes when it raises."""
        self._check_open()
        if isinstance(merge_id, bool) or not isinstance(merge_id, int):
            raise InvalidInputError(f"`merge_id` must be an int, got {merge_id!r:.100}")
        info = self.catalog.merge_info(merge_id)
        if info is None or info[2]:
            raise InvalidInputError(f"`merge_id`={merge_id!r} is not a merge that can be undone (unknown or undone)")
        merged_id, source_ids, _ = info
        merged = self._own_row(merged_id)
        if merged is not None:
            if merged.status == "merged":
                raise InvalidInputError(f"`merge_id`={merge_id!r}: {merged_id!r} was merged again; undo that merge first")
            users = self.catalog.composites_containing(merged_id)
            if users:
                raise CompositionError(f"{merged_id!r} is a member of composite adapter(s) {users}; change those first")
        sources = [ad for ad in (self._own_row(x) for x in source_ids) if ad is not None and ad.status == "merged"]
        restores: list[tuple[int, bytes | None, str | None]] = []
        written: list[str] = []
        try:
            for ad in sources:  # files first (verified), rows second
                data, _ = self._load_bytes(ad.id, ad.key)
                blob, file = self._place(data)
                if file is not None:
                    written.append(file)
                restores.append((ad.key, blob, file))
            restored, _, unused = self.catalog.undo_merge(merge_id, restores, merged.key if merged else None)
        except BaseException:
            for rel in written:
                self._discard_unused(rel)
            raise
        for ad in sources:
            self.cache.invalidate(ad.id)
        if merged is not None:
            self.cache.invalidate(merged.id)
        self._count += len(restored) - (1 if merged is not None else 0)
        for rel in unused:
            self._discard_unused(rel)
        return restored, merged_id

    def iter_weights(self, adapter_ids: Sequence[str]) -> Iterator[tuple[str, LoraWeights]]:
        """Weights read straight from storage (checksum-verified), bypassing and not disturbing the cache."""
        for aid in adapter_ids:
            resolved = self.resolve(aid)
            key = self.catalog.key_of(resolved)
            yield aid, self._parse(resolved, self._load_bytes(resolved, key)[0])

    def flush_usage(self) -> None:
        with self._usage_lock:
            counts, last, self._usage, self._last_used = self._usage, self._last_used, {}, {}
            self._usage_pending = 0
            self._usage_flushed_at = time.monotonic()
            queries = self.queries
        if counts or queries:
            self.catalog.record_usage(counts, last, queries)

    def statistics(self) -> dict[str, Any]:
        self.flush_usage()
        return {
            "total_adapters": self._count,
            "active_adapters": self.catalog.count(("active",)),
            "archived_adapters": self.catalog.count(("archived",)),
            "loaded_adapters": len(self.cache),
            "generation": self.generation,
            "queries": self.queries,
            "storage_path": str(self.directory),
            "temporary": self._temporary,
            "profile": self.profile.name,
            "database_bytes": _size(self.directory / "catalog.sqlite3") + _size(self.directory / "catalog.sqlite3-wal"),
        }

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.flush_usage()
        finally:
            self._closed = True
            self.cache.clear()
            self._release()

    # -- internals ---------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise InvalidInputError("the library is closed")

    def _check_profile(self) -> None:
        stored = self.catalog.get_meta("profile")
        if stored is None:
            self.catalog.set_meta("profile", self.profile.to_json())
            return
        stored_profile = BaseProfile.from_json(stored)
        if stored_profile.fingerprint != self.profile.fingerprint:
            raise ProfileMismatchError(
                f"library {str(self.directory)!r} holds adapters for profile {stored_profile.name!r} "
                f"({stored_profile.fingerprint}), not for {self.profile.name!r} ({self.profile.fingerprint})"
            )

    def _modules(self, spec: AdapterSpec) -> tuple[list[str], AdapterGranularity, int]:
        """Modules, real granularity and parameter count of a fresh adapter (memoised per request shape)."""
        tm = spec.target_modules
        key: tuple[Any, ...] = (
            ("tm", tm if isinstance(tm, str) else tuple(tm), spec.rank) if tm is not None else ("g", spec.granularity, spec.rank)
        )
        planned = self._modules_for.get(key)
        if planned is None:
            planned = self._modules_for[key] = plan_modules(self.profile, spec)
        return planned

    def _fresh_weight_bytes(self, specs: Sequence[AdapterSpec]) -> dict[int, tuple[bytes, list[str], float, int, Any]]:
        """Serialised fresh LoRA weights (A random, B zero) for every spec without weights, made in batches.

        Returns ``{spec index: (safetensors bytes, modules, alpha, num_parameters)}``. Adapters sharing modules,
        rank and alpha draw their ``A`` factors from one random tensor and share the cached header and zero ``B``
        bytes, so bulk creation costs a few microseconds of Python per adapter.
        """
        from smoa.adapter.weights import _ST_DTYPES, FORMAT, _header, init_factor_a

        groups: dict[tuple[tuple[str, ...], int, float], list[int]] = {}
        gran: dict[tuple[str, ...], AdapterGranularity] = {}
        for i, spec in enumerate(specs):
            if spec.weights is None and spec.specialization is not AdapterSpecialization.COMPOSITE:
                alpha = float(spec.alpha if spec.alpha is not None else self.config.default_alpha_ratio * spec.rank)
                mods, g, _count = self._modules(spec)
                gran[tuple(mods)] = g
                groups.setdefault((tuple(mods), spec.rank, alpha), []).append(i)
        out: dict[int, tuple[bytes, list[str], float, int, AdapterGranularity]] = {}
        itemsize = torch.empty((), dtype=self._dtype).element_size()
        st_dtype = _ST_DTYPES[self._dtype]
        for (modules, rank, alpha), idx in groups.items():
            layout, columns = [], []
            for m in modules:
                d_in, d_out = self.profile.shape(m)
                layout += [(f"{m}.lora_A", st_dtype, (rank, d_in), rank * d_in * itemsize),
                           (f"{m}.lora_B", st_dtype, (d_out, rank), rank * d_out * itemsize)]  # fmt: skip
                a = init_factor_a(len(idx), rank, d_in, self._gen, self._dtype).reshape(len(idx), -1)
                columns.append((a.view(torch.uint8) if a.dtype is torch.bfloat16 else a).numpy().view(np.uint8))
                columns.append(np.zeros((len(idx), rank * d_out * itemsize), dtype=np.uint8))  # B = 0
            header = _header(tuple(layout), tuple(sorted({"format": FORMAT, "alpha": repr(alpha), "rank": str(rank)}.items())))
            head = np.broadcast_to(np.frombuffer(header, dtype=np.uint8), (len(idx), len(header)))
            files = np.concatenate([head, *columns], axis=1)  # [n, file bytes]: one safetensors file per row
            nparams = sum(rank * sum(self.profile.shape(m)) for m in modules)
            shared_modules = list(modules)  # one list per group: rows share it (and its JSON encoding)
            for j, i in enumerate(idx):
                out[i] = (files[j].tobytes(), shared_modules, alpha, nparams, gran[modules])
        return out

    def _row_for(
        self, aid: str, spec: AdapterSpec, now: float, embedding: np.ndarray | None, written: list[str],
        fresh: tuple[bytes, list[str], float, int, AdapterGranularity] | None,
    ) -> NewAdapterRow:  # fmt: skip
        if spec.specialization is AdapterSpecialization.COMPOSITE:
            return self._composite_row(aid, spec, now, embedding)
        if fresh is not None:
            data, modules, alpha, nparams, granularity = fresh
            rank = spec.rank
        else:
            assert spec.weights is not None  # fresh adapters were handled above
            weights = weights_from_mapping(spec.weights, spec.alpha, name="weights")
            if spec.alpha is not None and isinstance(spec.weights, LoraWeights):
                weights = LoraWeights(weights.factors, float(spec.alpha), weights.rank)
            weights.validate(self.profile, name=f"adapter {aid}")
            modules = [m for m in self.profile.module_names if m in weights.factors]
            weights = LoraWeights({m: weights.factors[m] for m in modules}, weights.alpha, weights.rank)
            granularity, nparams = granularity_of(weights.num_parameters), weights.num_parameters
            alpha, rank, data = weights.alpha, weights.rank, weights.to_bytes()
        row = NewAdapterRow(
            id=aid, specialization=spec.specialization.value, granularity=granularity.value,  # type: ignore[union-attr]
            rank=rank, alpha=alpha, description=spec.description, target_modules=modules,
            num_parameters=nparams, profile=self.profile.fingerprint, checksum="", blob=None,
            file=None, nbytes=0, created_at=now, domain_tags=list(spec.domain_tags),
            skill_tags=list(spec.skill_tags), metadata=dict(spec.metadata),
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
            pinned=spec.pinned, created_query=self.queries, examples=list(spec.examples),
        )  # fmt: skip
        row.checksum = checksum(data)  # of the canonical weight bytes (a file's header row is not part of it)
        if len(data) > self.config.blob_inline_max_bytes:
            data = self._stamp(data, row_meta(row, version=1))
        row.blob, row.file = self._place(data)
        row.nbytes = len(data)
        if row.file is not None:
            written.append(row.file)
        return row

    def _stamp(self, data: bytes, meta: dict[str, Any]) -> bytes:
        """Weights that go to a file carry their catalog row in the header (``smoa fsck --repair`` rebuilds
        the catalog from them); inline BLOBs live in the catalog itself and stay as they are."""
        if len(data) <= self.config.blob_inline_max_bytes:
            return data
        from smoa.adapter.safetensors_io import with_row_meta

        return with_row_meta(data, meta)

    def _composite_row(self, aid: str, spec: AdapterSpec, now: float, embedding: np.ndarray | None) -> NewAdapterRow:
        members = [(self.resolve(m), w) for m, w in spec.members or []]
        modules: set[str] = set()
        nparams = 0
        for mid, _ in members:
            self.get_adapter(mid)  # raises AdapterNotFoundError for unknown members
        from smoa.compose.composite import flatten

        def members_of(x: str) -> list[tuple[str, float]] | None:
            if x == aid:
                return members
            ad = self.get_adapter(x)
            return list(ad.members) if ad.is_composite else None

        leaves = flatten(aid, members_of)  # raises CompositionError on cycles
        for leaf, _ in leaves:
            ad = self.get_adapter(leaf)
            modules.update(ad.target_modules)
            nparams += ad.num_parameters
        order = {m: i for i, m in enumerate(self.profile.module_names)}
        return NewAdapterRow(
            id=aid, specialization=AdapterSpecialization.COMPOSITE.value,
            granularity=spec.granularity.value, rank=0, alpha=0.0,  # type: ignore[union-attr]
            description=spec.description, target_modules=sorted(modules, key=order.__getitem__), num_parameters=nparams,
            profile=self.profile.fingerprint, checksum="", blob=b"", file=None, nbytes=0, created_at=now,
            domain_tags=list(spec.domain_tags), skill_tags=list(spec.skill_tags), metadata=dict(spec.metadata),
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
            pinned=spec.pinned, members=members, created_query=self.queries, examples=list(spec.examples),
        )  # fmt: skip

    def _place(self, data: bytes) -> tuple[bytes | None, str | None]:
        """Inline BLOB for small weights; a content-addressed file (written now, before the row) for large ones."""
        if len(data) <= self.config.blob_inline_max_bytes:
            return data, None
        return None, self.files.write("blobs", checksum(data), data)

    def _load_bytes(self, adapter_id: str, key: int) -> tuple[bytes, int]:
        """Checksum-verified stored bytes of an adapter and the version they belong to."""
        for attempt in range(3):
            blob, file, digest, version = self.catalog.read_weights(key)  # one SELECT: bytes, sha, version agree
            if blob is not None:
                data = blob
                break
            try:
                data = self.files.read(file or "", name=f"adapter {adapter_id}")
                break
            except CorruptAdapterError:
                # A concurrent update/archive/delete may have committed and unlinked the file between the row
                # read and the file read: read the row again (a deleted adapter raises AdapterNotFoundError).
                if attempt == 2 or self.catalog.read_weights(key)[1] == file:
                    raise
        whole = checksum(data)
        if blob is None and file and whole != file.rsplit("/", 1)[-1]:  # a file is named by its bytes' sha256
            digest = ""  # every byte of it is covered: a flipped header bit fails here
        if whole != digest and (blob is not None or not digest or not self._canonical_matches(adapter_id, data, digest)):
            raise CorruptAdapterError(
                f"adapter {adapter_id!r}: stored weights fail their checksum ({len(data)} bytes); "
                "the adapter is corrupt and was not loaded"
            )
        return data, version

    def _canonical_matches(self, adapter_id: str, data: bytes, digest: str) -> bool:
        """A weight file carries its row in the header: its checksum is that of the canonical weight bytes."""
        try:
            return checksum(LoraWeights.from_bytes(data, name=f"adapter {adapter_id!r}").to_bytes()) == digest
        except (CorruptAdapterError, InvalidAdapterError):
            return False

    def _parse(self, adapter_id: str, data: bytes) -> LoraWeights:
        weights = LoraWeights.from_bytes(data, name=f"adapter {adapter_id!r}")
        try:
            weights.validate(self.profile, name=f"adapter {adapter_id!r}")
        except InvalidAdapterError as exc:
            raise CorruptAdapterError(f"stored weights are invalid: {exc}") from None
        return weights

    def _adapter_from_row(self, key: int, r: NewAdapterRow) -> Adapter:
        return Adapter(
            id=r.id, key=key, specialization=AdapterSpecialization(r.specialization),
            granularity=AdapterGranularity(r.granularity), rank=r.rank, alpha=r.alpha,
            domain_tags=list(r.domain_tags), skill_tags=list(r.skill_tags), description=r.description,
            target_modules=list(r.target_modules), num_parameters=r.num_parameters, profile=r.profile, version=1,
            checksum=r.checksum, created_at=r.created_at, pinned=r.pinned, members=list(r.members or []),
            metadata=dict(r.metadata), created_query=r.created_query, examples=list(r.examples or []),
        )  # fmt: skip

    def __enter__(self) -> AdapterLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def row_meta(row: NewAdapterRow | Adapter, version: int | None = None) -> dict[str, Any]:
    """The row fields recorded in a weight file's header (:func:`smoa.adapter.safetensors_io.with_row_meta`)."""
    spec = row.specialization.value if isinstance(row, Adapter) else row.specialization
    gran = row.granularity.value if isinstance(row, Adapter) else row.granularity
    return {
        "id": row.id, "specialization": spec, "granularity": gran, "rank": row.rank, "alpha": row.alpha,
        "description": row.description, "target_modules": list(row.target_modules),
        "num_parameters": row.num_parameters, "profile": row.profile, "created_at": row.created_at,
        "domain_tags": list(row.domain_tags), "skill_tags": list(row.skill_tags), "metadata": dict(row.metadata),
        "examples": list(row.examples or []), "pinned": bool(row.pinned), "created_query": row.created_query,
        "version": version if version is not None else getattr(row, "version", 1),
    }  # fmt: skip


def _library_dir(storage_path: Any) -> Path:
    """``storage_path`` as an absolute directory (resolved once, at open: a later ``os.chdir`` changes nothing)."""
    path = Path(storage_path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise StorageError(f"`storage_path`={str(path)!r} is a file, not a directory")
    return Path(os.path.realpath(path))


def _refuse_lost_catalog(directory: Path, files: Any) -> None:
    """Refuse a directory whose weight files (or index) outlive a missing, empty or unreadable catalog.

    Opening it would create an empty catalog and then sweep every weight file as an orphan.
    """
    db = directory / "catalog.sqlite3"
    size = db.stat().st_size if db.exists() else -1
    if size > 0:
        return
    left = (isinstance(files, FileStore) and files.holds_weights()) or (directory / "index" / "meta.json").exists() or (directory / "catalog.sqlite3-wal").exists()
    if left:
        problem = "is missing" if size < 0 else "is empty (0 bytes)"
        raise StorageError(
            f"library {str(directory)!r}: the catalog {db.name} {problem}, but the directory still holds "
            f"adapter weight files or an index; refusing to open (nothing was changed). "
            f"Recover with `smoa fsck {directory} --repair`"
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = ["AdapterLibrary", "AdapterSpec", "new_adapter_ids", "validate_spec"]
