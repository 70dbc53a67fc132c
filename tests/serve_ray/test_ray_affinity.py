"""Placement of requests (no Ray needed): which adapters a body names, and the multiplexing key."""

from __future__ import annotations

import json

import pytest

from smoa.serve.ray_affinity import TTLCache, affinity_key, placement_of

BASE = frozenset({"tiny-llama"})


def _place(path: str, body: dict, method: str = "POST"):
    return placement_of(method, path, json.dumps(body).encode(), BASE)


def test_affinity_key_is_order_free_and_bounded() -> None:
    assert affinity_key(["b", "a", "b"]) == affinity_key(["a", "b"]) == "a|b"
    assert affinity_key([]) == ""
    long_ids = [f"adapter-{i:04d}" * 4 for i in range(20)]
    key = affinity_key(long_ids)
    assert key.startswith("sha256:") and key == affinity_key(list(reversed(long_ids)))


@pytest.mark.parametrize(
    ("path", "body", "kind", "ids"),
    [
        ("/v1/completions", {"model": "a1", "prompt": "x"}, "explicit", ("a1",)),
        ("/v1/completions", {"model": "smoa", "adapters": [{"id": "b", "weight": 1}, {"id": "a"}]}, "explicit", ("b", "a")),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "x"}, "none", ()),
        ("/v1/completions", {"model": "smoa", "prompt": "x"}, "routed", ()),
        ("/v1/completions", {"model": "tiny-llama", "route": True, "prompt": "x"}, "routed", ()),
        ("/v1/chat/completions", {"model": "smoa", "messages": [{"role": "user", "content": "hi"}]}, "routed", ()),
        ("/generate", {"inputs": "x", "parameters": {"adapter_id": "a1"}}, "explicit", ("a1",)),
        ("/generate", {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["a", "b"], "weights": [1, 1]}}},
         "explicit", ("a", "b")),
        ("/generate", {"inputs": "x"}, "none", ()),
        ("/v1/adapters", {"x": 1}, "none", ()),
    ],
)
def test_placement_of_each_request_form(path: str, body: dict, kind: str, ids: tuple) -> None:
    placement = _place(path, body)
    assert placement.kind == kind and placement.adapter_ids == ids


def test_routed_placement_carries_text_metadata_and_stream() -> None:
    p = _place("/v1/completions", {"model": "smoa", "prompt": ["q1", "q2"], "metadata": {"domain": "med"},
                                   "strategy": "hybrid", "stream": True})
    assert p.query is not None and (p.query.text, p.query.metadata, p.query.strategy) == ("q1", {"domain": "med"}, "hybrid")
    assert p.stream
    assert _place("/generate_stream", {"inputs": "x"}).stream
    assert placement_of("POST", "/v1/completions", b"{not json", BASE).kind == "none"


def test_ttl_cache_expires_and_evicts() -> None:
    cache = TTLCache(max_size=2, ttl_s=60)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)  # evicts b (a was used more recently)
    assert cache.get("b") is None and cache.get("c") == 3 and len(cache) == 2
    stale = TTLCache(ttl_s=0)
    stale.put("a", 1)
    assert stale.get("a") is None and (stale.hits, stale.misses) == (0, 1)
