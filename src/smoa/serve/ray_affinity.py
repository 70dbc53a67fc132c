"""Adapter affinity for the Ray deployment: which adapters a request needs, and the multiplexing key naming them.

The ingress reads each request body once and decides its *placement*::

    body                                              placement                   affinity key
    {"model": "<adapter id>"}                          explicit (id,)              "id"
    {"adapters": [{"id": a}, {"id": b}]}               explicit (a, b)             "a|b" (sorted, distinct)
    {"parameters": {"adapter_id": a}}     (LoRAX)      explicit (a,)               "a"
    {"parameters": {"merged_adapters": {"ids": [..]}}} explicit (ids)              sorted ids
    {"model": "smoa"} / base name + "route": true      routed: text, metadata      the route's ids
    {"model": "<base model name>"}, other paths        none                        "" (any replica)

The key is Ray Serve's ``multiplexed_model_id``: Serve sends a request to a replica that already "loaded" that
key, so requests for the same adapters meet the weights already in that replica's cache. A placement is only a
hint: the replica validates and routes the request itself, so a stale or wrong key costs a cache miss, never a
wrong answer. Routed placements are resolved through a replica's ``POST /v1/route`` and cached here for
:data:`ROUTE_TTL_S` seconds.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ROUTED_MODEL = "smoa"
MAX_READABLE_KEY = 200
ROUTE_TTL_S = 5.0
INFERENCE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/generate", "/generate_stream"})


@dataclass(frozen=True)
class RouteQuery:
    """What the router needs to place a routed request: the text, its metadata and the strategy."""

    text: str
    metadata: Mapping[str, Any] | None = None
    strategy: str | None = None

    def cache_key(self) -> str:
        """A string identifying this query (metadata serialised with sorted keys)."""
        return json.dumps([self.text, self.metadata, self.strategy], sort_keys=True, default=str)


@dataclass(frozen=True)
class Placement:
    """Where a request should go: ``kind`` is ``"explicit"``, ``"routed"`` or ``"none"``."""

    kind: str
    adapter_ids: tuple[str, ...] = ()
    query: RouteQuery | None = None
    stream: bool = False


def affinity_key(adapter_ids: Sequence[str]) -> str:
    """The multiplexing key of a set of adapters: sorted distinct ids joined by ``|``, hashed when long; ``""`` for none."""
    ids = sorted({str(i) for i in adapter_ids if str(i)})
    if not ids:
        return ""
    joined = "|".join(ids)
    if len(joined) <= MAX_READABLE_KEY:
        return joined
    return "sha256:" + hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


def _prompt_text(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return None


def _chat_text(messages: Any) -> str | None:
    """The text the router sees for a chat: the last user message (the rest is context, not the task)."""
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, Mapping) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                parts = [str(p["text"]) for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
                return " ".join(parts) if parts else None
    return None


def _ids_of(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list):
        return ()
    out = []
    for item in items:
        value = item.get("id") if isinstance(item, Mapping) else item
        if isinstance(value, str) and value:
            out.append(value)
    return tuple(out)


def _openai_placement(path: str, body: Mapping[str, Any], base_names: frozenset[str]) -> Placement:
    stream = body.get("stream") is True
    explicit = _ids_of(body.get("adapters"))
    if explicit:
        return Placement("explicit", explicit, stream=stream)
    model = body.get("model")
    routed = model == ROUTED_MODEL or (model in base_names and body.get("route") is True)
    if routed:
        text = _chat_text(body.get("messages")) if path.endswith("chat/completions") else _prompt_text(body.get("prompt"))
        metadata = body.get("metadata") if isinstance(body.get("metadata"), Mapping) else None
        strategy = body.get("strategy") if isinstance(body.get("strategy"), str) else None
        if text is None:
            return Placement("none", stream=stream)
        return Placement("routed", query=RouteQuery(text, metadata, strategy), stream=stream)
    if isinstance(model, str) and model and model not in base_names:
        return Placement("explicit", (model,), stream=stream)
    return Placement("none", stream=stream)


def _lorax_placement(path: str, body: Mapping[str, Any]) -> Placement:
    stream = path == "/generate_stream"
    raw = body.get("parameters")
    params: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    merged = params.get("merged_adapters")
    if isinstance(merged, Mapping) and _ids_of(merged.get("ids")):
        return Placement("explicit", _ids_of(merged.get("ids")), stream=stream)
    adapter_id = params.get("adapter_id")
    if adapter_id == ROUTED_MODEL and isinstance(body.get("inputs"), str):
        return Placement("routed", query=RouteQuery(body["inputs"]), stream=stream)
    if isinstance(adapter_id, str) and adapter_id:
        return Placement("explicit", (adapter_id,), stream=stream)
    return Placement("none", stream=stream)


def placement_of(method: str, path: str, body: bytes, base_names: frozenset[str]) -> Placement:
    """Placement of one request from its method, path and raw body (unparseable bodies: ``"none"``)."""
    if method.upper() != "POST" or path not in INFERENCE_PATHS:
        return Placement("none")
    try:
        parsed = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, Mapping):
        return Placement("none", stream=path == "/generate_stream")
    if path.startswith("/v1/"):
        return _openai_placement(path, parsed, base_names)
    return _lorax_placement(path, parsed)


class TTLCache:
    """A bounded LRU of ``str -> value`` whose entries expire ``ttl_s`` seconds after they were stored."""

    def __init__(self, max_size: int = 10_000, ttl_s: float = ROUTE_TTL_S) -> None:
        self.max_size = max_size
        self.ttl_s = ttl_s
        self._data: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> Any | None:
        """The live value stored under ``key`` (and mark it recently used), else None."""
        item = self._data.get(key)
        if item is None or item[0] < time.monotonic():
            if item is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return item[1]

    def put(self, key: str, value: Any) -> None:
        """Store ``value`` under ``key``, evicting the least recently used entry past ``max_size``."""
        self._data[key] = (time.monotonic() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)
