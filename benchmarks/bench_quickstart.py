"""How fast does the quick-start guide's own routing run, end to end, through the public API?

The seed guide (``../shared/seed/SMOA_QUICKSTART.md``) promises sub-millisecond routing with its "Advanced
Configuration" (``routing_latency_budget_ms=1.0``, HYBRID, k = 5, ``routing_threshold=0.6``, caching on). Issue 11
measured 3.7-5.3 ms median there (1,000 CUSTOM adapters, ``query_adapters(f"query {i}")``). This script builds that
library through ``SparseAdapterMixture`` (one ``create_adapters_sync`` of CUSTOM adapters described by text and
tags, as the guide does) and times ``query_adapters_sync`` on distinct queries (no route-cache hit), encoding
included, for each configuration side by side in one run:

* ``advanced``  the guide's Advanced Configuration (its routing and caching fields);
* ``defaults``  ``SMoAConfig()`` (50 ms budget, auto threshold).

    python benchmarks/bench_quickstart.py                  # 1,000 adapters, 3,000 queries per configuration
    python benchmarks/bench_quickstart.py --adapters 10000 --queries 1000

Prints one table: configuration, adapters, p50 / p90 / p99 ms, and the share of routes answered by the fast path,
escalated to MiniLM, stopped at the deadline, ``degraded`` and empty (no adapter over the threshold).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from smoa import AdapterSpec, AdapterSpecialization, RoutingStrategy, SMoAConfig, SparseAdapterMixture

WARMUP = 200


def advanced(path: Path) -> SMoAConfig:
    """The guide's Advanced Configuration (its scale, routing, memory, optimisation and performance fields)."""
    return SMoAConfig(storage_path=path, max_adapters=10_000_000, routing_strategy=RoutingStrategy.HYBRID,
                      max_active_adapters=5, routing_threshold=0.6, max_loaded_adapters=200, lazy_loading=True,
                      enable_offloading=True, enable_auto_merging=True, enable_auto_pruning=True,
                      routing_latency_budget_ms=1.0, enable_caching=True)  # fmt: skip


def specs(n: int) -> list[AdapterSpec]:
    return [AdapterSpec(AdapterSpecialization.CUSTOM, [f"domain{i % 50}"], [f"skill{i % 20}"],
                        description=f"custom adapter {i} for domain {i % 50}") for i in range(n)]  # fmt: skip


def measure(config: SMoAConfig, n_adapters: int, n_queries: int) -> dict[str, float]:
    smoa = SparseAdapterMixture(config)
    try:
        smoa.create_adapters_sync(specs(n_adapters))
        smoa.router.wait_fast_path(120)
        for i in range(WARMUP):
            smoa.query_adapters_sync(f"warm up {i}")
        before = dict(smoa.get_statistics()["routing"])
        ms = np.empty(n_queries)
        for i in range(n_queries):
            t = time.perf_counter()
            smoa.query_adapters_sync(f"query {i}")
            ms[i] = (time.perf_counter() - t) * 1e3
        after = smoa.get_statistics()["routing"]
    finally:
        smoa.close()
    share = {key: 100.0 * (after[key] - before[key]) / n_queries for key in ("fast", "escalated", "cancelled",
                                                                           "degraded", "empty", "cache_hits")}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": p50, "p90": p90, "p99": p99, **share}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=3000)
    args = ap.parse_args()
    rows = []
    for name, make in (("advanced", advanced), ("defaults", lambda p: SMoAConfig(storage_path=p))):
        tmp = Path(tempfile.mkdtemp(prefix="smoa_quickstart_"))
        try:
            rows.append((name, measure(make(tmp / "lib"), args.adapters, args.queries)))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    print("| configuration | adapters | p50 ms | p90 ms | p99 ms | fast % | escalated % | stopped % | degraded % "
          "| empty % | route-cache hits % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {args.adapters:,} | {r['p50']:.3f} | {r['p90']:.3f} | {r['p99']:.3f} | {r['fast']:.1f} "
              f"| {r['escalated']:.1f} | {r['cancelled']:.1f} | {r['degraded']:.1f} | {r['empty']:.1f} "
              f"| {r['cache_hits']:.1f} |")


if __name__ == "__main__":
    main()
