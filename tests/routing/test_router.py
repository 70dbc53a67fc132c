"""Router: strategies, scores and weights, tie-breaks, the route cache and generations, persistence, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from smoa.config import RoutingStrategy, SMoAConfig
from smoa.errors import InvalidInputError
from smoa.routing.encoders import get_encoder
from smoa.routing.router import MAX_QUERY_CHARS, Router, RoutingText

LIB = [
    RoutingText(["medical", "radiology"], ["diagnosis"], "chest x-ray and scan reading"),
    RoutingText(["medical", "cardiology"], ["diagnosis"], "heart ecg reading"),
    RoutingText(["legal", "contract"], ["review"], "contract clause review"),
    RoutingText(["finance", "trading"], ["prediction"], "stock market trading prediction"),
    RoutingText(["cooking"], ["recipes"], "bread baking recipes", examples=["bake bread", "sourdough bread recipe"]),
]


def ids_of(keys: list[int]) -> list[str]:
    return [f"ad_{k:03d}" for k in keys]


def make(tmp: Path | None = None, generation: int = 1, **cfg: object) -> Router:
    config = SMoAConfig(encoder="hash", **cfg)  # type: ignore[arg-type]
    router = Router(config, tmp, ids_of)
    keys = router.routing_keys(LIB)
    router.add(np.arange(len(LIB)), keys, [(it.domain_tags, it.skill_tags) for it in LIB], generation)
    return router


def rows_of(router_keys: np.ndarray):
    return lambda: [(i, router_keys[i], it.domain_tags, it.skill_tags) for i, it in enumerate(LIB)]


def test_routing_keys_are_unit_and_move_toward_examples() -> None:
    router = make()
    keys = router.routing_keys(LIB)
    assert keys.shape == (5, 384) and keys.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)
    enc = get_encoder("hash")
    text_only = router.routing_keys([RoutingText(["cooking"], ["recipes"], "bread baking recipes")])[0]
    centroid = enc.encode(["bake bread", "sourdough bread recipe"]).mean(axis=0)
    assert keys[4] @ centroid > text_only @ centroid


@pytest.mark.parametrize("strategy", list(RoutingStrategy))
def test_each_strategy_finds_the_obvious_adapter(strategy: RoutingStrategy) -> None:
    router = make()
    route = router.route("contract clause review", {"domain": "legal"}, strategy=strategy, k=2)
    assert route.adapter_ids[0] == "ad_002"
    assert route.strategy is strategy and len(route) <= 2
    assert route.weights and sum(route.weights) == pytest.approx(1.0)
    assert route.routing_scores == sorted(route.routing_scores, reverse=True)


def test_semantic_scores_are_cosines_and_weights_softmax() -> None:
    router = make(routing_temperature=0.1)
    route = router.route("heart ecg reading", strategy="semantic", k=3)
    q = get_encoder("hash").encode(["heart ecg reading"])[0]
    keys = router.routing_keys(LIB)
    ref = {f"ad_{i:03d}": float(keys[i] @ q) for i in range(5)}
    for aid, s in zip(route.adapter_ids, route.routing_scores):
        assert s == pytest.approx(ref[aid], abs=1e-5)
    z = np.exp(np.array(route.routing_scores) / 0.1)
    np.testing.assert_allclose(route.weights, z / z.sum(), rtol=1e-6)


def test_threshold_drops_low_scores() -> None:
    router = make(routing_threshold=0.99)
    assert router.route("unrelated words entirely", strategy="semantic").adapter_ids == []


def test_ties_broken_by_id() -> None:
    config = SMoAConfig(encoder="hash")
    names = {7: "b", 3: "c", 5: "a"}
    router = Router(config, None, lambda ks: [names[k] for k in ks])
    v = get_encoder("hash").encode(["same"])
    router.add(np.array([7, 3, 5]), np.repeat(v, 3, axis=0), [([], [])] * 3, 1)
    assert router.route("same", strategy="semantic", k=2).adapter_ids == ["a", "b"]


def test_task_based_uses_metadata_then_query_words() -> None:
    router = make()
    assert router.route("anything", {"domain": "medical", "task": "diagnosis"}, "task_based", k=2).adapter_ids == [
        "ad_000",
        "ad_001",
    ]
    assert router.route("please review it", strategy="task_based", k=1).adapter_ids == ["ad_002"]
    assert router.route("zzz qqq", strategy="task_based").adapter_ids == []


def test_route_cache_hits_and_generation_invalidates() -> None:
    router = make()
    a = router.route("heart ecg", k=2)
    b = router.route("  heart   ecg ", k=2)  # normalised to the same key
    assert not a.cache_hit and b.cache_hit and b.adapter_ids == a.adapter_ids
    assert router.route("heart ecg", k=2, strategy="semantic").cache_hit is False  # strategy is in the key
    router.remove([1], generation=2)
    c = router.route("heart ecg", k=2)
    assert not c.cache_hit and "ad_001" not in c.adapter_ids and c.library_version == 2
    stats = router.statistics()
    assert stats["cache_hits"] == 1 and stats["queries"] == 4 and stats["generation"] == 2


def test_add_replaces_key_and_updates_groups() -> None:
    router = make()
    v = router.routing_keys([RoutingText(["legal"], ["review"], "contract clause review")])
    router.add(np.array([0]), v, [(["legal"], ["review"])], generation=2)
    assert router.statistics()["index_size"] == 5
    assert router._groups.group_of(0) == "legal"
    route = router.route("chest x-ray scan", {"domain": "radiology"}, strategy="task_based")
    assert "ad_000" not in route.adapter_ids


def test_an_add_planned_before_its_hold_gives_the_state_of_one_planned_in_it() -> None:
    """``Router._plan`` (what ``apply`` works out before its hold: the groups' vectors, the tag postings and group
    sums) made before another change lands: the add that takes it leaves the tags, groups and routes of an add
    that planned nothing ahead."""
    more = [RoutingText(["medical"], ["triage"], "emergency triage of patients"),
            RoutingText(["legal", "contract"], ["drafting"], "draft a lease contract"),
            RoutingText([], ["poetry"], "write a sonnet")]  # fmt: skip
    late = [RoutingText(["medical", "radiology"], ["triage"], "x-ray triage")]
    planned, plain = make(), make()
    vecs, late_vecs = planned.routing_keys(more), planned.routing_keys(late)
    keys, tags = np.arange(10, 13), [(it.domain_tags, it.skill_tags) for it in more]
    plan = planned._plan(keys, list(vecs[:, None, :]), tags)
    for r in (planned, plain):
        r.add(np.array([20]), late_vecs, [(late[0].domain_tags, late[0].skill_tags)], generation=2)
        r.remove([1], generation=3)
    planned.add(keys, plan.mats, tags, generation=4, plan=plan)
    plain.add(keys, list(vecs[:, None, :]), tags, generation=4)
    assert {t: (k.tolist(), f.tolist()) for t, (k, f) in planned._tags._postings.items()} == {
        t: (k.tolist(), f.tolist()) for t, (k, f) in plain._tags._postings.items()}
    names, cents = planned._groups.centroids()
    assert names == plain._groups.centroids()[0]
    np.testing.assert_allclose(cents, plain._groups.centroids()[1], atol=1e-6)
    for text in ("emergency triage", "lease contract drafting", "chest x-ray", "sonnet"):
        for strategy in ("semantic", "hybrid", "hierarchical", "task_based"):
            assert planned.route(text, strategy=strategy, k=3).adapter_ids == plain.route(
                text, strategy=strategy, k=3).adapter_ids, (text, strategy)


def test_empty_and_huge_queries() -> None:
    router = make()
    assert router.route("").adapter_ids == []
    assert router.route("   ", {"domain": "legal"}).adapter_ids[0] == "ad_002"
    huge = router.route("contract clause review " * 1000)
    assert huge.query_truncated and huge.adapter_ids
    assert router.statistics()["truncated"] == 1
    assert len("contract clause review " * 1000) > MAX_QUERY_CHARS


def test_bad_input() -> None:
    router = make()
    with pytest.raises(InvalidInputError, match="`domain`"):
        router.route("x", {"domain": 3})
    with pytest.raises(InvalidInputError, match="`query`"):
        router.route(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="`strategy`"):
        router.route("x", strategy="psychic")
    with pytest.raises(InvalidInputError, match="`k`"):
        router.route("x", k=0)
    assert router.route("contract review", {"unknown_key": "whatever"}).adapter_ids  # ignored, not an error


def test_latency_budget_degrades_and_counts() -> None:
    router = make(routing_latency_budget_ms=0.0)
    route = router.route("contract clause review", {"domain": "legal"}, strategy="hybrid")
    assert route.degraded and route.adapter_ids
    assert router.statistics()["degraded"] == 1


def test_the_tag_side_runs_only_when_it_fits_what_is_left_of_the_budget() -> None:
    """HYBRID's tag side is skipped (cosines only, ``degraded``) when its measured cost and the steps after it no
    longer fit the budget, before it starts; with room it runs and the route is whole."""
    router = make(routing_latency_budget_ms=1e6, enable_caching=False)
    whole = router.route("contract clause review", {"domain": "legal"}, strategy="hybrid")
    assert not whole.degraded
    router._walk_cost.tag.extend([400.0] * 64)  # as if the tag side took 400 ms and what follows it 400 ms more
    router._walk_cost.tail.extend([400.0] * 64)
    router.config.routing_latency_budget_ms = 500.0
    cut = router.route("contract clause review", {"domain": "legal"}, strategy="hybrid")
    assert cut.degraded and cut.adapter_ids
    semantic = router.route("contract clause review", strategy="semantic")
    assert cut.routing_scores == pytest.approx(semantic.routing_scores)  # the cosines alone
    assert whole.routing_scores != pytest.approx(cut.routing_scores)  # the metadata's tag weight lifted them
    router.config.routing_latency_budget_ms = 1e6
    assert not router.route("contract clause review", {"domain": "legal"}, strategy="hybrid").degraded


def test_timings_and_latency_filled() -> None:
    route = make().route("heart ecg reading")
    assert set(route.timings_ms) == {"encode", "search", "fuse"}
    assert route.routing_latency_ms >= route.timings_ms["search"] > 0


def test_hierarchical_groups_grow_with_library() -> None:
    router = make()
    assert router.statistics()["groups"] == 4  # medical, legal, finance, cooking
    v = router.routing_keys([RoutingText([], ["misc"], "untagged thing")])
    router.add(np.array([10]), v, [([], ["misc"])], generation=2)
    assert router.statistics()["groups"] == 5 and router._groups.group_of(10).startswith("~c")


def test_persist_then_load_without_rebuild(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    router = make(tmp_path, generation=3)
    keys = router.routing_keys(LIB)
    router.save()
    before = router.route("heart ecg reading", k=3).adapter_ids
    calls = []
    again = Router(SMoAConfig(encoder="hash"), tmp_path, ids_of)
    with caplog.at_level(logging.WARNING):
        again.sync(lambda: calls.append(1) or rows_of(keys)(), generation=3)
    assert calls == [] and not caplog.records
    assert again.route("heart ecg reading", k=3).adapter_ids == before


def test_stale_generation_rebuilds_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    router = make(tmp_path, generation=3)
    keys = router.routing_keys(LIB)
    router.save()
    again = Router(SMoAConfig(encoder="hash"), tmp_path, ids_of)
    with caplog.at_level(logging.WARNING):
        again.sync(rows_of(keys), generation=4)
    assert "generation 3" in caplog.text
    assert again.statistics()["index_size"] == 5 and again.generation == 4


@pytest.mark.parametrize("victim", ["vectors.faiss", "tags.npz", "meta.json", "ids.npy"])
def test_corrupt_or_missing_file_rebuilds(tmp_path: Path, caplog: pytest.LogCaptureFixture, victim: str) -> None:
    router = make(tmp_path, generation=2)
    keys = router.routing_keys(LIB)
    router.save()
    path = tmp_path / victim
    if victim == "ids.npy":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:10] + b"garbage")
    again = Router(SMoAConfig(encoder="hash"), tmp_path, ids_of)
    with caplog.at_level(logging.WARNING):
        again.sync(rows_of(keys), generation=2)
    assert "rebuilt" in caplog.text
    assert again.route("contract clause review", k=1).adapter_ids == ["ad_002"]
    # the rebuild was saved: a third open loads it silently
    caplog.clear()
    third = Router(SMoAConfig(encoder="hash"), tmp_path, ids_of)
    with caplog.at_level(logging.WARNING):
        third.sync(rows_of(keys), generation=2)
    assert not caplog.records


def test_in_memory_sync_builds_from_rows() -> None:
    keys = make().routing_keys(LIB)
    router = Router(SMoAConfig(encoder="hash"), None, ids_of)
    router.sync(rows_of(keys), generation=1)
    assert router.route("heart ecg reading", k=1).adapter_ids == ["ad_001"]


def test_learned_keys_separate_examples_better() -> None:
    router = make()
    items = [
        RoutingText(["a"], ["x"], examples=["red apple pie", "apple crumble", "green apple tart"]),
        RoutingText(["b"], ["y"], examples=["apple stock price", "apple shares fall", "buy apple stock"]),
    ]
    enc = get_encoder("hash")
    ex = enc.encode([e for it in items for e in it.examples])
    lab = np.array([0, 0, 0, 1, 1, 1])

    def margin(keys: np.ndarray) -> float:
        s = ex @ keys.T
        return float(np.mean(s[np.arange(6), lab] - s[np.arange(6), 1 - lab]))

    plain, learned = router.routing_keys(items), router.routing_keys(items, learn=True)
    np.testing.assert_allclose(np.linalg.norm(learned, axis=1), 1.0, atol=1e-5)
    assert margin(learned) > margin(plain)


def _island_library(n_big: int = 3000, n_small: int = 12, dim: int = 64, seed: int = 0):
    """A small remote group (tag "island", added first) and a big group of keys around another centre."""
    rng = np.random.default_rng(seed)
    centre_big, centre_small = rng.standard_normal((2, dim))
    big = centre_big + 1.2 * rng.standard_normal((n_big, dim))
    small = centre_small + 0.5 * rng.standard_normal((n_small, dim))
    x = np.concatenate([small, big])
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    tags = [(["island"], ["s"])] * n_small + [(["bulk"], ["s"])] * n_big
    queries = centre_small + 0.5 * rng.standard_normal((40, dim))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    return x, tags, queries


def test_small_groups_are_scored_exactly_beside_the_graph() -> None:
    from smoa.routing.index import IndexParams
    from smoa.routing.router import SMALL_GROUP_LIMIT

    x, tags, queries = _island_library()
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(64), params=IndexParams(exact_threshold=100, ef_search=16))
    router.add(np.arange(len(x)), x, tags, generation=1)
    assert router.statistics()["index_kind"] == "hnsw-sq8" and 12 <= SMALL_GROUP_LIMIT
    texts = [f"q{i}" for i in range(len(queries))]
    router.encoder.prime(texts, queries)
    for strategy in ("semantic", "hybrid"):
        for text, q in zip(texts, queries):
            route = router.route(text, strategy=strategy, k=3)
            got = [int(a[3:]) for a in route.adapter_ids]
            sims = x @ q
            assert all(g < 12 for g in got), (strategy, text, got)  # all from the island
            # best found = best there is, up to the 8-bit codes' rounding (near ties may swap)
            assert sims[got[0]] >= sims.max() - 0.02, (strategy, text)
            np.testing.assert_allclose(route.routing_scores, sims[got], atol=0.02)


def test_the_rescue_reaches_past_the_nearest_group_centroids_within_its_member_budget() -> None:
    """A small group whose centroid ranks 4th among the small groups (its members spread apart) but which holds
    the query's best key is still scored exactly: the rescue takes the next nearest small groups while they hold
    at most ``RESCUE_MEMBERS`` adapters, not only the ``RESCUE_GROUPS`` nearest centroids."""
    from smoa.routing.index import IndexParams
    from smoa.routing.router import RESCUE_GROUPS, RESCUE_MEMBERS

    dim, rng = 64, np.random.default_rng(3)
    q = np.zeros(dim, np.float32)
    q[0] = 1.0

    def toward(cos: float, axis: int) -> np.ndarray:  # a unit vector at cosine ``cos`` to q
        v = np.zeros(dim, np.float32)
        v[0], v[axis] = cos, np.sqrt(1 - cos**2)
        return v

    decoys = [np.stack([toward(0.6, 1 + 3 * g + j) for j in range(3)]) for g in range(RESCUE_GROUPS + 1)]
    target = np.stack([toward(0.95, 20)] + [toward(-0.5, 21 + j) for j in range(3)])  # centroid cos to q < 0
    bulk = rng.standard_normal((600, dim)).astype(np.float32)
    bulk[:, 0] = -np.abs(bulk[:, 0]) * 3  # away from q
    x = np.concatenate(decoys + [target, bulk])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tags = [([f"decoy{g}"], ["s"]) for g in range(len(decoys)) for _ in range(3)] + [(["target"], ["s"])] * 4
    tags += [(["bulk"], ["s"])] * len(bulk)
    best = 3 * len(decoys)  # the target group's first member: cosine 0.95, the best key there is
    assert int(np.argmax(x @ q)) == best and len(decoys) * 3 + 4 <= RESCUE_MEMBERS
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(dim), params=IndexParams(exact_threshold=100, ef_search=16))
    router.add(np.arange(len(x)), x.astype(np.float32), tags, generation=1)
    names, cents = router._groups.centroids()
    small = sorted((n for n in names if n != "bulk"), key=lambda n: -float(cents[names.index(n)] @ q))
    assert small.index("target") >= RESCUE_GROUPS  # its centroid is not among the nearest RESCUE_GROUPS
    rescued = router._small_group_scores(q, 8)
    assert best in rescued and rescued[best] == pytest.approx(0.95, abs=0.02)
    router.encoder.prime(["q"], q[None, :])
    route = router.route("q", strategy="semantic", k=3)
    assert route.adapter_ids[0] == ids_of([best])[0]


def test_the_rescue_caches_one_entry_per_set_of_small_groups_whatever_their_order() -> None:
    """Two queries that rank the same small groups in different orders rescue them from one cache entry (keyed
    by the sorted group names), with the exact scores of their members."""
    from smoa.routing.index import IndexParams

    dim, rng = 64, np.random.default_rng(5)
    groups = [np.eye(dim, dtype=np.float32)[[1 + 3 * g + j for j in range(3)]] * 0.8 for g in range(4)]
    for rows in groups:
        rows[:, 0] = 0.6  # every small group near the queries' shared axis, each on axes of its own
    bulk = rng.standard_normal((600, dim)).astype(np.float32)
    bulk[:, 0] = -np.abs(bulk[:, 0]) * 3  # away from the queries
    x = np.concatenate(groups + [bulk])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    tags = [([f"g{g}"], ["s"]) for g in range(len(groups)) for _ in range(3)] + [(["bulk"], ["s"])] * len(bulk)
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(dim), params=IndexParams(exact_threshold=100, ef_search=16))
    router.add(np.arange(len(x)), x.astype(np.float32), tags, generation=1)

    def query(g: int) -> np.ndarray:  # nearest to group g's first member
        v = np.zeros(dim, np.float32)
        v[0], v[1 + 3 * g] = 0.8, 0.6
        return v

    orders = []
    for g in (0, 3):
        q = query(g)
        orders.append([n for n, _ in router._groups.top_groups(q, 4, 256)])
        got = router._small_group_scores(q, 8)
        best = 3 * g
        assert max(got, key=got.get) == best and got[best] == pytest.approx(float(x[best] @ q), abs=0.02)
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])  # same set, another order
    multi = [names for names in router._rescue if len(names) > 1]
    assert multi == [("g0", "g1", "g2", "g3")]


class _PrimedDim:
    """An encoder of dimension ``dim`` for queries primed into the router's cache (never called)."""

    name = "primed"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        raise AssertionError(f"unexpected encode of {texts!r}")


def test_a_tight_budget_narrows_the_hnsw_beam_before_the_walk_and_says_degraded() -> None:
    """The beam is chosen before the walk: with a budget the measured full walk does not fit, the router walks a
    narrower beam (counted as degraded: less recall than the default) and still returns the island's best
    adapters; with room in the budget it walks the full beam and is not degraded."""
    from smoa.routing.index import IndexParams, VectorIndex

    x, tags, queries = _island_library()
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False, routing_latency_budget_ms=1e6)
    router = Router(config, None, ids_of, encoder=_PrimedDim(64), params=IndexParams(exact_threshold=100, ef_search=128))
    router.add(np.arange(len(x)), x, tags, generation=1)
    texts = [f"q{i}" for i in range(len(queries))]
    router.encoder.prime(texts, queries)
    beams: list[int | None] = []
    real = VectorIndex.search

    def spy(self, q, k, allowed=None, ef_search=None):  # type: ignore[no-untyped-def]
        beams.append(ef_search)
        return real(self, q, k, allowed, ef_search)

    VectorIndex.search = spy  # type: ignore[method-assign]
    try:
        roomy = [router.route(t, strategy="semantic", k=3) for t in texts]
        assert set(beams) == {None} and not any(r.degraded for r in roomy)  # full beam while it fits
        beams.clear()
        router._walk_cost.per_ef.extend([1.0] * 64)  # as if a walk cost 1 ms per beam unit: the full 128 cannot fit in 50
        router.config.routing_latency_budget_ms = 50.0
        tight = [router.route(t, strategy="semantic", k=3) for t in texts[:20]]  # (fast real walks join the model)
    finally:
        VectorIndex.search = real  # type: ignore[method-assign]
    assert all(b is not None and 16 <= b < 128 for b in beams), beams
    assert all(r.degraded for r in tight) and router.statistics()["degraded"] == len(tight)
    for r, q in zip(tight, queries):  # the island is still found (the rescue scores small groups exactly)
        got = [int(a[3:]) for a in r.adapter_ids]
        assert all(g < 12 for g in got) and (x @ q)[got[0]] >= (x @ q).max() - 0.02


def test_the_rescue_never_serves_a_changed_small_group_from_its_cache() -> None:
    """The small groups' decoded keys are cached between routes; a replaced key is scored by its new vector,
    a removed one is gone, and a key moved into the group by its tags is scored at once."""
    from smoa.routing.index import IndexParams

    x, tags, queries = _island_library()
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(64), params=IndexParams(exact_threshold=100, ef_search=16))
    router.add(np.arange(len(x)), x, tags, generation=1)
    text = "q0"
    router.encoder.prime([text], queries[:1])
    q = queries[0]
    first = router.route(text, strategy="semantic", k=3)
    best = int(first.adapter_ids[0][3:])
    assert best < 12 and router._rescue  # served by the rescue, now cached
    router.route(text, strategy="semantic", k=3)  # a cache hit: the same answer
    far = -q / np.linalg.norm(q)  # the best island key turned away from the query
    router.add(np.array([best]), far[None, :].astype(np.float32), [(["island"], ["s"])], generation=2)
    again = router.route(text, strategy="semantic", k=3)
    assert f"ad_{best:03d}" not in again.adapter_ids
    second = int(again.adapter_ids[0][3:])
    router.remove([second], generation=3)
    assert f"ad_{second:03d}" not in router.route(text, strategy="semantic", k=3).adapter_ids
    mover = 500  # a bulk key given the query's own direction and the island's tag
    router.add(np.array([mover]), (q / np.linalg.norm(q))[None, :].astype(np.float32), [(["island"], ["s"])], 4)
    top = router.route(text, strategy="semantic", k=3)
    assert top.adapter_ids[0] == f"ad_{mover:03d}" and top.routing_scores[0] == pytest.approx(1.0, abs=0.02)


def test_refit_lays_out_an_index_grown_a_few_keys_at_a_time_unless_it_changed_meanwhile(monkeypatch) -> None:
    """A library created in small steps past ``layout_min_keys`` is laid out by locality at the next refit
    (``optimize_library()``, the background optimiser): the same routes after it, the layout persisted; a create
    that lands while the copy is laid out wins (the copy is dropped)."""
    from smoa.routing.index import IndexParams, VectorIndex

    x, tags, queries = _island_library(n_big=1500)
    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(64),
                    params=IndexParams(exact_threshold=100, ef_search=32, layout_min_keys=1000))  # fmt: skip
    router.add(np.arange(400), x[:400], tags[:400], generation=1)  # HNSW, too small for a layout
    for s in range(400, len(x), 100):
        router.add(np.arange(s, min(s + 100, len(x))), x[s : s + 100], tags[s : s + 100], generation=2)
    texts = [f"q{i}" for i in range(len(queries))]
    router.encoder.prime(texts, queries)
    before = [router.route(t, strategy="hybrid", k=3) for t in texts]
    first = router._vectors
    assert first.layout_due()
    router.refit()  # no adapter has examples: only the layout
    laid = router._vectors
    assert laid is not first and laid._laid == len(x) and not laid.layout_due() and router._dirty
    after = [router.route(t, strategy="hybrid", k=3) for t in texts]
    assert [r.adapter_ids for r in after] == [r.adapter_ids for r in before]
    assert [r.routing_scores for r in after] == [r.routing_scores for r in before]
    assert not router.lay_out_index()  # nothing appended since

    # a create lands while the copy is laid out: the index it went into stays
    router.add(np.arange(5000, 5600), np.repeat(x[:1], 600, axis=0), [(["late"], ["s"])] * 600, generation=3)
    assert router._vectors.layout_due()
    real = VectorIndex.laid_out

    def with_a_create(self, snapshot):
        out = real(self, snapshot)
        router.add(np.array([9000]), x[:1], [(["later"], ["s"])], generation=4)
        return out

    monkeypatch.setattr(VectorIndex, "laid_out", with_a_create)
    current = router._vectors
    assert not router.lay_out_index()
    assert router._vectors is current and 9000 in set((current.live_ids() >> 4).tolist())


@pytest.mark.parametrize("cap", [1024, 40])
def test_rivals_searched_a_few_rows_per_lock_hold_are_those_of_one_search(monkeypatch, cap) -> None:
    """A refit's rivals (the nearest keys of adapters it does not refit) are searched a few probe rows per hold of
    the router's lock, so that routes go on between the blocks. Merged, the blocks give what one search of every row
    gave: the same keys in the same order, ties included (keys with the same vector, probe rows repeated); ``cap``
    40 binds inside each block."""
    from smoa.routing import router as router_mod
    from smoa.routing.index import IndexParams
    from smoa.routing.learner import FIXED_NEIGHBOURS, owner_of

    x, tags, queries = _island_library(n_big=1500)
    router = Router(SMoAConfig(encoder="hash"), None, ids_of, encoder=_PrimedDim(64),
                    params=IndexParams(exact_threshold=100, ef_search=64))  # fmt: skip
    router.add(np.arange(len(x)), x, tags, generation=1)
    router.add(np.arange(5000, 5100), x[:100], tags[:100], generation=2)  # twins: equal similarities
    rng = np.random.default_rng(1)
    probe = np.concatenate([queries, x[rng.integers(0, 200, 150)], queries[:20]])
    trainable = list(range(0, len(x), 7))

    # one search of every row, the rivals taken as before the blocks (an independent statement of the rule)
    sims, slots = router._vectors.search(probe, min(FIXED_NEIGHBOURS, len(router._vectors)))
    ok = (slots >= 0) & ~np.isin(owner_of(slots), trainable)
    flat_s, flat_i = sims[ok], slots[ok]
    order = np.argsort(-flat_s, kind="stable")
    _, first = np.unique(flat_i[order], return_index=True)
    want_found, want_vecs = router._vectors.vectors_of(flat_i[order][np.sort(first)][:cap])
    assert len(want_found) == min(cap, len(np.unique(flat_i)))

    monkeypatch.setattr(router_mod, "MAX_FIXED", cap)
    for rows in (7, 64, len(probe)):
        monkeypatch.setattr(router_mod, "RIVAL_ROWS", rows)
        found, vecs = router._rivals(probe, trainable)
        np.testing.assert_array_equal(found, want_found)
        np.testing.assert_array_equal(vecs, want_vecs)


def _wide_beam_router(base: np.ndarray, texts: list[str], queries: np.ndarray) -> Router:
    """An HNSW router (from 100 keys) over ``base`` (tagged "old") whose beam covers it, with ``queries`` primed."""
    from smoa.routing.index import IndexParams

    config = SMoAConfig(encoder="hash", routing_threshold=-1.0, enable_caching=False)
    router = Router(config, None, ids_of, encoder=_PrimedDim(base.shape[1]),
                    params=IndexParams(exact_threshold=100, ef_search=512))  # fmt: skip
    router.add(np.arange(len(base)), base, [(["old"], [])] * len(base), generation=1)
    router.encoder.prime(texts, queries)
    return router


def _hybrid_routes(router: Router, texts: list[str]) -> list[tuple[list[str], list[float]]]:
    return [(r.adapter_ids, r.routing_scores) for r in (router.route(t, strategy="hybrid", k=5) for t in texts)]


@pytest.mark.parametrize("hold_ms", [2.0, 1e-9])
def test_a_big_change_set_is_staged_a_few_keys_per_lock_hold_and_goes_live_at_once(monkeypatch, hold_ms) -> None:
    """A change set of many keys for an HNSW index is inserted hidden a few keys per hold of the router's lock, then
    made live in the one hold that applies it. Routes between the blocks see the library as it was (none of the
    change set: atomic, as the core's change log needs); afterwards the router holds what applying it in one hold
    gives: the same keys, tags, groups, generation and routes. With a hold budget no row fits (``1e-9`` ms) each
    hold after the first inserts one row, so an adapter's two keys are staged in two holds."""
    from smoa.routing import router as router_mod
    from smoa.routing.router import KeyEntry

    dim, rng = 64, np.random.default_rng(5)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    base = unit(rng.standard_normal((300, dim)))
    new = unit(rng.standard_normal((150, dim)))
    two = unit(rng.standard_normal((20, 2, dim)))  # adapters with two keys each
    queries = unit(np.concatenate([new[:20], two[:10, 1], base[:10]]) + 0.1 * rng.standard_normal((40, dim)))
    texts = [f"q{i}" for i in range(len(queries))]
    upserts = [KeyEntry(300 + i, new[i], ["fresh"], []) for i in range(150)]
    upserts += [KeyEntry(5 + i, two[i], ["twice"], []) for i in range(20)]  # replace keys 5..24
    removes = list(range(100, 110))

    def built() -> Router:
        return _wide_beam_router(base, texts, queries)

    def routes(router: Router) -> list[tuple[list[str], list[float]]]:
        return _hybrid_routes(router, texts)

    monkeypatch.setattr(router_mod, "STAGE_MIN_ROWS", 10**9)  # the reference: everything in the one hold
    once = built()
    once.apply(upserts, removes, generation=2)
    monkeypatch.setattr(router_mod, "STAGE_MIN_ROWS", 64)
    monkeypatch.setattr(router_mod, "STAGE_ROWS", 16)
    monkeypatch.setattr(router_mod, "STAGE_HOLD_MS", hold_ms)
    staged = built()
    before, seen = routes(staged), []
    real_yield = router_mod.yield_gil

    def between_blocks() -> None:  # a route arriving between two blocks
        seen.append((routes(staged), len(staged._vectors), staged.generation))
        real_yield()

    monkeypatch.setattr(router_mod, "yield_gil", between_blocks)
    staged.apply(upserts, removes, generation=2)
    monkeypatch.setattr(router_mod, "yield_gil", real_yield)
    assert len(seen) >= (190 // 16 if hold_ms > 1 else 1 + 190 - router_mod.STAGE_FIRST_ROWS), len(seen)  # 190 keys
    assert all(s == (before, 300, 1) for s in seen)  # none of the change set before its hold
    assert len(staged._vectors) == len(once._vectors) == 300 - 10 + 150 + 20
    assert staged.generation == once.generation == 2
    for key in [0, 5, 24, 25, 100, 299, 300, 449]:
        np.testing.assert_array_equal(staged.key_vectors(key), once.key_vectors(key))
        assert staged._groups.group_of(key) == once._groups.group_of(key)
        assert staged._tags.tags_of(key) == once._tags.tags_of(key)
    after = routes(staged)
    assert after == routes(once) and after != before
    assert any(a[0][0].startswith("ad_3") or a[0][0] in ids_of(list(range(5, 25))) for a in after)


@pytest.mark.parametrize("hold_ms, per_row_ms, want", [
    (2.0, 0.5, [4, 4, 4, 4, 4, 4, 4, 2]),  # the first hold's 4 rows, then what fits 2 ms at 0.5 ms a row
    (2.0, 0.3, [4, 6, 6, 6, 6, 2]),
    (2.0, 0.01, [4, 26]),  # at most STAGE_ROWS (32) rows a hold
    (0.0, 0.5, [30]),  # no budget: STAGE_ROWS rows a hold, from the first
])  # fmt: skip
def test_stage_sizes_each_hold_to_the_measured_cost_per_row(monkeypatch, hold_ms, per_row_ms, want) -> None:
    """Each hold of the lock inserts the rows that fit ``STAGE_HOLD_MS`` at the cost per row the previous holds took
    (a clock that moves ``per_row_ms`` per staged row); every adapter comes back with its own keys' positions, the
    ones its keys were inserted at, even where they span two holds."""
    from smoa.routing import router as router_mod
    from smoa.routing.index import IndexParams, VectorIndex

    dim, rng = 32, np.random.default_rng(8)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    router = Router(SMoAConfig(encoder="hash", routing_threshold=-1.0), None, ids_of, encoder=_PrimedDim(dim),
                    params=IndexParams(exact_threshold=10))  # fmt: skip
    router.add(np.arange(40), unit(rng.standard_normal((40, dim))), [([], [])] * 40, generation=1)
    assert router._vectors.kind != "flat"
    now, holds = [0.0], []
    real_stage = VectorIndex.stage

    def timed(self, keys, vectors):
        holds.append(len(keys))
        now[0] += per_row_ms / 1e3 * len(keys)
        return real_stage(self, keys, vectors)

    class Clock:
        @staticmethod
        def perf_counter() -> float:
            return now[0]

    monkeypatch.setattr(VectorIndex, "stage", timed)
    monkeypatch.setattr(router_mod, "time", Clock)
    monkeypatch.setattr(router_mod, "STAGE_HOLD_MS", hold_ms)
    keys = {100 + i: unit(rng.standard_normal((1 + i % 3, dim))) for i in range(15)}  # 30 rows, 1-3 per adapter
    generation, staged = router._stage(keys)
    assert holds == want
    assert generation == router._vectors.staged_generation and list(staged) == list(keys)
    for k, (mat, pos) in staged.items():
        assert mat is keys[k] and len(pos) == len(mat)
        want = router_mod._slots(np.asarray([k]), np.asarray([len(mat)]))
        np.testing.assert_array_equal(router._vectors._ids[pos], want)


def test_a_compaction_runs_on_a_copy_beside_the_routes_and_keeps_every_change(monkeypatch) -> None:
    """Removing past a quarter of an HNSW index's positions does not rebuild it inside that hold: a background
    compaction copies the live rows a block per hold, builds the copy without the lock and adopts it once it has
    caught up with what changed meanwhile (removals, new and replaced adapters, a staged change set). Afterwards
    the router holds what compacting in place gives: the same keys, tags, groups and routes, and no dead rows
    but those removed while it caught up."""
    from smoa.routing import router as router_mod
    from smoa.routing.index import VectorIndex
    from smoa.routing.index import vector as vector_mod
    from smoa.routing.router import KeyEntry

    dim, rng = 48, np.random.default_rng(11)
    unit = lambda a: (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    base = unit(rng.standard_normal((600, dim)))
    extra = unit(rng.standard_normal((130, dim)))
    queries = unit(np.concatenate([base[::15], extra[::5]]) + 0.1 * rng.standard_normal((66, dim)))
    texts = [f"q{i}" for i in range(len(queries))]
    changes = [  # what happens between the copy's holds: (remove, upserts)
        (list(range(300, 320)), [KeyEntry(1000 + i, extra[i], ["new"], []) for i in range(30)]),
        ([], [KeyEntry(5 + i, extra[30 + i], ["back"], []) for i in range(20)]),  # removed keys back
        ([], [KeyEntry(400 + i, extra[110 + i], ["moved"], []) for i in range(20)]),  # replaced keys
        (list(range(320, 330)), [KeyEntry(2000 + i, extra[50 + i], ["bulk"], []) for i in range(80)]),  # staged
    ]

    def built() -> Router:
        return _wide_beam_router(base, texts, queries)

    def routes(router: Router) -> list[tuple[list[str], list[float]]]:
        return _hybrid_routes(router, texts)

    # the reference: compacted in place, in the hold that crossed a quarter
    monkeypatch.setattr(router_mod, "COMPACT_IN_BACKGROUND", False)
    once = built()
    once.remove(range(160), generation=2)
    assert once._vectors._dead == 0 and len(once._vectors) == 440
    for g, (gone, ups) in enumerate(changes, start=3):
        once.apply(ups, gone, generation=g)
    monkeypatch.setattr(router_mod, "COMPACT_IN_BACKGROUND", True)

    # in the background: a thread started by the removal's hold compacts the index once the hold is over
    quick = built()
    kept = quick._vectors
    quick.remove(range(160), generation=2)
    thread = quick._compactor.thread
    thread.join(60)
    assert not thread.is_alive() and quick._vectors is not kept and quick._vectors._dead == 0
    assert len(quick._vectors) == 440 and kept._journal is None
    for g, (gone, ups) in enumerate(changes, start=3):
        quick.apply(ups, gone, generation=g)
    assert routes(quick) == routes(once)

    # driven step by step: the changes land between the copy's holds and its catch-up rounds
    monkeypatch.setattr(vector_mod, "COMPACT_COPY_ROWS", 256)  # 3 copy holds, then catch-up rounds
    monkeypatch.setattr(vector_mod, "COMPACT_FINAL_ROWS", 16)  # the staged 80 rows: one more round
    monkeypatch.setattr(Router, "_compact_when_due", lambda self: None)
    step = built()
    step.remove(range(160), generation=2)
    assert step._vectors._dead == 160  # not compacted in the hold
    todo, holds = list(enumerate(changes, start=3)), []
    real_yield, real_compacted = router_mod.yield_gil, VectorIndex.compacted

    def between() -> None:
        if todo:
            assert not step.compact_index()  # one copy at a time: a second one leaves the first's journal alone
            g, (gone, ups) = todo.pop(0)
            step.apply(ups, gone, generation=g)
        real_yield()

    def compacted(template, keys, vectors):  # the build runs without the router's lock
        holds.append(step._lock._is_owned())
        return real_compacted(template, keys, vectors)

    monkeypatch.setattr(router_mod, "yield_gil", between)
    monkeypatch.setattr(VectorIndex, "compacted", staticmethod(compacted))
    old = step._vectors
    assert step.compact_index()
    monkeypatch.setattr(router_mod, "yield_gil", real_yield)
    assert not todo and holds == [False] and step._vectors is not old and old._journal is None
    assert step._vectors._dead <= 50  # the removals and replacements replayed; the 160 are gone
    assert len(step._vectors) == len(once._vectors) == 600 - 160 - 30 + 30 + 20 + 80
    for key in [0, 5, 24, 25, 299, 300, 330, 400, 419, 599, 1000, 1029, 2000, 2079]:
        np.testing.assert_array_equal(step.key_vectors(key), once.key_vectors(key))
        assert step._groups.group_of(key) == once._groups.group_of(key)
        assert step._tags.tags_of(key) == once._tags.tags_of(key)
    assert routes(step) == routes(once)
    assert not step.compact_index()  # nothing due any more

    # replaced meanwhile (a layout, a swap, a reload): the copy is dropped, the index left as it is
    gone = built()
    gone.remove(range(160), generation=2)
    monkeypatch.setattr(router_mod, "yield_gil", lambda: setattr(gone, "_vectors", VectorIndex.build(
        dim, *gone._vectors.items(), gone._params)))  # fmt: skip
    before = gone._vectors
    assert not gone.compact_index() and gone._vectors is not before and before._journal is None


def test_an_index_saved_past_a_quarter_dead_is_compacted_after_loading(tmp_path, monkeypatch) -> None:
    """A process that ended during a compaction saved its index with over a quarter of dead positions: the router
    that loads it starts the compaction (beside its routes), and ends with the same live keys and none dead."""
    from smoa.routing.index import IndexParams

    dim, rng = 32, np.random.default_rng(4)
    x = rng.standard_normal((400, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def router() -> Router:
        config = SMoAConfig(encoder="hash", routing_threshold=-1.0)
        return Router(config, tmp_path, ids_of, encoder=_PrimedDim(dim), params=IndexParams(exact_threshold=100))

    saved = router()
    saved.add(np.arange(400), x, [([], [])] * 400, generation=1)
    with monkeypatch.context() as m:
        m.setattr(Router, "_compact_when_due", lambda self: None)  # (the process ends before it compacts)
        saved.remove(range(150), generation=2)
        assert saved._vectors.compact_due()
        saved.save()
    loaded = router()
    assert loaded.load(2) == 2
    thread = loaded._compactor.thread
    thread.join(60)
    assert not thread.is_alive() and loaded._vectors._dead == 0
    assert sorted(loaded._vectors.live_ids().tolist()) == sorted(saved._vectors.live_ids().tolist())


@pytest.mark.parametrize("keys_each", [1, 3])
def test_removed_adapters_leave_their_groups_as_if_never_added(keys_each: int) -> None:
    """Taking adapters out of their groups subtracts each one's mean key (one key: the key itself): the groups'
    centroids and members equal those of a router that only ever held the others."""
    from smoa.routing.index import IndexParams

    dim, rng = 32, np.random.default_rng(9)
    x = rng.standard_normal((300, keys_each, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    tags = [([f"d{i % 4}"], []) for i in range(300)]
    gone = rng.choice(300, 90, replace=False)
    kept = np.setdiff1d(np.arange(300), gone)

    def router(keys: np.ndarray) -> Router:
        r = Router(SMoAConfig(encoder="hash", routing_threshold=-1.0), None, ids_of, encoder=_PrimedDim(dim),
                   params=IndexParams(exact_threshold=10_000))  # fmt: skip
        r.add(keys, list(x[keys]), [tags[k] for k in keys.tolist()], generation=1)
        return r

    full, ref = router(np.arange(300)), router(kept)
    full.remove(gone.tolist(), generation=2)
    names, cents = full._groups.centroids()
    ref_names, ref_cents = ref._groups.centroids()
    assert names == ref_names == ["d0", "d1", "d2", "d3"]
    np.testing.assert_allclose(cents, ref_cents, atol=1e-5)
    for name in names:
        np.testing.assert_array_equal(full._groups.members(name), ref._groups.members(name))


def test_a_router_is_freed_without_a_full_collection() -> None:
    """Nothing the router holds points back at it (its compactor holds it weakly): dropped, it is freed at once,
    with its side thread, even where the process's objects are frozen out of the collector (``smoa serve``)."""
    import gc
    import weakref

    from smoa.routing.index import IndexParams

    x = np.random.default_rng(6).standard_normal((300, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    router = Router(SMoAConfig(encoder="hash", enable_caching=False), None, ids_of, encoder=_PrimedDim(32),
                    params=IndexParams(exact_threshold=100))  # fmt: skip
    router.add(np.arange(300), x, [([], [])] * 300, generation=1)
    router.remove(range(100), generation=2)  # past a quarter dead: compacted on a copy
    router._compactor.thread.join(60)
    assert router._vectors.dead == 0
    gone = weakref.ref(router)
    gc.disable()
    try:
        del router
        assert gone() is None
    finally:
        gc.enable()
