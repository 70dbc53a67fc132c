"""What does laying the HNSW index's keys out by locality buy a walk?

A big HNSW build (``smoa.routing.index.vector.LAYOUT_MIN_KEYS`` keys on) permutes its positions so that near keys
sit near each other in memory (two-level k-means, :func:`smoa.routing.index.vector._locality_order`); the graph is
the same. This script builds one :class:`VectorIndex` over ``--keys`` realistic keys (the blends of real sentence
embeddings of ``bench_routing.py``), makes its twin in build order (the same faiss graph, permuted back), and
walks both side by side: each query on both, the order alternating, on one query thread, wall clock.

    python benchmarks/bench_layout.py                  # 1,000,000 keys (~7 min, most of it the graph's build)
    python benchmarks/bench_layout.py --keys 100000    # ~1 min

Prints the build's seconds (the layout's apart) and one row per layout and efSearch: p50 / p99 ms of
:meth:`VectorIndex.search` (walk + re-score) and recall@5 against the exact top-5 over the float keys.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_routing  # noqa: E402  (the realistic keys and queries)

from smoa.routing.index import VectorIndex  # noqa: E402
import smoa.routing.index.vector as vector_mod  # noqa: E402


def build_order_twin(index: VectorIndex) -> VectorIndex:
    """The same faiss graph with its positions back in build order (ids ``0..n-1`` were given in that order)."""
    return index.permuted(index.layout_snapshot(), np.argsort(index._ids[: index._n].astype(np.int64)))


def main(argv: list[str] | None = None) -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=500, help="held-out real texts' embeddings (at most 500)")
    ap.add_argument("--rounds", type=int, default=3, help="passes over the queries per efSearch")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    pool = bench_routing.Pool()
    keys, _ = pool.keys(args.keys, rng)
    _, qv = pool.queries(min(args.queries, bench_routing.N_QUERIES), rng)
    exact = bench_routing.exact_topk(keys, qv, 5)

    layout_s = []
    plain_order = vector_mod._locality_order

    def timed_order(x: np.ndarray, seed: int = 0) -> np.ndarray:
        t = time.perf_counter()
        try:
            return plain_order(x, seed)
        finally:
            layout_s.append(time.perf_counter() - t)

    vector_mod._locality_order = timed_order
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # build with all cores, query with one
    t = time.perf_counter()
    laid = VectorIndex.build(keys.shape[1], np.arange(args.keys), keys)
    build_s = time.perf_counter() - t
    vector_mod._locality_order = plain_order
    faiss.omp_set_num_threads(1)
    if not layout_s:
        print(f"{args.keys:,} keys: under the layout's threshold ({vector_mod.LAYOUT_MIN_KEYS:,}), nothing to compare")
        return 0
    plain = build_order_twin(laid)
    print(f"{args.keys:,} keys ({laid.kind}): built in {build_s:.0f} s, of which the layout {layout_s[0]:.1f} s; "
          f"{len(qv)} queries x {args.rounds} rounds per efSearch, each on both indexes (order alternating)\n")
    indexes = {"locality (default)": laid, "build order": plain}
    print("| layout | efSearch | search p50 ms | search p99 ms | recall@5 |")
    print("|---|---|---|---|---|")
    for ef in (64, 128, 192):
        lat: dict[str, list[float]] = {name: [] for name in indexes}
        got: dict[str, list[np.ndarray]] = {name: [] for name in indexes}
        names = list(indexes)
        for r in range(args.rounds):
            for i in range(len(qv)):
                for name in names if (i + r) % 2 == 0 else names[::-1]:
                    t = time.perf_counter()
                    _, g = indexes[name].search(qv[i : i + 1], 5, ef_search=ef)
                    lat[name].append((time.perf_counter() - t) * 1e3)
                    if r == 0:
                        got[name].append(g[0])
        for name in names:
            p50, p99 = np.percentile(lat[name], [50, 99])
            rec = bench_routing.recall(np.array(got[name]), exact)
            print(f"| {name} | {ef} | {p50:.3f} | {p99:.3f} | {rec:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
