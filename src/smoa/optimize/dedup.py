"""Finding near-duplicate adapters among millions without comparing every pair.

Three stages, each a pure function over arrays and callables (no library dependency)::

    sketches [N, D] ──► ANN top-m neighbours (faiss, inner product) ──► candidate pairs (sketch cos >= c)
                                                                              │
    exact factored cosine on candidates (verify_pairs, via a callable) ◄──────┘
                │
                ▼
    pairs with exact cosine >= threshold ──► union-find ──► groups (size >= 2)

Cost: sketching is linear in N; the ANN search is ``N * m`` neighbour look-ups (exact flat search below
``flat_max`` rows, an IVF index above); verification is linear in the number of candidates. Sketch noise
only costs recall at the candidate stage (the candidate cut ``c`` sits below ``threshold`` for that reason);
precision comes from the exact verification. Adapters of different profiles are never compared: pass
``partition`` labels and each partition is searched on its own. Zero updates (untrained adapters, whose
sketch is the zero vector) are never grouped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from smoa.errors import InvalidInputError

PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``(left [P], right [P]) -> exact cosines [P]`` for row indices into the sketched set."""

FLAT_MAX = 50_000


@dataclass
class DedupResult:
    """Outcome of :func:`find_near_duplicates`.

    Attributes:
        groups: arrays of row indices (each sorted, size >= 2), largest first.
        pairs: ``[Q, 2]`` verified pairs (``i < j``) with ``cosines`` ``[Q]``.
        candidates: number of candidate pairs verified exactly.
        timings: seconds per stage (``search``, ``verify``, ``group``).
    """

    groups: list[np.ndarray]
    pairs: np.ndarray
    cosines: np.ndarray
    candidates: int
    timings: dict[str, float] = field(default_factory=dict)


def candidate_pairs(
    sketches: np.ndarray,
    neighbours: int = 10,
    min_cosine: float = 0.8,
    *,
    flat_max: int = FLAT_MAX,
    nprobe: int = 16,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(i, j)``, ``i < j``, ``j`` among ``i``'s ``neighbours`` nearest sketches at cosine >= ``min_cosine``.

    Args:
        sketches: ``[N, D]`` float32 unit rows (zero rows are ignored).
        neighbours: neighbours looked up per row (besides itself).
        min_cosine: sketch-cosine cut.
        flat_max: up to this many rows an exact ``IndexFlatIP`` is used, above it ``IndexIVFFlat``
            (``4 * sqrt(N)`` lists, ``nprobe`` probed).
        nprobe, seed: IVF search width and k-means seed.

    Returns:
        ``(pairs [P, 2] int64, sketch cosines [P] float32)``, unique pairs.
    """

    x = np.ascontiguousarray(sketches, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidInputError(f"`sketches` must be 2-D [N, D], got shape {x.shape}")
    live = np.flatnonzero(np.abs(x).sum(axis=1) > 0)
    if live.size < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    xs = x[live]
    k = min(neighbours + 1, live.size)
    index = _build_index(xs, flat_max, nprobe, seed)
    sims, nbrs = _search(index, xs, k)
    rows = np.repeat(np.arange(live.size), k)
    sims, nbrs = sims.reshape(-1), nbrs.reshape(-1)
    keep = (nbrs >= 0) & (nbrs != rows) & (sims >= min_cosine)
    a, b = live[rows[keep]], live[nbrs[keep]]
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs.astype(np.int64), sims[keep][first].astype(np.float32)


def _build_index(x: np.ndarray, flat_max: int, nprobe: int, seed: int):  # -> faiss.Index
    import faiss

    n, d = x.shape
    if n <= flat_max:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = max(1, min(int(4 * np.sqrt(n)), n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.cp.seed = seed
        index.train(train)
        index.nprobe = nprobe
    index.add(x)
    return index


def _search(index, x: np.ndarray, k: int, batch: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    sims = np.empty((x.shape[0], k), np.float32)
    nbrs = np.empty((x.shape[0], k), np.int64)
    for s in range(0, x.shape[0], batch):
        sims[s : s + batch], nbrs[s : s + batch] = index.search(x[s : s + batch], k)
    return sims, nbrs


def verify_pairs(
    pairs: np.ndarray, scorer: PairScorer, threshold: float, batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray]:
    """Keep the pairs whose exact cosine (from ``scorer``) is >= ``threshold``.

    Returns:
        ``(pairs [Q, 2], exact cosines [Q])``.
    """
    kept, cos = [], []
    for s in range(0, len(pairs), batch):
        chunk = pairs[s : s + batch]
        c = np.asarray(scorer(chunk[:, 0], chunk[:, 1]), dtype=np.float64)
        if c.shape != (len(chunk),):
            raise InvalidInputError(f"`scorer` must return one cosine per pair ({len(chunk)}), got shape {c.shape}")
        m = c >= threshold
        kept.append(chunk[m])
        cos.append(c[m])
    if not kept:
        return np.zeros((0, 2), np.int64), np.zeros(0)
    return np.concatenate(kept), np.concatenate(cos)


def union_find_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components (size >= 2) of the graph on ``n`` rows with edges ``pairs``, largest first."""
    parent = list(range(n))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:  # path compression
            parent[i], i = root, parent[i]
        return root

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    touched = np.unique(pairs.reshape(-1)) if len(pairs) else np.zeros(0, np.int64)
    roots = np.array([find(int(i)) for i in touched], dtype=np.int64)
    order = np.argsort(roots, kind="stable")
    touched, roots = touched[order], roots[order]
    cuts = np.flatnonzero(np.diff(roots)) + 1
    groups = [g for g in np.split(touched, cuts) if g.size >= 2]
    groups.sort(key=lambda g: (-g.size, int(g[0])))
    return groups


def find_near_duplicates(
    sketches: np.ndarray,
    scorer: PairScorer,
    threshold: float = 0.98,
    *,
    partition: np.ndarray | None = None,
    neighbours: int = 10,
    candidate_margin: float = 0.2,
    flat_max: int = FLAT_MAX,
    nprobe: int = 16,
) -> DedupResult:
    """Groups of rows whose updates have exact cosine >= ``threshold`` (transitively), without O(N^2) work.

    Args:
        sketches: ``[N, D]`` unit sketches (:func:`smoa.compose.similarity.sketch_batch`).
        scorer: exact cosine of row pairs, e.g. :func:`smoa.compose.similarity.batched_cosine` over loaded
            factors.
        threshold: exact-cosine cut, in ``(-1, 1]``.
        partition: optional ``[N]`` labels (e.g. profile fingerprints); rows of different labels are never
            paired.
        neighbours: ANN neighbours per row.
        candidate_margin: candidates need sketch cosine >= ``threshold - candidate_margin``.
        flat_max, nprobe: as :func:`candidate_pairs`.
    """
    if not -1.0 < threshold <= 1.0:
        raise InvalidInputError(f"`threshold` must be in (-1, 1], got {threshold!r}")
    n = int(sketches.shape[0])
    labels = np.zeros(n, np.int64) if partition is None else np.unique(np.asarray(partition), return_inverse=True)[1]
    if labels.shape != (n,):
        raise InvalidInputError(f"`partition` must have one label per row ({n}), got shape {labels.shape}")
    t0 = time.perf_counter()
    parts = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        cut = threshold - candidate_margin
        p, _ = candidate_pairs(sketches[rows], neighbours, cut, flat_max=flat_max, nprobe=nprobe)
        parts.append(rows[p])
    cands = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    t1 = time.perf_counter()
    pairs, cos = verify_pairs(cands, scorer, threshold)
    t2 = time.perf_counter()
    groups = union_find_groups(n, pairs)
    t3 = time.perf_counter()
    return DedupResult(groups, pairs, cos, len(cands), {"search": t1 - t0, "verify": t2 - t1, "group": t3 - t2})
