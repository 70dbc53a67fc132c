"""A routing index sharded over Ray actors: each shard holds a slice of the keys, a query fans out to all of them.

Past one machine's RAM (~537 B per key as HNSW-SQ8, so ~1.9 M keys per GiB) the vector index is split by key::

    key k  ──▶  shard  k mod S            (S actors, each a smoa.routing.index.VectorIndex of ~N/S keys)

    search(q, k):   ┌─▶ shard 0 .search(q, k) ─┐
                    ├─▶ shard 1 .search(q, k) ─┤  in parallel (Ray actor calls), then
                    └─▶ shard S-1 ...         ─┘  merge_topk: the k best of the S·k candidates

Because every shard returns its own exact (flat) or approximate (HNSW) top-k, the merge of the S lists is the
global top-k whenever each shard's answer is exact; with HNSW shards the recall is that of one shard of N/S keys
(a smaller graph: at least as good as one graph over N). A query costs one round trip to the slowest shard, so
route p99 ~= the shard's search p99 + one Ray call (~1 ms on one node). Shards are plain Ray actors: place them with
``num_cpus`` / ``resources`` / ``scheduling_strategy`` options on as many nodes as the keys need (docs/scale.md).
"""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from smoa.errors import InvalidInputError
from smoa.routing.index.vector import Compactor, IndexParams, VectorIndex


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of several top-k lists.

    Args:
        parts: per shard ``(scores [m, k_i] float32, keys [m, k_i] int64)``, padded with ``-inf`` / ``-1``.
        k: how many to keep per query.

    Returns:
        ``(scores [m, k], keys [m, k])`` best first, padded with ``-inf`` / ``-1`` when fewer exist.
    """
    if not parts:
        raise InvalidInputError("`parts` must hold at least one shard's result, got none")
    scores = np.concatenate([p[0] for p in parts], axis=1)  # [m, sum k_i]
    keys = np.concatenate([p[1] for p in parts], axis=1)
    scores = np.where(keys >= 0, scores, -np.inf)
    width = scores.shape[1]
    if width < k:
        pad = k - width
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [m, k]
    return np.take_along_axis(scores, order, 1).astype(np.float32), np.take_along_axis(keys, order, 1)


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak RSS instead
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class IndexShard:
    """One shard: a :class:`VectorIndex` over the keys assigned to it (run as a Ray actor).

    An HNSW shard past a quarter of dead positions is compacted on a copy by a background thread of the actor
    (:class:`~smoa.routing.index.vector.Compactor`), as the router's index is: its searches go on meanwhile, where
    compacting in place held them for the whole rebuild."""

    def __init__(self, shard_id: int, dim: int, params: IndexParams | None = None, threads: int = 1) -> None:
        import faiss

        faiss.omp_set_num_threads(max(1, threads))
        self.shard_id = shard_id
        self.index = VectorIndex(dim, params)
        self._lock = threading.RLock()  # the actor's calls and its compaction thread
        self._compactor = Compactor(self, "_lock", "index", "_adopt")

    def _adopt(self, fresh: VectorIndex) -> None:
        self.index = fresh

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Replace the shard's content with ``keys`` -> ``vectors``; returns the live key count."""
        fresh = VectorIndex.build(self.index.dim, keys, vectors, self.index.params)
        with self._lock:
            self.index = fresh
            return len(self.index)

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> int:
        """Add (or replace) keys; returns the live key count."""
        with self._lock:
            self.index.add(np.asarray(keys, dtype=np.int64), vectors)
            self._compactor.when_due()  # (replaced keys leave dead positions)
            return len(self.index)

    def remove(self, keys: np.ndarray) -> int:
        """Remove keys (absent ones are ignored); returns how many were removed."""
        with self._lock:
            removed = int(self.index.remove(np.asarray(keys, dtype=np.int64), compact=False))
            self._compactor.when_due()
            return removed

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """This shard's top-``k``: ``(scores [m, k], keys [m, k])``."""
        with self._lock:
            return self.index.search(queries, k)

    def stats(self) -> dict[str, Any]:
        """Live keys, dead positions (until the next compaction), index kind, index bytes and the actor process's
        resident memory."""
        with self._lock:
            return {"shard": self.shard_id, "keys": len(self.index), "dead": self.index.dead, "kind": self.index.kind,
                    "index_bytes": self.index.memory_bytes(), "rss_bytes": _rss_bytes()}  # fmt: skip


class ShardedIndex:
    """A routing index over ``num_shards`` :class:`IndexShard` Ray actors; keys go to shard ``key mod num_shards``.

    Args:
        dim: vector dimension.
        num_shards: number of shard actors.
        params: index knobs of every shard.
        actor_options: Ray options of each shard actor (``num_cpus``, ``memory``, ``resources``, ...).
        threads: faiss threads per shard.
    """

    def __init__(
        self,
        dim: int,
        num_shards: int,
        params: IndexParams | None = None,
        actor_options: dict[str, Any] | None = None,
        threads: int = 1,
    ) -> None:
        import ray

        if not isinstance(num_shards, int) or num_shards < 1:
            raise InvalidInputError(f"`num_shards` must be an int >= 1, got {num_shards!r}")
        self.dim = dim
        self.num_shards = num_shards
        remote = ray.remote(IndexShard).options(**{"num_cpus": 0, **(actor_options or {})})
        self.shards: list[Any] = [remote.remote(i, dim, params, threads) for i in range(num_shards)]

    def _split(self, keys: np.ndarray) -> list[np.ndarray]:
        owner = np.asarray(keys, dtype=np.int64) % self.num_shards
        return [np.flatnonzero(owner == s) for s in range(self.num_shards)]

    def build(self, keys: np.ndarray, vectors: np.ndarray) -> list[int]:
        """Bulk-load: every shard rebuilt from its slice (in parallel); returns the keys per shard."""
        import ray

        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        parts = self._split(keys)
        return ray.get([s.build.remote(keys[p], vectors[p]) for s, p in zip(self.shards, parts)])

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add (or replace) keys on their shards."""
        import ray

        keys = np.asarray(keys, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        refs = [s.add.remote(keys[p], vectors[p]) for s, p in zip(self.shards, self._split(keys)) if len(p)]
        ray.get(refs)

    def remove(self, keys: np.ndarray) -> int:
        """Remove keys from their shards; returns how many were removed."""
        import ray

        keys = np.asarray(keys, dtype=np.int64)
        refs = [s.remove.remote(keys[p]) for s, p in zip(self.shards, self._split(keys)) if len(p)]
        return int(sum(ray.get(refs)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global top-``k``: every shard searched in parallel, their lists merged (:func:`merge_topk`)."""
        import ray

        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise InvalidInputError(f"`queries` must have shape [m, {self.dim}], got {tuple(q.shape)}")
        ref = ray.put(q) if q.nbytes > 64 * 1024 else q
        return merge_topk(ray.get([s.search.remote(ref, k) for s in self.shards]), k)

    def stats(self) -> list[dict[str, Any]]:
        """Each shard's :meth:`IndexShard.stats`."""
        import ray

        return ray.get([s.stats.remote() for s in self.shards])

    def close(self) -> None:
        """Stop the shard actors."""
        import ray

        for s in self.shards:
            ray.kill(s)
        self.shards = []
