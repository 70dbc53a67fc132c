"""A stateful model-based test of the core against a plain in-memory oracle (hypothesis RuleBasedStateMachine).

Rules: create, bulk create, update weights, update tags, delete, bulk delete, delete an alias, archive, restore,
pin, merge, undo merge, prune, route, mix, close + reopen, reopen with another encoder. After every step:

* a route never names an adapter that is not active (and every active adapter is reachable by its tag);
* every adapter's weights equal the oracle's bit for bit; counts and statuses agree; aliases resolve as the
  oracle says;
* the routing index reflects the catalog's generation (it caught up, it did not fall behind).

Bounded in the default run (``SMOA_STATEFUL_EXAMPLES``, 200 by default with short runs); ``-m slow`` runs a
longer search.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, precondition, rule

from smoa.adapter.spec import AdapterSpec
from smoa.adapter.weights import LoraWeights
from smoa.compose.merge import combine_mean
from smoa.errors import InvalidInputError

from .conftest import open_core, weights

TAGS = ("anatomy", "botany", "chemistry", "geology", "zoology")
ENCODERS = ("hash", "static")


@dataclass
class Model:
    """What the oracle knows of one adapter."""

    weights: LoraWeights
    tag: str
    status: str = "active"  # active | archived | merged
    pinned: bool = False
    merged_into: str | None = None


@dataclass
class MergeRecord:
    sources: list[str]
    merged: str
    undone: bool = False


@dataclass
class Oracle:
    adapters: dict[str, Model] = field(default_factory=dict)
    merges: dict[int, MergeRecord] = field(default_factory=dict)

    def live(self) -> list[str]:
        return sorted(i for i, m in self.adapters.items() if m.status in ("active", "archived"))

    def active(self) -> list[str]:
        return sorted(i for i, m in self.adapters.items() if m.status == "active")

    def resolve(self, aid: str) -> str:
        seen = 0
        while (m := self.adapters.get(aid)) is not None and m.merged_into is not None and seen < 32:
            aid, seen = m.merged_into, seen + 1
        return aid


def _same(a: LoraWeights, b: LoraWeights) -> bool:
    return (set(a.factors) == set(b.factors) and a.alpha == b.alpha and a.rank == b.rank
            and all(torch.equal(a.factors[m][0], b.factors[m][0]) and torch.equal(a.factors[m][1], b.factors[m][1])
                    for m in a.factors))  # fmt: skip


class CoreMachine(RuleBasedStateMachine):
    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory(prefix="smoa-sm-")
        self.path = Path(self.tmp.name) / "lib"
        self.encoder = "hash"
        self.core = open_core(self.path, encoder=self.encoder, blob_inline_max_bytes=700)
        self.oracle = Oracle()
        self.seed = 1000

    def teardown(self) -> None:
        self.core.close()
        self.tmp.cleanup()

    def _fresh(self) -> LoraWeights:
        self.seed += 1
        return weights(self.seed, rank=1 + self.seed % 3)

    # -- creation -----------------------------------------------------------------------------------------------
    @initialize(target=ids)
    def first(self) -> str:
        return self.create(0)

    @rule(target=ids, t=st.integers(0, len(TAGS) - 1))
    def create(self, t: int) -> str:
        w = self._fresh()
        ad = self.core.create(AdapterSpec(weights=w, domain_tags=[TAGS[t]], description=f"{TAGS[t]} study"))
        self.oracle.adapters[ad.id] = Model(w, TAGS[t])
        return ad.id

    @rule(n=st.integers(0, 4), t=st.integers(0, len(TAGS) - 1))
    def bulk_create(self, n: int, t: int) -> None:
        ws = [self._fresh() for _ in range(n)]
        made = self.core.create_many([AdapterSpec(weights=w, domain_tags=[TAGS[t]]) for w in ws])
        assert len(made) == n
        for ad, w in zip(made, ws):
            self.oracle.adapters[ad.id] = Model(w, TAGS[t])

    # -- changes ------------------------------------------------------------------------------------------------
    @rule(aid=ids)
    def update_weights(self, aid: str) -> None:
        target = self.oracle.resolve(aid)
        if target not in self.oracle.live():
            return
        w = self._fresh()
        self.core.update_weights(aid, w)
        self.oracle.adapters[target].weights = w

    @rule(aid=ids, t=st.integers(0, len(TAGS) - 1))
    def update_tags(self, aid: str, t: int) -> None:
        target = self.oracle.resolve(aid)
        if target not in self.oracle.live():
            return
        self.core.update_adapter(aid, domain_tags=[TAGS[t]])
        self.oracle.adapters[target].tag = TAGS[t]

    @rule(aid=consumes(ids))
    def delete(self, aid: str) -> None:
        m = self.oracle.adapters.get(aid)
        if m is None:
            return
        self.core.delete(aid)
        self._forget(aid)

    @rule(aids=st.lists(ids, max_size=3, unique=True))
    def bulk_delete(self, aids: list[str]) -> None:
        present = [a for a in aids if a in self.oracle.adapters]
        self.core.delete_many(present)
        for a in present:
            self._forget(a)

    def _forget(self, aid: str) -> None:
        m = self.oracle.adapters.pop(aid, None)
        if m is None:  # went with an adapter deleted before it in the same call
            return
        if m.status != "merged":  # a live adapter: aliases to it go too
            for other in [i for i, o in self.oracle.adapters.items() if o.merged_into == aid]:
                self.oracle.adapters.pop(other)

    @rule(aid=ids)
    def archive(self, aid: str) -> None:
        target = self.oracle.resolve(aid)
        if target not in self.oracle.live():
            return
        self.core.archive(aid)
        self.oracle.adapters[target].status = "archived"

    @rule(aid=ids)
    def restore(self, aid: str) -> None:
        target = self.oracle.resolve(aid)
        if target not in self.oracle.live():
            return
        self.core.restore(aid)
        self.oracle.adapters[target].status = "active"

    @rule(aid=ids, on=st.booleans())
    def pin(self, aid: str, on: bool) -> None:
        target = self.oracle.resolve(aid)
        if target not in self.oracle.live():
            return
        (self.core.pin if on else self.core.unpin)(aid)
        self.oracle.adapters[target].pinned = on

    @precondition(lambda self: len(self.oracle.active()) >= 2)
    @rule(target=ids, pick=st.randoms(use_true_random=False))
    def merge(self, pick) -> str:
        a, b = pick.sample(self.oracle.active(), 2)
        w = combine_mean([self.oracle.adapters[a].weights, self.oracle.adapters[b].weights], "cat")
        new, merge_id = self.core.merge([a, b], AdapterSpec(weights=w, domain_tags=[self.oracle.adapters[a].tag]), "cat")
        self.oracle.adapters[new.id] = Model(w, self.oracle.adapters[a].tag)
        for s in (a, b):
            self.oracle.adapters[s].status, self.oracle.adapters[s].merged_into = "merged", new.id
        self.oracle.merges[merge_id] = MergeRecord([a, b], new.id)
        return new.id

    @precondition(lambda self: any(not r.undone for r in self.oracle.merges.values()))
    @rule(pick=st.randoms(use_true_random=False))
    def undo_merge(self, pick) -> None:
        merge_id = pick.choice(sorted(i for i, r in self.oracle.merges.items() if not r.undone))
        rec = self.oracle.merges[merge_id]
        merged = self.oracle.adapters.get(rec.merged)
        if merged is not None and merged.status == "merged":  # merged again: refused, nothing changes
            with pytest.raises(InvalidInputError):
                self.core.undo_merge(merge_id)
            return
        restored = self.core.undo_merge(merge_id)
        expect = [s for s in rec.sources if s in self.oracle.adapters and self.oracle.adapters[s].status == "merged"]
        assert sorted(restored) == sorted(expect)
        for s in expect:
            self.oracle.adapters[s].status, self.oracle.adapters[s].merged_into = "active", None
        if merged is not None:
            self._forget(rec.merged)
        rec.undone = True

    @rule(aids=st.lists(ids, max_size=4, unique=True), action=st.sampled_from(["archive", "delete"]))
    def prune(self, aids: list[str], action: str) -> None:
        done = self.core.prune(aids, action)
        expect = [self.oracle.resolve(a) for a in aids]
        expect = list(dict.fromkeys(a for a in expect if a in self.oracle.adapters
                                    and self.oracle.adapters[a].status == "active" and not self.oracle.adapters[a].pinned))  # fmt: skip
        assert [i for i, _ in done] == expect
        for a in expect:
            if action == "archive":
                self.oracle.adapters[a].status = "archived"
            else:
                self._forget(a)

    # -- reads --------------------------------------------------------------------------------------------------
    @rule(t=st.integers(0, len(TAGS) - 1), strategy=st.sampled_from(["semantic", "task_based", "hybrid"]))
    def route_and_mix(self, t: int, strategy: str) -> None:
        route = self.core.route(f"{TAGS[t]} study", metadata={"domain": TAGS[t]}, strategy=strategy, k=3)
        active = set(self.oracle.active())
        assert set(route.adapter_ids) <= active, (route.adapter_ids, active)
        for (leaf, _version), w, _ in self.core.mixture(route):
            assert _same(w, self.oracle.adapters[leaf].weights)

    @rule()
    def reopen(self) -> None:
        self.core.close()
        self.core = open_core(self.path, encoder=self.encoder, blob_inline_max_bytes=700)

    @rule()
    def reopen_with_another_encoder(self) -> None:
        self.core.close()
        self.encoder = ENCODERS[1 - ENCODERS.index(self.encoder)]
        self.core = open_core(self.path, encoder=self.encoder, blob_inline_max_bytes=700)
        assert self.core.reencoded == self.core.catalog.count(("active", "archived", "merged"))

    # -- invariants ---------------------------------------------------------------------------------------------
    @invariant()
    def catalog_matches_the_oracle(self) -> None:
        live = self.oracle.live()
        assert self.core.total_adapters == len(live)
        assert sorted(a.id for a in self.core.iter_adapters(("active", "archived"))) == live
        for aid, m in self.oracle.adapters.items():
            ad = self.core.catalog.get(aid)
            assert ad.status == m.status and ad.pinned == m.pinned or m.status == "merged"
            assert self.core.resolve(aid) == self.oracle.resolve(aid)
            if m.status != "merged":
                assert _same(self.core.get_weights(aid), m.weights)
                assert ad.domain_tags == [m.tag]

    @invariant()
    def index_is_never_behind_and_names_only_active(self) -> None:
        assert self.core.statistics()["index_generation"] == self.core.generation
        active = set(self.oracle.active())
        for tag in {m.tag for m in self.oracle.adapters.values()}:
            route = self.core.route(tag, metadata={"domain": tag}, strategy="task_based", k=64)
            expect = {i for i in active if self.oracle.adapters[i].tag == tag}
            assert set(route.adapter_ids) == expect


EXAMPLES = int(os.environ.get("SMOA_STATEFUL_EXAMPLES", "100"))
_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                 derandomize=True)  # fmt: skip

TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=EXAMPLES, stateful_step_count=8, **_SETTINGS)


@pytest.mark.slow
def test_core_machine_long() -> None:
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(CoreMachine, settings=settings(max_examples=1000, stateful_step_count=30, **_SETTINGS))
