"""Finding 3: `optimize_library` completes while adapters are deleted; the background optimiser logs failures."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from smoa.adapter.spec import AdapterSpec
from smoa.mixture import SparseAdapterMixture
from smoa.optimize.optimizer import optimize_library

from .conftest import config, open_core, weights


def _library_with_duplicates(core, n: int = 12) -> tuple[list[str], list[tuple[str, str]]]:
    base = [weights(i) for i in range(n)]
    specs = [AdapterSpec(weights=w, domain_tags=[f"d{i}"]) for i, w in enumerate(base)]
    specs += [AdapterSpec(weights=weights(100 + i, like=base[i], noise=0.002), domain_tags=[f"d{i}"]) for i in range(4)]
    ids = [a.id for a in core.create_many(specs)]
    return ids, [(ids[i], ids[n + i]) for i in range(4)]


def test_deletes_at_every_stage_of_a_run_never_abort_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = open_core(tmp_path / "lib")
    ids, pairs = _library_with_duplicates(core)
    doomed = [pairs[0][0], pairs[1][1], ids[11]]  # a source of two planned merges, and a plain adapter
    real_iter, real_get = core.iter_weights, core.get_weights
    calls = {"iter": 0, "get": 0}

    def iter_weights(adapter_ids):  # the sketch scan: an adapter disappears between two batches
        calls["iter"] += 1
        if calls["iter"] == 3:
            core.delete(doomed[2])
        return real_iter(adapter_ids)

    def get_weights(adapter_id):  # the exact verification / merge: a planned source disappears
        calls["get"] += 1
        if calls["get"] == 1:
            core.delete_many(doomed[:2])
        return real_get(adapter_id)

    monkeypatch.setattr(core, "iter_weights", iter_weights)
    monkeypatch.setattr(core, "get_weights", get_weights)
    report = optimize_library(core, prune=False, threshold=0.98)
    merged_sources = {s for g in report.groups_merged for s in g}
    assert not merged_sources & set(doomed)
    assert len(report.groups_merged) == 2  # the two untouched planted pairs
    for g, new_id in zip(report.groups_merged, report.merged_into):
        assert {core.resolve(s) for s in g} == {new_id}
    assert core.total_adapters == len(ids) - 3 - 2
    core.close()


def test_threads_deleting_while_optimize_runs(tmp_path: Path) -> None:
    core = open_core(tmp_path / "lib")
    ids, _ = _library_with_duplicates(core, n=40)
    stop = threading.Event()
    errors: list[BaseException] = []

    def deleter() -> None:
        for aid in ids[::3]:
            if stop.is_set():
                return
            try:
                core.delete(aid)
            except Exception as exc:  # noqa: BLE001 - an already-merged id is an alias delete; anything else fails
                errors.append(exc)

    t = threading.Thread(target=deleter)
    t.start()
    try:
        for _ in range(3):
            optimize_library(core, prune=True, prune_action="delete", prune_after_queries=1, prune_after_seconds=0.0)
    finally:
        stop.set()
        t.join()
    assert not errors
    for ad in core.iter_adapters(("active",)):
        assert core.route(ad.domain_tags[0] if ad.domain_tags else "x", k=3).adapter_ids is not None
    core.close()


def test_background_optimiser_logs_its_failures(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    smoa = SparseAdapterMixture(config(tmp_path / "m", enable_auto_optimization=True, auto_optimize_interval_s=0.01))

    def boom(**_: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(smoa, "optimize_library_sync", boom)

    async def main() -> None:
        await smoa.query_adapters("anything")  # starts the background loop
        await asyncio.sleep(0.2)

    with caplog.at_level(logging.ERROR, logger="smoa.mixture"):
        asyncio.run(main())
    last = smoa.get_statistics()["optimization"]["last"]
    smoa.close()
    assert "disk on fire" in last  # kept and reported, not swallowed
    assert any("background optimize_library failed" in r.getMessage() and r.exc_info for r in caplog.records)
