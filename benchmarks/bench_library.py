"""How fast does the library ingest and load nano adapters as it grows to 1,000,000?

Bulk-creates NANO adapters (rank 2, float16) in transactions of `--chunk`, growing one persistent library through
the checkpoint sizes; at each checkpoint it measures the ingestion rate, database size and peak RSS, then cold
(not in the weight cache: SQLite read + sha256 check + safetensors parse) and warm (cache hit) `get_adapter` +
`get_weights` latency p50/p99 on random ids. Prints one table.

    python benchmarks/bench_library.py                # 1K, 100K, 1M (about 2-3 minutes, ~3.5 GB of disk)
    python benchmarks/bench_library.py --quick        # 1K, 10K, 50K
    python benchmarks/bench_library.py --core         # the core (issue 10): warm route -> mixture, SQL per warm
                                                      # request, bulk-create peak RSS, ingestion, compaction

The ``--core`` table (20,000 NANO adapters by default, ``--core-size``):

* warm route -> mixture at k = 3: per request, total and outside the router (the core's directory + weight
  cache), on a route-cache hit with every weight cached;
* SQL statements per warm request, counted with ``sqlite3.Connection.set_trace_callback`` (target 0);
* peak RSS of one bulk create of all of them, measured in a fresh subprocess, against the weights' size;
* bulk ingestion rate through the core (routing keys encoded, rows streamed in chunks, one transaction);
* compaction: catalog bytes before and after deleting half of them and ``compact()``.
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from smoa import AdapterSpec, SMoAConfig
from smoa.library import AdapterLibrary

VOCAB = ["medical", "legal", "finance", "code", "cooking", "travel", "sports", "music", "science", "history",
         "radiology", "contract", "trading", "python", "baking", "hotels", "football", "jazz", "physics", "war"]  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def measure_loads(lib: AdapterLibrary, ids: list[str], n: int, rng: random.Random) -> dict[str, float]:
    sample = rng.sample(ids, min(n, len(ids)))
    lib.cache.clear()
    cold, warm, meta = [], [], []
    for aid in sample:
        t0 = time.perf_counter()
        lib.get_adapter(aid)
        t1 = time.perf_counter()
        lib.get_weights(aid)
        t2 = time.perf_counter()
        lib.get_weights(aid)
        t3 = time.perf_counter()
        meta.append((t1 - t0) * 1e3)
        cold.append((t2 - t1) * 1e3)
        warm.append((t3 - t2) * 1e3)
    return {"meta_p50": pct(meta, 50), "meta_p99": pct(meta, 99), "cold_p50": pct(cold, 50),
            "cold_p99": pct(cold, 99), "hit_p50": pct(warm, 50), "hit_p99": pct(warm, 99)}  # fmt: skip


def _core_specs(n: int, rng: random.Random) -> list[AdapterSpec]:
    module = ["model.layers.15.self_attn.v_proj"]
    return [AdapterSpec(domain_tags=[rng.choice(VOCAB)], skill_tags=[rng.choice(VOCAB)], rank=2, target_modules=module)
            for _ in range(n)]  # fmt: skip


def bulk_rss(n: int, root: Path) -> dict[str, float]:
    """In this (fresh) process: RSS before, peak RSS during one bulk create of ``n`` nano adapters, their bytes."""
    from smoa.core import LibraryCore

    core = LibraryCore(SMoAConfig(storage_path=root, max_adapters=n + 10, adapter_dtype="float16", seed=0,
                                  encoder="hash"))  # fmt: skip
    specs = _core_specs(n, random.Random(1))
    core.delete_many([a.id for a in core.create_many(_core_specs(50, random.Random(2)))])  # lazy imports done
    before = _rss_now()
    t0 = time.perf_counter()
    made = core.create_many(specs)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = int(core.catalog._read("SELECT SUM(nbytes) FROM adapters")[0][0] or 0)
    core.close()
    return {"n": len(made), "before": before, "peak": peak, "weights": weights, "seconds": seconds}


def _rss_now() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    return 0.0


def core_table(n: int, root: Path, requests: int = 2000) -> None:
    """The issue-10 figures (module docstring)."""
    import json
    import subprocess

    from smoa.core import LibraryCore

    rng = random.Random(0)
    out = subprocess.run([sys.executable, __file__, "--bulk-rss", str(n), "--dir", str(root)], check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    rss = json.loads(out.strip().splitlines()[-1])
    core = LibraryCore(SMoAConfig(storage_path=root / "lib", max_adapters=n + 10, adapter_dtype="float16", seed=0,
                                  encoder="hash", max_loaded_adapters=1000))  # fmt: skip
    t0 = time.perf_counter()
    made = core.create_many(_core_specs(n, rng))
    ingest = n / (time.perf_counter() - t0)
    queries = [f"{rng.choice(VOCAB)} {rng.choice(VOCAB)}" for _ in range(20)]
    for q in queries:  # warm: route cache and weight cache hold everything these routes need
        core.mixture(core.route(q, k=3))
    core.flush_usage()
    statements: list[str] = []
    core.catalog._db.set_trace_callback(statements.append)
    total, router_s = 0.0, 0.0
    real_route = core.router.route

    def timed_route(*a: object, **k: object) -> object:
        nonlocal router_s
        t = time.perf_counter()
        r = real_route(*a, **k)
        router_s += time.perf_counter() - t
        return r

    core.router.route = timed_route  # type: ignore[method-assign]
    for i in range(requests):
        t = time.perf_counter()
        core.mixture(core.route(queries[i % len(queries)], k=3))
        total += time.perf_counter() - t
    core.router.route = real_route  # type: ignore[method-assign]
    core.catalog._db.set_trace_callback(None)
    per_us, outside_us = total / requests * 1e6, (total - router_s) / requests * 1e6
    db = root / "lib" / "catalog.sqlite3"
    core.flush_usage()
    core.catalog.compact()
    size_full = db.stat().st_size
    core.delete_many([a.id for a in made[::2]])
    t = time.perf_counter()
    reclaimed = core.compact()
    compact_s = time.perf_counter() - t
    size_half = db.stat().st_size
    core.close()
    print(f"LibraryCore, {n:,} NANO adapters (rank 2, 1 module, float16), hash encoder, k = 3")
    print(f"{'measure':<46} {'value':>14}")
    print(f"{'warm route -> mixture per request (µs)':<46} {per_us:>14.1f}")
    print(f"{'  of which outside the router (µs)':<46} {outside_us:>14.1f}")
    print(f"{'SQL statements per warm request':<46} {len(statements) / requests:>14.3f}")
    print(f"{'bulk create: weights (MiB)':<46} {rss['weights'] / 2**20:>14.1f}")
    print(f"{'bulk create: peak RSS - RSS before (MiB)':<46} {(rss['peak'] - rss['before']) / 2**20:>14.1f}")
    print(f"{'  ratio to the weights':<46} {(rss['peak'] - rss['before']) / max(rss['weights'], 1):>14.2f}")
    print(f"{'bulk ingestion, fresh process (adapters/s)':<46} {rss['n'] / rss['seconds']:>14,.0f}")
    print(f"{'bulk ingestion, into a library (adapters/s)':<46} {ingest:>14,.0f}")
    print(f"{'catalog MiB: full / half deleted + compact':<46} {size_full / 2**20:>6.1f} / {size_half / 2**20:>5.1f}")
    print(f"{'compact(): bytes reclaimed (MiB), seconds':<46} {reclaimed / 2**20:>6.1f} / {compact_s:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--core", action="store_true", help="the core's figures (issue 10) instead of the growth table")
    ap.add_argument("--core-size", type=int, default=20_000)
    ap.add_argument("--bulk-rss", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the library (deleted afterwards)")
    args = ap.parse_args(argv)
    if args.bulk_rss:
        import json

        where = Path(tempfile.mkdtemp(prefix="smoa-rss-", dir=args.dir))
        try:
            print(json.dumps(bulk_rss(args.bulk_rss, where / "lib")))
        finally:
            shutil.rmtree(where, ignore_errors=True)
        return 0
    if args.core:
        where = Path(tempfile.mkdtemp(prefix="smoa-bench-", dir=args.dir))
        try:
            core_table(args.core_size, where)
        finally:
            shutil.rmtree(where, ignore_errors=True)
        return 0
    sizes = args.sizes or ([1_000, 10_000, 50_000] if args.quick else [1_000, 100_000, 1_000_000])
    root = Path(tempfile.mkdtemp(prefix="smoa-bench-", dir=args.dir))
    rng = random.Random(0)
    cfg = SMoAConfig(storage_path=root / "lib", max_adapters=max(sizes), adapter_dtype="float16", seed=0)
    lib = AdapterLibrary(cfg)
    module = ["model.layers.15.self_attn.v_proj"]  # one module at rank 2: 1,536 parameters, the NANO floor region
    ids: list[str] = []
    rows = []
    ingest_s = 0.0
    try:
        for size in sizes:
            while len(ids) < size:
                n = min(args.chunk, size - len(ids))
                specs = [AdapterSpec(domain_tags=[rng.choice(VOCAB)], skill_tags=[rng.choice(VOCAB)], rank=2,
                                     target_modules=module) for _ in range(n)]  # fmt: skip
                t0 = time.perf_counter()
                made = lib.create_many(specs)
                ingest_s += time.perf_counter() - t0
                ids += [a.id for a in made]
                print(f"  {len(ids):>9,} adapters, {len(ids) / ingest_s:,.0f}/s", file=sys.stderr, end="\r")
            db = sum(p.stat().st_size for p in (root / "lib").iterdir() if p.is_file())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            loads = measure_loads(lib, ids, args.samples, rng)
            rows.append((size, len(ids) / ingest_s, db / 2**20, db / len(ids), rss, loads))
        print(file=sys.stderr)
        print(f"NANO adapters: rank 2, 1 module (1,536 parameters), float16; bulk transactions of {args.chunk:,}")
        print(f"{'adapters':>10} {'ingest/s':>9} {'DB MiB':>8} {'B/adapter':>9} {'peak RSS MiB':>12} "
              f"{'meta p50/p99 ms':>16} {'cold load p50/p99 ms':>21} {'cache hit p50/p99 ms':>21}")  # fmt: skip
        for size, rate, mib, per, rss, l in rows:
            print(f"{size:>10,} {rate:>9,.0f} {mib:>8,.0f} {per:>9,.0f} {rss:>12,.0f} "
                  f"{l['meta_p50']:>7.3f}/{l['meta_p99']:<8.3f} {l['cold_p50']:>10.3f}/{l['cold_p99']:<10.3f} "
                  f"{l['hit_p50']:>10.4f}/{l['hit_p99']:<10.4f}")  # fmt: skip
    finally:
        lib.close()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
