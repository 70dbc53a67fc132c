"""Coarse groups for HIERARCHICAL routing, maintained incrementally as adapters come and go.

An adapter joins the group named by its first domain tag (lower-cased: ``"medical"``). An adapter without a
domain tag joins the nearest *cluster* among the untagged ones (online leader clustering: the nearest cluster
centroid if its cosine is at least ``CLUSTER_RADIUS``, else it founds a new cluster ``"~c<n>"``). Each group keeps
the running sum of its members' keys, so its centroid is always current::

    centroid(g) = normalise(sum_{a in g} key(a))

Routing is then coarse to fine: score the groups by ``cos(q, centroid(g))``, keep the best ``n_groups``, and
search the adapters inside them only. SEMANTIC and HYBRID also use the groups: the members of *small* groups
near the query are scored exactly beside the approximate search (see :mod:`smoa.routing.router`).
"""

from __future__ import annotations

import numpy as np

CLUSTER_RADIUS = 0.5


class GroupIndex:
    """Group name -> member keys and running key sum."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._members: dict[str, set[int]] = {}
        self._sums: dict[str, np.ndarray] = {}
        self._group_of: dict[int, str] = {}
        self._next_cluster = 0
        self._centroid_cache: tuple[list[str], np.ndarray] | None = None
        self._sizes = np.zeros(0, np.int64)  # members per group, in centroids()' order
        self._member_cache: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._members)

    def add(self, key: int, vector: np.ndarray, domain_tags: list[str] | tuple[str, ...]) -> str:
        """Place adapter ``key`` (``vector`` ``[dim]``) in its group; returns the group name."""
        key = int(key)
        if key in self._group_of:
            self.remove(key, vector)
        name = domain_tags[0].strip().lower() if domain_tags else self._nearest_cluster(vector)
        self._members.setdefault(name, set()).add(key)
        self._sums[name] = self._sums.get(name, np.zeros(self.dim, np.float64)) + vector
        self._group_of[key] = name
        self._invalidate(name)
        return name

    def add_many(self, keys: np.ndarray, vectors: np.ndarray, domain_tags: list[list[str]]) -> None:
        """Bulk :meth:`add` (``keys [n]``, ``vectors [n, dim]``); tagged rows are summed per group in one pass."""
        tagged = [i for i, d in enumerate(domain_tags) if d]
        tagged_set = set(tagged)
        for i in range(len(keys)):
            if i not in tagged_set or int(keys[i]) in self._group_of:
                self.add(int(keys[i]), vectors[i], domain_tags[i])
                tagged_set.discard(i)
        rows = [i for i in tagged if i in tagged_set]
        if not rows:
            return
        names = [domain_tags[i][0].strip().lower() for i in rows]
        uniq = sorted(set(names))
        col = {n: j for j, n in enumerate(uniq)}
        idx = np.fromiter((col[n] for n in names), dtype=np.int64, count=len(names))
        sums = np.zeros((len(uniq), self.dim), np.float64)
        np.add.at(sums, idx, vectors[rows])
        for j, name in enumerate(uniq):
            self._sums[name] = self._sums.get(name, np.zeros(self.dim, np.float64)) + sums[j]
            self._invalidate(name)
        for i, name in zip(rows, names):
            self._members.setdefault(name, set()).add(int(keys[i]))
            self._group_of[int(keys[i])] = name

    def remove(self, key: int, vector: np.ndarray | None = None) -> None:
        """Take ``key`` out of its group; ``vector`` (its key) keeps the group's running sum exact."""
        name = self._group_of.pop(int(key), None)
        if name is None:
            return
        members = self._members[name]
        members.discard(int(key))
        if not members:
            del self._members[name], self._sums[name]
        elif vector is not None:
            self._sums[name] = self._sums[name] - vector
        self._invalidate(name)

    def group_of(self, key: int) -> str | None:
        return self._group_of.get(int(key))

    def members(self, name: str) -> np.ndarray:
        """int64 keys of group ``name``."""
        if name not in self._member_cache:
            self._member_cache[name] = np.fromiter(self._members.get(name, ()), dtype=np.int64)
        return self._member_cache[name]

    def _invalidate(self, name: str) -> None:
        self._centroid_cache = None
        self._member_cache.pop(name, None)

    def centroids(self) -> tuple[list[str], np.ndarray]:
        """``(names [G], unit centroids float32 [G, dim])``, names sorted."""
        if self._centroid_cache is None:
            names = sorted(self._members)
            sums = np.stack([self._sums[n] for n in names]) if names else np.zeros((0, self.dim))
            norms = np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
            self._centroid_cache = (names, (sums / norms).astype(np.float32))
            self._sizes = np.fromiter((len(self._members[n]) for n in names), np.int64, len(names))
        return self._centroid_cache

    def _nearest_cluster(self, vector: np.ndarray) -> str:
        names, cents = self.centroids()
        clusters = [i for i, n in enumerate(names) if n.startswith("~c")]
        if clusters:
            sims = cents[clusters] @ vector.astype(np.float32)
            best = int(np.argmax(sims))
            if sims[best] >= CLUSTER_RADIUS:
                return names[clusters[best]]
        name = f"~c{self._next_cluster}"
        self._next_cluster += 1
        return name

    def top_groups(self, query: np.ndarray, n_groups: int, max_size: int | None = None) -> list[tuple[str, float]]:
        """The ``n_groups`` groups whose centroid is nearest to ``query`` ``[dim]``, best first (ties by name).

        ``max_size``: consider only the groups with at most this many members.
        """
        names, cents = self.centroids()
        if not names:
            return []
        sims = cents @ query.astype(np.float32)  # [G]
        if max_size is not None:
            sims = np.where(self._sizes <= max_size, sims, -np.inf)
        order = np.argsort(-sims, kind="stable")[:n_groups]  # names are sorted: stable sort breaks ties by name
        return [(names[i], float(sims[i])) for i in order if np.isfinite(sims[i])]

    def size(self, name: str) -> int:
        """Members of group ``name`` (0 if unknown)."""
        return len(self._members.get(name, ()))
