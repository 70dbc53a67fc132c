"""Finding 6: archive and new routing keys take effect at once; writes around the core are caught up from the log."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from smoa.adapter.spec import AdapterSpec
from smoa.errors import AdapterNotFoundError
from smoa.mixture import SparseAdapterMixture

from .conftest import config, weights


@pytest.fixture
def smoa(tmp_path: Path):
    m = SparseAdapterMixture(config(tmp_path / "m"))
    yield m
    m.close()


def _two(smoa):
    return smoa.create_adapters_sync([
        AdapterSpec(weights=weights(0), domain_tags=["medical"], description="chest x-ray radiology"),
        AdapterSpec(weights=weights(1), domain_tags=["legal"], description="contract law review"),
    ])  # fmt: skip


@pytest.mark.parametrize("strategy", ["semantic", "task_based", "hybrid"])
def test_archive_through_the_library_is_not_routed_or_mixed(smoa, strategy: str) -> None:
    med, _ = _two(smoa)
    q, meta = "chest x-ray radiology medical", {"domain": "medical"}
    route = smoa.query_adapters_sync(q, meta, strategy)
    assert med.id in route.adapter_ids
    smoa.library.archive(med.id)  # the internal path the finding used
    assert med.id not in smoa.query_adapters_sync(q, meta, strategy).adapter_ids
    assert all(leaf != med.id for (leaf, _), _, _ in smoa.mixture_for(route))  # a stale route mixes nothing of it
    smoa.restore_adapter_sync(med.id)
    assert med.id in smoa.query_adapters_sync(q, meta, strategy).adapter_ids


def test_set_embedding_without_reindex_is_routed_at_once(smoa) -> None:
    med, legal = _two(smoa)
    q = "contract law review"
    assert smoa.query_adapters_sync(q, strategy="semantic", k=1).adapter_ids == [legal.id]
    key = smoa.router.routing_keys([__import__("smoa.routing.router", fromlist=["RoutingText"]).RoutingText([], [], q)])[0]
    smoa.library.set_embedding(med.id, key)  # no reindex call
    assert smoa.query_adapters_sync(q, strategy="semantic", k=1).adapter_ids == [med.id]


def test_a_write_around_the_core_is_caught_up_from_the_change_log(smoa, monkeypatch: pytest.MonkeyPatch) -> None:
    med, _legal = _two(smoa)
    q, meta = "chest x-ray radiology", {"domain": "medical"}
    assert med.id in smoa.query_adapters_sync(q, meta).adapter_ids
    monkeypatch.setattr(smoa.router, "rebuild", lambda *a, **k: pytest.fail("caught up by a full rebuild"))
    smoa.library.catalog.set_status(med.key, "archived")  # straight into the catalog, past the core
    assert med.id not in smoa.query_adapters_sync(q, meta).adapter_ids
    assert smoa.library.statistics()["index_generation"] == smoa.library.generation
    with pytest.raises(AdapterNotFoundError):
        smoa.mixture_for([(med.id + "x", 1.0)])


def test_update_adapter_moves_its_routing_key(smoa) -> None:
    med, legal = _two(smoa)
    smoa.update_adapter_sync(med.id, domain_tags=["cooking"], description="bake bread in the oven",
                             examples=["how long to bake sourdough bread"])  # fmt: skip
    assert smoa.query_adapters_sync("bake bread oven", strategy="semantic", k=1).adapter_ids == [med.id]
    assert smoa.query_adapters_sync("x", {"domain": "cooking"}, "task_based").adapter_ids == [med.id]
    assert smoa.query_adapters_sync("x", {"domain": "medical"}, "task_based").adapter_ids == []
    ad = smoa.get_adapter_sync(med.id)
    assert ad.domain_tags == ["cooking"] and ad.examples == ["how long to bake sourdough bread"]
    assert np.isfinite(smoa.library.routing_keys_of(legal.id)).all()
