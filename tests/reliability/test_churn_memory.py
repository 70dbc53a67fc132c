"""Churning 100x the cache size of adapters through the cache: memory returns to its baseline.

* bookkeeping: after the churn, every internal map of the weight cache holds no more entries than the tiers do
  (an entry per adapter ever loaded would be a slow leak that RSS cannot see at this scale);
* RSS: ``benchmarks/bench_churn.py`` runs in a fresh process: a warm-up pass over 2x the cache, then 100x the cache
  of distinct 256 KiB adapters, twice; after ``gc.collect()`` + glibc ``malloc_trim(0)`` the RSS must be within
  10 % of the baseline (and within the host tier's budget + 8 MiB of it, a much tighter bound).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from smoa import AdapterSpec

from .helpers import open_lib, seeded_weights

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_churn.py"


@pytest.mark.parametrize("offload", [False, True], ids=["device-tier", "with-host-tier"])
def test_cache_bookkeeping_stays_bounded(tmp_path: Path, offload: bool) -> None:
    cache = 4
    lib = open_lib(tmp_path / "lib", max_loaded_adapters=cache, enable_offloading=offload, offload_max_bytes=20_000)
    ids = [a.id for a in lib.create_many([AdapterSpec(weights=seeded_weights(i)) for i in range(100 * cache)])]
    for _ in range(2):
        for aid in ids:
            lib.get_weights(aid)
    c = lib.cache
    held = len(c._device) + (len(c._host) if c._host is not None else 0)
    assert len(c._device) == cache
    assert sum(len(v) for v in c._versions.values()) == held, "version map keeps adapters no tier holds"
    assert len(c._raw) <= cache and len(c._load_ms) <= 4096
    stats = c.statistics()
    assert stats["evictions"] >= 2 * 100 * cache - 2 * cache
    if offload:
        assert stats["host_tier"]["bytes"] <= 20_000
    lib.close()


def _run_bench(path: str, cache: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, str(BENCH), "--json", "--path", path, "--cache", str(cache)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="RSS from /proc")
@pytest.mark.parametrize("path", ["library", pytest.param("offload", marks=pytest.mark.slow)])
def test_rss_returns_to_baseline_after_churn(path: str) -> None:
    r = _run_bench(path, cache=4)
    assert r["churned"] == 400 and r["evictions"] >= 800 and r["loaded"] == 4
    assert r["churn_data_mib"] >= 90  # the churned weights are large next to the allowed growth
    assert abs(r["growth_pct"]) < 10.0, r
    assert r["growth_mib"] < (4 if path == "offload" else 0) + 8, r


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "the engine's stacked-factor cache (src/smoa/inject/plan.py FactorCache, 256 MiB by default, independent of "
    "max_loaded_adapters) keeps ~110 MiB of churned adapters (+27 %); see docs/reliability.md, Open issues"))  # fmt: skip
def test_rss_returns_to_baseline_after_churn_through_forward() -> None:
    r = _run_bench("facade", cache=4)
    assert abs(r["growth_pct"]) < 10.0, r
