"""Finding 4: routes concurrent with a prune (delete) never name deleted adapters; mixing never fails."""

from __future__ import annotations

import threading
from pathlib import Path

from smoa.adapter.spec import AdapterSpec
from smoa.mixture import SparseAdapterMixture

from .conftest import config, weights


def test_routes_during_a_deleting_prune_name_only_live_adapters(tmp_path: Path) -> None:
    smoa = SparseAdapterMixture(config(tmp_path / "m", prune_action="delete", enable_caching=False))
    made = smoa.create_adapters_sync([AdapterSpec(weights=weights(i), domain_tags=["shared", f"t{i % 7}"],
                                                  description=f"topic {i % 7} shared text") for i in range(150)])  # fmt: skip
    keep = {a.id for a in made[:10]}
    for aid in keep:
        smoa.pin_adapter_sync(aid)  # never pruned
    bad: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def router() -> None:
        i = 0
        while not done.is_set():
            i += 1
            try:
                route = smoa.query_adapters_sync(f"topic {i % 7} shared", metadata={"domain": "shared"}, k=5)
                if any(not a for a in route.adapter_ids):
                    bad.append(f"empty id in {route.adapter_ids}")
                gone = [a for a in route.adapter_ids if a not in smoa.library]
                mixed = {leaf for (leaf, _), _, _ in smoa.mixture_for(route)}
                if mixed & set(gone):  # deleted after this route was made: the mixture leaves it out
                    bad.append(f"deleted {gone} mixed")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=router) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        report = smoa.optimize_library_sync(merge=False, prune=True, prune_after_queries=1,
                                            prune_after_seconds=0.0, prune_action="delete")  # fmt: skip
    finally:
        done.set()
        for t in threads:
            t.join()
    assert not errors and not bad
    assert report.deleted and not set(report.deleted) & keep
    live = {a.id for a in smoa.library.iter_adapters(("active",))}
    assert keep <= live and not live & set(report.deleted)
    for i in range(20):
        route = smoa.query_adapters_sync(f"topic {i % 7} shared", metadata={"domain": "shared"}, k=5)
        assert set(route.adapter_ids) <= live
    smoa.close()
