"""The adapter weight cache: a device tier of ready tensors and an optional host tier of serialised bytes.

::

    get(id, version) ──► device tier (LoraWeights on the target device, LRU: max_loaded_adapters, cache_max_bytes)
                          │ miss
                          ▼
                         host tier (safetensors bytes in RAM, LRU: offload_max_bytes)   [enable_offloading]
                          │ miss
                          ▼
                         loader()  (catalog BLOB / file, checksum verified)

Entries are keyed by ``(adapter id, version)``: a changed adapter has a new version, so an old entry can never
be served for it; :meth:`AdapterCache.invalidate` drops every version of an id at once. Evicted device entries
drop to the host tier when offloading is on (their bytes re-parse in microseconds instead of a database read).
``loaded_adapters`` is the device tier's size.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from smoa.adapter.weights import LoraWeights
from smoa.cache.lru import LRUCache
from smoa.errors import CacheFullError

Key = tuple[str, int]


class AdapterCache:
    """Thread-safe two-tier weight cache with load-latency statistics."""

    def __init__(
        self,
        max_items: int,
        max_bytes: int,
        offload_bytes: int = 0,
        device: str = "cpu",
    ) -> None:
        self.device = device
        self._lock = threading.RLock()
        self._host: LRUCache[Key, bytes] | None = (
            LRUCache(max_items=10**12, max_bytes=offload_bytes, size_of=len, on_evict=self._forget)
            if offload_bytes > 0
            else None
        )
        self._device: LRUCache[Key, LoraWeights] = LRUCache(
            max_items=max_items, max_bytes=max_bytes, size_of=lambda w: w.nbytes, on_evict=self._offload
        )
        self._versions: dict[str, set[int]] = {}
        self._raw: dict[Key, bytes] = {}  # bytes of device entries, kept only with a host tier (for demotion)
        self._load_ms: list[float] = []
        self._loads = 0
        self._host_hits = 0
        self._uncached = 0

    def get(self, adapter_id: str, version: int, load_bytes: Callable[[], bytes],
            parse: Callable[[bytes], LoraWeights], pin: bool = False) -> LoraWeights:  # fmt: skip
        """Weights of ``(adapter_id, version)``: from a tier, or loaded, parsed and cached.

        The cache speeds reads up and never refuses one: when pinned entries hold the whole device tier (or the
        entry alone is over ``max_bytes``) the weights are returned uncached (counted in ``uncached_loads``).
        With ``pin=True`` the entry is cached and pinned under one lock, or :class:`CacheFullError` is raised.
        """
        key = (adapter_id, version)
        with self._lock:
            hit = self._device.get(key)
            if hit is not None:
                if pin:
                    self._device.pin(key)
                return hit
            data = self._host.get(key) if self._host is not None else None
        t0 = time.perf_counter()
        from_host = data is not None
        if data is None:
            data = load_bytes()
        weights = parse(data)
        if self.device != "cpu":
            weights = weights.to(self.device)
        with self._lock:
            if from_host:
                self._host_hits += 1
                assert self._host is not None
                self._host.remove(key)
            self._loads += 1
            self._record_ms((time.perf_counter() - t0) * 1000.0)
            try:
                self._device.put(key, weights)
            except CacheFullError:
                if from_host:  # put the bytes back where they were
                    assert self._host is not None
                    self._host.put(key, data)
                if pin:
                    raise
                self._uncached += 1
                return weights
            self._versions.setdefault(adapter_id, set()).add(version)
            if self._host is not None:
                self._raw[key] = data
            if pin:
                self._device.pin(key)
        return weights

    def peek(self, adapter_id: str, version: int) -> LoraWeights | None:
        """The device-tier entry of ``(adapter_id, version)`` if cached (counted as a hit and touched), else None."""
        with self._lock:
            return self._device.get((adapter_id, version)) if (adapter_id, version) in self._device else None

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            for v in self._versions.get(adapter_id, ()):
                self._device.unpin((adapter_id, v))

    def invalidate(self, adapter_id: str) -> None:
        """Drop every cached version of ``adapter_id`` from every tier."""
        with self._lock:
            for v in self._versions.pop(adapter_id, set()):
                self._device.remove((adapter_id, v))
                self._raw.pop((adapter_id, v), None)
                if self._host is not None:
                    self._host.remove((adapter_id, v))

    def clear(self) -> None:
        with self._lock:
            self._device.clear()
            self._raw.clear()
            self._versions.clear()
            if self._host is not None:
                self._host.clear()

    def is_loaded(self, adapter_id: str, version: int) -> bool:
        return (adapter_id, version) in self._device

    def __len__(self) -> int:
        return len(self._device)

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            s = self._device.stats()
            ms = sorted(self._load_ms)
            out: dict[str, Any] = {
                "loaded_adapters": s.items,
                "bytes": s.bytes,
                "max_items": self._device.max_items,
                "max_bytes": self._device.max_bytes,
                "hits": s.hits,
                "misses": s.misses,
                "evictions": s.evictions,
                "hit_rate": s.hit_rate,
                "loads": self._loads,
                "uncached_loads": self._uncached,
                "load_ms_p50": _pct(ms, 50),
                "load_ms_p99": _pct(ms, 99),
            }
            if self._host is not None:
                h = self._host.stats()
                out["host_tier"] = {"items": h.items, "bytes": h.bytes, "hits": self._host_hits,
                                    "evictions": h.evictions}  # fmt: skip
            return out

    # -- internals ---------------------------------------------------------------------------------------------
    def _offload(self, key: Key, _weights: LoraWeights) -> None:
        data = self._raw.pop(key, None)
        if self._host is not None and data is not None and len(data) <= self._host.max_bytes:
            self._host.put(key, data)
        else:
            self._forget(key, None)

    def _forget(self, key: Key, _value: object) -> None:
        """``key`` left the last tier holding it: drop it from ``_versions`` (else that map grows per adapter)."""
        if key in self._device or (self._host is not None and key in self._host):
            return
        versions = self._versions.get(key[0])
        if versions is not None:
            versions.discard(key[1])
            if not versions:
                del self._versions[key[0]]

    def _record_ms(self, ms: float) -> None:
        self._load_ms.append(ms)
        if len(self._load_ms) > 4096:
            del self._load_ms[:2048]


def _pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, int(round(q / 100.0 * (len(sorted_values) - 1))))
    return sorted_values[i]
