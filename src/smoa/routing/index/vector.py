"""The vector index of routing keys: exact inner product when small, HNSW over 8-bit codes when large.

Keys are unit-norm float32 ``[d]`` rows, scores are inner products (= cosine). Ids are the catalog's int64 row
keys. Layout (both kinds)::

    faiss index  position p -> vector            (IndexFlatIP, or IndexHNSWSQ QT_8bit_direct, integer L2)
    codec        (lo, scale): code = round((x - lo) * scale) in 0..255, the same for every dimension (HNSW)
    ids[p]       position p -> catalog key       int32 while every id fits (4 B/adapter), else int64
    alive[p]     position p not removed          bool,  1 B/adapter

The HNSW graph is walked in the integer domain. Keys and the query are coded with one affine map for every
dimension (:class:`ByteCodec`, its range learned from the keys the graph is built on), so the squared L2 distance
between two codes is ``scale**2`` times the one between the vectors, up to rounding, and for unit vectors L2
order is inner-product order. faiss then compares the 384 bytes of a key with the query's 384 bytes in integer
arithmetic, where per-dimension 8-bit codes (``QT_8bit``) had every byte decoded to a float first. On 1M real
keys (``bench_routing.py --sizes 1000,1000000``) the router's walk at efSearch 192 went from 0.64 / 1.09 ms
(p50 / p99, recall@5 0.962) to 0.49 / 0.77 ms (0.958), and the build from 346 to 225 s; raw faiss on one graph of
each kind (a scratch harness): 0.59 / 1.04 -> 0.39 / 0.64 ms (``docs/bench_routing.md``). The returned candidates are
re-scored against the float query on their decoded codes, so scores stay inner products of the float query with
the stored keys, as before (only the rounding of the keys changed). An index saved with per-dimension codes (no
``codec.npy``) is still read and searched as it was; it moves to byte codes at its next rebuild (compaction).

Positions are in insertion order, except that a build or compaction of :data:`LAYOUT_MIN_KEYS` keys or more lays
them out by locality first (:func:`_locality_order`: near keys at near positions, so a walk's last, local steps
read fewer scattered pages; the graph is the same). Keys added later are appended; once they make over a quarter
of the index (:meth:`VectorIndex.layout_due`), the router lays a copy out at its next refit
(:meth:`VectorIndex.laid_out`, ``Router.lay_out_index``).

A removal only clears ``alive[p]`` (HNSW cannot delete); searches skip dead positions through a faiss
``IDSelectorBitmap``, and the index is compacted (rebuilt from its own stored vectors) once a quarter of its
positions are dead: in place, or by its owner on a copy beside the searches (:class:`Compactor`). Keys can also be inserted dead on purpose (:meth:`VectorIndex.stage`) and made live later in
one step (:meth:`VectorIndex.reveal`): the slow graph insert outside the one lock hold that must flip them. Re-adding an existing key replaces it. Below ``exact_threshold`` live vectors the index is
flat (exact search); when it grows past it, it is rebuilt as HNSW-SQ8. HNSW-SQ8 costs 384 B of codes + ~150 B
of graph links and bookkeeping per vector (~533 B in all, ids as int32); flat costs 1,541 B.

Why HNSW-SQ8 (``benchmarks/bench_routing.py``, ``docs/bench_routing.md``, real MiniLM embeddings, 100K keys, one
thread): IVF-SQ8 (2,048 k-means lists) needs 64 probes for recall@5 0.952 (p99 0.21 ms) where HNSW-SQ8 gives
0.972 at efSearch 64 (p99 0.20 ms); efConstruction 128 rather than 40 buys 3-4 points of recall at equal
efSearch. Real sentence embeddings need ~200 of 384 principal directions for 90 % of their variance, so coarse
partitions cut many true neighbours apart. A bigger graph needs a wider beam for the same recall, hence
:func:`auto_ef_search` (192 at 1M keys: recall@5 0.954 as first measured, 0.954-0.958 on byte codes). The graph's
blind spot, a small group of keys apart from the rest that no edge leads into, is covered by the router, which
scores small groups near the query exhaustively.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EXACT_THRESHOLD = 5_000
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128
HNSW_EF_SEARCH_BASE = 48  # efSearch at 10K live keys, doubled per decade (auto_ef_search)
HNSW_EF_SEARCH_MAX = 256
COMPACT_DEAD_FRACTION = 0.25
COMPACT_COPY_ROWS = 16_384  # Compactor: positions copied per hold of the owner's lock
COMPACT_FINAL_ROWS = 64  # Compactor: journal rows replayed in the adopting hold at most (else one more round)
COMPACT_ROUNDS = 8  # Compactor: catch-up rounds before the rest is replayed in the adopting hold anyway
LAYOUT_MIN_KEYS = 65_536  # an HNSW index (re)built with this many keys lays them out by locality (_locality_order)
LAYOUT_FINE = 16  # _locality_order: sub-clusters per cluster
HUGE_PAGE_MIN_BYTES = 32 << 20  # HNSW arrays from this size on are backed by 2 MB pages (Linux; see _advise_huge)
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
_GENERATIONS = itertools.count(1)  # VectorIndex.staged_generation: a new one per object and per rebuild
CODEC_FILE = "codec.npy"
LAYOUT_FILE = "layout.npy"  # how many positions (from the first) were laid out by locality


@dataclass(frozen=True)
class ByteCodec:
    """One affine map of every dimension onto the codes 0..255 (module docstring): ``code = round((x - lo) * scale)``,
    clipped (a key added later with a value past the range fitted at build time loses precision in that dimension
    only; the next rebuild that fits a range, e.g. past the exact threshold, takes it in)."""

    lo: float
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray) -> ByteCodec:
        """The whole range of ``x``'s values mapped onto 0..255. Not clipped: the 1e-5 quantiles of 1M MiniLM keys
        (+-0.26 against extremes of -0.32 / 0.30) gave steps a fifth finer, but would cut a key whose weight sits
        on a few dimensions (a hashed or hand-made key) by more than its neighbours differ."""
        lo, hi = float(np.min(x)), float(np.max(x))
        return cls(lo, 255.0 / (hi - lo) if hi > lo else 1.0)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 ``[n, d]`` -> integer-valued float32 codes (what faiss' ``QT_8bit_direct`` stores as bytes)."""
        return np.clip(np.rint((x - self.lo) * self.scale), 0.0, 255.0).astype(np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        out = np.multiply(codes, np.float32(1.0 / self.scale), dtype=np.float32)
        out += np.float32(self.lo)
        return out

    def inner(self, codes: np.ndarray, q: np.ndarray, by_row: bool = False) -> np.ndarray:
        """``decode(codes) @ q`` without decoding: ``(codes @ q) / scale + lo * sum(q)``. ``by_row``: each row's
        score has the same bits whatever other rows are scored with it (numpy's own loops, ~2x BLAS' time; BLAS
        sums a row in another order by where it falls in its blocks, a few last bits apart)."""
        dots = np.einsum("ij,j->i", codes.astype(np.float32), q) if by_row else codes @ q
        return dots / np.float32(self.scale) + np.float32(self.lo * float(q.sum()))


@dataclass(frozen=True)
class IndexParams:
    """Knobs of :class:`VectorIndex` (defaults chosen by ``benchmarks/bench_routing.py``)."""

    exact_threshold: int = EXACT_THRESHOLD
    hnsw_m: int = HNSW_M
    ef_construction: int = HNSW_EF_CONSTRUCTION
    ef_search: int | None = None  # None: auto_ef_search(live keys)
    layout_min_keys: int = LAYOUT_MIN_KEYS  # HNSW (re)builds from this many keys on are laid out by locality


def auto_ef_search(n: int) -> int:
    """HNSW beam width for ``n`` live keys: 48 at 10K, doubled per decade (96 at 100K, 192 at 1M), <= 256.

    A graph over more keys needs a wider beam for the same recall; measured on real MiniLM embeddings
    (``docs/bench_routing.md``) this keeps recall@5 at ~0.95 or more up to 1M keys. (``math``, not numpy: a route asks
    three times, and numpy's scalar maths cost ~2 us a call.)
    """
    ef = HNSW_EF_SEARCH_BASE * 2.0 ** (math.log10(max(n, 10_000)) - 4.0)
    return int(min(HNSW_EF_SEARCH_MAX, 16 * round(ef / 16)))


def _id_dtype(ids: np.ndarray) -> type:
    """int32 while every id fits (4 B per vector saved; slot ids ``key << 4 | j`` fit below 134M keys), else int64."""
    return np.int32 if not len(ids) or (int(np.min(ids)) >= 0 and int(np.max(ids)) < 2**31) else np.int64


def _members(values: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Indices of ``values`` that are among ``keys`` (few keys): a binary search into the sorted keys. ``np.isin``
    costs ~25 us of set-up even on an empty tail, a sixth of a route's same-key check at 1M keys."""
    if not len(values) or not len(keys):
        return np.zeros(0, np.int64)
    ordered = np.sort(keys)
    at = np.minimum(np.searchsorted(ordered, values), len(ordered) - 1)
    return np.flatnonzero(ordered[at] == values)


def _chain(centroids: np.ndarray) -> np.ndarray:
    """An order of ``centroids`` ``[c, d]`` in which each is followed by the nearest one not yet taken (greedy)."""
    left = np.ones(len(centroids), dtype=bool)
    order = [0]
    left[0] = False
    for _ in range(len(centroids) - 1):
        sims = centroids @ centroids[order[-1]]
        sims[~left] = -np.inf
        order.append(int(np.argmax(sims)))
        left[order[-1]] = False
    return np.asarray(order, np.int64)


def _locality_order(
    x: np.ndarray, seed: int = 0, decode: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """A permutation of the rows of ``x`` ``[n, d]`` that puts near keys near each other in memory (``decode``: maps
    rows of ``x``, e.g. byte codes, to float rows; read a chunk at a time).

    An HNSW walk spends most of its time waiting for the codes and links of the nodes it visits, read from RAM at
    random. Late in a walk those nodes are all near the query. In build order (the catalog's) they are scattered
    over the whole array; clustered, they share pages and DRAM rows, and the walk waits less (the reordering of
    Coleman et al., "Graph Reordering for Cache-Efficient Near Neighbor Search", 2022). Two levels of spherical
    k-means: ~sqrt(n) clusters (trained on a sample of 64 rows per cluster), then :data:`LAYOUT_FINE` sub-clusters in
    each; clusters and sub-clusters follow a greedy nearest-next chain (:func:`_chain`). At 1M keys it took 13 s of
    a 237 s build on 2 cores, and the walk at efSearch 192 went from 0.500 / 0.879 to 0.365 / 0.711 ms (p50 / p99,
    ``benchmarks/bench_layout.py``). Only the layout changes: the graph and a search's results are the same."""
    import faiss

    def rows(i: np.ndarray | slice) -> np.ndarray:
        return np.ascontiguousarray(x[i] if decode is None else decode(x[i]), np.float32)

    n, d = x.shape
    n_coarse = max(2, int(round(math.sqrt(n))))
    rng = np.random.default_rng(seed)
    sample = rows(np.sort(rng.choice(n, min(n, 64 * n_coarse), replace=False)))
    km = faiss.Kmeans(d, n_coarse, niter=8, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1,
                       max_points_per_centroid=64)
    km.train(sample)
    coarse = np.empty(n, np.int64)
    for s in range(0, n, 65_536):
        coarse[s : s + 65_536] = km.index.search(rows(slice(s, s + 65_536)), 1)[1][:, 0]
    rank = np.empty(n_coarse, np.int64)
    rank[_chain(km.centroids)] = np.arange(n_coarse)
    coarse = rank[coarse]
    by_cluster = np.argsort(coarse, kind="stable")
    bounds = np.searchsorted(coarse[by_cluster], np.arange(n_coarse + 1))
    fine = np.zeros(n, np.int64)
    for c in range(n_coarse):
        members = by_cluster[bounds[c] : bounds[c + 1]]
        if len(members) < 4 * LAYOUT_FINE:
            continue
        xc = rows(members)
        sub = faiss.Kmeans(d, LAYOUT_FINE, niter=8, seed=seed, spherical=True, verbose=False, min_points_per_centroid=1)
        sub.train(xc)
        rank = np.empty(LAYOUT_FINE, np.int64)
        rank[_chain(sub.centroids)] = np.arange(LAYOUT_FINE)
        fine[members] = rank[sub.index.search(xc, 1)[1][:, 0]]
    return np.lexsort((fine, coarse))


def _advise_huge(address: int, nbytes: int) -> bool:
    """Ask Linux to back ``[address, address + nbytes)`` with 2 MB pages: ``MADV_HUGEPAGE`` for what is faulted in
    later, ``MADV_COLLAPSE`` (Linux >= 6.1) for what is already there. An HNSW walk reads a few thousand codes at
    random places; with 4 KB pages nearly every one is a TLB miss (a two-level page walk under a hypervisor). On
    1M keys (366 MB of codes, 126 MB of links) this took the walk at efSearch 192 from 814 to 702 us p50 and at
    efSearch 16 from 178 to 126 us (``docs/bench_routing.md``). Returns whether the kernel took the advice; any
    refusal (other OS, THP off, old kernel) leaves the memory as it was: the index works the same on 4 KB pages."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or nbytes < HUGE_PAGE_MIN_BYTES:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return False
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    start, end = (address + 4095) & ~4095, (address + nbytes) & ~4095
    if madvise(start, end - start, MADV_HUGEPAGE) != 0:
        return False
    return madvise(start, end - start, MADV_COLLAPSE) == 0


def _as_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"`vectors` must have shape [n, {dim}], got {tuple(np.shape(vectors))}")
    return x


def _stored_matrix(vectors: np.ndarray, dim: int) -> np.ndarray:
    """:func:`_as_matrix` for vectors to store: finite, checked before any change (a NaN would code to an arbitrary
    byte). Queries skip the check: they come from the encoders, and a route should not pay for it."""
    x = _as_matrix(vectors, dim)
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0].tolist()
        raise ValueError(f"`vectors` must be finite, got {x[bad[0], bad[1]]} at row {bad[0]}, column {bad[1]}")
    return x


class VectorIndex:
    """Inner-product search over int64-keyed unit vectors, flat or HNSW-SQ8 (see the module docstring)."""

    def __init__(self, dim: int, params: IndexParams | None = None) -> None:
        self.dim = dim
        self.params = params or IndexParams()
        self.kind = "flat"
        self._index = self._new_flat()
        self._ids = np.zeros(0, dtype=np.int64)
        self._alive = np.zeros(0, dtype=bool)
        self._n = 0  # used positions (ids/alive have spare capacity past _n)
        self._sorted = True  # ids[:_n] strictly increasing
        self._dead = 0
        self._selector_cache: tuple[np.ndarray, object] | None = None
        # efSearch (0: flat) -> faiss search parameters of an unrestricted search (holding the dead positions' selector,
        # if any), reused until the selector changes (_forget_selector)
        self._search_params: dict[int, object] = {}
        self._view: tuple[np.ndarray, int, np.ndarray] | None = None  # (argsort, upto, sorted ids) when unsorted
        self._laid = 0  # positions [0, _laid) were laid out by locality (_locality_order); later ones appended
        self.version = 0  # bumped by every change of content (callers key caches of decoded vectors on it)
        self._advised: dict[str, tuple[int, int]] = {}  # HNSW array -> (address, bytes) last advised (_advise)
        self._codec: ByteCodec | None = None  # HNSW byte codes' map; None: flat, or per-dimension codes (older files)
        self._code_view: np.ndarray | None = None  # uint8 [n, d] over faiss' byte codes (_codes); reset on every change
        self.staged_generation = next(_GENERATIONS)  # positions from stage() are valid while it stays (reveal)
        # changes since begin_copy(), for a copy being compacted elsewhere to catch up: (True, keys, vectors) made
        # live, (False, keys, None) removed; None while no copy is made; _journal_lost: a rebuild meanwhile
        self._journal: list[tuple[bool, np.ndarray, np.ndarray | None]] | None = None
        self._journal_lost = False

    # ------------------------------------------------------------------ construction
    def _new_flat(self):  # -> faiss.Index
        import faiss

        return faiss.IndexFlatIP(self.dim)

    def _new_hnsw(self):  # -> faiss.Index
        import faiss

        index = faiss.IndexHNSWSQ(self.dim, faiss.ScalarQuantizer.QT_8bit_direct, self.params.hnsw_m, faiss.METRIC_L2)
        index.hnsw.efConstruction = self.params.ef_construction
        index.hnsw.efSearch = self.ef_search
        index.train(np.zeros((1, self.dim), np.float32))  # the direct codes need no training (the codec is ours)
        return index

    @classmethod
    def build(cls, dim: int, keys: np.ndarray, vectors: np.ndarray, params: IndexParams | None = None) -> VectorIndex:
        """A new index holding ``keys`` ``[n]`` -> ``vectors`` ``[n, dim]`` (kind chosen by size)."""
        out = cls(dim, params)
        out._rebuild(np.asarray(keys, dtype=np.int64), _stored_matrix(vectors, dim))
        return out

    def _rebuild(self, keys: np.ndarray, vectors: np.ndarray, codec: ByteCodec | None = None) -> None:
        """Replace the whole content (duplicates in ``keys``: the last one wins); ``codec``: keep this map of the
        byte codes (a compaction: decoded codes map back onto the same codes), else fit one to ``vectors``."""
        if len(keys) and len(np.unique(keys)) != len(keys):
            _, last = np.unique(keys[::-1], return_index=True)
            keep = np.sort(len(keys) - 1 - last)
            keys, vectors = keys[keep], vectors[keep]
        if len(keys) > self.params.exact_threshold:
            self._codec = codec or ByteCodec.fit(vectors)
            self._index, self.kind = self._new_hnsw(), "hnsw-sq8"
        else:
            self._index, self.kind, self._codec = self._new_flat(), "flat", None
        self._ids = np.array(keys, dtype=_id_dtype(keys))
        self._alive = np.ones(len(keys), dtype=bool)
        self._n, self._dead, self._laid = len(keys), 0, 0
        self._sorted = bool(np.all(np.diff(self._ids) > 0))
        self._forget_selector()
        self._view = None
        self.version += 1
        self._code_view = None
        self.staged_generation = next(_GENERATIONS)  # staged positions are gone
        self._journal_lost = self._journal is not None  # positions renumbered: a copy under way cannot catch up
        if len(keys):
            self._index.add(self._encode(vectors))
            if self.kind != "flat" and len(keys) >= self.params.layout_min_keys:
                perm = _locality_order(vectors)
                self._index.permute_entries(perm)
                self._ids = self._ids[perm]
                self._sorted = False
                self._laid = len(keys)
            self._advise()

    def _codes(self) -> np.ndarray:
        """The byte codes as a uint8 ``[n, d]`` numpy view of faiss' own array (no copy). Dropped wherever faiss'
        index changes (:meth:`add`, :meth:`_rebuild`): an insert may move the array."""
        if self._code_view is None:
            import faiss

            codes = faiss.downcast_index(self._index.storage).codes
            n = self._index.ntotal
            self._code_view = faiss.rev_swig_ptr(codes.data(), n * self.dim).reshape(n, self.dim) if n else \
                np.zeros((0, self.dim), np.uint8)  # fmt: skip
        return self._code_view

    def _encode(self, x: np.ndarray) -> np.ndarray:
        """What faiss stores or is asked for: ``x`` itself, or its byte codes."""
        return x if self._codec is None else self._codec.encode(x)

    def _advise(self) -> None:
        """Back the HNSW codes and links with huge pages (:func:`_advise_huge`) when they moved (a faiss vector
        reallocates as it grows) or grew by an eighth since the last advice."""
        if self.kind == "flat":
            return
        import faiss

        arrays = {"codes": (faiss.downcast_index(self._index.storage).codes, 1),
                  "links": (self._index.hnsw.neighbors, 4)}  # fmt: skip
        for name, (vec, itemsize) in arrays.items():
            at, nbytes = int(vec.data()), vec.size() * itemsize
            last = self._advised.get(name)
            if last is None or last[0] != at or nbytes > last[1] * 9 // 8:
                self._advised[name] = (at, nbytes)
                _advise_huge(at, nbytes)

    @property
    def ef_search(self) -> int:
        """The HNSW beam width in use: ``params.ef_search``, or :func:`auto_ef_search` of the live keys."""
        return self.params.ef_search or auto_ef_search(len(self))

    # ------------------------------------------------------------------ updates
    def __len__(self) -> int:
        return self._n - self._dead

    def _positions_of(self, keys: np.ndarray) -> np.ndarray:
        """Live positions holding any of ``keys``.

        Catalog keys are row ids, so positions are usually in increasing key order: then a binary search
        (O(len(keys) log n)) replaces the O(n) scan.
        """
        ids, alive = self._ids[: self._n], self._alive[: self._n]
        if ids.dtype == np.int32:  # same dtype on both sides, or numpy would copy ids to compare (O(n))
            keys = np.where((keys >= 0) & (keys < 2**31), keys, -1).astype(np.int32)
        if self._sorted:
            pos = np.searchsorted(ids, keys)
            inside = pos < len(ids)
            pos = pos[inside][ids[pos[inside]] == keys[inside]]
            return np.unique(pos[alive[pos]])
        if len(keys) * 64 < self._n:  # few keys in a big, unsorted index: a sorted view + a small unsorted tail
            order, upto, sids = self._sorted_view()
            # every position holding the key (a re-added key also has dead copies): the runs [lo, hi)
            lo, hi = np.searchsorted(sids, keys, "left"), np.searchsorted(sids, keys, "right")
            lens = hi - lo
            if lens.max(initial=0) <= 1:  # no key held twice (the usual case): no runs to expand
                pos = order[lo[lens == 1]]
            else:
                starts = np.repeat(lo, lens)
                pos = order[starts + np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)]
            if upto < len(ids):
                pos = np.concatenate([pos, upto + _members(ids[upto:], keys)])
            pos = pos.astype(np.int64)
            return np.unique(pos[alive[pos]])
        return np.flatnonzero(np.isin(ids, keys) & alive)

    def _sorted_view(self) -> tuple[np.ndarray, int, np.ndarray]:
        """``(argsort of ids[:upto], upto, ids[:upto] sorted)``; re-sorted when the unsorted tail past ``upto`` grows
        past 1/16. The sorted ids are kept (4 B/vector more): gathering them per lookup cost O(n), ~1.5 ms at 1M."""
        view = self._view
        if view is None or self._n - view[1] > max(4096, self._n // 16) or view[1] > self._n:
            order = np.argsort(self._ids[: self._n], kind="stable")
            order = order.astype(np.int32) if self._n < 2**31 else order  # 4 B/vector
            view = self._view = (order, self._n, self._ids[: self._n][order])
        return view

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace ``keys`` ``[n]`` with ``vectors`` ``[n, dim]`` (unit norm expected)."""
        keys, x = self._checked(keys, vectors)
        if not len(keys):
            return
        self._kill(self._positions_of(keys))
        if self.kind == "flat" and len(self) + len(keys) > self.params.exact_threshold:
            live_keys, live_vecs = self.items()
            self._rebuild(np.concatenate([live_keys, keys]), np.concatenate([live_vecs, x]))
            logger.info("routing index grew past %d keys: rebuilt as %s", self.params.exact_threshold, self.kind)
            return
        self._append(keys, x, alive=True)

    def stage(self, keys: np.ndarray, vectors: np.ndarray) -> np.ndarray:
        """Insert ``keys`` ``[n]`` -> ``vectors`` ``[n, dim]`` hidden: searches and lookups skip them (dead positions)
        until :meth:`reveal` makes them live in one step. Returns their positions, valid while
        :attr:`staged_generation` stays what it was (a rebuild, e.g. a compaction, drops them).

        What an adaptation's swap and a big change set from the core are for: each must go live at once, in one
        hold of the router's lock, and inserting into a big HNSW graph is the slow part (2,400 keys among 200K held
        it 0.57-0.73 s, 10K keys 3.2-3.7 s: ``benchmarks/bench_refit_lock.py --swap`` / ``--apply``). The router
        stages them here a few at a time, while routes still see the old keys."""
        keys, x = self._checked(keys, vectors)
        at = self._n
        if len(keys):
            self._append(keys, x, alive=False)
            self._dead += len(keys)
        return np.arange(at, at + len(keys), dtype=np.int64)

    def reveal(self, generation: int, positions: np.ndarray, replaced: np.ndarray) -> bool:
        """Make staged ``positions`` (:meth:`stage`) live and remove the ``replaced`` keys plus any live key they
        replace, in one step. ``False``, changing nothing, when the staged positions are gone (``generation`` is not
        :attr:`staged_generation`: the index was rebuilt since). Never rebuilds (other staged positions would be
        lost): :meth:`settle` after the last one."""
        positions = np.asarray(positions, np.int64).reshape(-1)
        if generation != self.staged_generation or (len(positions) and (
                positions.min() < 0 or positions.max() >= self._n or self._alive[positions].any())):  # fmt: skip
            return False
        ids = self._ids[positions].astype(np.int64)
        self._kill(self._positions_of(np.concatenate([np.asarray(replaced, np.int64).reshape(-1), ids])))
        if len(positions):
            if self._journal is not None:
                self._journal.append((True, ids, self._reconstruct_positions(positions)))
            self._alive[positions] = True
            self._dead -= len(positions)
            self._forget_selector()
            self.version += 1
        return True

    def settle(self, compact: bool = True) -> None:
        """After the last :meth:`reveal` of a batch (never between two: a rebuild drops what is still staged):
        rebuild as HNSW a flat index that grew past its threshold, compact one with a quarter of dead positions
        (an HNSW one only if ``compact``: see :meth:`remove`)."""
        if self.kind == "flat" and len(self) > self.params.exact_threshold:
            self._rebuild(*self.items())
            logger.info("routing index grew past %d keys: rebuilt as %s", self.params.exact_threshold, self.kind)
        elif self.compact_due() and (compact or self.kind == "flat"):
            self.compact()

    def _checked(self, keys: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keys = np.asarray(keys, dtype=np.int64).reshape(-1)
        x = _stored_matrix(vectors, self.dim)
        if len(keys) != len(x):
            raise ValueError(f"`keys` ({len(keys)}) and `vectors` ({len(x)}) differ in length")
        return keys, x

    def _append(self, keys: np.ndarray, x: np.ndarray, alive: bool) -> None:
        """Append ``keys`` -> ``x`` at the end (positions ``[_n, _n + len(keys))``), live or not."""
        self._reserve(self._n + len(keys))
        if self._ids.dtype == np.int32 and _id_dtype(keys) is np.int64:
            self._ids = self._ids.astype(np.int64)
            self._view = None  # its sorted ids are int32: compared with int64 keys numpy would copy them (O(n))
        if self._sorted:
            last = self._ids[self._n - 1] if self._n else np.iinfo(np.int64).min
            self._sorted = bool(keys[0] > last and np.all(np.diff(keys) > 0))
        self._ids[self._n : self._n + len(keys)] = keys
        self._alive[self._n : self._n + len(keys)] = alive
        self._n += len(keys)
        self._code_view = None
        self._index.add(self._encode(x))
        self._advise()
        if alive and self._journal is not None:
            self._journal.append((True, keys.copy(), np.array(x, np.float32)))
        if alive or not self._dead:  # hidden positions past the selector's bitmap are outside it: it still holds
            self._forget_selector()
        self.version += 1

    def remove(self, keys: np.ndarray, compact: bool = True) -> int:
        """Remove ``keys`` (absent ones are ignored); returns how many were removed. Past a quarter of dead positions
        the index is compacted here, or, if not ``compact`` and it is HNSW, left for the caller to compact on a copy
        (:meth:`compact_due`, :meth:`begin_copy`; ``Router.compact_index``): rebuilding 1M keys takes minutes."""
        pos = self._positions_of(np.asarray(keys, dtype=np.int64).reshape(-1))
        self._kill(pos)
        if self.compact_due() and (compact or self.kind == "flat"):
            self.compact()
        return len(pos)

    @property
    def dead(self) -> int:
        """Positions holding a removed or replaced key (or a staged one), until the next compaction."""
        return self._dead

    def compact_due(self) -> bool:
        """Whether over a quarter of the positions are dead (:data:`COMPACT_DEAD_FRACTION`)."""
        return bool(self._n) and self._dead > COMPACT_DEAD_FRACTION * self._n

    def _kill(self, positions: np.ndarray) -> None:
        if len(positions):
            if self._journal is not None:
                self._journal.append((False, self._ids[positions].astype(np.int64), None))
            self._alive[positions] = False
            self._dead += len(positions)
            self._forget_selector()
            self.version += 1

    def layout_due(self) -> bool:
        """Whether :meth:`laid_out` would pay: an HNSW index of ``layout_min_keys`` live keys or more of which over a
        quarter of the positions were appended after its last layout (keys added a few at a time). Byte codes only:
        an index saved with per-dimension codes moves to byte codes, laid out, at its next rebuild."""
        return (self._codec is not None and len(self) >= self.params.layout_min_keys
                and 4 * (self._n - self._laid) > self._n)

    def layout_snapshot(self) -> tuple[int, object, np.ndarray, np.ndarray]:
        """What :meth:`laid_out` works from: ``(version, a copy of the faiss index, ids, alive)``. A copy, so that the
        caller may hold its lock for this step only (~1 s at 1M keys) and lay the copy out without it."""
        import faiss

        return self.version, faiss.clone_index(self._index), self._ids[: self._n].copy(), self._alive[: self._n].copy()

    def laid_out(self, snapshot: tuple[int, object, np.ndarray, np.ndarray]) -> VectorIndex:
        """A new index: this one's ``snapshot`` (:meth:`layout_snapshot`) with its positions laid out by locality, the
        same graph (~15 s at 1M keys, without any lock: it reads only the copy). The caller adopts it in place of this
        one if nothing changed since the snapshot (``version``)."""
        import faiss

        index = snapshot[1]
        n = index.ntotal
        codes = faiss.rev_swig_ptr(faiss.downcast_index(index.storage).codes.data(), n * self.dim).reshape(n, self.dim)
        out = self.permuted(snapshot, _locality_order(codes, decode=self._codec.decode))
        out._laid = n
        return out

    def permuted(self, snapshot: tuple[int, object, np.ndarray, np.ndarray], perm: np.ndarray) -> VectorIndex:
        """A new index from ``snapshot`` (:meth:`layout_snapshot`, whose faiss copy it takes over) whose position ``j``
        holds the snapshot's position ``perm[j]``: the same graph, the same search results (none counted as laid
        out)."""
        version, index, ids, alive = snapshot
        index.permute_entries(perm)
        out = copy.copy(self)
        out._index, out._ids, out._alive = index, ids[perm], alive[perm]
        out._n, out._laid, out.version = index.ntotal, 0, version + 1
        out._sorted = bool(np.all(np.diff(out._ids) > 0))
        out._view = out._code_view = out._selector_cache = None
        out._search_params, out._advised = {}, {}
        out._journal, out._journal_lost = None, False
        out.staged_generation = next(_GENERATIONS)  # staged positions are not carried over
        out._advise()
        return out

    def _reserve(self, n: int) -> None:
        if n > len(self._ids):
            cap = max(n, 2 * len(self._ids), 1024)
            self._ids = np.resize(self._ids, cap)
            self._alive = np.concatenate([self._alive, np.zeros(cap - len(self._alive), dtype=bool)])

    def compact(self) -> None:
        """Drop dead positions by rebuilding from the stored vectors (SQ8 codes decode to the same codes)."""
        keys, vecs = self.items()
        self._rebuild(keys, vecs, self._codec)

    # ------------------------------------------------------------------ a compacted copy, made beside the searches
    def begin_copy(self) -> int:
        """Start a copy (a compaction made elsewhere, without the caller's lock): from now on every change is kept
        for :meth:`take_journal`; returns how many positions to copy with :meth:`copy_rows`. Positions below it
        keep their place until the copy ends (a rebuild meanwhile makes :meth:`take_journal` say so)."""
        self._journal, self._journal_lost = [], False
        return self._n

    @property
    def copying(self) -> bool:
        """Whether a copy is under way (:meth:`begin_copy` until :meth:`end_copy`)."""
        return self._journal is not None

    def copy_rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Live ``(keys, vectors)`` at positions ``[lo, hi)``, in position order: a copy may take them a block per
        hold of the caller's lock, since what changes between two blocks is in the journal."""
        pos = lo + np.flatnonzero(self._alive[lo:hi])
        return self._ids[pos].astype(np.int64), self._reconstruct_positions(pos)

    def take_journal(self) -> list[tuple[bool, np.ndarray, np.ndarray | None]] | None:
        """The changes since :meth:`begin_copy` or the last call, in order (then forgotten); ``None`` if the index
        was rebuilt meanwhile (the copy cannot catch up)."""
        if self._journal is None or self._journal_lost:
            return None
        out, self._journal = self._journal, []
        return out

    def end_copy(self) -> None:
        """Stop keeping changes for a copy."""
        self._journal, self._journal_lost = None, False

    @classmethod
    def compacted(cls, template: VectorIndex, keys: np.ndarray, vectors: np.ndarray) -> VectorIndex:
        """A new index of ``template``'s kind, parameters and byte-code map holding ``keys`` -> ``vectors`` (a copy's
        live rows, :meth:`copy_rows`): what :meth:`compact` makes, built without touching ``template``."""
        out = cls(template.dim, template.params)
        out._rebuild(keys, vectors, template._codec)
        return out

    def replay(self, journal: list[tuple[bool, np.ndarray, np.ndarray | None]]) -> int:
        """Apply another index's :meth:`take_journal` here, in order; returns the rows made live."""
        rows = 0
        for live, keys, vectors in journal:
            if live:
                self.add(keys, vectors)
                rows += len(keys)
            else:
                self.remove(keys, compact=False)
        return rows

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Live ``(keys [n], vectors [n, dim])`` in position order (HNSW-SQ8: decoded 8-bit vectors)."""
        pos = np.flatnonzero(self._alive[: self._n])
        if not len(pos):
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return self._ids[pos].astype(np.int64), self._reconstruct_positions(pos)

    def live_ids(self) -> np.ndarray:
        """int64 ids of the live positions, in position order (no vector decoded)."""
        return self._ids[: self._n][self._alive[: self._n]].astype(np.int64)

    def _reconstruct_positions(self, pos: np.ndarray) -> np.ndarray:
        if self._codec is not None:  # straight from the codes (faiss' reconstruct_batch: ~20 us of wrapping a call)
            return self._codec.decode(self._codes()[pos])
        if len(pos) == self._n:
            return self._index.reconstruct_n(0, self._n)
        return self._index.reconstruct_batch(np.ascontiguousarray(pos, dtype=np.int64))

    def vectors_of(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found keys [m], vectors [m, dim])`` for the live ones among ``keys``."""
        pos = self._positions_of(np.asarray(keys, dtype=np.int64).reshape(-1))
        if not len(pos):
            return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim), dtype=np.float32)
        return self._ids[pos].astype(np.int64), self._reconstruct_positions(pos)

    def scores_of(self, keys: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(found keys [m], q . their vectors [m])`` for the live ones among ``keys`` (byte codes: scored on the
        codes, no decoded copy); a key's score has the same bits whatever other keys are asked with it."""
        pos = self._positions_of(np.asarray(keys, dtype=np.int64).reshape(-1))
        if not len(pos):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        found = self._ids[pos].astype(np.int64)
        # by row: a key scores the same bits in any batch (a route's two paths, serial and beside the walk, ask the
        # tag side's candidates in different batches, and their fused scores must agree float for float)
        if self._codec is not None:
            return found, self._codec.inner(self._codes()[pos], q, by_row=True)
        return found, np.einsum("ij,j->i", self._reconstruct_positions(pos), q)

    # ------------------------------------------------------------------ search
    def _forget_selector(self) -> None:
        """Drop the dead positions' selector and the search parameters that hold it (the alive set changed)."""
        self._selector_cache = None
        self._search_params.clear()

    def _selector(self, allowed: np.ndarray | None):  # -> faiss.IDSelector | None
        import faiss

        if allowed is None:
            if not self._dead:
                return None
            if self._selector_cache is None:
                bits = np.packbits(self._alive[: self._n], bitorder="little")  # (faiss takes the size in bytes)
                self._selector_cache = (bits, faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)))
            return self._selector_cache[1]
        mask = np.isin(self._ids[: self._n], allowed) & self._alive[: self._n]
        bits = np.packbits(mask, bitorder="little")
        sel = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
        sel._smoa_bits = bits  # keep the bitmap alive as long as the selector
        return sel

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, ef_search: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` inner products.

        Args:
            queries: float32 ``[m, dim]`` (a float64 query would be converted, at a cost, so cast first).
            k: neighbours per query.
            allowed: optional int64 keys to restrict the search to.
            ef_search: HNSW beam width (default :attr:`ef_search`, raised to ``k`` at least).

        Returns:
            ``(scores [m, k] float32, keys [m, k] int64)``, best first, padded with ``-inf`` / ``-1``.
        """
        import faiss

        q = _as_matrix(queries, self.dim)
        k = max(1, int(k))
        if len(self) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        sel = self._selector(allowed)
        # faiss' parameters are built through its Python wrappers (~15 us, a tenth of a narrow 1M-key walk), so an
        # unrestricted search's are reused; before 2026-12-07 only without dead positions: an index with a removed
        # key built them on every route
        ef = 0 if self.kind == "flat" else max(ef_search or self.ef_search, k)
        params = self._search_params.get(ef, False) if allowed is None else False
        if params is False:
            if self.kind == "flat":
                params = faiss.SearchParameters(sel=sel) if sel is not None else None
            else:
                params = faiss.SearchParametersHNSW(efSearch=ef)
                if sel is not None:
                    params.sel = sel
            if allowed is None and len(self._search_params) < 1024:  # efSearch <= a few hundred
                self._search_params[ef] = params
        if self._codec is None:
            scores, pos = self._index.search(q, k, params=params)
        else:
            _, pos = self._index.search(self._codec.encode(q), k, params=params)
            scores, pos = self._rescore(q, pos)
        if pos.min() >= 0:  # every slot filled (the usual case): no padding to mask
            return scores, self._ids[pos].astype(np.int64)
        keys = np.where(pos >= 0, self._ids[np.clip(pos, 0, None)], -1).astype(np.int64)
        scores = np.where(pos >= 0, scores, -np.inf).astype(np.float32)
        return scores, keys

    def _rescore(self, q: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Inner products of the float queries ``q`` ``[m, d]`` with the decoded codes at ``pos`` ``[m, k]`` (``-1``:
        none, scored ``-inf``), best first per row (the walk ranked them on the query's own byte codes)."""
        if len(q) == 1:  # a route: one query, no index arithmetic; q . (c / scale + lo) without decoding c
            row, codec = pos[0], self._codec
            ok = row >= 0
            s = np.full(len(row), -np.inf, np.float32)
            s[ok] = codec.inner(self._codes()[row[ok]], q[0])
            order = np.argsort(-s, kind="stable")
            return s[order][None, :], row[order][None, :]
        r, c = np.nonzero(pos >= 0)
        s = np.full(pos.shape, -np.inf, np.float32)
        s[r, c] = np.einsum("ij,ij->i", self._reconstruct_positions(pos[r, c]), q[r])
        order = np.argsort(-s, axis=1, kind="stable")
        return np.take_along_axis(s, order, 1), np.take_along_axis(pos, order, 1)

    # ------------------------------------------------------------------ persistence and accounting
    def memory_bytes(self) -> int:
        """Bytes held: faiss codes and graph plus the id, alive and sorted-view arrays."""
        import faiss

        if self.kind == "flat":
            index_bytes = self._index.ntotal * self.dim * 4
        else:
            hnsw = self._index.hnsw
            index_bytes = (
                self._index.ntotal * self._index.storage.sa_code_size()
                + faiss.vector_to_array(hnsw.neighbors).nbytes
                + faiss.vector_to_array(hnsw.offsets).nbytes
                + faiss.vector_to_array(hnsw.levels).nbytes
            )
        view = self._view[0].nbytes + self._view[2].nbytes if self._view is not None else 0  # once ids are unsorted
        return int(index_bytes + self._ids.nbytes + self._alive.nbytes + view)

    def save(self, directory: Path) -> list[str]:
        """Write ``vectors.faiss``, ``ids.npy``, ``alive.npy``, ``layout.npy`` into ``directory``; returns the file
        names."""
        import faiss

        faiss.write_index(self._index, str(directory / "vectors.faiss"))
        np.save(directory / "ids.npy", self._ids[: self._n].astype(np.int64))
        np.save(directory / "alive.npy", self._alive[: self._n])
        np.save(directory / LAYOUT_FILE, np.array([self._laid], np.int64))
        names = ["vectors.faiss", "ids.npy", "alive.npy", LAYOUT_FILE]
        if self._codec is not None:
            np.save(directory / CODEC_FILE, np.array([self._codec.lo, self._codec.scale], np.float64))
            names.append(CODEC_FILE)
        return names

    @classmethod
    def load(cls, directory: Path, dim: int, params: IndexParams | None = None) -> VectorIndex:
        """Read what :meth:`save` wrote; raises ``ValueError``/``RuntimeError``/``OSError`` if inconsistent."""
        import faiss

        out = cls(dim, params)
        index = faiss.read_index(str(directory / "vectors.faiss"))
        ids = np.load(directory / "ids.npy", allow_pickle=False)
        alive = np.load(directory / "alive.npy", allow_pickle=False)
        if index.d != dim or index.ntotal != len(ids) or len(ids) != len(alive) or ids.dtype != np.int64:
            raise ValueError(f"index files disagree: d={index.d}, ntotal={index.ntotal}, ids={len(ids)}")
        out._index, out._ids, out._alive = index, ids.astype(_id_dtype(ids)), alive.astype(bool)
        out.kind = "flat" if isinstance(index, faiss.IndexFlat) else "hnsw-sq8"
        if out.kind != "flat":
            out._index.hnsw.efSearch = out.ef_search
            if faiss.downcast_index(index.storage).sq.qtype == faiss.ScalarQuantizer.QT_8bit_direct:
                lo, scale = np.load(directory / CODEC_FILE, allow_pickle=False).astype(np.float64).tolist()
                if not (np.isfinite(lo) and np.isfinite(scale) and scale > 0):
                    raise ValueError(f"{CODEC_FILE} holds a bad range: lo={lo}, scale={scale}")
                out._codec = ByteCodec(lo, scale)
        out._n, out._dead = len(ids), int((~out._alive).sum())
        out._sorted = bool(np.all(np.diff(ids) > 0))
        if (directory / LAYOUT_FILE).is_file():  # saved before 2026-12-07: none laid out
            laid = np.load(directory / LAYOUT_FILE, allow_pickle=False)
            if laid.shape != (1,) or laid.dtype != np.int64 or not 0 <= int(laid[0]) <= out._n:
                raise ValueError(f"{LAYOUT_FILE} holds a bad count: {laid!r} for {out._n} positions")
            out._laid = int(laid[0])
        out._advise()
        return out


class Compactor:
    """Compacts an owner's HNSW :class:`VectorIndex` on a copy, on a background thread, beside the owner's searches.

    Compacting in place rebuilds the whole graph while the owner's lock is held (~1 minute at 200K keys, minutes at
    1M), and every search waits. Here the index keeps a journal of its changes from the start
    (:meth:`VectorIndex.begin_copy`); its live rows are copied :data:`COMPACT_COPY_ROWS` positions per hold of the
    lock; the copy is built without the lock (:meth:`VectorIndex.compacted`), then catches up with the journal a
    round at a time, also without the lock (:meth:`VectorIndex.replay`); the last :data:`COMPACT_FINAL_ROWS` rows
    or fewer are replayed in the hold that adopts it. The copy is dropped if the owner's index is replaced or
    rebuilt in place meanwhile. Keys staged for a later reveal are not carried over: that reveal then fails, as after
    any rebuild, and the owner inserts them.

    The owner is held weakly (it holds its compactor: a strong reference back would keep both alive until a full
    collection), and its attributes are read at each use.

    Args:
        owner: the object that holds the index.
        lock: name of the owner's lock attribute, held around every change of the index.
        index: name of the owner's index attribute.
        adopt: name of the owner's method that puts the compacted copy in its place (called holding the lock).
        pause: called between two holds (e.g. to hand the GIL to a waiting search).
    """

    def __init__(self, owner: object, lock: str, index: str, adopt: str, pause: Callable[[], None] | None = None
                 ) -> None:  # fmt: skip
        self._owner = weakref.ref(owner)
        self._names = (lock, index, adopt)
        self._pause = pause or (lambda: None)
        self.thread: threading.Thread | None = None
        self._pid = -1

    def when_due(self) -> None:
        """Start :meth:`run` on a background thread if the index is past a quarter of dead positions (HNSW) and no
        compaction is under way in this process (caller holds the lock)."""
        owner = self._owner()
        if owner is None:
            return
        vectors = getattr(owner, self._names[1])
        if self.thread is not None:
            if self._pid == os.getpid() and self.thread.is_alive():
                return
            if self._pid != os.getpid():  # a forked child: the parent's copy is not made here
                vectors.end_copy()
            self.thread = None
        if vectors.kind != "flat" and vectors.compact_due():
            self.thread = threading.Thread(target=self.run, name="smoa-compact", daemon=True)
            self._pid = os.getpid()
            self.thread.start()

    def run(self) -> bool:
        """Compact the index now, on the calling thread; returns whether the copy was adopted (``False``: nothing
        due, another copy under way, the owner gone, or the index replaced or rebuilt meanwhile)."""
        owner = self._owner()  # (held for the run)
        if owner is None:
            return False
        lock_name, index_name, adopt_name = self._names

        def lock() -> AbstractContextManager:
            return getattr(owner, lock_name)

        with lock():
            vectors = getattr(owner, index_name)
            if vectors.kind == "flat" or not vectors.compact_due() or vectors.copying:  # one copy at a time
                return False
            n0 = vectors.begin_copy()
        t = time.perf_counter()
        try:
            keys, rows = [], []
            for lo in range(0, n0, COMPACT_COPY_ROWS):
                with lock():
                    if getattr(owner, index_name) is not vectors:
                        return False
                    k, x = vectors.copy_rows(lo, min(n0, lo + COMPACT_COPY_ROWS))
                keys.append(k)
                rows.append(x)
                self._pause()
            fresh = VectorIndex.compacted(vectors, np.concatenate(keys), np.concatenate(rows))
            del keys, rows
            for round_ in range(COMPACT_ROUNDS + 1):
                with lock():
                    journal = vectors.take_journal() if getattr(owner, index_name) is vectors else None
                    if journal is None:
                        logger.info("routing index replaced or rebuilt during its compaction: copy dropped")
                        return False
                    if round_ == COMPACT_ROUNDS or sum(len(k) for live, k, _ in journal if live) <= COMPACT_FINAL_ROWS:
                        fresh.replay(journal)
                        getattr(owner, adopt_name)(fresh)
                        logger.info("routing index compacted to %d keys in %.1f s beside its searches", len(fresh),
                                    time.perf_counter() - t)  # fmt: skip
                        return True
                fresh.replay(journal)
                self._pause()
            return False  # (not reached: the last round adopts)
        finally:
            with lock():
                vectors.end_copy()
