"""The adapter library: catalog + weight files + weight cache for one base-model profile (synchronous core).

``AdapterLibrary`` validates every request up front, turns it into rows and safetensors bytes, and writes each
adapter (or each bulk call) in one catalog transaction. Weights load lazily through the two-tier
:class:`~smoa.cache.tiered.AdapterCache`, keyed by ``(id, version)`` and checked against their sha256 on every
load from storage. Routing keys are computed by the caller (the router) and stored in the ``embedding`` column.

The async facade (:mod:`smoa.mixture`) wraps this class; nothing here knows about routing or models.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smoa.adapter.granularity import granularity_of, select_modules
from smoa.adapter.profile import BaseProfile, resolve_profile
from smoa.adapter.spec import Adapter
from smoa.adapter.weights import LoraWeights, checksum, weights_from_mapping
from smoa.cache.tiered import AdapterCache
from smoa.config import AdapterGranularity, AdapterSpecialization, SMoAConfig, coerce_enum
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
from smoa.storage.files import DirectoryLock, FileStore

MAX_TAG_CHARS = 256
MAX_TAGS = 64
MAX_DESCRIPTION_CHARS = 16_384
MAX_METADATA_BYTES = 64 * 1024
MAX_EXAMPLES = 10_000
MAX_METADATA_DEPTH = 32
MAX_ID_CHARS = 256
_USAGE_FLUSH_EVERY = 2048
_USAGE_FLUSH_SECONDS = 5.0


@dataclass
class AdapterSpec:
    """A request to create one adapter (validated by :func:`validate_spec`)."""

    specialization: AdapterSpecialization | str = AdapterSpecialization.CUSTOM
    domain_tags: Sequence[str] = ()
    skill_tags: Sequence[str] = ()
    granularity: AdapterGranularity | str = AdapterGranularity.NANO
    rank: int = 2
    alpha: float | None = None
    description: str = ""
    examples: Sequence[str] = ()
    weights: LoraWeights | Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    target_modules: Sequence[str] | str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    pinned: bool = False
    members: Sequence[tuple[str, float]] | None = None  # COMPOSITE only


def _is_unicode(text: str) -> bool:
    """False for strings SQLite and JSON cannot store (lone surrogates such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of lists/dicts in ``value``, counted iteratively and capped at ``limit + 1``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, tuple, dict)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def _check_text_list(name: str, value: Any) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise InvalidInputError(f"`{name}` must be a list of strings, got {value!r:.200}")
    if len(value) > MAX_TAGS:
        raise InvalidInputError(f"`{name}` holds {len(value)} tags; at most {MAX_TAGS} are allowed")
    out = []
    for tag in value:
        if not isinstance(tag, str):
            raise InvalidInputError(f"`{name}` must hold only strings, got {tag!r:.100} ({type(tag).__name__})")
        if not tag.strip() or len(tag) > MAX_TAG_CHARS or any(ord(c) < 32 for c in tag) or not _is_unicode(tag):
            raise InvalidInputError(
                f"`{name}` tag {tag[:80]!r} must be 1-{MAX_TAG_CHARS} characters with no control characters or lone surrogates"
            )
        out.append(tag)
    return out


def validate_spec(spec: AdapterSpec, where: str = "") -> AdapterSpec:
    """Check and normalise every field of ``spec``; raise :class:`InvalidInputError` naming the bad one."""
    p = f"{where}: " if where else ""
    try:
        specialization = coerce_enum(AdapterSpecialization, spec.specialization, "specialization")
        granularity = coerce_enum(AdapterGranularity, spec.granularity, "granularity")
    except ConfigError as exc:
        raise InvalidInputError(p + str(exc)) from None
    if not isinstance(spec.rank, int) or isinstance(spec.rank, bool) or not 1 <= spec.rank <= 4096:
        raise InvalidInputError(f"{p}`rank` must be an int in [1, 4096], got {spec.rank!r}")
    if spec.alpha is not None and (
        isinstance(spec.alpha, bool) or not isinstance(spec.alpha, (int, float)) or not math.isfinite(spec.alpha)
        or spec.alpha <= 0
    ):  # fmt: skip
        raise InvalidInputError(f"{p}`alpha` must be a positive finite number, got {spec.alpha!r}")
    if (not isinstance(spec.description, str) or len(spec.description) > MAX_DESCRIPTION_CHARS
            or "\x00" in spec.description or not _is_unicode(spec.description)):  # fmt: skip
        raise InvalidInputError(
            f"{p}`description` must be a string of at most {MAX_DESCRIPTION_CHARS} characters without NUL "
            "or lone surrogates, "
            f"got {spec.description!r:.100}"
        )
    examples = list(spec.examples) if not isinstance(spec.examples, str) else None
    if examples is None or len(examples) > MAX_EXAMPLES or not all(isinstance(e, str) and _is_unicode(e) for e in examples):
        raise InvalidInputError(f"{p}`examples` must be a list of at most {MAX_EXAMPLES} strings, got {spec.examples!r:.100}")
    if not isinstance(spec.metadata, Mapping) or not all(isinstance(k, str) for k in spec.metadata):
        raise InvalidInputError(f"{p}`metadata` must be a mapping with string keys, got {spec.metadata!r:.100}")
    if _depth(dict(spec.metadata), MAX_METADATA_DEPTH) > MAX_METADATA_DEPTH:
        raise InvalidInputError(f"{p}`metadata` is nested more than {MAX_METADATA_DEPTH} levels deep")
    try:
        meta_json = json.dumps(dict(spec.metadata), ensure_ascii=False, allow_nan=False) if spec.metadata else "{}"
        meta_json.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise InvalidInputError(f"{p}`metadata` must be JSON-serialisable UTF-8: {str(exc)[:200]}") from None
    if len(meta_json.encode()) > MAX_METADATA_BYTES:
        raise InvalidInputError(f"{p}`metadata` is {len(meta_json):,} bytes; at most {MAX_METADATA_BYTES:,} allowed")
    if not isinstance(spec.pinned, bool):
        raise InvalidInputError(f"{p}`pinned` must be a bool, got {spec.pinned!r}")
    members = None
    if specialization is AdapterSpecialization.COMPOSITE:
        if not spec.members:
            raise InvalidInputError(f"{p}a COMPOSITE adapter needs `members` [(adapter_id, weight), ...]")
        members = []
        for m in spec.members:
            if not (isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], str)
                    and isinstance(m[1], (int, float)) and not isinstance(m[1], bool) and math.isfinite(m[1])):  # fmt: skip
                raise InvalidInputError(f"{p}`members` items must be (adapter_id: str, weight: float), got {m!r:.100}")
            members.append((m[0], float(m[1])))
    elif spec.members:
        raise InvalidInputError(f"{p}`members` is only for COMPOSITE adapters (got specialization {specialization.value!r})")
    try:
        domain_tags = _check_text_list("domain_tags", spec.domain_tags)
        skill_tags = _check_text_list("skill_tags", spec.skill_tags)
    except InvalidInputError as exc:
        raise InvalidInputError(p + str(exc)) from None
    return AdapterSpec(
        specialization=specialization, domain_tags=domain_tags, skill_tags=skill_tags, granularity=granularity, rank=spec.rank,
        alpha=spec.alpha, description=spec.description, examples=examples, weights=spec.weights,
        target_modules=spec.target_modules, metadata=json.loads(meta_json), pinned=spec.pinned, members=members,
    )  # fmt: skip


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
        directory = Path(tempfile.mkdtemp(prefix="smoa-")) if self._temporary else Path(config.storage_path)  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._dir_lock = DirectoryLock(directory)
        self._dir_lock.acquire()
        try:
            self.catalog = Catalog(directory / "catalog.sqlite3")
            self._check_profile()
        except BaseException:
            self._dir_lock.release()
            raise
        self.files = FileStore(directory)
        self.collected_files = self.files.collect_garbage(self.catalog.all_files())
        self.cache = AdapterCache(
            max_items=config.max_loaded_adapters,
            max_bytes=config.cache_max_bytes,
            offload_bytes=config.offload_max_bytes if config.enable_offloading else 0,
            device=config.device,
        )
        self._count = self.catalog.count()
        self._gen = torch.Generator().manual_seed(config.seed if config.seed is not None else secrets.randbits(62))
        self._dtype = getattr(torch, config.adapter_dtype)
        self._modules_for: dict[tuple[Any, ...], list[str]] = {}
        self._usage_lock = threading.Lock()
        self._usage: dict[int, int] = {}
        self._last_used: dict[int, tuple[float, int]] = {}
        self._usage_pending = 0
        self._usage_flushed_at = time.monotonic()
        self.queries = int(self.catalog.get_meta("queries") or 0)
        self._closed = False

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
        if len(adapter_id) > MAX_ID_CHARS or not _is_unicode(adapter_id):
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
        key, version, _status = self.catalog.version_of(aid)
        members = self.catalog.members_of(key)
        if members:
            from smoa.compose.merge import combine  # lazy: compose depends on nothing here

            leaves = self.flatten(aid)
            return combine([self.get_weights(i) for i, _ in leaves], [w for _, w in leaves], method="cat")
        return self.cache.get(aid, version, lambda: self._load_bytes(aid, key), lambda b: self._parse(aid, b))

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

    def create_many(self, specs: Sequence[AdapterSpec], embeddings: np.ndarray | None = None) -> list[Adapter]:
        """Create adapters in one transaction: all appear, or none (on any error nothing is written)."""
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
        rows: list[NewAdapterRow] = []
        written: list[str] = []
        fresh = self._fresh_weight_bytes(specs)
        ids = new_adapter_ids(len(specs))
        try:
            for i, spec in enumerate(specs):
                emb = None if embeddings is None else embeddings[i]
                rows.append(self._row_for(ids[i], spec, now, emb, written, fresh.get(i)))
            keys = self.catalog.insert_many(rows)
        except BaseException:
            for rel in written:  # files written for this call; no row references them now
                if not self.catalog.file_referenced(rel):
                    self.files.delete(rel)
            raise
        self._count += len(rows)
        return [self._adapter_from_row(k, r) for k, r in zip(keys, rows)]

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
        data = weights.to_bytes()
        blob, file = self._place(data)
        try:
            old_file = self.catalog.read_weights(adapter.key)[1]
            self.catalog.replace_weights(
                adapter.key, blob, file, checksum(data), len(data),
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
        """Delete an adapter; refused while a COMPOSITE adapter lists it as a member."""
        self._check_open()
        adapter = self.get_adapter(adapter_id)
        users = self.catalog.composites_containing(adapter.id)
        if users:
            raise CompositionError(
                f"adapter {adapter.id!r} is a member of composite adapter(s) {users}; delete or change those first"
            )
        for rel in self.catalog.delete([adapter.key]):
            self.files.delete(rel)
        self.cache.invalidate(adapter.id)
        if adapter.status != "merged":
            self._count -= 1
        return adapter

    def pin(self, adapter_id: str) -> None:
        """Protect from pruning and keep loaded in the cache."""
        adapter = self.get_adapter(adapter_id)
        self.catalog.set_pinned(adapter.key, True)
        if not adapter.is_composite:
            self.get_weights(adapter.id)
            self.cache.pin(adapter.id, adapter.version)

    def unpin(self, adapter_id: str) -> None:
        adapter = self.get_adapter(adapter_id)
        self.catalog.set_pinned(adapter.key, False)
        self.cache.unpin(adapter.id)

    def archive(self, adapter_id: str) -> int:
        """Move an adapter's weights to cold storage (not routed, still restorable); returns hot bytes freed."""
        adapter = self.get_adapter(adapter_id)
        if adapter.status == "archived":
            return 0
        blob, file, _ = self.catalog.read_weights(adapter.key)
        data = blob if blob is not None else self.files.read(file or "", name=f"adapter {adapter.id}")
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
        _, file, _ = self.catalog.read_weights(adapter.key)
        data = self.files.read(file or "", name=f"adapter {adapter.id}")
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
        """Count a use of each adapter; written to the catalog in batches, not per query."""
        now = time.time()
        with self._usage_lock:
            if query:
                self.queries += 1
            for aid in adapter_ids:
                try:
                    key = self.catalog.key_of(aid)
                except AdapterNotFoundError:
                    continue
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
                blob, file, _ = self.catalog.read_weights(ad.key)
                data = blob if blob is not None else self.files.read(file or "", name=f"adapter {ad.id}")
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
        """Undo :meth:`merge_into`: sources active again (weights back from cold storage), their aliases gone.
        Returns ``(source ids, merged id)``; the merged adapter itself is left for the caller to delete."""
        self._check_open()
        sources, merged = self.catalog.undo_merge(int(merge_id))
        self._count += len(sources)
        for s in sources:
            self.restore(s)
        return sources, merged

    def iter_weights(self, adapter_ids: Sequence[str]) -> Iterator[tuple[str, LoraWeights]]:
        """Weights read straight from storage (checksum-verified), bypassing and not disturbing the cache."""
        for aid in adapter_ids:
            resolved = self.resolve(aid)
            key = self.catalog.key_of(resolved)
            yield aid, self._parse(resolved, self._load_bytes(resolved, key))

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
            self.catalog.close()
            self._dir_lock.release()
            if self._temporary:
                shutil.rmtree(self.directory, ignore_errors=True)

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

    def _modules(self, spec: AdapterSpec) -> list[str]:
        """Target modules of a fresh adapter: explicit ``target_modules`` or the granularity's choice (memoised)."""
        tm = spec.target_modules
        key: tuple[Any, ...] = (
            ("tm", tm if isinstance(tm, str) else tuple(tm)) if tm is not None else ("g", spec.granularity, spec.rank)
        )
        mods = self._modules_for.get(key)
        if mods is None:
            if tm is not None:
                mods = self.profile.match(tm)
                if not mods:
                    raise InvalidInputError(
                        f"`target_modules`={tm!r:.100} matches no module of profile {self.profile.name!r}"
                    )
            else:
                mods = select_modules(self.profile, spec.granularity, spec.rank)  # type: ignore[arg-type]
            self._modules_for[key] = mods
        return mods

    def _fresh_weight_bytes(self, specs: Sequence[AdapterSpec]) -> dict[int, tuple[bytes, list[str], float, int]]:
        """Serialised fresh LoRA weights (A random, B zero) for every spec without weights, made in batches.

        Returns ``{spec index: (safetensors bytes, modules, alpha, num_parameters)}``. Adapters sharing modules,
        rank and alpha draw their ``A`` factors from one random tensor and share the cached header and zero ``B``
        bytes, so bulk creation costs a few microseconds of Python per adapter.
        """
        from smoa.adapter.weights import FORMAT, _header, _ST_DTYPES, init_factor_a

        groups: dict[tuple[tuple[str, ...], int, float], list[int]] = {}
        for i, spec in enumerate(specs):
            if spec.weights is None and spec.specialization is not AdapterSpecialization.COMPOSITE:
                alpha = float(spec.alpha if spec.alpha is not None else self.config.default_alpha_ratio * spec.rank)
                groups.setdefault((tuple(self._modules(spec)), spec.rank, alpha), []).append(i)
        out: dict[int, tuple[bytes, list[str], float, int]] = {}
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
                out[i] = (files[j].tobytes(), shared_modules, alpha, nparams)
        return out

    def _row_for(
        self, aid: str, spec: AdapterSpec, now: float, embedding: np.ndarray | None, written: list[str],
        fresh: tuple[bytes, list[str], float, int] | None,
    ) -> NewAdapterRow:  # fmt: skip
        if spec.specialization is AdapterSpecialization.COMPOSITE:
            return self._composite_row(aid, spec, now, embedding)
        if fresh is not None:
            data, modules, alpha, nparams = fresh
            blob, file = self._place(data)
            if file is not None:
                written.append(file)
            return NewAdapterRow(
                id=aid, specialization=spec.specialization.value, granularity=spec.granularity.value,  # type: ignore[union-attr]
                rank=spec.rank, alpha=alpha, description=spec.description, target_modules=modules,
                num_parameters=nparams, profile=self.profile.fingerprint, checksum=checksum(data), blob=blob,
                file=file, nbytes=len(data), created_at=now, domain_tags=list(spec.domain_tags),
                skill_tags=list(spec.skill_tags), metadata=dict(spec.metadata),
                embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
                pinned=spec.pinned, created_query=self.queries,
            )  # fmt: skip
        assert spec.weights is not None  # fresh adapters were handled above
        weights = weights_from_mapping(spec.weights, spec.alpha, name="weights")
        if spec.alpha is not None and isinstance(spec.weights, LoraWeights):
            weights = LoraWeights(weights.factors, float(spec.alpha), weights.rank)
        weights.validate(self.profile, name=f"adapter {aid}")
        modules = [m for m in self.profile.module_names if m in weights.factors]
        weights = LoraWeights({m: weights.factors[m] for m in modules}, weights.alpha, weights.rank)
        granularity = granularity_of(weights.num_parameters)
        data = weights.to_bytes()
        blob, file = self._place(data)
        if file is not None:
            written.append(file)
        return NewAdapterRow(
            id=aid, specialization=spec.specialization.value, granularity=granularity.value,  # type: ignore[union-attr]
            rank=weights.rank, alpha=weights.alpha, description=spec.description, target_modules=modules,
            num_parameters=weights.num_parameters, profile=self.profile.fingerprint, checksum=checksum(data),
            blob=blob, file=file, nbytes=len(data), created_at=now, domain_tags=list(spec.domain_tags),
            skill_tags=list(spec.skill_tags), metadata=dict(spec.metadata),
            embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32).tobytes(),
            pinned=spec.pinned, created_query=self.queries,
        )  # fmt: skip

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
            pinned=spec.pinned, members=members, created_query=self.queries,
        )  # fmt: skip

    def _place(self, data: bytes) -> tuple[bytes | None, str | None]:
        """Inline BLOB for small weights; a content-addressed file (written now, before the row) for large ones."""
        if len(data) <= self.config.blob_inline_max_bytes:
            return data, None
        return None, self.files.write("blobs", checksum(data), data)

    def _load_bytes(self, adapter_id: str, key: int) -> bytes:
        for attempt in range(3):
            blob, file, digest = self.catalog.read_weights(key)  # one SELECT: blob/file and checksum agree
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
        if checksum(data) != digest:
            raise CorruptAdapterError(
                f"adapter {adapter_id!r}: stored weights fail their checksum ({len(data)} bytes); "
                "the adapter is corrupt and was not loaded"
            )
        return data

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
            metadata=dict(r.metadata), created_query=r.created_query,
        )  # fmt: skip

    def __enter__(self) -> AdapterLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


__all__ = ["AdapterLibrary", "AdapterSpec", "validate_spec", "new_adapter_ids"]
