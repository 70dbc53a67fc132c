"""Many concurrent async clients against one library, every result checked by an independent oracle.

Clients (``asyncio.gather``; the facade's async ``forward`` and ``asyncio.to_thread`` for the rest) create,
bulk-create, compose, delete, update weights, read weights, route queries and run per-row mixture forwards on a
tiny Llama, with a weight cache of 4 adapters for a working set of ~30 (constant eviction, in random orders).

The test keeps its own registry of every weight version it ever gave the library: ``(id, version) -> weights``,
written *before* the update call, so any version the library can serve is known. The oracle for a forward is a
second, untouched copy of the model whose linear weights are replaced by ``W + sum_i w_i * s_i * B_i @ A_i``
(dense, float64, from the registry) and run row by row; the facade's logits must match it for versions
between the one current when the call started and the newest one given by then. A stale version (older than
at the start), a deleted adapter served after its deletion, or a route naming an adapter deleted before the
query started fails the test. Reads must return the registry's bits exactly. At the end every stored adapter
is re-read from the catalog bytes and compared with the registry.

Default: 1,500 operations; ``-m slow``: 10,000.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from smoa import (
    AdapterNotFoundError,
    AdapterSpecialization,
    CompositionError,
    SMoAConfig,
    SparseAdapterMixture,
)
from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights, checksum

from .helpers import Oracle

TAGS = [f"d{i}" for i in range(6)]
ATOL = RTOL = 2e-4


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def random_weights(profile: BaseProfile, rng: random.Random) -> LoraWeights:
    """rank 2, 1-4 random modules, non-zero A and B (every version changes the output visibly)."""
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    modules = rng.sample(profile.module_names, rng.randint(1, 4))
    factors = {}
    for m in [m for m in profile.module_names if m in modules]:
        d_in, d_out = profile.shape(m)
        factors[m] = (torch.randn(2, d_in, generator=g) * 0.2, torch.randn(d_out, 2, generator=g) * 0.2)
    return LoraWeights(factors, alpha=4.0, rank=2)


@dataclass
class Registry:
    """What the test gave the library. Versions are recorded before the call that creates them."""

    history: dict[tuple[str, int], LoraWeights] = field(default_factory=dict)
    current: dict[str, int] = field(default_factory=dict)  # leaf id -> version confirmed by the library
    composites: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    live: list[str] = field(default_factory=list)
    deleted: dict[str, int] = field(default_factory=dict)  # id -> sequence number when its delete returned
    deleting: set[str] = field(default_factory=set)  # delete calls in flight
    pending_members: dict[str, int] = field(default_factory=dict)
    locks: dict[str, threading.Lock] = field(default_factory=dict)
    seq: itertools.count = field(default_factory=itertools.count)
    mutex: threading.Lock = field(default_factory=threading.Lock)
    checked: dict[str, int] = field(default_factory=dict)

    def newest(self, aid: str) -> int:
        with self.mutex:
            v = self.current[aid]
            while (aid, v + 1) in self.history:
                v += 1
            return v

    def add(self, aid: str, weights: LoraWeights | None, members: list[tuple[str, float]] | None = None) -> None:
        with self.mutex:
            if weights is not None:
                self.history[(aid, 1)] = weights
                self.current[aid] = 1
            else:
                self.composites[aid] = list(members or [])
            self.locks[aid] = threading.Lock()
            self.live.append(aid)

    def count(self, what: str, n: int = 1) -> None:
        with self.mutex:
            self.checked[what] = self.checked.get(what, 0) + n


def _leaves(reg: Registry, pairs: list[tuple[str, float]]) -> list[tuple[str, float]]:
    out = []
    for aid, w in pairs:
        if aid in reg.composites:
            out += [(leaf, w * lw) for leaf, lw in reg.composites[aid]]
        else:
            out.append((aid, w))
    return out


def check_row(reg: Registry, oracle: Oracle, ids: list[int], pairs: list[tuple[str, float]],
              lo: dict[str, int], got: torch.Tensor) -> None:  # fmt: skip
    """``got`` must equal the oracle for some versions in ``[lo, newest]`` of each leaf (usually exactly one)."""
    leaves = _leaves(reg, pairs)
    ranges = [range(lo[leaf], reg.newest(leaf) + 1) for leaf, _ in leaves]
    tried = []
    for versions in itertools.product(*ranges):
        mix = [(reg.history[(leaf, v)], w) for (leaf, w), v in zip(leaves, versions)]
        want = oracle.logits(ids, mix)
        if torch.allclose(got, want, atol=ATOL, rtol=RTOL):
            return
        tried.append((versions, float((got - want).abs().max())))
    raise AssertionError(f"forward of {pairs} matches no allowed version: lo={lo} tried={tried}")


class Client:
    def __init__(self, smoa: SparseAdapterMixture, reg: Registry, oracle: Oracle, seed: int) -> None:
        self.smoa, self.reg, self.oracle = smoa, reg, oracle
        self.rng = random.Random(seed)
        self.profile = smoa.library.profile

    async def run(self, n_ops: int) -> None:
        ops = [(self.forward, 34), (self.read, 18), (self.query, 12), (self.update, 12), (self.create, 8),
               (self.create_many, 3), (self.delete, 9), (self.compose, 3), (self.stats, 1)]  # fmt: skip
        funcs, weights = zip(*ops)
        for _ in range(n_ops):
            await self.rng.choices(funcs, weights)[0]()

    # -- helpers ------------------------------------------------------------------------------------------------
    def _pick(self, k: int, leaves_only: bool = False) -> list[str]:
        """``k`` live ids; 70 % of the time from a hot set of 4 (so updates hit cached adapters), else any."""
        with self.reg.mutex:
            pool = [a for a in self.reg.live if not leaves_only or a in self.reg.current]
        if self.rng.random() < 0.7 and len(pool) > 4:
            pool = pool[:4]
        return self.rng.sample(pool, min(k, len(pool)))

    def _lo(self, pairs: list[tuple[str, float]]) -> dict[str, int]:
        with self.reg.mutex:
            return {leaf: self.reg.current[leaf] for leaf, _ in _leaves(self.reg, pairs)}

    def _deleted(self, ids: list[str]) -> bool:
        """Some id was deleted, or its delete is in flight (committed before the registry hears of it)."""
        with self.reg.mutex:
            return any(i in self.reg.deleted or i in self.reg.deleting for i in ids)

    # -- operations ---------------------------------------------------------------------------------------------
    async def forward(self, pairs_per_row: list[list[tuple[str, float]]] | None = None) -> None:
        if pairs_per_row is None:
            pairs_per_row = []
            for _ in range(self.rng.randint(1, 3)):
                ids = self._pick(self.rng.randint(1, 3))
                pairs_per_row.append([(a, self.rng.uniform(0.1, 1.0)) for a in ids])
        t = self.rng.randint(3, 10)
        inputs = [[self.rng.randrange(256) for _ in range(t)] for _ in pairs_per_row]
        los = [self._lo(p) for p in pairs_per_row]
        try:
            out = await self.smoa.forward(inputs, routes=pairs_per_row)
        except AdapterNotFoundError:
            assert self._deleted([a for p in pairs_per_row for a, _ in p])
            self.reg.count("forward refused: adapter deleted meanwhile")
            return
        logits = out.logits.detach()
        for r, (pairs, lo) in enumerate(zip(pairs_per_row, los)):
            await asyncio.to_thread(check_row, self.reg, self.oracle, inputs[r], pairs, lo, logits[r])
            self.reg.count("forward rows checked by the oracle")
        self.reg.count("forwards")

    async def read(self) -> None:
        ids = self._pick(1, leaves_only=True)
        if not ids:
            return
        aid = ids[0]
        lo = self._lo([(aid, 1.0)])[aid]
        try:
            w = await asyncio.to_thread(self.smoa.library.get_weights, aid)
        except AdapterNotFoundError:
            assert self._deleted([aid])
            return
        hi = self.reg.newest(aid)
        want = [self.reg.history[(aid, v)].to_bytes() for v in range(lo, hi + 1)]
        assert w.to_bytes() in want, f"{aid}: served weights are not a version in [{lo}, {hi}]"
        self.reg.count("reads checked bit for bit")

    async def query(self) -> None:
        start = next(self.reg.seq)
        tag = self.rng.choice(TAGS)
        route = await asyncio.to_thread(self.smoa.query_adapters_sync, f"about {tag}", {"domain": tag})
        with self.reg.mutex:
            stale = [a for a in route.adapter_ids if self.reg.deleted.get(a, 1 << 62) < start]
        assert not stale, f"route names adapters deleted before the query: {stale}"
        self.reg.count("routes checked")
        if route.adapter_ids and self.rng.random() < 0.5:
            await self.forward([list(zip(route.adapter_ids, route.weights))])

    async def update(self) -> None:
        ids = self._pick(1, leaves_only=True)
        if not ids:
            return
        aid = ids[0]
        new = random_weights(self.profile, self.rng)

        def work() -> None:
            with self.reg.locks[aid]:
                with self.reg.mutex:
                    if aid in self.reg.deleted:
                        return
                    v = self.reg.current[aid]
                    self.reg.history[(aid, v + 1)] = new  # known before the library can serve it
                try:
                    ad = self.smoa.update_adapter_weights_sync(aid, new)
                except AdapterNotFoundError:
                    raise AssertionError(f"{aid} vanished without a delete") from None
                assert ad.version == v + 1, (ad.version, v)
                with self.reg.mutex:
                    self.reg.current[aid] = v + 1
                self.reg.count("updates")

        await asyncio.to_thread(work)

    async def create(self) -> None:
        if len(self.reg.live) > 45:
            return await self.delete()
        w = random_weights(self.profile, self.rng)
        tag = self.rng.choice(TAGS)
        ad = await asyncio.to_thread(self.smoa.create_adapter_sync, AdapterSpecialization.DOMAIN, [tag], weights=w)
        assert ad.version == 1
        self.reg.add(ad.id, w)
        self.reg.count("creates")

    async def create_many(self) -> None:
        ws = [random_weights(self.profile, self.rng) for _ in range(self.rng.randint(2, 5))]
        specs = [{"domain_tags": [self.rng.choice(TAGS)], "weights": w} for w in ws]
        made = await asyncio.to_thread(self.smoa.create_adapters_sync, specs)
        for ad, w in zip(made, ws):
            self.reg.add(ad.id, w)
        self.reg.count("creates")

    async def compose(self) -> None:
        members = self._pick(self.rng.randint(2, 3), leaves_only=True)
        if len(members) < 2:
            return
        with self.reg.mutex:
            for m in members:
                self.reg.pending_members[m] = self.reg.pending_members.get(m, 0) + 1
        try:
            ad = await asyncio.to_thread(self.smoa.compose_adapters_sync, members, domain_tags=[self.rng.choice(TAGS)])
            with self.reg.mutex:
                weights = [w for _, w in ad.members]
            self.reg.add(ad.id, None, list(zip(members, weights)))
            self.reg.count("composites")
        except AdapterNotFoundError:
            assert self._deleted(members)
        finally:
            with self.reg.mutex:
                for m in members:
                    self.reg.pending_members[m] -= 1

    async def delete(self) -> None:
        if len(self.reg.live) < 20:
            return await self.create()
        ids = self._pick(1)
        if not ids:
            return
        aid = ids[0]

        def work() -> None:
            with self.reg.locks[aid]:
                with self.reg.mutex:
                    if aid in self.reg.deleted:
                        return
                    in_use = self.reg.pending_members.get(aid, 0) > 0 or any(
                        aid in dict(ms) for c, ms in self.reg.composites.items() if c not in self.reg.deleted)
                    self.reg.deleting.add(aid)
                try:
                    self.smoa.delete_adapter_sync(aid)
                except CompositionError:
                    with self.reg.mutex:
                        self.reg.deleting.discard(aid)
                        assert in_use or aid in {m for ms in self.reg.composites.values() for m, _ in ms}
                    self.reg.count("deletes refused (member of a composite)")
                    return
                with self.reg.mutex:
                    self.reg.deleted[aid] = next(self.reg.seq)
                    self.reg.deleting.discard(aid)
                    self.reg.live.remove(aid)
                self.reg.count("deletes")
            try:  # a deleted adapter is never served again, even if it was cached a moment ago
                self.smoa.library.get_weights(aid)
                raise AssertionError(f"deleted adapter {aid} still served")
            except AdapterNotFoundError:
                pass

        await asyncio.to_thread(work)

    async def stats(self) -> None:
        s = await asyncio.to_thread(self.smoa.get_statistics)
        assert s["cache"]["loaded_adapters"] <= 4


def run_stress(tmp_path: Path, n_ops: int, n_clients: int = 8) -> dict[str, int]:
    torch.set_num_threads(1)
    model = tiny_llama()
    oracle = Oracle(model, profile_of(model))
    cfg = SMoAConfig(storage_path=tmp_path / "lib", max_loaded_adapters=4, encoder="hash", seed=0,
                     routing_strategy="task_based", max_active_adapters=3, blob_inline_max_bytes=2048)  # fmt: skip
    smoa = SparseAdapterMixture(cfg, base_model=model, tokenizer=None)
    reg = Registry()
    rng = random.Random(0)
    try:
        initial = [random_weights(smoa.library.profile, rng) for _ in range(30)]
        made = smoa.create_adapters_sync([{"domain_tags": [TAGS[i % 6]], "weights": w} for i, w in enumerate(initial)])
        for ad, w in zip(made, initial):
            reg.add(ad.id, w)

        async def main() -> None:
            await asyncio.gather(*(Client(smoa, reg, oracle, seed=s).run(n_ops // n_clients) for s in range(n_clients)))

        asyncio.run(main())
        stats = smoa.get_statistics()["cache"]
        assert stats["evictions"] > n_ops // 20, stats  # the cache really was far too small ...
        assert stats["hits"] > n_ops // 10, stats  # ... and still served hits (so a stale entry would show)
        reg.count("cache evictions", stats["evictions"])
        reg.count("cache hits", stats["hits"])
        _check_storage(smoa, reg)
    finally:
        smoa.close()
    return dict(reg.checked)


def profile_of(model: torch.nn.Module) -> BaseProfile:
    from smoa.adapter.profile import profile_from_model

    return profile_from_model(model)


def _check_storage(smoa: SparseAdapterMixture, reg: Registry) -> None:
    """Every stored adapter's catalog bytes are exactly the registry's current version; deleted ones are gone."""
    lib = smoa.library
    for aid, v in reg.current.items():
        if aid in reg.deleted:
            assert aid not in lib
            continue
        ad = lib.get_adapter(aid)
        assert ad.version == v
        key = ad.key
        blob, file, digest, _ = lib.catalog.read_weights(key)
        data = blob if blob is not None else (lib.directory / file).read_bytes()
        # the catalog checksum covers the canonical weight bytes (a file also carries its row in its header,
        # and is named by the sha256 of all its bytes)
        assert checksum(LoraWeights.from_bytes(data).to_bytes()) == digest
        assert blob is not None or file.rsplit("/", 1)[-1] == checksum(data)
        want = reg.history[(aid, v)]
        got = LoraWeights.from_bytes(data)
        assert list(got) == list(want) and all(torch.equal(got[m][i], want[m][i]) for m in want for i in (0, 1))


def test_concurrent_clients_with_an_oracle(tmp_path: Path) -> None:
    counts = run_stress(tmp_path, n_ops=1_500)
    assert counts.get("forward rows checked by the oracle", 0) > 300, counts
    assert counts.get("updates", 0) > 50 and counts.get("deletes", 0) > 20, counts


@pytest.mark.slow
def test_concurrent_clients_with_an_oracle_10k(tmp_path: Path) -> None:
    counts = run_stress(tmp_path, n_ops=10_000, n_clients=16)
    assert sum(counts.values()) >= 10_000 * 0.8, counts
    print(counts)


def test_the_oracle_sees_a_stale_version(tmp_path: Path) -> None:
    """The oracle can fail: the output under version 1 does not pass for version 2 and vice versa."""
    torch.set_num_threads(1)
    model = tiny_llama()
    oracle = Oracle(model, profile_of(model))
    rng = random.Random(1)
    with SparseAdapterMixture(SMoAConfig(storage_path=tmp_path / "lib", encoder="hash", max_loaded_adapters=4),
                              base_model=model) as smoa:  # fmt: skip
        w1, w2 = random_weights(smoa.library.profile, rng), random_weights(smoa.library.profile, rng)
        ad = smoa.create_adapter_sync(weights=w1)
        ids = [5, 17, 33, 2, 9]
        out1 = smoa.forward_sync([ids], routes=[[(ad.id, 0.7)]]).logits[0].detach()
        smoa.update_adapter_weights_sync(ad.id, w2)
        out2 = smoa.forward_sync([ids], routes=[[(ad.id, 0.7)]]).logits[0].detach()
        assert torch.allclose(out1, oracle.logits(ids, [(w1, 0.7)]), atol=ATOL, rtol=RTOL)
        assert torch.allclose(out2, oracle.logits(ids, [(w2, 0.7)]), atol=ATOL, rtol=RTOL)
        assert not torch.allclose(out2, oracle.logits(ids, [(w1, 0.7)]), atol=ATOL, rtol=RTOL)
        assert (out2 - oracle.logits(ids, [(w1, 0.7)])).abs().max() > 100 * ATOL


def test_merge_and_recreate_invalidate_routes_and_cached_weights(tmp_path: Path) -> None:
    """Merging near-duplicates or re-creating an adapter: no route or cached copy of the old one is served."""
    torch.set_num_threads(1)
    model = tiny_llama()
    oracle = Oracle(model, profile_of(model))
    rng = random.Random(3)
    cfg = SMoAConfig(storage_path=tmp_path / "lib", encoder="hash", max_loaded_adapters=4,
                     routing_strategy="task_based", max_active_adapters=3)  # fmt: skip
    with SparseAdapterMixture(cfg, base_model=model) as smoa:
        base = random_weights(smoa.library.profile, rng)
        twin = LoraWeights({m: (a * 1.001, b) for m, (a, b) in base.items()}, base.alpha, base.rank)
        a = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["dup"], weights=base)
        b = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["dup"], weights=twin)
        other = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["other"], weights=random_weights(smoa.library.profile, rng))
        ids = [7, 1, 99, 42]
        before = smoa.query_adapters_sync("dup", {"domain": "dup"})  # cached route and cached weights
        assert set(before.adapter_ids) == {a.id, b.id}
        smoa.forward_sync([ids], routes=[[(a.id, 1.0)]])
        report = smoa.optimize_library_sync(merge=True, prune=False, threshold=0.99)
        assert len(report.groups_merged) == 1 and sorted(report.groups_merged[0]) == sorted([a.id, b.id])
        merged = report.merged_into[0]
        after = smoa.query_adapters_sync("dup", {"domain": "dup"})
        assert after.adapter_ids == [merged], after  # the cached route was dropped
        w_merged = smoa.library.get_weights(merged)
        for src in (a.id, b.id):  # the sources' ids now serve the merged adapter, not their cached weights
            assert smoa.library.get_weights(src).to_bytes() == w_merged.to_bytes()
        got = smoa.forward_sync([ids], routes=[[(a.id, 1.0)]]).logits[0].detach()
        assert torch.allclose(got, oracle.logits(ids, [(w_merged, 1.0)]), atol=ATOL, rtol=RTOL)
        # re-create: delete `other`, create a new adapter with the same tag; only the new one is routed and served
        smoa.forward_sync([ids], routes=[[(other.id, 1.0)]])
        assert smoa.query_adapters_sync("other", {"domain": "other"}).adapter_ids == [other.id]
        smoa.delete_adapter_sync(other.id)
        w_new = random_weights(smoa.library.profile, rng)
        new = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["other"], weights=w_new)
        assert smoa.query_adapters_sync("other", {"domain": "other"}).adapter_ids == [new.id]
        with pytest.raises(AdapterNotFoundError):
            smoa.forward_sync([ids], routes=[[(other.id, 1.0)]])
        got = smoa.forward_sync([ids], routes=[[(new.id, 1.0)]]).logits[0].detach()
        assert torch.allclose(got, oracle.logits(ids, [(w_new, 1.0)]), atol=ATOL, rtol=RTOL)
