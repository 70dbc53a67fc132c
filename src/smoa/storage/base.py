"""The storage seam: a catalog backend and a weight-store backend, chosen by URL scheme.

::

    LibraryCore ──► CatalogBackend   (rows, tags, routing keys + texts, members, aliases, merges, change log, meta)
                └─► WeightStore      (immutable, content-addressed weight files under the library's namespace)

Only :class:`smoa.core.LibraryCore` calls these; it holds its own lock around every mutation, so a backend
needs to be safe for one writer and concurrent readers. Backends register by URL scheme::

    storage_path = "/data/lib"          -> SQLite catalog in that directory  (smoa.storage.catalog.Catalog)
    storage_path = "postgresql://..."   -> PostgreSQL catalog                (smoa.storage.postgres, issue 13)
    weights_path = None                 -> files under <storage_path>/weights (smoa.storage.files.FileStore)
    weights_path = "s3://bucket/prefix" -> S3 objects                        (smoa.storage.s3, issue 13)

Contract of a catalog backend (every write method is one transaction, all or nothing, and every write that
changes what routing or mixing sees — insert, delete, status, version, routing keys, tags, members — bumps the
*generation* by one and appends one ``(generation, key)`` row per touched adapter to the change log in the same
transaction). :meth:`CatalogBackend.changes_since` lets a router that is behind catch up without a rebuild.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from smoa.adapter.spec import Adapter
from smoa.errors import ConfigError

KEY_FORMAT = "multi-v1"  # adapters.embedding = float32 [P, dim], P = len // (4 * dim)


@dataclass
class DirectoryRow:
    """What the hot path needs of one adapter: the core keeps these in memory (no SQL per request)."""

    key: int
    id: str
    version: int
    status: str  # active | archived | merged
    members: tuple[tuple[str, float], ...]  # COMPOSITE members (ids as stored), () for a plain adapter
    pinned: bool


@dataclass
class RoutingRow:
    """An adapter's routing state: its keys (float32 bytes, ``[P, dim]``) and the texts they come from."""

    key: int
    status: str
    embedding: bytes | None
    domain_tags: list[str]
    skill_tags: list[str]
    description: str
    examples: list[str]


@runtime_checkable
class CatalogBackend(Protocol):
    """What :class:`smoa.core.LibraryCore` needs of a catalog (SQLite: :class:`smoa.storage.catalog.Catalog`)."""

    generation: int  # the last committed generation this connection knows

    # -- meta ------------------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def read_generation(self) -> int:
        """The committed generation read from storage (sees other processes' commits)."""
        ...

    # -- writes (each one transaction; those named in the module docstring bump + log) -----------------------
    def insert_many(self, rows: Sequence[Any]) -> list[int]: ...  # NewAdapterRow -> keys in order
    def insert_chunks(self, chunks: Any, on_chunk: Any = None) -> list[int]: ...  # lazily built chunks, ONE transaction
    def replace_weights(self, key: int, blob: bytes | None, file: str | None, checksum: str, nbytes: int,
                        embedding: bytes | None) -> int: ...  # fmt: skip
    def set_embeddings(self, items: Sequence[tuple[int, bytes | None]]) -> None: ...
    def update_fields(self, key: int, *, domain_tags: Sequence[str] | None = None,
                      skill_tags: Sequence[str] | None = None, description: str | None = None,
                      examples: Sequence[str] | None = None, metadata: dict[str, Any] | None = None,
                      embedding: bytes | None = None) -> None: ...  # fmt: skip
    def delete(self, keys: Sequence[int]) -> list[str]: ...  # returns files no row references any more
    def delete_alias(self, alias: str) -> list[str]: ...  # drop an alias and its retained source copy
    def set_status(self, key: int, status: str, blob: bytes | None = None, file: str | None = None) -> str | None: ...
    def set_pinned(self, key: int, pinned: bool) -> None: ...
    def record_usage(self, counts: dict[int, int], last_used: dict[int, tuple[float, int]], query_counter: int) -> None: ...
    def record_merge(self, moves: Sequence[tuple[int, str, str]], merged_id: str, method: str) -> int: ...
    def undo_merge(self, merge_id: int, restores: Sequence[tuple[int, bytes | None, str | None]],
                   delete_key: int | None) -> tuple[list[str], str, list[str]]: ...  # fmt: skip
    def compact(self) -> int: ...  # reclaim free space; returns bytes reclaimed
    def trim_changes(self, upto: int) -> None: ...  # drop change-log rows of generations <= upto

    # -- reads -----------------------------------------------------------------------------------------------
    def count(self, statuses: Sequence[str] = ("active", "archived")) -> int: ...
    def get(self, adapter_id: str) -> Adapter: ...
    def get_by_key(self, key: int) -> Adapter: ...
    def read_weights(self, key: int) -> tuple[bytes | None, str | None, str, int]: ...  # blob, file, sha, version
    def merge_info(self, merge_id: int) -> tuple[str, list[str], bool] | None: ...  # merged_into, sources, undone
    def iter_adapters(self, statuses: Sequence[str] = ("active", "archived"), batch: int = 10_000) -> Iterator[Adapter]: ...
    def page(self, statuses: Sequence[str], offset: int, limit: int, tag: str | None = None) -> list[Adapter]: ...
    def directory_rows(self, keys: Sequence[int] | None = None) -> Iterator[DirectoryRow]: ...
    def aliases(self) -> dict[str, str]: ...
    def routing_rows(self, keys: Sequence[int] | None = None) -> Iterator[RoutingRow]: ...
    def changes_since(self, generation: int) -> list[int] | None:
        """Keys changed after ``generation`` (distinct), or None when the log no longer reaches back there."""
        ...
    def all_files(self) -> set[str]: ...
    def file_referenced(self, file: str) -> bool: ...
    def usage_rows(self) -> Iterator[tuple[str, int, float | None, int, float, bool, str, int]]: ...
    def close(self) -> None: ...


@runtime_checkable
class WeightStore(Protocol):
    """Immutable weight files addressed ``<area>/<sha[:2]>/<sha>`` (area ``weights/hot`` or ``weights/cold``).

    The store only ever deletes what :meth:`write` wrote (the catalog records every path it holds); it never
    lists or touches anything outside its own namespace (``weights/`` of the library directory, or the S3 prefix).
    """

    def write(self, area: str, digest: str, data: bytes) -> str: ...  # -> relative path, idempotent
    def read(self, rel: str, *, name: str) -> bytes: ...  # CorruptAdapterError if missing
    def delete(self, rel: str) -> None: ...  # missing is fine
    def owned_files(self) -> set[str]: ...  # every content-addressed file in the namespace
    def close(self) -> None: ...


CatalogFactory = Callable[[str, "Any"], CatalogBackend]  # (url, config) -> backend
WeightFactory = Callable[[str, "Any"], WeightStore]

_CATALOGS: dict[str, CatalogFactory | str] = {"postgresql": "smoa.storage.postgres:open_catalog",
                                              "postgres": "smoa.storage.postgres:open_catalog"}  # fmt: skip
_WEIGHTS: dict[str, WeightFactory | str] = {"s3": "smoa.storage.s3:open_weight_store"}


def register_catalog_backend(scheme: str, factory: CatalogFactory) -> None:
    """Make ``<scheme>://...`` in ``storage_path`` open ``factory(url, config)``."""
    _CATALOGS[scheme] = factory


def register_weight_backend(scheme: str, factory: WeightFactory) -> None:
    """Make ``<scheme>://...`` in ``weights_path`` open ``factory(url, config)``."""
    _WEIGHTS[scheme] = factory


def url_scheme(location: str | Path | None) -> str | None:
    """``"postgresql"`` for ``"postgresql://..."``; None for a plain path (or None)."""
    if location is None or isinstance(location, Path):
        return None
    head, sep, _ = str(location).partition("://")
    return head.lower() if sep and head.isascii() and head.replace("+", "").isalnum() else None


def _factory(table: dict[str, Any], scheme: str, field: str, url: str) -> Callable[[str, Any], Any]:
    entry = table.get(scheme.split("+")[0])
    if entry is None:
        raise ConfigError(f"`{field}`={url!r}: no storage backend for scheme {scheme!r} (known: {sorted(table)})")
    if isinstance(entry, str):
        module, _, name = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"`{field}`={url!r}: the {scheme!r} backend is not available ({exc})") from exc
    return entry  # type: ignore[no-any-return]


def open_catalog_backend(url: str, config: Any) -> CatalogBackend:
    """A registered (non-SQLite) catalog for ``storage_path=url``."""
    return _factory(_CATALOGS, url_scheme(url) or "", "storage_path", url)(url, config)  # type: ignore[no-any-return]


def open_weight_backend(url: str, config: Any) -> WeightStore:
    """A registered (non-local) weight store for ``weights_path=url``."""
    return _factory(_WEIGHTS, url_scheme(url) or "", "weights_path", url)(url, config)  # type: ignore[no-any-return]


__all__ = [
    "KEY_FORMAT", "CatalogBackend", "DirectoryRow", "RoutingRow", "WeightStore", "open_catalog_backend",
    "open_weight_backend", "register_catalog_backend", "register_weight_backend", "url_scheme",
]  # fmt: skip
