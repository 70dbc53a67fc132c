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

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smoa.routing.index.keymap import MISSING, KeyMap, narrow, sorted_delete, sorted_insert

CLUSTER_RADIUS = 0.5


ROW_SUM_BLOCK = 8_192  # row_sums: rows gathered and summed per step


def row_sums(x: np.ndarray, idx: np.ndarray, n: int, unit: bool = False) -> np.ndarray:
    """float64 ``[n, dim]``: row ``j`` = sum of the rows ``x[i]`` with ``idx[i] == j`` (in row order; a few times
    faster than ``np.add.at``); ``unit``: each row scaled to unit norm first. The rows are gathered
    :data:`ROW_SUM_BLOCK` at a time: gathered at once, 50K rows of 384 float32 made an 80 MB copy, and its page
    faults doubled the time (a bulk removal's hold, ``Router._ungroup``)."""
    out = np.zeros((n, x.shape[1]), np.float64)
    if not len(idx):
        return out
    x = np.asarray(x)
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    for s in range(0, len(order), ROW_SUM_BLOCK):
        part = sidx[s : s + ROW_SUM_BLOCK]
        rows = x[order[s : s + ROW_SUM_BLOCK]]
        if unit:
            rows *= (1.0 / np.maximum(np.sqrt(np.einsum("ij,ij->i", rows, rows)), 1e-12))[:, None]
        starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
        out[part[starts]] += np.add.reduceat(rows, starts, axis=0, dtype=np.float64)
    return out


def _tagged_sums(vectors: np.ndarray, rows: np.ndarray, domain_tags: Sequence[Sequence[str]]
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:  # fmt: skip
    """The group names of ``rows`` (tagged: by their first domain tag), each row's index into them, and the rows'
    ``vectors`` summed per name (float64)."""
    names = [domain_tags[i][0].strip().lower() for i in rows.tolist()]
    uniq = sorted(set(names))
    col = {n: j for j, n in enumerate(uniq)}
    idx = np.fromiter((col[n] for n in names), dtype=np.int64, count=len(names))
    return uniq, idx, row_sums(vectors if len(rows) == len(vectors) else vectors[rows], idx, len(uniq))


@dataclass(frozen=True)
class GroupPlan:
    """:meth:`GroupIndex.plan_add`: the planned rows' ``keys`` and which are ``tagged``; the group ``names`` of the
    tagged rows, each tagged row's index ``idx`` into them, and their ``sums`` float64 ``[len(names), dim]``."""

    keys: np.ndarray
    tagged: np.ndarray
    names: list[str]
    idx: np.ndarray
    sums: np.ndarray


class GroupIndex:
    """Group name -> member keys and running key sum, in arrays::

        group_of   KeyMap: adapter key -> group id           8 B / adapter
        members    per group: sorted int32 keys               4 B / adapter (int64 once a key does not fit)
        sums       float64 [groups, dim] running key sums     (group ids are reused once a group empties)
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._gid: dict[str, int] = {}
        self._names: list[str | None] = []
        self._members: list[np.ndarray] = []
        self._sums = np.zeros((0, dim), np.float64)
        self._free: list[int] = []
        self._group_of = KeyMap()
        self._next_cluster = 0
        self._centroid_cache: tuple[list[str], np.ndarray] | None = None
        self._sizes = np.zeros(0, np.int64)  # members per group, in centroids()' order
        self.version = 0  # bumped by every membership change (callers key caches of member vectors on it)

    def __len__(self) -> int:
        return len(self._gid)

    def _group(self, name: str) -> int:
        """Id of group ``name``, created empty if new."""
        g = self._gid.get(name)
        if g is None:
            if self._free:
                g = self._free.pop()
                self._names[g], self._members[g] = name, _NO_KEYS
                self._sums[g] = 0.0
            else:
                g = len(self._names)
                self._names.append(name)
                self._members.append(_NO_KEYS)
                if g >= len(self._sums):
                    grown = np.zeros((max(8, 2 * len(self._sums)), self.dim), np.float64)
                    grown[: len(self._sums)] = self._sums
                    self._sums = grown
            self._gid[name] = g
        return g

    def add(self, key: int, vector: np.ndarray, domain_tags: Sequence[str]) -> str:
        """Place adapter ``key`` (``vector`` ``[dim]``) in its group; returns the group name."""
        key = int(key)
        if key in self._group_of:
            self.remove(key, vector)
        name = domain_tags[0].strip().lower() if domain_tags else self._nearest_cluster(vector)
        g = self._group(name)
        self._members[g] = sorted_insert(self._members[g], np.array([key], np.int64))
        self._sums[g] += vector
        self._group_of.set(key, g)
        self._centroid_cache = None
        self.version += 1
        return name

    def plan_add(self, keys: np.ndarray, vectors: np.ndarray, domain_tags: Sequence[Sequence[str]]) -> GroupPlan:
        """:meth:`add_many`'s sums of the tagged rows per group, worked out ahead, off the owner's lock (reads nothing
        of the index)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        tagged = np.fromiter((bool(d) for d in domain_tags), bool, len(keys))
        return GroupPlan(keys, tagged, *_tagged_sums(vectors, np.flatnonzero(tagged), domain_tags))

    def add_many(self, keys: np.ndarray, vectors: np.ndarray, domain_tags: Sequence[Sequence[str]],
                 plan: GroupPlan | None = None) -> None:  # fmt: skip
        """Bulk :meth:`add` (``keys [n]``, ``vectors [n, dim]``); new tagged rows are summed per group in one pass,
        or were by ``plan`` (:meth:`plan_add` of the same rows), used when none of them is here already."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        if not len(keys):
            return
        if plan is not None and not np.array_equal(plan.keys, keys):
            plan = None  # planned for other rows
        present = self._group_of.get_many(keys) != MISSING
        if len(np.unique(keys)) != len(keys):
            present[:] = True  # a repeated key: row by row, the last one wins
        tagged = np.fromiter((bool(d) for d in domain_tags), bool, len(keys)) if plan is None else plan.tagged
        for i in np.flatnonzero(present | ~tagged).tolist():
            self.add(int(keys[i]), vectors[i], domain_tags[i])
        rows = np.flatnonzero(~present & tagged)
        if not len(rows):
            return
        if plan is not None and len(rows) == len(plan.idx):  # none of the tagged rows was here: as planned
            uniq, idx, sums = plan.names, plan.idx, plan.sums
        else:
            uniq, idx, sums = _tagged_sums(vectors, rows, domain_tags)
        gids = np.array([self._group(n) for n in uniq], np.int64)
        self._sums[gids] += sums
        order = np.argsort(idx, kind="stable")
        bounds = np.searchsorted(idx[order], np.arange(len(uniq) + 1))
        new_keys = keys[rows]
        for j, g in enumerate(gids.tolist()):
            part = np.sort(new_keys[order[bounds[j] : bounds[j + 1]]])
            self._members[g] = sorted_insert(self._members[g], part)
        self._group_of.set_new(new_keys, gids[idx].astype(np.int32))
        self._centroid_cache = None
        self.version += 1

    def remove(self, key: int, vector: np.ndarray | None = None) -> None:
        """Take ``key`` out of its group; ``vector`` (its key) keeps the group's running sum exact."""
        g = self._group_of.pop(int(key))
        if g == MISSING:
            return
        self._take_out(g, np.array([int(key)], np.int64), vector)
        self._centroid_cache = None
        self.version += 1

    def _take_out(self, g: int, keys: np.ndarray, key_sum: np.ndarray | None) -> None:
        """Delete ``keys`` from group ``g``'s members and ``key_sum`` (their keys' sum) from its running sum; an
        emptied group is freed (its id reused)."""
        members = sorted_delete(self._members[g], keys)
        if not len(members):
            del self._gid[self._names[g]]  # type: ignore[arg-type]
            self._names[g], self._members[g] = None, _NO_KEYS
            self._sums[g] = 0.0
            self._free.append(g)
        else:
            self._members[g] = members
            if key_sum is not None:
                self._sums[g] -= key_sum

    def remove_many(self, keys: np.ndarray, vectors: np.ndarray, unit: bool = False) -> None:
        """Bulk :meth:`remove` of distinct ``keys`` ``[n]`` with their keys ``vectors`` ``[n, dim]`` (``unit``: to be
        scaled to unit norm first, a block at a time): one pass per group (a swap's install takes hundreds of
        adapters out of groups of ~100K members)."""
        keys = np.asarray(keys, np.int64).reshape(-1)
        gids = self._group_of.get_many(keys)
        ok = gids != MISSING
        if not ok.any():
            return
        if not ok.all():
            keys, vectors = keys[ok], np.asarray(vectors)[ok]
        gids = gids[ok].astype(np.int64)
        self._group_of.pop_many(keys)
        uniq, idx = np.unique(gids, return_inverse=True)
        sums = row_sums(vectors, idx, len(uniq), unit)
        for j, g in enumerate(uniq.tolist()):
            self._take_out(g, keys[idx == j], sums[j])
        self._centroid_cache = None
        self.version += 1

    def group_of(self, key: int) -> str | None:
        g = self._group_of.get(int(key))
        return None if g == MISSING else self._names[g]

    def members(self, name: str) -> np.ndarray:
        """Keys of group ``name``, sorted, int32 (int64 once a key does not fit); a shared array: do not modify."""
        g = self._gid.get(name)
        return _NO_KEYS if g is None else self._members[g]

    def centroids(self) -> tuple[list[str], np.ndarray]:
        """``(names [G], unit centroids float32 [G, dim])``, names sorted."""
        if self._centroid_cache is None:
            names = sorted(self._gid)
            gids = np.array([self._gid[n] for n in names], np.int64)
            sums = self._sums[gids] if names else np.zeros((0, self.dim))
            norms = np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
            self._centroid_cache = (names, (sums / norms).astype(np.float32))
            self._sizes = np.fromiter((len(self._members[g]) for g in gids.tolist()), np.int64, len(names))
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

    def top_groups(
        self, query: np.ndarray, n_groups: int, max_size: int | None = None, max_members: int | None = None
    ) -> list[tuple[str, float]]:
        """The ``n_groups`` groups whose centroid is nearest to ``query`` ``[dim]``, best first (ties by name).

        ``max_size``: consider only the groups with at most this many members. ``max_members``: past the first
        ``n_groups``, keep taking the next nearest groups while the members of all those taken stay within it.
        """
        names, cents = self.centroids()
        if not names:
            return []
        sims = cents @ query.astype(np.float32)  # [G]
        if max_size is not None:
            sims = np.where(self._sizes <= max_size, sims, -np.inf)
        order = np.argsort(-sims, kind="stable")  # names are sorted: stable sort breaks ties by name
        order = order[np.isfinite(sims[order])]
        take = n_groups
        if max_members is not None and len(order) > n_groups:
            take = max(n_groups, int(np.searchsorted(np.cumsum(self._sizes[order]), max_members, side="right")))
        return [(names[i], float(sims[i])) for i in order[:take]]

    def size(self, name: str) -> int:
        """Members of group ``name`` (0 if unknown)."""
        return len(self.members(name))

    # ------------------------------------------------------------------ accounting and persistence
    def memory_bytes(self) -> int:
        """Bytes held: member arrays, the key map, the sums, ~200 B per group of headers."""
        return int(sum(m.nbytes for m in self._members) + self._group_of.nbytes() + self._sums.nbytes
                   + 200 * len(self._names))  # fmt: skip

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (``np.savez``-able without pickle): names (JSON), sums, members in CSR form."""
        names = sorted(self._gid)
        gids = [self._gid[n] for n in names]
        members = [self._members[g] for g in gids]
        offsets = np.concatenate([[0], np.cumsum([len(m) for m in members])]).astype(np.int64)
        return {
            "group_names": np.array(json.dumps({"names": names, "next_cluster": self._next_cluster})),
            "group_sums": self._sums[gids] if gids else np.zeros((0, self.dim)),
            "group_members": np.concatenate([m.astype(np.int64) for m in members]) if members else _NO_KEYS,
            "group_offsets": offsets,
        }

    @classmethod
    def from_arrays(cls, dim: int, data: Mapping[str, np.ndarray]) -> GroupIndex:
        """Inverse of :meth:`to_arrays` (raises ``ValueError``/``KeyError`` on inconsistent data)."""
        head = json.loads(str(data["group_names"]))
        names, sums = head["names"], np.asarray(data["group_sums"], np.float64)
        members, offsets = np.asarray(data["group_members"], np.int64), np.asarray(data["group_offsets"], np.int64)
        if sums.shape != (len(names), dim) or len(offsets) != len(names) + 1 or offsets[-1] != len(members):
            raise ValueError("group arrays disagree")
        out = cls(dim)
        out._next_cluster = int(head["next_cluster"])
        out._names = list(names)
        out._gid = {n: g for g, n in enumerate(names)}
        small = narrow(members)
        out._members = [small[offsets[g] : offsets[g + 1]] for g in range(len(names))]
        out._sums = sums.copy()
        gids = np.repeat(np.arange(len(names), dtype=np.int32), np.diff(offsets))
        if len(np.unique(members)) != len(members):
            raise ValueError("a key is in two groups")
        out._group_of.set_new(members, gids)
        return out


_NO_KEYS = np.zeros(0, np.int32)
