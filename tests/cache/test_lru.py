from __future__ import annotations

import pytest
import torch

from smoa.adapter.weights import LoraWeights
from smoa.cache.lru import LRUCache
from smoa.cache.tiered import AdapterCache
from smoa.errors import CacheFullError


def _cache(max_items: int = 2, max_bytes: int = 100) -> tuple[LRUCache[str, bytes], list[str]]:
    evicted: list[str] = []
    return LRUCache(max_items, max_bytes, size_of=len, on_evict=lambda k, v: evicted.append(k)), evicted


def test_lru_order_step_by_step() -> None:
    c, evicted = _cache(max_items=2)
    c.put("a", b"1")
    c.put("b", b"2")
    assert c.get("a") == b"1"  # a is now most recent
    c.put("c", b"3")
    assert evicted == ["b"] and list(c.keys()) == ["a", "c"]
    s = c.stats()
    assert (s.hits, s.misses, s.evictions, s.items) == (1, 0, 1, 2)
    assert c.get("b") is None and c.stats().misses == 1


def test_byte_budget_and_pins() -> None:
    c, evicted = _cache(max_items=10, max_bytes=10)
    c.put("a", b"xxxx")
    c.put("b", b"xxxx")
    c.pin("a")
    c.put("c", b"xxxx")  # 12 bytes > 10: b goes (a is pinned)
    assert evicted == ["b"] and "a" in c and "c" in c
    c.pin("c")
    with pytest.raises(CacheFullError, match="pinned"):
        c.put("d", b"xxxx")
    assert "d" not in c and c.nbytes == 8  # the refused insert left nothing behind
    c.unpin("c")
    c.put("d", b"xxxx")
    assert evicted == ["b", "c"]


def test_delta_stats() -> None:
    c, _ = _cache()
    before = c.stats()
    c.get("x")
    c.put("x", b"1")
    c.get("x")
    d = c.stats().delta(before)
    assert (d.hits, d.misses) == (1, 1)


def _w(seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    return LoraWeights({"m": (torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g))}, 2.0, 2)


def test_tiered_cache_versions_and_offload() -> None:
    loads: list[str] = []
    store = {("a", 1): _w(1).to_bytes(), ("b", 1): _w(2).to_bytes(), ("a", 2): _w(3).to_bytes()}

    def get(cache: AdapterCache, aid: str, v: int) -> LoraWeights:
        def load() -> bytes:
            loads.append(f"{aid}@{v}")
            return store[(aid, v)]

        return cache.get(aid, v, load, LoraWeights.from_bytes)

    cache = AdapterCache(max_items=1, max_bytes=10**6, offload_bytes=10**6)
    w = get(cache, "a", 1)
    assert torch.equal(w["m"][0], _w(1)["m"][0])
    get(cache, "b", 1)  # evicts a@1 to the host tier
    get(cache, "a", 1)  # comes back from the host tier, no storage load
    assert loads == ["a@1", "b@1"]
    assert cache.statistics()["host_tier"]["hits"] == 1
    # a new version is a different entry: never served stale
    w2 = get(cache, "a", 2)
    assert torch.equal(w2["m"][0], _w(3)["m"][0]) and loads[-1] == "a@2"
    cache.invalidate("a")
    get(cache, "a", 2)
    assert loads[-1] == "a@2" and len(loads) == 4
