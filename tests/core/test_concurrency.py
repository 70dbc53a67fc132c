"""Threads and asyncio tasks mixing routes, forwards and every mutation, with the optimiser merging and pruning
in the background — checked against a dense oracle.

* Every forward's logits equal a dense reference model (``W + sum w * s * B @ A`` in float64, one row at a time)
  built from the registry of weights this test gave the library, for the exact ``(id, version)`` items the core
  mixed — so no version was served that the test did not write.
* No stale adapter: a mixed ``(id, version)`` is never older than the version confirmed before the forward began,
  and an adapter whose delete (or archive) returned before the route began is never routed or mixed.
* No exception except the documented ones for racing on an id another worker removed (AdapterNotFoundError) or
  one a composite still lists (CompositionError); the optimiser's runs all complete.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from smoa import (
    AdapterNotFoundError,
    AdapterSpec,
    CacheFullError,
    CompositionError,
    LoraWeights,
    SMoAConfig,
    SparseAdapterMixture,
)
from smoa.adapter.profile import BaseProfile

from reliability.helpers import Oracle  # the dense reference shared with the reliability oracle test

ATOL = RTOL = 2e-4
TAGS = ("anatomy", "botany", "chemistry", "geology")
RACY = (AdapterNotFoundError, CompositionError)


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_weights(profile: BaseProfile, rng: random.Random, like: LoraWeights | None = None) -> LoraWeights:
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    if like is not None:  # a near-duplicate: the optimiser will merge it
        return LoraWeights({m: (a + 1e-3 * torch.randn(a.shape, generator=g), b + 1e-3 * torch.randn(b.shape, generator=g))
                            for m, (a, b) in like.factors.items()}, like.alpha, like.rank)  # fmt: skip
    modules = [m for m in profile.module_names if m.endswith(("q_proj", "v_proj"))]
    factors = {}
    for m in modules:
        d_in, d_out = profile.shape(m)
        factors[m] = (torch.randn(2, d_in, generator=g) * 0.3, torch.randn(d_out, 2, generator=g) * 0.3)
    return LoraWeights(factors, alpha=4.0, rank=2)


def same(got: LoraWeights, want: LoraWeights) -> bool:
    return all(torch.equal(got[m][0], want[m][0]) and torch.equal(got[m][1], want[m][1]) for m in want)


@dataclass
class Registry:
    history: dict[tuple[str, int], LoraWeights] = field(default_factory=dict)
    confirmed: dict[str, int] = field(default_factory=dict)  # id -> newest version a call returned
    gone: dict[str, float] = field(default_factory=dict)  # id -> time its delete/archive returned
    # id -> weights of updates in flight: their version is known only when the call returns (two updates of one id
    # may race, and the core serialises them in either order)
    pending: dict[str, list[LoraWeights]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, aid: str, version: int, weights: LoraWeights) -> None:
        with self.lock:
            self.history[(aid, version)] = weights
            self.confirmed[aid] = max(self.confirmed.get(aid, 0), version)


class Workload:
    def __init__(self, smoa: SparseAdapterMixture, reg: Registry, oracle: Oracle) -> None:
        self.smoa, self.reg, self.oracle = smoa, reg, oracle
        self.profile = smoa.library.profile
        self.errors: list[BaseException] = []
        self.counts: dict[str, int] = {}

    def live(self) -> list[str]:
        return [a.id for a in self.smoa.library.iter_adapters(("active",))]

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def forward_checked(self, rng: random.Random) -> None:
        tag = rng.choice(TAGS)
        started = time.monotonic()
        with self.reg.lock:
            floor = dict(self.reg.confirmed)
        route = self.smoa.query_adapters_sync(f"{tag} notes", {"domain": tag}, "hybrid", k=3)
        with self.reg.lock:
            for aid in route.adapter_ids:
                assert not (aid in self.reg.gone and self.reg.gone[aid] < started), f"routed {aid} after it went"
        mixture = self.smoa.mixture_for(route)
        ids = [rng.randrange(1, 128) for _ in range(6)]
        with self.smoa.engine_lock:
            got = self.smoa.engine.forward(torch.tensor([ids]), [mixture]).logits[0]
        mix = []
        for (leaf, version), weights, w in mixture:
            assert version >= floor.get(leaf, 0), f"stale {leaf} v{version} < v{floor.get(leaf)}"
            with self.reg.lock:
                want = self.reg.history.get((leaf, version))
                if want is None or not same(weights, want):  # an update in flight: its version is not known yet
                    want = next((w for w in self.reg.pending.get(leaf, []) if same(weights, w)), want)
            if want is None and self._merged_by_optimiser(leaf):  # its factors come from the merge maths
                self.reg.record(leaf, version, weights)
                want = weights
            assert want is not None, f"served {leaf} v{version}, a version this test never wrote"
            assert same(weights, want), f"served {leaf} v{version} with factors this test never wrote for it"
            mix.append((want, w))
        torch.testing.assert_close(got, self.oracle.logits(ids, mix), atol=ATOL, rtol=RTOL)
        self._count("forward")

    def _merged_by_optimiser(self, aid: str) -> bool:
        try:
            return "merged_from" in self.smoa.library.get_adapter(aid).metadata
        except AdapterNotFoundError:
            return True  # merged and already deleted again: it was the optimiser's

    def mutate(self, rng: random.Random) -> None:
        op = rng.choice(["create", "bulk", "update", "tags", "delete", "bulk_delete", "archive", "restore", "pin"])
        live = self.live()
        try:
            if op in ("create", "bulk") or not live:
                n = 1 if op == "create" else rng.randint(0, 3)
                ws = [random_weights(self.profile, rng) for _ in range(n)]
                made = self.smoa.create_adapters_sync([AdapterSpec(weights=w, domain_tags=[rng.choice(TAGS)]) for w in ws])
                for ad, w in zip(made, ws):
                    self.reg.record(ad.id, ad.version, w)
            elif op == "update":
                aid, w = rng.choice(live), random_weights(self.profile, rng)
                with self.reg.lock:  # known before the call: a concurrent forward may see it at once
                    self.reg.pending.setdefault(aid, []).append(w)
                try:
                    ad = self.smoa.update_adapter_weights_sync(aid, w)
                    self.reg.record(ad.id, ad.version, w)
                finally:
                    with self.reg.lock:
                        self.reg.pending[aid] = [x for x in self.reg.pending[aid] if x is not w]
            elif op == "tags":
                self.smoa.update_adapter_sync(rng.choice(live), domain_tags=[rng.choice(TAGS)])
            elif op == "delete":
                aid = rng.choice(live)
                self.smoa.delete_adapter_sync(aid)
                with self.reg.lock:
                    self.reg.gone[aid] = time.monotonic()
            elif op == "bulk_delete":
                ids = rng.sample(live, min(2, len(live)))
                self.smoa.delete_adapters_sync(ids)
                with self.reg.lock:
                    self.reg.gone.update(dict.fromkeys(ids, time.monotonic()))
            elif op == "archive":
                aid = rng.choice(live)
                self.smoa.archive_adapter_sync(aid)
                with self.reg.lock:
                    self.reg.gone[aid] = time.monotonic()
            elif op == "restore":
                archived = [a.id for a in self.smoa.library.iter_adapters(("archived",))]
                if archived:
                    aid = rng.choice(archived)
                    self.smoa.restore_adapter_sync(aid)
                    with self.reg.lock:
                        self.reg.gone.pop(aid, None)
            else:
                aid = rng.choice(live)
                if rng.random() < 0.5:
                    try:
                        self.smoa.pin_adapter_sync(aid)
                    except CacheFullError:  # every slot of max_loaded_adapters pinned: refused, the catalog unchanged
                        self._count("pin_refused")
                else:
                    self.smoa.unpin_adapter_sync(aid)
            self._count(op)
        except RACY:
            self._count("racy")

    def guard(self, fn, rng: random.Random) -> None:
        try:
            fn(rng)
        except RACY:
            self._count("racy")
        except BaseException as exc:  # noqa: BLE001 - collected, the test fails on any
            self.errors.append(exc)


@pytest.mark.parametrize("n_ops", [pytest.param(120, id="default"), pytest.param(1500, id="long", marks=pytest.mark.slow)])
def test_threads_tasks_and_background_optimiser(tmp_path: Path, n_ops: int) -> None:
    model = tiny_llama()
    cfg = SMoAConfig(storage_path=tmp_path / "m", encoder="hash", seed=0, max_loaded_adapters=4,
                     merge_similarity_threshold=0.99, prune_action="archive", prune_after_queries=50,
                     prune_after_seconds=0.0)  # fmt: skip
    smoa = SparseAdapterMixture(cfg, base_model=model)
    reg, oracle = Registry(), Oracle(model, smoa.library.profile)
    rng = random.Random(0)
    base = [random_weights(smoa.library.profile, rng) for _ in range(12)]
    ws = base + [random_weights(smoa.library.profile, rng, like=w) for w in base[:4]]  # 4 planted duplicates
    for ad, w in zip(smoa.create_adapters_sync([AdapterSpec(weights=w, domain_tags=[TAGS[i % 4]]) for i, w in enumerate(ws)]), ws):
        reg.record(ad.id, ad.version, w)
    work = Workload(smoa, reg, oracle)
    stop = threading.Event()
    runs: list[object] = []

    def optimiser() -> None:  # merges create adapters the registry must know: record each merged result
        while not stop.is_set():
            try:
                report = smoa.optimize_library_sync(merge=True, prune=True)
            except BaseException as exc:  # noqa: BLE001
                work.errors.append(exc)
                return
            for new_id in report.merged_into:
                if new_id:
                    try:  # recorded only if no update landed between reading the version and the weights
                        ad = smoa.library.get_adapter(new_id)
                        weights = smoa.library.get_weights(ad.id)
                        if smoa.library.get_adapter(new_id).version == ad.version:
                            reg.record(ad.id, ad.version, weights)
                    except AdapterNotFoundError:
                        pass
            runs.append(report)

    def thread_worker(seed: int) -> None:
        r = random.Random(seed)
        for _ in range(n_ops // 4):
            work.guard(work.forward_checked if r.random() < 0.5 else work.mutate, r)

    async def tasks() -> None:
        async def one(seed: int) -> None:
            r = random.Random(seed)
            for _ in range(n_ops // 4):
                if r.random() < 0.5:
                    await asyncio.to_thread(work.guard, work.forward_checked, r)
                else:
                    await asyncio.to_thread(work.guard, work.mutate, r)
                    await smoa.query_adapters(f"{r.choice(TAGS)} notes", {"domain": r.choice(TAGS)})

        await asyncio.gather(one(100), one(101))

    background = threading.Thread(target=optimiser)
    threads = [threading.Thread(target=thread_worker, args=(s,)) for s in (1, 2)]
    background.start()
    for t in threads:
        t.start()
    try:
        asyncio.run(tasks())
    finally:
        for t in threads:
            t.join()
        stop.set()
        background.join()
    assert not work.errors, work.errors[:3]
    assert runs and work.counts.get("forward", 0) > n_ops // 8
    assert any(r.merged_into for r in runs)  # type: ignore[attr-defined]  # the planted duplicates were merged
    assert any(r.archived for r in runs)  # type: ignore[attr-defined]  # and idle adapters pruned meanwhile
    # at the end: every stored adapter is bit for bit a version this test (or the optimiser's merge) wrote
    for ad in smoa.library.iter_adapters(("active", "archived")):
        want = reg.history.get((ad.id, ad.version))
        if want is not None:
            got = smoa.library.get_weights(ad.id)
            assert all(torch.equal(got[m][0], want[m][0]) and torch.equal(got[m][1], want[m][1]) for m in want)
    smoa.close()
