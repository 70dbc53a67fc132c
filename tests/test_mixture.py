from __future__ import annotations

import asyncio

import pytest
import torch

from smoa import (
    AdapterGranularity,
    AdapterNotFoundError,
    AdapterSpecialization,
    CompositionError,
    InvalidInputError,
    SMoAConfig,
    SparseAdapterMixture,
    create_sparse_adapter_mixture,
)

DOMAINS = [
    ("medical", ["radiology", "cardiology"], ["diagnosis", "treatment"]),
    ("legal", ["contract", "patent"], ["review", "analysis"]),
    ("finance", ["trading", "risk"], ["prediction", "analysis"]),
]


async def _guide_library(smoa: SparseAdapterMixture) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}
    for domain, specialties, tasks in DOMAINS:
        for specialty in specialties:
            for task in tasks:
                ad = await smoa.create_adapter(
                    specialization=AdapterSpecialization.DOMAIN, domain_tags=[domain, specialty], skill_tags=[task],
                    granularity=AdapterGranularity.NANO, rank=2,
                )  # fmt: skip
                made.setdefault(domain, []).append(ad.id)
    return made


def test_guide_flow_routes_by_domain_metadata() -> None:
    async def run() -> None:
        smoa = create_sparse_adapter_mixture(max_adapters=1_000_000, max_active_adapters=3, routing_strategy="hybrid",
                                             enable_auto_optimization=True)  # fmt: skip
        try:
            made = await _guide_library(smoa)
            assert smoa.library.total_adapters == 12
            for query, domain in [("Diagnose this ECG", "medical"), ("Review this contract", "legal"),
                                  ("Predict market trend", "finance")]:  # fmt: skip
                route = await smoa.query_adapters(query, metadata={"domain": domain})
                assert len(route.adapter_ids) == 3
                assert set(route.adapter_ids) <= set(made[domain]), (query, route)
                assert route.routing_latency_ms > 0 and abs(sum(route.weights) - 1) < 1e-6
                assert list(route.routing_scores) == sorted(route.routing_scores, reverse=True)
                for aid in route.adapter_ids:
                    ad = smoa.library.get_adapter(aid)
                    assert domain in ad.domain_tags and 1_000 <= ad.num_parameters <= 10_000
            stats = smoa.get_statistics()
            assert stats["library"]["total_adapters"] == 12
            assert stats["library"]["loaded_adapters"] == 0  # lazy: routing loads no weights
            assert stats["routing"]["queries"] >= 3
        finally:
            smoa.close()

    asyncio.run(run())


def test_text_only_routing_and_mixture_weights() -> None:
    with SparseAdapterMixture(SMoAConfig(max_active_adapters=2)) as smoa:
        cook = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["cooking"], ["recipes"],
                                        description="recipes, baking bread, kitchen techniques")  # fmt: skip
        law = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["legal"], ["contracts"],
                                       description="contract law, clauses, liability and court cases")  # fmt: skip
        route = smoa.query_adapters_sync("how long should I knead dough for a sourdough loaf?")
        assert route.adapter_ids[0] == cook.id
        route = smoa.query_adapters_sync("is this indemnification clause enforceable in court?")
        assert route.adapter_ids[0] == law.id
        mix = smoa.mixture_for(route)
        assert len(mix) == len(route.adapter_ids)
        assert mix[0][0] == (law.id, 1)  # keyed by (id, version)
        assert torch.equal(mix[0][1]["model.layers.0.self_attn.v_proj"][0],
                           smoa.library.get_weights(law.id)["model.layers.0.self_attn.v_proj"][0])  # fmt: skip
        assert smoa.get_statistics()["library"]["loaded_adapters"] == len(route.adapter_ids)


def test_delete_invalidates_routes_and_weights() -> None:
    with SparseAdapterMixture(SMoAConfig(max_active_adapters=1)) as smoa:
        a = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["astronomy"], ["stars"])
        b = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["astronomy"], ["planets"])
        first = smoa.query_adapters_sync("astronomy", {"domain": "astronomy"})
        gone = first.adapter_ids[0]
        smoa.delete_adapter_sync(gone)
        again = smoa.query_adapters_sync("astronomy", {"domain": "astronomy"})
        assert again.adapter_ids and gone not in again.adapter_ids
        assert {a.id, b.id} - {gone} == set(again.adapter_ids)
        with pytest.raises(AdapterNotFoundError):
            smoa.library.get_weights(gone)


def test_composite_adapter_is_routable_and_flattens() -> None:
    with SparseAdapterMixture(SMoAConfig(seed=0)) as smoa:
        g = torch.Generator().manual_seed(0)
        mods = ["model.layers.0.self_attn.v_proj"]

        def w() -> dict:
            return {mods[0]: (torch.randn(2, 576, generator=g), torch.randn(192, 2, generator=g))}

        x = smoa.create_adapter_sync(domain_tags=["x"], weights=w(), alpha=2.0)
        y = smoa.create_adapter_sync(domain_tags=["y"], weights=w(), alpha=2.0)
        comp = smoa.compose_adapters_sync([x.id, y.id], [0.25, 0.75], domain_tags=["xy"])
        nested = smoa.compose_adapters_sync([comp.id, x.id], [0.5, 0.5], domain_tags=["nested"])
        assert smoa.library.flatten(nested.id) == [(x.id, 0.625), (y.id, 0.375)]
        route = smoa.query_adapters_sync("xy", {"domain": "xy"})
        assert route.adapter_ids[0] == comp.id
        dense = sum(wt * smoa.library.get_weights(i).delta(mods[0]) for i, wt in smoa.library.flatten(nested.id))
        merged = smoa.library.get_weights(nested.id)
        assert torch.allclose(merged.delta(mods[0]), dense, atol=1e-5)
        with pytest.raises(CompositionError, match="member"):
            smoa.delete_adapter_sync(x.id)


def test_persistent_library_reopens_with_routes(tmp_path) -> None:
    cfg = SMoAConfig(storage_path=tmp_path / "lib")
    with SparseAdapterMixture(cfg) as smoa:
        ad = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["oceanography"], ["tides"])
        before = smoa.library.get_weights(ad.id)
    with SparseAdapterMixture(cfg) as smoa:
        assert smoa.library.total_adapters == 1
        route = smoa.query_adapters_sync("ocean tides", {"domain": "oceanography"})
        assert route.adapter_ids == [ad.id]
        after = smoa.library.get_weights(ad.id)
        assert all(torch.equal(before[m][0], after[m][0]) for m in before)


def test_bulk_specs_validate_all_or_nothing() -> None:
    with SparseAdapterMixture() as smoa:
        with pytest.raises(InvalidInputError, match="adapter 1"):
            smoa.create_adapters_sync([{"domain_tags": ["a"]}, {"domain_tags": ["b"], "colour": "red"}])
        with pytest.raises(InvalidInputError, match="adapter 1"):
            smoa.create_adapters_sync([{"domain_tags": ["a"]}, {"rank": -1}])
        assert smoa.library.total_adapters == 0
        made = smoa.create_adapters_sync([{"domain_tags": [f"d{i}"]} for i in range(50)])
        assert len(made) == 50 and smoa.library.total_adapters == 50


def test_peft_round_trip_and_refused_import_stores_nothing(tmp_path) -> None:
    from smoa import UnsafeAdapterFileError

    with SparseAdapterMixture(SMoAConfig(seed=0)) as smoa:
        g = torch.Generator().manual_seed(3)
        mod = "model.layers.4.self_attn.q_proj"
        ad = smoa.create_adapter_sync(domain_tags=["poetry"], weights={mod: (torch.randn(4, 576, generator=g),
                                                                             torch.randn(576, 4, generator=g))})  # fmt: skip
        out = smoa.export_peft_sync(ad.id, tmp_path / "peft")
        back = smoa.import_peft_sync(out, domain_tags=["poetry-copy"])
        assert torch.equal(smoa.library.get_weights(back.id)[mod][0], smoa.library.get_weights(ad.id)[mod][0])
        assert back.alpha == ad.alpha and back.rank == 4
        (out / "adapter_model.bin").write_bytes(b"\x80\x04not really a pickle")
        (out / "adapter_model.safetensors").write_bytes(b"garbage")
        before = (smoa.library.total_adapters, smoa.library.generation)
        with pytest.raises(UnsafeAdapterFileError):
            smoa.import_peft_sync(out)
        assert (smoa.library.total_adapters, smoa.library.generation) == before
