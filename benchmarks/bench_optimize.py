"""Can the library find its near-duplicate adapters at 100K-1M scale, and how well does each merge method merge?

Builds N NANO adapters (rank 2, the default profile's NANO modules, A Kaiming-uniform, B random non-zero) in
chunks, deterministically from a seed, never holding them all in memory. In every chunk 5 % are planted
near-duplicates (source + 5 % relative noise on A and B; cosine ~0.997) and, by default, another 5 % are hard
negatives (same A as a source, B = 0.75 B_src + 0.25 B_other; cosine ~0.95, below the 0.98 threshold). Then:

1. sketch every adapter through its factors (smoa.compose.similarity.sketch_batch), streamed chunk by chunk;
2. ANN candidate search over the sketches (faiss; flat below 50K rows, IVF above);
3. exact factored cosine on the candidates (factors re-generated chunk by chunk, as a store would load them);
4. union-find groups; precision / recall against the planted pairs; bytes a merge would free.

Side by side: on a subset, exact all-pairs search (brute force Gram matrices) vs the pipeline: time and the
pipeline's recall against the exact answer. Finally the merge error of every method on found duplicate pairs
(mean weights) and on random triples of unrelated adapters (weights 1/3, like a routed mixture).

    python benchmarks/bench_optimize.py             # 100K adapters (a few minutes on 2 cores)
    python benchmarks/bench_optimize.py --full      # 1M adapters
    python benchmarks/bench_optimize.py --quick     # 10K adapters
"""

from __future__ import annotations

import argparse
import math
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from smoa.adapter.granularity import select_modules
from smoa.adapter.profile import default_profile
from smoa.compose.merge import METHODS, combine, combine_mean, merge_error
from smoa.compose.similarity import LoraStack, batched_cosine, sketch_batch
from smoa.config import AdapterGranularity
from smoa.optimize.dedup import find_near_duplicates

RANK, ALPHA = 2, 4.0


@dataclass
class Setup:
    n: int
    chunk: int
    modules: list[tuple[str, int, int]]  # (name, d_in, d_out)
    dup_frac: float
    hard_frac: float
    seed: int
    dup_noise: float = 0.05

    @property
    def chunks(self) -> int:
        return math.ceil(self.n / self.chunk)


def make_chunk(s: Setup, c: int) -> tuple[LoraStack, np.ndarray, np.ndarray]:
    """Adapters ``[c*chunk, ...)``: ``(stack, planted duplicate pairs [P, 2], hard-negative pairs [H, 2])`` (global ids)."""
    lo = c * s.chunk
    n = min(s.n, lo + s.chunk) - lo
    g = torch.Generator().manual_seed(s.seed * 1_000_003 + c)
    perm = np.random.default_rng([s.seed, c]).permutation(n)
    nd, nh = int(round(s.dup_frac * n)), int(round(s.hard_frac * n))
    dups, dsrc = perm[:nd], perm[nd : 2 * nd]
    hard, hsrc, hoth = perm[2 * nd : 2 * nd + nh], perm[2 * nd + nh : 2 * nd + 2 * nh], perm[2 * nd + 2 * nh : 2 * nd + 3 * nh]
    factors = {}
    for name, d_in, d_out in s.modules:
        a = (torch.rand(n, RANK, d_in, generator=g) * 2 - 1) / math.sqrt(d_in)  # Kaiming-uniform(a=sqrt(5))
        b = torch.randn(n, d_out, RANK, generator=g) * 0.02
        a[dups] = a[dsrc] + s.dup_noise * a[dups]  # the dup's own draw is the noise
        b[dups] = b[dsrc] + s.dup_noise * b[dups]
        a[hard] = a[hsrc]
        b[hard] = 0.75 * b[hsrc] + 0.25 * b[hoth]
        factors[name] = (a, b)
    stack = LoraStack(factors, torch.full((n,), ALPHA / RANK, dtype=torch.float64))
    return stack, np.stack([lo + dups, lo + dsrc], 1), np.stack([lo + hard, lo + hsrc], 1)


class ChunkStore:
    """Loads adapters by global id, re-generating their chunk (a few chunks kept)."""

    def __init__(self, s: Setup, keep: int = 4) -> None:
        self.s, self.keep = s, keep
        self.cache: OrderedDict[int, LoraStack] = OrderedDict()

    def chunk(self, c: int) -> LoraStack:
        if c not in self.cache:
            self.cache[c] = make_chunk(self.s, c)[0]
            if len(self.cache) > self.keep:
                self.cache.popitem(last=False)
        self.cache.move_to_end(c)
        return self.cache[c]

    def gather(self, ids: np.ndarray) -> LoraStack:
        parts, order = [], []
        for c in np.unique(ids // self.s.chunk):
            rows = np.flatnonzero(ids // self.s.chunk == c)
            parts.append(self.chunk(int(c)).select(ids[rows] - c * self.s.chunk))
            order.append(rows)
        perm = np.argsort(np.concatenate(order))
        mods = parts[0].factors
        return LoraStack(
            {m: (torch.cat([p.factors[m][0] for p in parts])[perm], torch.cat([p.factors[m][1] for p in parts])[perm]) for m in mods},
            torch.cat([p.scaling for p in parts])[perm],
        )

    def cosine(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return batched_cosine(self.gather(left), self.gather(right)).numpy()


def exact_all_pairs(stack: LoraStack, threshold: float) -> set[tuple[int, int]]:
    """Every pair with update cosine >= threshold, by brute force (full Gram matrices through the factors)."""
    n = len(stack)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for a, b in stack.factors.values():
        ga = a.double().reshape(n * RANK, -1) @ a.double().reshape(n * RANK, -1).T  # [nr, nr]
        bt = b.double().transpose(1, 2).reshape(n * RANK, -1)
        gb = bt @ bt.T
        gram += (ga * gb).reshape(n, RANK, n, RANK).sum(dim=(1, 3))
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None, :])
    i, j = torch.nonzero(torch.triu(cos >= threshold, diagonal=1), as_tuple=True)
    return set(zip(i.tolist(), j.tolist()))


def pair_set(p: np.ndarray) -> set[tuple[int, int]]:
    return {(min(int(a), int(b)), max(int(a), int(b))) for a, b in p}


def adapter_bytes(s: Setup) -> int:
    stack = make_chunk(Setup(1, 1, s.modules, 0.0, 0.0, 0), 0)[0]
    return len(stack.unstack(0).to_bytes())


def run_dedup(s: Setup, threshold: float, dim: int, neighbours: int) -> dict[str, float]:
    t = time.perf_counter()
    sketches = np.zeros((s.n, dim), np.float32)
    planted, hard = [], []
    gen_s = sk_s = 0.0
    profile = default_profile()
    for c in range(s.chunks):
        t0 = time.perf_counter()
        stack, dups, hn = make_chunk(s, c)
        t1 = time.perf_counter()
        sketches[c * s.chunk : c * s.chunk + len(stack)] = sketch_batch(stack, profile, dim)
        gen_s += t1 - t0
        sk_s += time.perf_counter() - t1
        planted.append(dups)
        hard.append(hn)
    truth = pair_set(np.concatenate(planted))
    store = ChunkStore(s)

    def scorer(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        order = np.lexsort((right // s.chunk, left // s.chunk))  # load each chunk about once
        out = np.empty(len(left))
        out[order] = store.cosine(left[order], right[order])
        return out

    res = find_near_duplicates(sketches, scorer, threshold, neighbours=neighbours)
    found = pair_set(res.pairs)
    in_group = np.full(s.n, -1)
    for gi, grp in enumerate(res.groups):
        in_group[grp] = gi
    recall = np.mean([in_group[a] >= 0 and in_group[a] == in_group[b] for a, b in truth])
    precision = len(found & truth) / max(len(found), 1)
    hard_pairs = pair_set(np.concatenate(hard))
    hard_cos = store.cosine(np.array([p[0] for p in hard_pairs]), np.array([p[1] for p in hard_pairs]))
    dup_cos = store.cosine(np.array([p[0] for p in truth]), np.array([p[1] for p in truth]))
    nbytes = adapter_bytes(s)
    freed = sum(len(grp) - 1 for grp in res.groups) * nbytes
    return {
        "n": s.n, "planted": len(truth), "hard": len(hard_pairs), "hard_cos_max": float(hard_cos.max()),
        "dup_cos_min": float(dup_cos.min()),
        "gen_s": gen_s, "sketch_s": sk_s, "search_s": res.timings["search"], "verify_s": res.timings["verify"],
        "group_s": res.timings["group"], "pipeline_s": sk_s + sum(res.timings.values()),
        "candidates": res.candidates, "found_pairs": len(found), "groups": len(res.groups),
        "precision": precision, "recall": float(recall), "bytes_freed": freed, "adapter_bytes": nbytes,
        "wall_s": time.perf_counter() - t, "found": res.pairs,
    }  # fmt: skip


def run_exact_check(s: Setup, n_sub: int, threshold: float, dim: int, neighbours: int) -> dict[str, float]:
    """Brute force vs the pipeline on the first ``n_sub`` adapters."""
    sub = Setup(n_sub, n_sub, s.modules, s.dup_frac, s.hard_frac, s.seed, s.dup_noise)
    stack = make_chunk(sub, 0)[0]
    t0 = time.perf_counter()
    exact = exact_all_pairs(stack, threshold)
    t1 = time.perf_counter()
    sk = sketch_batch(stack, default_profile(), dim)
    res = find_near_duplicates(sk, lambda a, b: batched_cosine(stack.select(a), stack.select(b)).numpy(), threshold,
                               neighbours=neighbours)  # fmt: skip
    t2 = time.perf_counter()
    found = pair_set(res.pairs)
    return {"n_sub": n_sub, "exact_pairs": len(exact), "brute_s": t1 - t0, "pipeline_s": t2 - t1,
            "recall_vs_exact": len(found & exact) / max(len(exact), 1),
            "precision_vs_exact": len(found & exact) / max(len(found), 1)}  # fmt: skip


def run_merge_errors(s: Setup, found: np.ndarray, trials: int) -> list[dict[str, float]]:
    """Per method: error of the mean update of found duplicate pairs and of unrelated triples (``combine_mean``,
    as the optimizer merges), and of triples combined as given at weights 1/3 (PEFT semantics)."""
    store = ChunkStore(s)
    rng = np.random.default_rng(s.seed)
    pairs = found[rng.choice(len(found), size=min(trials, len(found)), replace=False)] if len(found) else found
    triples = rng.choice(min(s.n, s.chunk), size=(trials, 3), replace=True)
    groups = [[stack.unstack(i) for i in range(len(m))] for m in (*pairs, *triples) for stack in [store.gather(np.asarray(m))]]
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny factorisations: thread hand-offs cost more than they save on a busy box
    for method, info in METHODS.items():
        errs: dict[str, list[float]] = {"dup": [], "tri_mean": [], "tri_given": []}
        secs = []
        combine_mean(groups[0], method)  # warm-up (first LAPACK call initialises)
        for ads in groups:
            mean_w = [1.0 / len(ads)] * len(ads)
            t0 = time.perf_counter()
            merged = combine_mean(ads, method)
            secs.append(time.perf_counter() - t0)
            errs["dup" if len(ads) == 2 else "tri_mean"].append(merge_error(ads, mean_w, merged))
            if len(ads) == 3:
                errs["tri_given"].append(merge_error(ads, mean_w, combine(ads, mean_w, method)))
        rows.append({"method": method, "exact": info.exact, "rank": merged.rank, "ms": 1e3 * float(np.mean(secs)),
                     **{k: float(np.mean(v)) if v else float("nan") for k, v in errs.items()}})  # fmt: skip
    torch.set_num_threads(threads)
    return rows


def run_library(s: Setup, n_lib: int, threshold: float) -> dict[str, float]:
    """The same planted set in a real AdapterLibrary, then ``optimize_library`` (merge only, method svd)."""
    import tempfile

    from smoa.config import SMoAConfig
    from smoa.library import AdapterLibrary, AdapterSpec
    from smoa.optimize.optimizer import optimize_library

    sub = Setup(n_lib, n_lib, s.modules, s.dup_frac, s.hard_frac, s.seed, s.dup_noise)
    stack, dups, _ = make_chunk(sub, 0)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = SMoAConfig(storage_path=tmp, seed=0, max_loaded_adapters=1000, cache_max_bytes=64 << 20)
        with AdapterLibrary(cfg, default_profile()) as lib:
            t0 = time.perf_counter()
            specs = [AdapterSpec(weights=stack.unstack(i), domain_tags=[f"t{i % 97}"]) for i in range(n_lib)]
            ids = [a.id for a in lib.create_many(specs)]
            t1 = time.perf_counter()
            report = optimize_library(lib, prune=False, threshold=threshold, method="svd")
            t2 = time.perf_counter()
            truth = {frozenset((ids[a], ids[b])) for a, b in dups}
            found = {frozenset(g) for g in report.groups_merged}
            resolved = sum(lib.resolve(ids[a]) == lib.resolve(ids[b]) for a, b in dups)
            return {"n": n_lib, "create_s": t1 - t0, "optimize_s": t2 - t1, "merged": len(report.groups_merged),
                    "precision": len(found & truth) / max(len(found), 1), "recall": resolved / max(len(truth), 1),
                    "bytes_freed": report.bytes_freed, "max_err": max(report.merge_errors, default=0.0),
                    "total_after": lib.total_adapters, **{f"{k}_s": v for k, v in report.timings.items()}}  # fmt: skip


def run_trained(folder: Path | None = None) -> tuple[list[str], np.ndarray, np.ndarray, list[dict[str, float]]] | None:
    """On the shipped trained adapters (if present): exact vs sketch cosines, and merge errors of every method."""
    from smoa.compose.similarity import cosine, sketch
    from smoa.data.shipped import load_shipped_adapters

    try:
        shipped = load_shipped_adapters(folder)
    except (FileNotFoundError, OSError):
        return None
    names = [a.name for a in shipped]
    ws = [a.weights for a in shipped]
    n = len(ws)
    exact = np.array([[cosine(x, y) for y in ws] for x in ws])
    profile = default_profile()
    sk = np.stack([sketch(w, profile, 64) for w in ws])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for method, info in METHODS.items():
        pair_err = [merge_error([ws[i], ws[j]], [0.5, 0.5], combine_mean([ws[i], ws[j]], method)) for i, j in pairs]
        t0 = time.perf_counter()
        merged = combine_mean(ws, method)
        ms = 1e3 * (time.perf_counter() - t0)
        rows.append({"method": method, "exact": info.exact, "rank": merged.rank, "pair": float(np.mean(pair_err)),
                     "all": merge_error(ws, [1.0 / n] * n, merged), "ms": ms})  # fmt: skip
    torch.set_num_threads(threads)
    return names, exact, sk @ sk.T, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10K adapters")
    ap.add_argument("--full", action="store_true", help="1M adapters")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--dup-frac", type=float, default=0.05)
    ap.add_argument("--hard-frac", type=float, default=0.05)
    ap.add_argument("--dup-noise", type=float, default=0.05, help="relative noise of planted duplicates "
                    "(0.05: cosine ~0.997; 0.12: ~0.986, just above the 0.98 threshold)")
    ap.add_argument("--threshold", type=float, default=0.98)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--neighbours", type=int, default=10)
    ap.add_argument("--exact-subset", type=int, default=4000)
    ap.add_argument("--merge-trials", type=int, default=50)
    ap.add_argument("--library", type=int, default=None, help="adapters in the real-library run (default 5K; 1K quick)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.n or (10_000 if args.quick else 1_000_000 if args.full else 100_000)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    profile = default_profile()
    modules = [(m, *profile.shape(m)) for m in select_modules(profile, AdapterGranularity.NANO, RANK)]
    s = Setup(n, args.chunk, modules, args.dup_frac, args.hard_frac, args.seed, args.dup_noise)
    params = sum(RANK * (i + o) for _, i, o in modules)
    print(f"# bench_optimize: N={n:,} NANO adapters, rank {RANK}, {len(modules)} modules, {params:,} params each; "
          f"{args.dup_frac:.0%} planted duplicates (noise {args.dup_noise}), {args.hard_frac:.0%} hard negatives; threshold {args.threshold}, "
          f"sketch dim {args.dim}, {args.neighbours} neighbours; torch threads {torch.get_num_threads()}")  # fmt: skip

    r = run_dedup(s, args.threshold, args.dim, args.neighbours)
    print("\n## Near-duplicate search")
    print("| N | planted dup pairs (min cos) | hard negatives (max cos) | candidates verified | found pairs | groups | precision "
          "| recall | sketch s | ANN search s | verify s | group s | pipeline s | (generation s) | bytes freed by merging |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {r['n']:,} | {r['planted']:,} ({r['dup_cos_min']:.3f}) | {r['hard']:,} ({r['hard_cos_max']:.3f}) | {r['candidates']:,} | "
          f"{r['found_pairs']:,} | {r['groups']:,} | {r['precision']:.4f} | {r['recall']:.4f} | {r['sketch_s']:.1f} | "
          f"{r['search_s']:.1f} | {r['verify_s']:.1f} | {r['group_s']:.2f} | {r['pipeline_s']:.1f} | {r['gen_s']:.1f} | "
          f"{r['bytes_freed']:,} ({r['bytes_freed'] / (r['n'] * r['adapter_bytes']):.1%}) |")  # fmt: skip

    if args.exact_subset:
        e = run_exact_check(s, min(args.exact_subset, n), args.threshold, args.dim, args.neighbours)
        scale = (n / e["n_sub"]) ** 2
        print("\n## Side by side on a subset: exact all-pairs (brute force) vs sketch + ANN + verify")
        print("| subset | exact pairs >= threshold | brute force s | pipeline s | speed-up | pipeline recall vs exact "
              "| precision vs exact | brute force extrapolated to N (n^2) | pipeline at N (measured) | ratio at N |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {e['n_sub']:,} | {e['exact_pairs']:,} | {e['brute_s']:.2f} | {e['pipeline_s']:.2f} | "
              f"{e['brute_s'] / e['pipeline_s']:.1f}x | {e['recall_vs_exact']:.4f} | {e['precision_vs_exact']:.4f} | "
              f"{e['brute_s'] * scale:,.0f} s | {r['pipeline_s']:.1f} s | {e['brute_s'] * scale / r['pipeline_s']:,.0f}x |")  # fmt: skip

    n_lib = args.library if args.library is not None else (1000 if args.quick else 5000)
    if n_lib:
        lr = run_library(s, n_lib, args.threshold)
        print("\n## The same, end to end through AdapterLibrary + optimize_library (merge only, svd, SQLite on disk)")
        print("| adapters | create_many s | optimize_library s | (dedup s / merge s) | groups merged | precision "
              "| recall (old ids resolve together) | max merge error | bytes freed | adapters after |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(f"| {lr['n']:,} | {lr['create_s']:.1f} | {lr['optimize_s']:.1f} | {lr.get('dedup_s', 0):.1f} / "
              f"{lr.get('merge_s', 0):.1f} | {lr['merged']:,} | {lr['precision']:.4f} | {lr['recall']:.4f} | "
              f"{lr['max_err']:.2e} | {lr['bytes_freed']:,} | {lr['total_after']:,} |")  # fmt: skip

    rows = run_merge_errors(s, r["found"], args.merge_trials)
    print(f"\n## Merge error ||merged - target||_F / ||target||_F (mean over {args.merge_trials} merges per column)")
    print("target = the members' mean update. 'mean' columns use combine_mean (what optimize_library does: factor-space "
          "methods get weights 1/n^2, TIES ones 1); the last column passes w = 1/3 as given (PEFT semantics).")
    print("| method | exact when | output rank | found duplicate pairs, mean | unrelated triples, mean "
          "| unrelated triples, w = 1/3 as given | ms per merge (1 thread) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['exact']} | {row['rank']} | {row['dup']:.2e} | {row['tri_mean']:.2e} | "
              f"{row['tri_given']:.2e} | {row['ms']:.1f} |")
    trained = run_trained()
    if trained is not None:
        names, exact, approx, trows = trained
        off = ~np.eye(len(names), dtype=bool)
        print(f"\n## Real trained adapters ({len(names)} shipped: {', '.join(names)})")
        print(f"update cosines between different adapters: exact min {exact[off].min():.3f} / mean "
              f"{exact[off].mean():.3f} / max {exact[off].max():.3f}; sketch (dim 64) mean abs error "
              f"{np.abs(exact - approx)[off].mean():.3f}")  # fmt: skip
        print("| method | exact when | output rank | all pairs, mean update (mean error) | all adapters, mean update "
              "| ms (all, 1 thread) |")
        print("|---|---|---|---|---|---|")
        for row in trows:
            print(f"| {row['method']} | {row['exact']} | {row['rank']} | {row['pair']:.2e} | {row['all']:.2e} | {row['ms']:.1f} |")
    else:
        print("\n(no shipped trained adapters found in smoa/data/adapters: real-adapter merge errors skipped)")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {rss:,.0f} MB; total wall {r['wall_s']:.1f} s for the search stage")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
