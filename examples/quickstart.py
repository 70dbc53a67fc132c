"""The quick-start guide's "Complete Example", with only the import changed (runs as is)."""

import asyncio

from smoa import AdapterGranularity, AdapterSpecialization, create_sparse_adapter_mixture


async def main():
    # 1. Create system
    smoa = create_sparse_adapter_mixture(
        max_adapters=1_000_000,
        max_active_adapters=3,
        routing_strategy="hybrid"
    )

    # 2. Create specialized adapters
    domains = [
        ("medical", ["radiology", "cardiology"], ["diagnosis", "treatment"]),
        ("legal", ["contract", "patent"], ["review", "analysis"]),
        ("finance", ["trading", "risk"], ["prediction", "analysis"])
    ]

    for domain, specialties, tasks in domains:
        for specialty in specialties:
            for task in tasks:
                await smoa.create_adapter(
                    specialization=AdapterSpecialization.DOMAIN,
                    domain_tags=[domain, specialty],
                    skill_tags=[task],
                    granularity=AdapterGranularity.NANO,
                    rank=2
                )

    print(f"✅ Created {smoa.library.total_adapters} adapters")

    # 3. Query for adapters
    queries = [
        ("Diagnose this ECG", {"domain": "medical"}),
        ("Review this contract", {"domain": "legal"}),
        ("Predict market trend", {"domain": "finance"})
    ]

    for query, metadata in queries:
        route = await smoa.query_adapters(query, metadata=metadata)
        print(f"\n{query}:")
        print(f"  Selected: {len(route.adapter_ids)} adapters")
        print(f"  Latency: {route.routing_latency_ms:.2f}ms")

    # 4. Show results
    stats = smoa.get_statistics()
    print(f"\n{'='*60}")
    print(f"Total adapters: {stats['library']['total_adapters']}")
    print("Active per query: ~3 (sparse!)")
    print("Inference overhead: < 0.01% (constant!)")
    print("Memory usage: Constant (LRU cache)")
    print("\n🚀 INFINITE SPECIALIZATION AT CONSTANT COST!")
    print(f"{'='*60}")

if __name__ == "__main__":
    asyncio.run(main())
