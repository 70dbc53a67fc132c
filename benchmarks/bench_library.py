"""How fast does the library ingest and load nano adapters as it grows to 1,000,000?

Bulk-creates NANO adapters (rank 2, float16) in transactions of `--chunk`, growing one persistent library through
the checkpoint sizes; at each checkpoint it measures the ingestion rate, database size and peak RSS, then cold
(not in the weight cache: SQLite read + sha256 check + safetensors parse) and warm (cache hit) `get_adapter` +
`get_weights` latency p50/p99 on random ids. Prints one table.

    python benchmarks/bench_library.py                # 1K, 100K, 1M (about 2-3 minutes, ~3.5 GB of disk)
    python benchmarks/bench_library.py --quick        # 1K, 10K, 50K
"""

from __future__ import annotations

import argparse
import random
import resource
import shutil
import statistics
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", type=int, nargs="*")
    ap.add_argument("--chunk", type=int, default=20_000)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--dir", type=Path, default=None, help="where to build the library (deleted afterwards)")
    args = ap.parse_args(argv)
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
