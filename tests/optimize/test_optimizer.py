"""`optimize_library` on a real (small) library core: planted duplicates merged, idle adapters pruned."""

from __future__ import annotations

import math

import pytest
import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.spec import AdapterSpec
from smoa.adapter.weights import LoraWeights
from smoa.compose.similarity import cosine
from smoa.config import SMoAConfig
from smoa.core import LibraryCore
from smoa.optimize.optimizer import optimize_library

TOY = BaseProfile("toy", tuple((f"layers.{i}.{n}", 32, o) for i in range(2) for n, o in (("q", 32), ("v", 16))))
MODULES = ("layers.0.q", "layers.1.v")


def _weights(g: torch.Generator, like: LoraWeights | None = None, noise: float = 0.03) -> LoraWeights:
    f = {}
    for m in MODULES:
        d_in, d_out = TOY.shape(m)
        if like is None:
            f[m] = (torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g))
        else:
            a, b = like.factors[m]
            f[m] = (a + noise * torch.randn(a.shape, generator=g), b + noise * torch.randn(b.shape, generator=g))
    return LoraWeights(f, 4.0, 2)


@pytest.fixture
def lib(tmp_path):
    library = LibraryCore(SMoAConfig(storage_path=tmp_path / "lib", seed=0, encoder="hash"), TOY)
    yield library
    library.close()


def _populate(lib: LibraryCore, n: int = 30) -> tuple[list[str], list[tuple[str, str]]]:
    g = torch.Generator().manual_seed(0)
    base = [_weights(g) for _ in range(n)]
    specs = [AdapterSpec(weights=w, domain_tags=[f"d{i}"], skill_tags=["s"]) for i, w in enumerate(base)]
    specs += [AdapterSpec(weights=_weights(g, base[i]), domain_tags=[f"d{i}", "dup"]) for i in (3, 7)]
    ids = [a.id for a in lib.create_many(specs)]
    return ids, [(ids[3], ids[n]), (ids[7], ids[n + 1])]


def test_planted_duplicates_are_merged_and_aliased(lib: LibraryCore) -> None:
    ids, planted = _populate(lib)
    before = {i: lib.get_weights(i) for i in ids}
    report = optimize_library(lib, prune=False, threshold=0.98, method="svd")
    assert sorted(sorted(g) for g in report.groups_merged) == sorted(sorted(p) for p in planted)
    assert lib.total_adapters == len(ids) - 2 and report.adapters_scanned == len(ids)
    assert all(e < 0.05 for e in report.merge_errors) and report.bytes_freed > 0
    for (a, b), new_id in zip(sorted(report.groups_merged), [report.merged_into[report.groups_merged.index(g)]
                                                             for g in sorted(report.groups_merged)]):  # fmt: skip
        assert lib.resolve(a) == lib.resolve(b) == new_id  # old ids are aliases of the merged adapter
        merged = lib.get_weights(new_id)
        assert cosine(merged, before[a]) > 0.98 and cosine(merged, before[b]) > 0.98
        ad = lib.get_adapter(a)
        assert ad.id == new_id and "dup" in ad.domain_tags and "s" in ad.skill_tags
        assert ad.metadata["merge_method"] == "svd" and sorted(ad.metadata["merged_from"]) == sorted([a, b])
    second = optimize_library(lib, prune=False, threshold=0.98)
    assert second.groups_merged == []  # nothing left to merge


def test_dry_run_changes_nothing(lib: LibraryCore) -> None:
    ids, _ = _populate(lib)
    generation = lib.generation
    report = optimize_library(lib, threshold=0.98, dry_run=True, now=1e12)
    assert len(report.groups_merged) == 2 and report.merged_into == ["", ""]
    assert len(report.archived) == len(ids) - 4  # everything idle except the merge sources
    assert lib.generation == generation and lib.total_adapters == len(ids)


def test_prune_archives_idle_unpinned_non_member_adapters(lib: LibraryCore) -> None:
    g = torch.Generator().manual_seed(1)
    ids = [a.id for a in lib.create_many([AdapterSpec(weights=_weights(g)) for _ in range(5)])]
    lib.pin(ids[0])
    composite = lib.create(AdapterSpec(specialization="composite", members=[(ids[1], 1.0)]))
    lib.record_usage([ids[2]])
    lib.flush_usage()
    report = optimize_library(lib, merge=False, prune_after_seconds=3600.0, now=lib.get_adapter(ids[2]).last_used_at + 60)
    assert report.archived == []  # everything is younger than an hour
    report = optimize_library(lib, merge=False, prune_after_seconds=3600.0, now=lib.get_adapter(ids[3]).created_at + 7200)
    assert sorted(report.archived) == sorted([ids[2], ids[3], ids[4]])
    assert composite.id not in report.archived and report.bytes_freed > 0
    assert lib.get_adapter(ids[3]).status == "archived"
    restored = lib.restore(ids[3])
    assert restored.status == "active" and lib.get_weights(ids[3]).rank == 2


def test_prune_by_queries_and_delete_action(lib: LibraryCore) -> None:
    g = torch.Generator().manual_seed(2)
    ids = [a.id for a in lib.create_many([AdapterSpec(weights=_weights(g)) for _ in range(3)])]
    lib.record_usage([ids[0]])  # query 1 uses ids[0]
    for _ in range(20):
        lib.record_usage([ids[1]])
    lib.flush_usage()  # one batched write; each adapter keeps the query counter of its own latest use
    assert lib.get_adapter(ids[0]).last_used_query == 1 and lib.get_adapter(ids[1]).last_used_query == 21
    late = lib.create(AdapterSpec(weights=_weights(g)))  # created at query 21: young by the query rule
    assert late.created_query == 21
    report = optimize_library(lib, merge=False, prune_after_queries=10, prune_after_seconds=math.inf, prune_action="delete")
    # ids[0]: 20 queries since its use; ids[2]: never used, 21 queries since creation; late: 0 queries old
    assert sorted(report.deleted) == sorted([ids[0], ids[2]])
    assert ids[0] not in lib and late.id in lib and lib.total_adapters == 2


def test_through_the_facade_routes_forget_merged_sources(tmp_path) -> None:
    import asyncio

    from smoa.mixture import SparseAdapterMixture

    g = torch.Generator().manual_seed(3)
    base = _weights(g)
    with SparseAdapterMixture(SMoAConfig(base_profile=TOY, seed=0, storage_path=tmp_path / "m")) as smoa:
        a = smoa.create_adapter_sync("domain", ["medical"], ["diagnosis"], weights=base, description="chest x-ray")
        b = smoa.create_adapter_sync("domain", ["radiology"], ["diagnosis"], weights=_weights(g, base))
        smoa.create_adapter_sync("domain", ["legal"], ["review"], weights=_weights(g), description="contracts")
        report = asyncio.run(smoa.optimize_library(prune=False))
        (new_id,) = report.merged_into
        route = asyncio.run(smoa.query_adapters("chest x-ray diagnosis", k=3))
        assert new_id in route.adapter_ids and a.id not in route.adapter_ids and b.id not in route.adapter_ids
        assert smoa.library.get_adapter(a.id).id == new_id and smoa.library.total_adapters == 2


def test_undo_merge_restores_the_sources(lib: LibraryCore) -> None:
    from smoa.optimize.optimizer import undo_merge

    ids, planted = _populate(lib, n=10)
    before = {i: lib.get_weights(i) for i in ids}
    report = optimize_library(lib, prune=False, threshold=0.98)
    assert len(report.merge_ids) == 2 and lib.total_adapters == len(ids) - 2
    restored = undo_merge(lib, report.merge_ids[0])
    assert sorted(restored) == sorted(report.groups_merged[0])
    assert lib.total_adapters == len(ids) - 1  # 2 sources back, their merged adapter gone
    assert report.merged_into[0] not in lib
    for s in restored:
        ad = lib.get_adapter(s)
        assert ad.id == s and ad.status == "active"
        w = lib.get_weights(s)
        for m in w:
            torch.testing.assert_close(w[m][0], before[s][m][0])
    with pytest.raises(Exception, match="merge_id"):
        undo_merge(lib, report.merge_ids[0])
