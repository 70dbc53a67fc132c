"""The 8 demos promised by the quick-start guide, each printing figures measured on this machine.

    python examples/sparse_adapter_demo.py                 # ~2-4 minutes on a 2-core CPU
    python examples/sparse_adapter_demo.py --scale 20000   # a bigger library for demo 4

1. create adapters         NANO adapters as in the guide: parameters, bytes, creation time
2. routing                 the guide's queries: chosen adapters, scores, weights, latency
3. statistics              library, cache and routing counters
4. scale                   thousands of adapters in bulk; routing latency before / after, measured
5. composition             adapter of adapters (COMPOSITE) and materialised merges (cat exact, svd truncated)
6. optimisation            near-duplicates merged, idle adapters archived (``optimize_library``)
7. continual learning      train a new adapter on real text; every other adapter unchanged, bit for bit
8. base-model integration  routed forward and generate on SmolLM2-135M with the shipped BBC adapters
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import statistics
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from smoa import AdapterGranularity, AdapterSpecialization, create_sparse_adapter_mixture  # noqa: E402
from smoa.adapter.weights import LoraWeights  # noqa: E402


def header(n: int, title: str) -> None:
    print(f"\n{'=' * 100}\nDEMO {n}: {title}\n{'=' * 100}")


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.2f} ms, max {max(values):.2f} ms"


# -- 1 ----------------------------------------------------------------------------------------------------------
async def demo_create(smoa: Any) -> list[Any]:
    header(1, "create specialised NANO adapters")
    made = []
    t0 = time.perf_counter()
    for domain, tags, skills in [("medical", ["radiology"], ["diagnosis", "classification"]),
                                 ("legal", ["contract"], ["review", "analysis"]),
                                 ("finance", ["trading"], ["prediction", "analysis"])]:  # fmt: skip
        made.append(await smoa.create_adapter(
            specialization=AdapterSpecialization.DOMAIN, domain_tags=[domain, *tags], skill_tags=skills,
            granularity=AdapterGranularity.NANO, rank=2,
        ))  # fmt: skip
    dt = (time.perf_counter() - t0) / len(made) * 1e3
    for ad in made:
        w = smoa.library.get_weights(ad.id)
        print(f"  {ad.id}  {ad.domain_tags + ad.skill_tags}: {ad.num_parameters:,} params ({ad.granularity.value}), "
              f"{w.nbytes:,} bytes, modules {[m.split('.', 2)[-1] for m in ad.target_modules]}")  # fmt: skip
    print(f"  created {len(made)} adapters, {dt:.1f} ms each (one at a time; bulk creation in demo 4)")
    return made


# -- 2 ----------------------------------------------------------------------------------------------------------
async def demo_routing(smoa: Any) -> None:
    header(2, "intelligent routing")
    queries = [("Analyze this chest X-ray for pneumonia", {"task": "diagnosis", "domain": "medical"}),
               ("Review this contract for termination clauses", None),
               ("Predict the market trend for tech stocks", {"domain": "finance"})]  # fmt: skip
    for query, meta in queries:
        route = await smoa.query_adapters(query, metadata=meta)
        print(f"  {query!r} (metadata {meta}): {len(route.adapter_ids)} adapters in {route.routing_latency_ms:.2f} ms")
        for aid, score, w in zip(route.adapter_ids, route.routing_scores, route.weights):
            print(f"    {smoa.library.get_adapter(aid).domain_tags}: score {score:.3f}, weight {w:.3f}")
    again = await smoa.query_adapters(queries[0][0], metadata=queries[0][1])
    print(f"  repeated query: cache hit {again.cache_hit}, {again.routing_latency_ms:.3f} ms")


# -- 3 ----------------------------------------------------------------------------------------------------------
def demo_statistics(smoa: Any, final: bool = False) -> None:
    if final:
        print(f"\n{'=' * 100}\nFINAL STATISTICS\n{'=' * 100}")
    else:
        header(3, "statistics")
    s = smoa.get_statistics()
    lib, cache, rt = s["library"], s["cache"], s["routing"]
    print(f"  library: {lib['total_adapters']} adapters, {lib['loaded_adapters']} loaded, {lib['queries']} queries")
    print(f"  cache:   { {k: v for k, v in cache.items() if isinstance(v, (int, float))} }")
    print(f"  routing: {rt['queries']} queries, {rt['cache_hits']} cache hits, p50 {rt['latency_p50_ms']:.2f} ms, "
          f"index {rt['index_kind']} ({rt['index_size']} keys), encoder {rt['encoder']}")  # fmt: skip


# -- 4 ----------------------------------------------------------------------------------------------------------
def _latencies(smoa: Any, queries: list[str]) -> list[float]:
    return [smoa.query_adapters_sync(q).routing_latency_ms for q in queries]


async def demo_scale(smoa: Any, n: int) -> None:
    header(4, f"scale: {n:,} adapters, routing stays fast")
    from smoa.jobs.main_job import distractor_specs

    queries = [f"question {i} about {w} and its {s}" for i, (w, s) in
               enumerate(zip(["tax law", "heart surgery", "tennis", "gpu kernels", "soup"] * 40,
                             ["risks", "costs", "rules", "history", "taste"] * 40))]  # fmt: skip
    before_n = smoa.library.total_adapters
    small = _latencies(smoa, queries[:100])
    specs = distractor_specs(n, seed=1, noise=0.0, profile=smoa.library.profile)
    t0 = time.perf_counter()
    for i in range(0, n, 1000):
        await smoa.create_adapters(specs[i : i + 1000])
    dt = time.perf_counter() - t0
    big = _latencies(smoa, queries[100:])
    print(f"  bulk-created {n:,} NANO adapters in {dt:.1f} s ({dt / n * 1e6:.0f} us each, routing keys included)")
    print(f"  routing with {before_n:,} adapters:  {ms(small)}   (100 distinct queries, no route-cache hits)")
    print(f"  routing with {smoa.library.total_adapters:,} adapters: {ms(big)}")
    cached = _latencies(smoa, queries[100:200])
    print(f"  the same queries again (route cache): {ms(cached)}")


# -- 5 ----------------------------------------------------------------------------------------------------------
def demo_composition(smoa: Any, shipped_ids: dict[str, str]) -> None:
    header(5, "hierarchical composition (adapter of adapters)")
    from smoa.compose.merge import combine

    a, b = shipped_ids["business"], shipped_ids["politics"]
    comp = smoa.compose_adapters_sync([a, b], [0.6, 0.4], domain_tags=["political-economy"],
                                      description="economy and government news")  # fmt: skip
    print(f"  COMPOSITE {comp.id}: members {comp.members} -> routable, flattened at load: {smoa.library.flatten(comp.id)}")
    wa, wb = smoa.library.get_weights(a), smoa.library.get_weights(b)
    exact = combine([wa, wb], [0.6, 0.4], method="cat")
    module = next(iter(wa))
    ref = 0.6 * wa.delta(module) + 0.4 * wb.delta(module)
    for method, rank in (("cat", None), ("svd", 4)):
        t0 = time.perf_counter()
        merged = smoa.compose_adapters_sync([a, b], [0.6, 0.4], materialize=method, rank=rank)
        w = smoa.library.get_weights(merged.id)
        err = float((w.delta(module) - ref).norm() / ref.norm())
        print(f"  materialised '{method}': rank {w.rank}, {merged.num_parameters:,} params, "
              f"relative error of the update on {module.split('.', 2)[-1]}: {err:.2e} "
              f"({(time.perf_counter() - t0) * 1e3:.0f} ms)")  # fmt: skip
    assert exact.rank == wa.rank + wb.rank


# -- 6 ----------------------------------------------------------------------------------------------------------
def demo_optimisation() -> None:
    header(6, "auto-optimisation: merge near-duplicates, prune idle adapters")
    smoa = create_sparse_adapter_mixture(max_active_adapters=3, seed=0)
    try:
        g = torch.Generator().manual_seed(0)
        prof = smoa.library.profile
        mods = prof.module_names[:3]

        def rand(scale: float = 0.05, like: LoraWeights | None = None) -> LoraWeights:
            f = {}
            for m in mods:
                d_in, d_out = prof.shape(m)
                if like is None:
                    f[m] = (torch.randn(2, d_in, generator=g) * scale, torch.randn(d_out, 2, generator=g) * scale)
                else:
                    a, bb = like[m]
                    f[m] = (a + torch.randn(a.shape, generator=g) * 1e-4, bb + torch.randn(bb.shape, generator=g) * 1e-4)
            return LoraWeights(f, 4.0, 2)

        originals = [rand() for _ in range(20)]
        specs = [{"domain_tags": [f"topic-{i}"], "weights": w} for i, w in enumerate(originals)]
        specs += [{"domain_tags": [f"topic-{i}"], "weights": rand(like=originals[i])} for i in range(5)]  # 5 near-dups
        ads = smoa.create_adapters_sync(specs)
        for i in range(10):  # the first 10 topics get traffic; 10-19 stay idle
            for _ in range(3):
                smoa.query_adapters_sync(f"topic {i}", metadata={"domain": f"topic-{i}"})
        before = smoa.library.total_adapters
        try:
            report = smoa.optimize_library_sync(prune_after_queries=10)
        except (ImportError, AttributeError, NotImplementedError) as exc:  # optimisation not available
            print(f"  optimize_library is not available in this build ({type(exc).__name__}: {exc})")
            return
        print(f"  {before} adapters ({len(ads)} created: 20 distinct, 5 near-duplicates of the first 5)")
        print(f"  merged {len(report.groups_merged)} groups (errors "
              f"{', '.join(f'{e:.1e}' for e in report.merge_errors) or '-'}), archived {len(report.archived)} idle, "
              f"deleted {len(report.deleted)}, freed {report.bytes_freed:,} bytes in {report.seconds * 1e3:.0f} ms")  # fmt: skip
        s = smoa.get_statistics()["library"]
        print(f"  now: {s['active_adapters']} active, {s['archived_adapters']} archived")
    finally:
        smoa.close()


# -- 7 ----------------------------------------------------------------------------------------------------------
def _fingerprint(smoa: Any) -> dict[str, str]:
    return {ad.id: f"{ad.version}:{ad.checksum}" for ad in smoa.library.iter_adapters()}


def _continual_data() -> tuple[str, list[str], list[str]]:
    try:
        from smoa.data.clinc import clinc150_by_domain

        train, val = clinc150_by_domain("train")["travel"], clinc150_by_domain("val")["travel"]
        return "travel (CLINC150)", train, val[:40]
    except FileNotFoundError:
        from smoa.data.bbc import bbc_passages

        return "sports (BBC, CLINC150 not found)", bbc_passages("sports")[:200], bbc_passages("sports", "held_out")[:16]


def demo_continual(smoa: Any, steps: int) -> str:
    header(7, "continual learning: a new skill, nothing forgotten")
    from smoa.train import evaluate_loss, train_adapter

    name, train, held = _continual_data()
    before = _fingerprint(smoa)
    base_sum = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in smoa.engine.model.parameters())).hexdigest()
    spec = {"specialization": "domain", "domain_tags": ["travel"], "skill_tags": ["assistant"], "rank": 4,
            "target_modules": r"model\.layers\.(2[2-9])\..*", "description": "travel requests and trip planning"}  # fmt: skip
    trainer = getattr(smoa, "train_adapter_sync", None)
    kwargs = {"steps": steps, "lr": 1e-2, "batch_size": 16, "max_length": 48, "progress": True}
    result = trainer(spec, train, **kwargs) if trainer is not None else train_adapter(smoa, spec, train, **kwargs)
    w = smoa.library.get_weights(result.adapter.id)
    base_loss = evaluate_loss(smoa.engine, None, held, max_length=48)
    new_loss = evaluate_loss(smoa.engine, w, held, max_length=48)
    after = _fingerprint(smoa)
    unchanged = sum(after[i] == v for i, v in before.items())
    base_after = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in smoa.engine.model.parameters())).hexdigest()
    h = result.history
    print(f"  trained a new adapter on {len(train)} {name} queries: {h.steps} steps in {h.seconds:.1f} s, "
          f"train loss {h.initial_loss:.3f} -> {h.final_loss:.3f}")  # fmt: skip
    print(f"  held-out ({len(held)} queries): base loss {base_loss:.3f} -> with the new adapter {new_loss:.3f}")
    print(f"  existing adapters unchanged (version + sha256): {unchanged} / {len(before)}; base model unchanged: "
          f"{base_sum == base_after}")  # fmt: skip
    routes = [smoa.query_adapters_sync(q).adapter_ids for q in held]
    top1 = [smoa.library.flatten(r[0])[0][0] if r else None for r in routes]
    print(f"  held-out queries routed (top-1) to the new adapter: {sum(a == result.adapter.id for a in top1)} / {len(held)}")
    return result.adapter.id


# -- 8 ----------------------------------------------------------------------------------------------------------
def demo_integration(smoa: Any) -> None:
    header(8, "integration with the base model (SmolLM2-135M)")
    from smoa.data.bbc import bbc_news
    from smoa.data.text import head_tokens

    tok = smoa.engine.tokenizer
    arts = [bbc_news("held_out", [t])[0] for t in ("sports", "business", "tech")]
    texts = head_tokens([a.text for a in arts], tok, 96)
    routes = [smoa.query_adapters_sync(t) for t in texts]
    for a, r in zip(arts, routes):
        print(f"  held-out {a.topic} article -> {[smoa.library.get_adapter(i).domain_tags[0] for i in r.adapter_ids]} "
              f"weights {[round(w, 2) for w in r.weights]} ({r.routing_latency_ms:.1f} ms)")  # fmt: skip
    with torch.no_grad():
        t0 = time.perf_counter()
        base = smoa.engine.loss(texts, [])
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        routed = smoa.engine.loss(texts, [smoa.mixture_for(r) for r in routes])
        t_routed = time.perf_counter() - t0
    for a, lb, lr in zip(arts, base.tolist(), routed.tolist()):
        print(f"  {a.topic:9s} loss: base {lb:.3f} -> routed mixture {lr:.3f}")
    print(f"  forward (3 texts x 96 tokens): base {t_base * 1e3:.0f} ms, routed {t_routed * 1e3:.0f} ms "
          f"({100 * (t_routed / t_base - 1):+.0f}%)")  # fmt: skip
    prompts = ["The Chancellor said the economy", "The striker scored twice as"]
    t0 = time.perf_counter()
    outs = smoa.generate_sync(prompts, max_new_tokens=20)
    dt = time.perf_counter() - t0
    for p, o in zip(prompts, outs):
        print(f"  routed generate: {p!r} -> {o.strip()!r}")
    print(f"  routed generate: 2 prompts x 20 tokens in {dt:.1f} s (routing included)")


# -- main -------------------------------------------------------------------------------------------------------
async def main(scale: int, train_steps: int, with_model: bool) -> None:
    t_all = time.perf_counter()
    smoa = create_sparse_adapter_mixture(max_adapters=1_000_000, max_active_adapters=3, routing_strategy="hybrid", seed=0)
    try:
        await demo_create(smoa)
        await demo_routing(smoa)
        demo_statistics(smoa)
        await demo_scale(smoa, scale)
        from smoa.data.shipped import load_shipped_adapters
        from smoa.jobs.main_job import add_topic_adapters

        t0 = time.perf_counter()
        shipped = load_shipped_adapters()
        ads, aliases = add_topic_adapters(smoa, shipped, prototypes=8, seed=0)
        ids = {a.domain: ad.id for a, ad in zip(shipped, ads)}
        print(f"\n(loaded the {len(ids)} shipped BBC-topic adapters {sorted(ids)}, each with 8 prototype routing keys, "
              f"in {time.perf_counter() - t0:.1f} s)")
        demo_composition(smoa, ids)
        demo_optimisation()
        if with_model:
            from smoa.models import load_default_base_model

            t0 = time.perf_counter()
            model, tokenizer = load_default_base_model()
            smoa.attach(model, tokenizer)
            print(f"\n(SmolLM2-135M attached in {time.perf_counter() - t0:.1f} s)")
            demo_continual(smoa, train_steps)
            demo_integration(smoa)
        demo_statistics(smoa, final=True)
    finally:
        await smoa.aclose()
    print(f"\nall demos done in {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=5000, help="adapters bulk-created in demo 4 (default 5000)")
    p.add_argument("--train-steps", type=int, default=30, help="training steps in demo 7 (default 30)")
    p.add_argument("--no-model", action="store_true", help="skip demos 7-8 (no base model)")
    a = p.parse_args()
    asyncio.run(main(a.scale, a.train_steps, not a.no_model))
