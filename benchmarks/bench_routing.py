"""Routing speed and recall at 1K, 10K, 100K and 1M adapters, side by side with brute force.

Question: how fast is a route (encode apart, search+fuse apart, end to end), how much RAM does an adapter cost in
the index, and how many of the exact top-5 does the index return, as the library grows?

Library: "realistic clustered" 384-d unit keys: 2,000 topic centres, each key = normalise(centre + noise) with a
cosine of ~0.75 to its centre (sentence-embedding-like neighbourhoods); each adapter has a domain tag
``topic<c>`` and a skill tag. Queries are fresh draws around the same centres, phrased ``"... topic<c> ..."`` so
HYBRID's tag side fires. Single thread throughout (``OMP_NUM_THREADS=1``, faiss ``omp_set_num_threads(1)``).

* ``search``: :meth:`VectorIndex.search` alone; ``brute``: numpy float32 ``keys @ q`` + argpartition;
* ``search+fuse``: :meth:`Router.route` (HYBRID, route cache off) with the query embedding already known;
* ``e2e <enc>``: encoding a real sentence with ``<enc>`` + ``search+fuse``, timed together;
* ``recall@5``: overlap of the router's (SEMANTIC) top-5 with brute-force top-5 on the float32 keys.

Run: ``python benchmarks/bench_routing.py`` (~8 min) or ``--quick`` (1K and 10K only).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from smoa.config import SMoAConfig  # noqa: E402
from smoa.routing.encoders import get_encoder, l2_normalize  # noqa: E402
from smoa.routing.index import IndexParams, VectorIndex  # noqa: E402
from smoa.routing.router import Router  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 384
CENTRES = 2000
N_QUERIES = 500
SENTENCES = [
    "does this lung scan show signs of pneumonia",
    "review the termination clause of my lease",
    "will tech stocks rally after the earnings report",
    "fix the IndexError in my python list comprehension",
    "how long should sourdough proof before baking",
    "translate good morning into Japanese",
]


def clustered(n: int, centres: np.ndarray, rng: np.random.Generator, noise: float = 0.88) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors around random centres (cos to centre ~ 1/sqrt(1+noise^2)) and their centre ids."""
    c = rng.integers(0, len(centres), n)
    out = np.empty((n, centres.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        g = rng.standard_normal((e - s, centres.shape[1]), dtype=np.float32) * (noise / np.sqrt(centres.shape[1]))
        out[s:e] = l2_normalize(centres[c[s:e]] + g)
    return out, c


def pct(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 99))


def brute_topk(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = keys @ q  # [n]
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def bench_size(n: int, rng: np.random.Generator, centres: np.ndarray, encoders: dict, ef: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(1)
    keys, cid = clustered(n, centres, rng)
    qv, qc = clustered(N_QUERIES, centres, rng)
    texts = [f"question {i} about topic{c} please" for i, c in enumerate(qc)]
    cfg = SMoAConfig(encoder="hash", enable_caching=False, embedding_cache_size=N_QUERIES + 10, routing_threshold=-1.0,
                     routing_latency_budget_ms=1e9, max_active_adapters=5)
    router = Router(cfg, None, lambda ks: [f"ad_{k:07d}" for k in ks], params=IndexParams(ef_search=ef))
    router.encoder.prime(texts, qv)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # build with all cores, query with one
    t = time.perf_counter()
    router.add(np.arange(n, dtype=np.int64), keys, [([f"topic{c}"], ["skill"]) for c in cid], generation=1)
    build_s = time.perf_counter() - t
    faiss.omp_set_num_threads(1)
    index: VectorIndex = router._vectors
    out: dict = {"n": n, "kind": index.kind, "build_s": build_s, "bytes_per": index.memory_bytes() / n,
                 "tag_bytes_per": router._tags.memory_bytes() / n}

    search, brute, fuse, rec = [], [], [], []
    for i in range(N_QUERIES):
        q = qv[i]
        t = time.perf_counter()
        index.search(q[None, :], 5)
        search.append((time.perf_counter() - t) * 1e3)
        if i < (100 if n >= 1_000_000 else 300):
            t = time.perf_counter()
            exact = brute_topk(keys, q, 5)
            brute.append((time.perf_counter() - t) * 1e3)
            got = router.route(texts[i], strategy="semantic", k=5).adapter_ids
            rec.append(len({int(a[3:]) for a in got} & set(exact.tolist())) / 5)
        t = time.perf_counter()
        router.route(texts[i], strategy="hybrid", k=5)
        fuse.append((time.perf_counter() - t) * 1e3)
    out["search"], out["brute"], out["fuse"], out["recall"] = pct(search), pct(brute), pct(fuse), float(np.mean(rec))
    for name, enc in encoders.items():
        e2e = []
        for i in range(300):
            t = time.perf_counter()
            enc.encode([SENTENCES[i % len(SENTENCES)] + f" {i}"])
            router.route(texts[i], strategy="hybrid", k=5)
            e2e.append((time.perf_counter() - t) * 1e3)
        out[f"e2e {name}"] = pct(e2e)
    if n >= 1_000_000:
        sweep = []
        for ef_s in (16, 32, 48, 64, 96, 128):
            lat, r = [], []
            for i in range(100):
                t = time.perf_counter()
                _, got = index.search(qv[i][None, :], 5, ef_search=ef_s)
                lat.append((time.perf_counter() - t) * 1e3)
                r.append(len(set(got[0].tolist()) & set(brute_topk(keys, qv[i], 5).tolist())) / 5)
            sweep.append((ef_s, *pct(lat), float(np.mean(r))))
        out["sweep"] = sweep
    del router, keys
    return out


def encode_latency(encoders: dict) -> dict[str, tuple[float, float]]:
    res = {}
    for name, enc in encoders.items():
        enc.encode(["warm up"])
        lat = []
        for i in range(200):
            t = time.perf_counter()
            enc.encode([SENTENCES[i % len(SENTENCES)] + f" {i}"])
            lat.append((time.perf_counter() - t) * 1e3)
        res[name] = pct(lat)
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [r["n"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("search", "index search"), ("fuse", "search+fuse (hybrid)"), ("brute", "brute force")):
        a.plot(ns, [r[key][1] for r in results], "o-", label=f"{label} p99")
    for key in [k for k in results[0] if k.startswith("e2e")]:
        a.plot(ns, [r[key][1] for r in results], "s--", label=f"{key} p99")
    a.axhline(1.0, color="grey", lw=0.8, ls=":")
    a.set(xscale="log", yscale="log", xlabel="adapters", ylabel="ms (single thread)", title="routing latency")
    a.legend(fontsize=8)
    b.plot(ns, [r["recall"] for r in results], "o-", label="router recall@5 vs exact")
    b.axhline(0.95, color="grey", lw=0.8, ls=":")
    b.set(xscale="log", ylim=(0.8, 1.01), xlabel="adapters", ylabel="recall@5", title="recall vs brute force")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1K and 10K only")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--ef", type=int, default=IndexParams().ef_search)
    ap.add_argument("--plot", default=str(ROOT / "docs" / "bench_routing.png"))
    args = ap.parse_args(argv)
    sizes = [1000, 10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    centres = l2_normalize(rng.standard_normal((CENTRES, DIM)).astype(np.float32))
    encoders = {"static": get_encoder("static"), "minilm-int8": get_encoder("minilm-int8")}
    enc_lat = encode_latency(encoders)
    print("encode one sentence (ms p50 / p99):", ", ".join(f"{k} {v[0]:.3f} / {v[1]:.3f}" for k, v in enc_lat.items()))
    print(f"\nHNSW efSearch={args.ef}, exact below {IndexParams().exact_threshold:,} keys, k=5, {N_QUERIES} queries\n")
    head = ("| adapters | index | build s | B/adapter (index) | B/adapter (tags) | search p50/p99 ms | brute p50/p99 ms | "
            "brute/search p99 | search+fuse p50/p99 ms | " + " | ".join(f"e2e {e} p50/p99 ms" for e in encoders)
            + " | recall@5 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results = []
    for n in sizes:
        r = bench_size(n, rng, centres, encoders, args.ef)
        results.append(r)
        e2e = " | ".join(f"{r[f'e2e {e}'][0]:.3f} / {r[f'e2e {e}'][1]:.3f}" for e in encoders)
        print(f"| {n:,} | {r['kind']} | {r['build_s']:.1f} | {r['bytes_per']:.0f} | {r['tag_bytes_per']:.0f} | "
              f"{r['search'][0]:.3f} / {r['search'][1]:.3f} | {r['brute'][0]:.3f} / {r['brute'][1]:.3f} | "
              f"{r['brute'][1] / r['search'][1]:.1f}x | {r['fuse'][0]:.3f} / {r['fuse'][1]:.3f} | {e2e} | "
              f"{r['recall']:.3f} |", flush=True)
    for r in results:
        if "sweep" in r:
            print(f"\nefSearch sweep at {r['n']:,} (index search only, 100 queries)\n")
            print("| efSearch | p50 ms | p99 ms | recall@5 |\n|---|---|---|---|")
            for ef_s, p50, p99, rc in r["sweep"]:
                print(f"| {ef_s} | {p50:.3f} | {p99:.3f} | {rc:.3f} |")
    if len(results) > 1:
        grow = results[-1]["fuse"][1] / results[0]["fuse"][1]
        print(f"\nsearch+fuse p99 growth {results[0]['n']:,} -> {results[-1]['n']:,}: {grow:.2f}x")
        plot(results, Path(args.plot))
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
