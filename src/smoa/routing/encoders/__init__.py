"""Text encoders for routing: one small Protocol, backends registered by name, imported lazily.

=============== ============================================================ ===== =====================
name            what                                                          dim   one query (this CPU)
=============== ============================================================ ===== =====================
``minilm``      all-MiniLM-L6-v2 through sentence-transformers (fp32, torch)  384   ~7 ms
``minilm-int8`` the same model as int8 ONNX (onnxruntime + tokenizers)        384   ~3 ms
``static``      model2vec-style static embeddings distilled from MiniLM       384   ~0.03 ms
``hash``        signed feature hashing of words (tests only, never default)   384   ~0.02 ms
=============== ============================================================ ===== =====================

``get_encoder("default")`` returns :data:`DEFAULT_ENCODER` (chosen from ``docs/bench_routing.md``).
Every encoder returns float32 ``[n, dim]`` rows of unit L2 norm (an empty text encodes to the zero vector's
normalised stand-in: the encoder's embedding of ``""``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from smoa.errors import ConfigError

DEFAULT_ENCODER = "minilm-int8"


@runtime_checkable
class Encoder(Protocol):
    """What the router needs from a text encoder.

    Optional: ``cpu_bound = True`` says the encoder computes on the calling thread alone, so the latency budget's
    cost model may time it on that thread's CPU clock (:meth:`smoa.routing.costs.EncoderCost.probe`); without it
    (a GPU, a remote service, several threads) it is timed on the wall clock.
    """

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode texts.

        Args:
            texts: n strings.

        Returns:
            float32 ``[n, dim]``, each row of unit L2 norm.
        """
        ...


_REGISTRY: dict[str, Callable[[], Encoder]] = {}
_INSTANCES: dict[str, Encoder] = {}
_LOCK = threading.Lock()


def register_encoder(name: str, factory: Callable[[], Encoder]) -> None:
    """Register ``factory`` under ``name`` (a later registration replaces an earlier one)."""
    _REGISTRY[name] = factory
    _INSTANCES.pop(name, None)


def available_encoders() -> list[str]:
    """Names accepted by :func:`get_encoder` (besides ``"default"``)."""
    return sorted(_REGISTRY)


def get_encoder(name: str = "default") -> Encoder:
    """Return the shared instance of encoder ``name`` (``"default"`` = :data:`DEFAULT_ENCODER`).

    Raises:
        ConfigError: unknown name.
    """
    key = DEFAULT_ENCODER if name == "default" else name
    if key not in _REGISTRY:
        raise ConfigError(f"`encoder` must be one of {['default', *available_encoders()]}, got {name!r}")
    with _LOCK:
        if key not in _INSTANCES:
            _INSTANCES[key] = _REGISTRY[key]()
        return _INSTANCES[key]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` ``[n, d]`` scaled to unit norm, as float32 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class CachedEncoder:
    """An LRU cache of single-text embeddings in front of an :class:`Encoder`.

    ``encode`` looks every text up, encodes the misses in one batch and stores them; ``encode_batch`` (bulk
    ingestion) bypasses the cache and encodes in chunks of ``batch_size``.
    """

    def __init__(self, encoder: Encoder, max_size: int = 10_000, batch_size: int = 256) -> None:
        self.inner = encoder
        self.name = encoder.name
        self.dim = encoder.dim
        self.max_size = max_size
        self.batch_size = batch_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def cancellable(self) -> bool:
        """Whether ``encode`` takes onnxruntime ``RunOptions`` (:mod:`smoa.routing.deadline`)."""
        return bool(getattr(self.inner, "cancellable", False))

    def encode(self, texts: list[str], run_options: Any = None) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, dim]``, serving repeated texts from the cache. ``run_options``
        (a :attr:`cancellable` encoder only) goes to the encoder's runs; a stopped run caches nothing."""
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for i, text in enumerate(texts):
                vec = self._cache.get(text)
                if vec is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = vec
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        if missing:
            todo = [texts[i] for i in missing]
            fresh = self.inner.encode(todo) if run_options is None else self.inner.encode(todo, run_options)
            out[missing] = fresh
            if self.max_size > 0:
                with self._lock:
                    for i, vec in zip(missing, fresh):
                        self._cache[texts[i]] = vec
                        self._cache.move_to_end(texts[i])
                    while len(self._cache) > self.max_size:
                        self._cache.popitem(last=False)
        return out

    def peek(self, text: str) -> np.ndarray | None:
        """The cached embedding of ``text`` (counted as a hit), or ``None`` without encoding anything."""
        with self._lock:
            vec = self._cache.get(text)
            if vec is not None:
                self._cache.move_to_end(text)
                self.hits += 1
            return vec

    def prime(self, texts: Sequence[str], vectors: np.ndarray) -> None:
        """Store precomputed embeddings ``vectors`` ``[n, dim]`` of ``texts`` (e.g. from a bulk encode)."""
        with self._lock:
            for text, vec in zip(texts, np.asarray(vectors, np.float32)):
                self._cache[text] = vec
                self._cache.move_to_end(text)
            while len(self._cache) > self.max_size:
                self._cache.popitem(last=False)

    def encode_batch(self, texts: Sequence[str]) -> np.ndarray:
        """Encode many texts in chunks -> float32 ``[n, dim]``; texts already cached are served from the cache,
        the others are encoded without being cached (bulk ingestion must not evict the queries' embeddings)."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for i, text in enumerate(texts):
                vec = self._cache.get(text) if self._cache else None
                if vec is None:
                    missing.append(i)
                else:
                    out[i] = vec
        for start in range(0, len(missing), self.batch_size):
            rows = missing[start : start + self.batch_size]
            out[rows] = self.inner.encode([texts[i] for i in rows])
        return out

    def stats(self) -> dict[str, int]:
        """Cache size, hits and misses so far."""
        return {"size": len(self._cache), "hits": self.hits, "misses": self.misses}


def _minilm() -> Encoder:
    from smoa.routing.encoders.minilm import MiniLMEncoder

    return MiniLMEncoder()


def _minilm_int8() -> Encoder:
    from smoa.routing.encoders.onnx_int8 import OnnxInt8Encoder

    return OnnxInt8Encoder()


def _static() -> Encoder:
    from smoa.routing.encoders.static import StaticEncoder

    return StaticEncoder()


def _hash() -> Encoder:
    from smoa.routing.encoders.hashing import HashEncoder

    return HashEncoder()


register_encoder("minilm", _minilm)
register_encoder("minilm-int8", _minilm_int8)
register_encoder("static", _static)
register_encoder("hash", _hash)

__all__ = [
    "DEFAULT_ENCODER",
    "CachedEncoder",
    "Encoder",
    "available_encoders",
    "get_encoder",
    "l2_normalize",
    "register_encoder",
]
