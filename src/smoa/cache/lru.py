"""A bounded LRU cache with pinning, byte accounting, eviction callbacks and hit/miss statistics.

Built on ``OrderedDict`` (most recently used last). Bounds are an item count and a byte budget; ``put`` evicts
least-recently-used *unpinned* entries until both hold, and raises :class:`smoa.errors.CacheFullError` when only
pinned entries are left to evict. Not thread-safe by itself: callers hold a lock (see ``smoa.cache.tiered``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from smoa.errors import CacheFullError, InvalidInputError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@dataclass
class CacheStats:
    """Counters of one cache. ``delta(previous)`` gives the change since an earlier snapshot."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    items: int = 0
    bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def delta(self, previous: CacheStats) -> CacheStats:
        return CacheStats(
            self.hits - previous.hits, self.misses - previous.misses, self.evictions - previous.evictions,
            self.items, self.bytes,
        )  # fmt: skip


class LRUCache(Generic[K, V]):
    """LRU over ``(key -> value)`` bounded by ``max_items`` and ``max_bytes``.

    Args:
        max_items: most entries held.
        max_bytes: most total ``size_of(value)`` held.
        size_of: byte size of a value.
        on_evict: called with ``(key, value)`` for every entry pushed out by the bounds (not for ``remove``).
    """

    def __init__(
        self,
        max_items: int,
        max_bytes: int,
        size_of: Callable[[V], int],
        on_evict: Callable[[K, V], None] | None = None,
    ) -> None:
        if max_items < 0 or max_bytes < 0:
            raise InvalidInputError(f"`max_items`/`max_bytes` must be >= 0, got {max_items!r}/{max_bytes!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._size_of = size_of
        self._on_evict = on_evict
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._pinned: set[K] = set()
        self._bytes = 0
        self._hits = self._misses = self._evictions = 0

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)

    def keys(self) -> Iterator[K]:
        """Keys from least to most recently used."""
        return iter(list(self._data))

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: K) -> V | None:
        """The value (marked most recently used) or ``None``; counts a hit or a miss."""
        entry = self._data.get(key)
        if entry is None:
            self._misses += 1
            return None
        self._data.move_to_end(key)
        self._hits += 1
        return entry[0]

    def peek(self, key: K) -> V | None:
        """The value without touching recency or statistics."""
        entry = self._data.get(key)
        return None if entry is None else entry[0]

    def touch(self, key: K) -> None:
        if key in self._data:
            self._data.move_to_end(key)

    def put(self, key: K, value: V) -> None:
        """Insert or replace ``key``; then evict unpinned LRU entries until within bounds."""
        size = int(self._size_of(value))
        if size > self.max_bytes:
            raise CacheFullError(f"entry {key!r} needs {size:,} bytes, more than the whole budget {self.max_bytes:,}")
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._data[key] = (value, size)
        self._bytes += size
        self._evict_to_bounds(protect=key)

    def remove(self, key: K) -> V | None:
        entry = self._data.pop(key, None)
        self._pinned.discard(key)
        if entry is None:
            return None
        self._bytes -= entry[1]
        return entry[0]

    def pin(self, key: K) -> None:
        """Keep ``key`` from eviction (it must be present)."""
        if key not in self._data:
            raise KeyError(key)
        self._pinned.add(key)

    def unpin(self, key: K) -> None:
        self._pinned.discard(key)
        self._evict_to_bounds(protect=None)

    def is_pinned(self, key: K) -> bool:
        return key in self._pinned

    def clear(self) -> None:
        self._data.clear()
        self._pinned.clear()
        self._bytes = 0

    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, self._evictions, len(self._data), self._bytes)

    def _evict_to_bounds(self, protect: K | None) -> None:
        while len(self._data) > self.max_items or self._bytes > self.max_bytes:
            victim = next((k for k in self._data if k not in self._pinned and k != protect), None)
            if victim is None:
                # Undo the insert that broke the bound, then refuse it.
                if protect is not None:
                    self.remove(protect)
                raise CacheFullError(
                    f"cache full: {len(self._pinned)} pinned entries hold {self._bytes:,} bytes; unpin some adapters "
                    f"or raise `max_loaded_adapters` ({self.max_items}) / `cache_max_bytes` ({self.max_bytes:,})"
                )
            value, size = self._data.pop(victim)
            self._bytes -= size
            self._evictions += 1
            if self._on_evict is not None:
                self._on_evict(victim, value)
