"""Learning router (issue 11): multi-vector keys, local updates and refits, the "auto" threshold, negatives,
calibrated confidence, the static fast path (cascade) and the latency budget, persistence of the learned state."""

from __future__ import annotations

import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from smoa.config import SMoAConfig
from smoa.errors import ConfigError, InvalidInputError
from smoa.routing import costs as costs_mod
from smoa.routing import router as router_mod
from smoa.routing.calibrate import (
    AUTO_REJECT_RATE,
    FALLBACK_THRESHOLD,
    Calibration,
    Evidence,
    calibrate,
)
from smoa.routing.encoders.hashing import HashEncoder
from smoa.routing.encoders.onnx_int8 import OnnxInt8Encoder
from smoa.routing.index import IndexParams
from smoa.routing.learner import (
    KeyLearner,
    initial_keys,
    owner_of,
    slots_of,
    spherical_kmeans,
)
from smoa.routing.router import KeyEntry, Router, RoutingText

TOPICS = {
    "bread": "bake bread loaf oven flour yeast dough crust sourdough knead rye",
    "stocks": "stock shares market trade price invest dividend broker portfolio equity",
    "heart": "heart ecg pulse blood pressure cardiac beat artery cholesterol rhythm",
    "contract": "contract clause lease agreement sign terms breach party liability notice",
    "travel": "flight hotel trip booking airport passport luggage visa tour beach",
    "python": "python code function bug list loop class import error script",
}


def topic_examples(topic: str, n: int = 24, seed: int = 0) -> list[str]:
    words = TOPICS[topic].split()
    rng = np.random.default_rng(zlib.crc32(topic.encode()) + seed)
    return [" ".join(rng.choice(words, 4, replace=False)) for _ in range(n)]


def items() -> list[RoutingText]:
    return [RoutingText([t], ["help"], f"{t} questions", topic_examples(t)) for t in TOPICS]


def make(params: IndexParams | None = None, **cfg: object) -> tuple[Router, dict[int, str]]:
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False, **cfg)  # type: ignore[arg-type]
    return Router(config, None, lambda ks: [names.get(k, "") for k in ks], params=params), names


def create(router: Router, names: dict[int, str], order: list[int], bulk: bool) -> None:
    its = items()
    topics = list(TOPICS)
    if bulk:
        keys = router.encode_keys([its[i] for i in order])
        router.apply([KeyEntry(i + 1, k, its[i].domain_tags, its[i].skill_tags) for i, k in zip(order, keys)], [], 1)
        names.update({i + 1: topics[i] for i in order})
        return
    for g, i in enumerate(order):
        names[i + 1] = topics[i]
        router.apply([KeyEntry(i + 1, router.encode_keys([its[i]])[0], its[i].domain_tags, its[i].skill_tags)], [], g + 1)


# ---------------------------------------------------------------------------------------------- calibration
def test_calibrated_threshold_is_the_reject_quantile_and_negatives_move_it() -> None:
    rng = np.random.default_rng(0)
    best = rng.uniform(0.3, 0.9, 500).astype(np.float32)
    ev = Evidence(best, np.full(500, 0.2, np.float32), np.ones(500, bool), rng.uniform(0.0, 0.3, 500).astype(np.float32),
                  np.full(500, 0.05, np.float32))  # fmt: skip
    cal = calibrate(ev)
    assert cal.source == "held-out"
    assert cal.threshold == pytest.approx(np.quantile(best, AUTO_REJECT_RATE), abs=1e-6)
    with_neg = calibrate(ev, neg_best=np.full(50, 0.45, np.float32))
    assert with_neg.threshold > 0.45  # the user's negatives score 0.45: the threshold goes above them
    assert cal.confidence(0.9, 0.3) > cal.confidence(0.35, 0.3) > cal.confidence(0.05, 0.01)


def test_too_little_evidence_falls_back() -> None:
    cal = calibrate(Evidence())
    assert cal == Calibration() and cal.threshold == FALLBACK_THRESHOLD and cal.source == "fallback"
    assert 0.0 < cal.confidence(0.5, 0.1) < 1.0


# ---------------------------------------------------------------------------------------------- keys
def test_slots_and_prototypes() -> None:
    s = slots_of(np.array([3, 7]), 2)
    assert s.tolist() == [48, 49, 112, 113] and owner_of(s).tolist() == [3, 3, 7, 7]
    x = np.concatenate([np.eye(4)[[0]].repeat(5, 0), np.eye(4)[[1]].repeat(5, 0)]).astype(np.float32)
    c = spherical_kmeans(x, 2)
    assert sorted(np.argmax(c, 1).tolist()) == [0, 1]
    keys = initial_keys(np.eye(4, dtype=np.float32)[2], x, max_keys=4)
    assert keys.shape == (1, 4)  # 10 examples -> one prototype (one per 40 examples)
    np.testing.assert_allclose(np.linalg.norm(keys, axis=1), 1.0, atol=1e-5)


def test_multi_vector_adapter_is_found_by_either_key_and_listed_once() -> None:
    router, names = make(routing_threshold=-1.0)
    enc = HashEncoder()
    two = enc.encode(["sourdough bread oven", "stock market shares"])
    router.add(np.array([1, 2]), [two, enc.encode(["heart pulse ecg"])], [(["a"], []), (["b"], [])], 1)
    names.update({1: "both", 2: "heart"})
    for q in ("sourdough bread oven", "stock market shares"):
        route = router.route(q, strategy="semantic", k=3)
        assert route.adapter_ids[0] == "both" and route.adapter_ids.count("both") == 1
    assert router.key_vectors(1).shape == (2, 384)
    router.remove([1], 2)
    assert router.key_vectors(1).shape == (0, 384)
    assert "both" not in router.route("sourdough bread oven", strategy="semantic").adapter_ids
    with pytest.raises(InvalidInputError):
        router.add(np.array([3]), [np.zeros((17, 384), np.float32)], [([], [])], 3)


def test_encode_keys_then_apply_learns_and_routes() -> None:
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=False)
    assert router.statistics()["learned_adapters"] == len(TOPICS)
    queries = [(q, t) for t in TOPICS for q in topic_examples(t, 5, seed=5)]
    hits = [router.route(q, strategy="semantic").adapter_ids[:1] == [t] for q, t in queries]
    assert np.mean(hits) >= 0.9, hits


def test_one_by_one_in_any_order_matches_bulk_after_refit() -> None:
    queries = [(" ".join(topic_examples(t, 6, seed=99)[j].split()), t) for t in TOPICS for j in range(6)]

    def top1(order: list[int], bulk: bool) -> tuple[float, list[str]]:
        router, names = make(routing_threshold=-1.0)
        create(router, names, order, bulk)
        router.refit()
        got = [router.route(q, strategy="semantic").adapter_ids[0] for q, _ in queries]
        return float(np.mean([g == t for g, (_, t) in zip(got, queries)])), got

    bulk, _ = top1(list(range(len(TOPICS))), True)
    shuffled, _ = top1([3, 0, 5, 1, 4, 2], False)
    assert bulk > 0.8
    assert abs(bulk - shuffled) <= 0.005 * 100 / len(queries)  # within half a point (here: identical)


def test_adapters_without_examples_route_from_tags_and_description() -> None:
    router, names = make()
    its = [RoutingText(["cooking"], ["baking"], "bread oven flour"), RoutingText(["finance"], ["trading"], "stock market")]
    keys = router.encode_keys(its)
    assert [k.shape for k in keys] == [(1, 384), (1, 384)]
    router.apply([KeyEntry(i + 1, k, it.domain_tags, it.skill_tags) for i, (k, it) in enumerate(zip(keys, its))], [], 1)
    names.update({1: "bake", 2: "trade"})
    assert router.route("bread in the oven", strategy="semantic").adapter_ids[0] == "bake"


# ---------------------------------------------------------------------------------------------- out of scope
def test_auto_threshold_empties_unrelated_queries_and_reports_confidence() -> None:
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=True)
    cal = router.calibration
    assert cal.source == "held-out" and router.threshold() == cal.threshold
    inside = router.route("sourdough loaf oven crust", strategy="semantic")
    outside = router.route("zebra quantum violin glacier", strategy="semantic")
    assert inside.adapter_ids[:1] == ["bread"]
    assert outside.adapter_ids == [] and outside.weights == []  # the base model alone
    assert inside.confidence > outside.confidence
    assert router.statistics()["empty"] >= 1


def test_negative_examples_raise_the_threshold_and_bad_input_is_refused() -> None:
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=True)
    before = router.threshold()
    negatives = ["bread " + w for w in ["zebra", "quantum", "violin", "glacier", "nebula", "tundra"]]
    assert router.add_negative_examples(negatives) == len(negatives)
    assert router.threshold() >= before
    assert router.statistics()["negatives"] == len(negatives)
    with pytest.raises(InvalidInputError):
        router.add_negative_examples("one string")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        router.add_negative_examples(["ok", 3])  # type: ignore[list-item]


def test_explicit_threshold_overrides_auto_and_bad_values_are_refused() -> None:
    assert SMoAConfig().routing_threshold == "auto"
    router, names = make(routing_threshold=-1.0)
    create(router, names, list(range(len(TOPICS))), bulk=True)
    assert router.threshold() == -1.0
    assert router.route("zebra quantum violin glacier", strategy="semantic").adapter_ids  # never empty at -1
    for bad in ("automatic", 2.0, float("nan")):
        with pytest.raises(ConfigError, match="routing_threshold"):
            SMoAConfig(routing_threshold=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="routing_keys_per_adapter"):
        SMoAConfig(routing_keys_per_adapter=0)


def with_free_adapters(n: int = 200, params: IndexParams | None = None) -> tuple[Router, dict[int, str], list[RoutingText]]:
    """The 6 topics (with examples) and ``n`` adapters without examples: 3 words of their own and one topic word
    each (so the topics' examples reach them a little: the null of the free threshold)."""
    router, names = make(params)
    create(router, names, list(range(len(TOPICS))), bulk=True)
    rng = np.random.default_rng(0)
    topic_words = " ".join(TOPICS.values()).split()
    its = [RoutingText(["misc"], [], " ".join([*rng.choice([f"w{i}" for i in range(300)], 3, replace=False),
                                               str(rng.choice(topic_words))])) for _ in range(n)]  # fmt: skip
    keys = router.encode_keys(its)
    router.apply([KeyEntry(100 + i, k, it.domain_tags, it.skill_tags) for i, (k, it) in enumerate(zip(keys, its))], [], 2)
    names.update({100 + i: f"free{i}" for i in range(n)})
    return router, names, its


def test_adapters_without_examples_must_beat_what_unrelated_examples_score_on_them() -> None:
    router, names, its = with_free_adapters()
    cal = router.calibration
    # measured when the 200 example-less adapters arrived (no refit needed): above the topics' own threshold
    assert cal.free_threshold > cal.threshold + 0.05, cal
    words = its[0].description.split()
    weak = f"{words[0]} {words[1]} zebra glacier violin ocean"  # two words of free0's four, among unrelated ones
    assert router.route(weak, strategy="semantic").adapter_ids == []  # an unrelated query: the base model alone
    router._learner.calibration = replace(cal, free_threshold=-np.inf)  # without the gate it went to free0
    assert router.route(weak, strategy="semantic").adapter_ids[:1] == ["free0"]
    router._learner.calibration = cal
    # metadata naming the adapter's tag is the caller saying what the query is about: the gate keeps it
    assert "free0" in router.route(weak, {"domain": "misc"}, strategy="hybrid").adapter_ids
    assert router.route(weak, strategy="hybrid").adapter_ids == []
    strong = f"{words[0]} {words[1]} zebra"  # the same two words in a shorter query: above the free threshold
    assert router.route(strong, strategy="semantic").adapter_ids[:1] == ["free0"]
    assert router.route(its[5].description, strategy="semantic").adapter_ids[:1] == ["free5"]
    assert router.route("sourdough loaf oven crust", strategy="semantic").adapter_ids[:1] == ["bread"]
    # a number overrides "auto": no gate of either kind
    router.config.routing_threshold = 0.0
    assert router.route(weak, strategy="semantic").adapter_ids[:1] == ["free0"]


def spy_tag_scoring(router: Router, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The keys the router's tag index scores from now on (``score_keys``), one entry per key per call."""
    scored: list[int] = []
    real_score_keys = router._tags.score_keys

    def spy(terms, keys):  # noqa: ANN001, ANN202
        keys = list(keys)
        scored.extend(keys)
        return real_score_keys(terms, keys)

    monkeypatch.setattr(router._tags, "score_keys", spy)
    return scored


def hybrid_routes(router: Router, cases: list[tuple]) -> list[tuple]:
    """HYBRID routes of ``(query, metadata, k)`` cases (``k`` None: the default), every float they carry."""
    routes = [router.route(q, m, strategy="hybrid", k=k) for q, m, k in cases]
    return [(r.adapter_ids, r.routing_scores, r.weights, r.confidence, r.degraded) for r in routes]


@pytest.mark.parametrize("beside", [False, True], ids=["after-the-walk", "beside-the-walk"])
def test_hybrid_does_not_tag_score_the_candidates_the_free_gate_drops(monkeypatch: pytest.MonkeyPatch, beside: bool) -> None:
    """HYBRID's tag side skips the candidates the free gate will drop (at 1M keys about half of a route's): the
    routes are those of tag-scoring and fusing every candidate and gating at the end, float for float, on both the
    serial path and the side thread's (an HNSW index)."""
    import sys

    router, names, its = with_free_adapters(params=IndexParams(exact_threshold=100, ef_search=64))
    router.config.routing_parallel_side = beside
    assert router._vectors.kind != "flat"
    cal = router.calibration
    assert cal.free_threshold > cal.threshold
    words = its[0].description.split()
    weak = f"{words[0]} {words[1]} zebra glacier violin ocean"
    cases = [(it.description, None, None) for it in its[:40:4]] + [
        (weak, None, None), (weak, {"domain": "misc"}, None), (f"{words[0]} {words[1]} zebra", None, None),
        ("sourdough loaf oven crust", None, None), ("python list loop bread", {"skill": "baking"}, None),
        ("misc bread stocks", None, None)]
    scored = spy_tag_scoring(router, monkeypatch)
    got, n_scored = hybrid_routes(router, cases), len(scored)
    real_drops = Router._free_drops

    def at_the_end_only(self, cos, terms):  # noqa: ANN001, ANN202 -- the gate as it was: after every candidate was fused
        if sys._getframe(1).f_code.co_name in ("_tag_side", "_beside_walk"):
            return set()
        return real_drops(self, cos, terms)

    monkeypatch.setattr(Router, "_free_drops", at_the_end_only)
    monkeypatch.setattr(router_mod, "contenders", lambda *a, **kw: None)  # and every candidate tag-scored and fused
    scored.clear()
    want = hybrid_routes(router, cases)
    assert got == want
    assert any(ids == [] for ids, *_ in got) and any(ids and ids[0].startswith("free") for ids, *_ in got)
    assert "free0" in got[len(its[:40:4]) + 1][0]  # the caller's metadata names free0's tag: kept, tag-scored
    # the gate's drops were not tag-scored (beside the walk, the side thread scores the rescued and rare-term
    # adapters before the walk's candidates, and so the gate, are known: only the walk's own are spared)
    assert n_scored < (len(scored) if beside else 0.8 * len(scored))


@pytest.mark.parametrize("beside", [False, True], ids=["after-the-walk", "beside-the-walk"])
def test_a_route_works_out_the_free_gate_once(monkeypatch: pytest.MonkeyPatch, beside: bool) -> None:
    """HYBRID's tag side and the route's gate ask for the same cosines' drops: they are worked out once per route,
    and the routes are those of working them out at each ask, float for float."""
    router, names, its = with_free_adapters(params=IndexParams(exact_threshold=100, ef_search=64))
    router.config.routing_parallel_side = beside
    words = its[0].description.split()
    weak = f"{words[0]} {words[1]} zebra glacier violin ocean"
    cases = [(it.description, None, None) for it in its[:40:4]] + [(weak, None, None), (weak, {"domain": "misc"}, None),
                                                                   ("sourdough loaf oven crust", None, None)]
    calls: list[int] = []
    real_gated, real_drops = Router._gated_out, Router._free_drops

    def counted(self, cos, terms, free):  # noqa: ANN001, ANN202
        calls.append(len(cos))
        return real_gated(self, cos, terms, free)

    monkeypatch.setattr(Router, "_gated_out", counted)
    got = hybrid_routes(router, cases)
    assert len(calls) == len(cases)  # once per route
    monkeypatch.setattr(Router, "_free_drops", lambda self, cos, terms: (setattr(self, "_drops_memo", None),
                                                                         real_drops(self, cos, terms))[1])  # fmt: skip
    calls.clear()
    assert hybrid_routes(router, cases) == got
    assert len(calls) > len(cases)  # worked out at each ask: the tag side's and the gate's
    assert any(ids == [] for ids, *_ in got) and any(ids and ids[0].startswith("free") for ids, *_ in got)
    assert router._drops_memo is None  # a route lets its cosines go


@pytest.mark.parametrize("beside", [False, True], ids=["after-the-walk", "beside-the-walk"])
def test_hybrid_tag_scores_only_the_candidates_that_can_still_make_the_route(
    monkeypatch: pytest.MonkeyPatch, beside: bool
) -> None:
    """A candidate whose cosine trails the route's k-th best by more than its tags can make up is neither
    tag-scored nor fused (``contenders``): the routes are those of scoring every candidate, float for float, at a
    numeric threshold, under metadata (tag weight 0.3) and the query's own words (0.1), for k = 1, 3 and 5."""
    router, names, its = with_free_adapters(params=IndexParams(exact_threshold=100, ef_search=64))
    router.config.routing_threshold = 0.05
    router.config.routing_parallel_side = beside
    assert router._vectors.kind != "flat"
    cases = [(it.description, None, k) for k, it in zip((1, 3, 5) * 8, its[:48:2])] + [
        ("sourdough loaf oven crust", None, 5), ("python list loop bread", {"skill": "baking"}, 3),
        ("misc bread stocks", None, 5), ("misc shares", {"domain": "misc"}, 5), (its[3].description, {"tag": "misc"}, 1)]
    scored = spy_tag_scoring(router, monkeypatch)
    got, n_scored = hybrid_routes(router, cases), len(scored)
    monkeypatch.setattr(router_mod, "contenders", lambda *a, **kw: None)
    scored.clear()
    want = hybrid_routes(router, cases)
    assert got == want
    assert sum(len(ids) >= 3 for ids, *_ in got) >= 10 and any(ids and ids[0] in TOPICS for ids, *_ in got)
    # beside the walk the side thread tag-scores the rescued and rare-term adapters before the k-th best cosine is
    # known: only the walk's own candidates are spared there
    assert n_scored < (len(scored) if beside else 0.8 * len(scored))


def test_the_free_threshold_is_remeasured_only_when_the_library_changed_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    router, _, _ = with_free_adapters()
    searches = []  # queries per vector search: the null's is one search of the sampled examples (144 here)
    real_search = router._vectors.search
    monkeypatch.setattr(router._vectors, "search", lambda *a, **kw: searches.append(a[0].shape[0]) or real_search(*a, **kw))
    one = router.encode_keys([RoutingText(["misc"], [], "w1 w2 w3 bread")])
    router.apply([KeyEntry(999, one[0], ["misc"], [])], [], 3)  # 1 of 206 adapters: not enough to measure again
    assert not any(n > 100 for n in searches)
    more = router.encode_keys([RoutingText(["misc"], [], f"w{i} w{i + 1} loaf") for i in range(40)])
    router.apply([KeyEntry(1000 + i, k, ["misc"], []) for i, k in enumerate(more)], [], 4)  # +20 %: measured again
    assert any(n > 100 for n in searches)


# ---------------------------------------------------------------------------------------------- cascade
def fast_router(budget: float) -> tuple[Router, dict[int, str]]:
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False, routing_latency_budget_ms=budget, embedding_cache_size=0,
                        routing_threshold=-1.0)  # fmt: skip
    router = Router(config, None, lambda ks: [names.get(k, "") for k in ks], encoder=HashEncoder(),
                    fast_encoder=HashEncoder())  # fmt: skip
    create(router, names, list(range(len(TOPICS))), bulk=True)
    return router, names


def test_fast_path_answers_clear_queries_and_escalates_unsure_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    router, _ = fast_router(budget=1000.0)
    assert router.statistics()["fast_path"]
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 0.0)  # every fast answer is clear
    clear = router.route("sourdough loaf oven crust flour", strategy="semantic")
    assert clear.adapter_ids[0] == "bread" and not clear.escalated and not clear.degraded
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)  # every fast answer is unsure
    unsure = router.route("bread stock", strategy="semantic")
    assert unsure.escalated and not unsure.degraded and unsure.adapter_ids
    assert router.statistics()["escalated"] == 1 and router.statistics()["fast"] == 1


def test_budget_too_small_for_the_main_encoder_keeps_the_fast_answer_and_says_degraded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    router, _ = fast_router(budget=0.0)
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)
    unsure = router.route("bread stock", strategy="semantic")
    assert not unsure.escalated and unsure.degraded and unsure.adapter_ids
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 0.0)
    clear = router.route("sourdough loaf oven crust flour", strategy="semantic")
    assert not clear.degraded  # a clear fast answer is no loss of quality, whatever the budget



def test_learned_query_encoder_widens_the_escalation_margin_but_not_what_counts_as_degraded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once the query encoder is learned the fast path defers to it below ADAPTED_MARGIN_FACTOR x the margin; a
    fast answer between the two margins that the budget keeps is not marked degraded (it is usually right)."""
    router, _ = fast_router(budget=1000.0)
    monkeypatch.setattr(router_mod, "ADAPTED_MARGIN_FACTOR", 4.0)
    q = "sourdough loaf oven crust flour"  # its fast answer leads by ~0.65
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 0.25)  # clear by the base margin, unsure by 4x it
    assert not router.route(q, strategy="semantic").escalated  # no learned encoder: the factor does not apply
    router._adapted = router.encoder  # stands for a learned query encoder (same space here)
    wide = router.route(q, strategy="semantic")
    assert wide.escalated and not wide.degraded and wide.adapter_ids[0] == "bread"
    router.config.routing_latency_budget_ms = 0.0  # now the budget forbids the main encoder
    kept = router.route(q + " rye", strategy="semantic")
    assert not kept.escalated and not kept.degraded and kept.adapter_ids[0] == "bread"
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)  # unsure even by the base margin: a real loss
    lost = router.route(q + " knead", strategy="semantic")
    assert not lost.escalated and lost.degraded


class _StoppableEncoder(HashEncoder):
    """The hash encoder's vectors after a real onnxruntime run of int8 MiniLM over ``tokens`` words (cancellable:
    the run takes the router's RunOptions, so its deadline can stop it)."""

    cancellable = True

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.minilm = OnnxInt8Encoder(threads=1)
        self.words = "word " * tokens
        self.runs = 0

    def encode(self, texts: list[str], run_options: object = None) -> np.ndarray:
        self.minilm.encode([self.words], run_options)
        self.runs += 1
        return super().encode(texts)


def stoppable_router(budget: float, tokens: int) -> Router:
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False, routing_latency_budget_ms=budget, embedding_cache_size=8,
                        routing_threshold=-1.0)  # fmt: skip
    main = _StoppableEncoder(tokens)
    router = Router(config, None, lambda ks: [names.get(k, "") for k in ks], encoder=main, fast_encoder=HashEncoder())
    create(router, names, list(range(len(TOPICS))), bulk=True)
    return router


def test_an_escalation_running_past_the_budget_is_stopped_and_keeps_the_fast_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cost model predicts the main encoder fits, but this run would take ~100 ms against a 30 ms budget: the
    deadline stops it (onnxruntime's terminate flag), the route keeps the fast answer, marked degraded, and nothing
    is cached for the text. The same encoder on a budget it fits escalates as before."""
    router = stoppable_router(budget=30.0, tokens=500)
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)  # every fast answer is unsure
    router._main_cost.terms[:] = [1.0, 0.0]  # as if the encoder took 1 ms
    monkeypatch.setattr(router._main_cost, "probe", lambda *args, **kw: None)  # no background re-measure
    q = "bread stock"
    router.config.routing_latency_budget_ms = 0.0
    want = router.route(q, strategy="semantic").adapter_ids  # the fast answer (no time for the main encoder)
    router.config.routing_latency_budget_ms = 30.0
    runs = router.encoder.inner.runs
    stopped = router.route(q, strategy="semantic")
    assert stopped.degraded and not stopped.escalated and stopped.adapter_ids == want
    assert router.statistics()["cancelled"] == 1 and router._watchdog.fired == 1
    assert router.encoder.inner.runs == runs  # the run raised: it never returned a vector
    assert router.encoder.peek(q) is None  # and nothing was cached for the text
    assert router._main_cost.predict(len(q)) > 1.0  # the stopped run's time was learned (a lower bound)
    router.config.routing_latency_budget_ms = 10_000.0
    done = router.route(q, strategy="semantic")
    assert done.escalated and not done.degraded and router.statistics()["cancelled"] == 1
    assert router.encoder.peek(q) is not None


def test_a_refused_escalation_runs_now_and_then_to_remeasure_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cold samples (300 ms) hold the median over a 50 ms budget; one refusal in ``COST_EXPLORE_EVERY`` runs the
    encoder anyway under the deadline (the fastest recent sample fits), and its real cost is learned. An encoder
    that no deadline can stop is never explored."""
    router = stoppable_router(budget=50.0, tokens=8)
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)
    cost = router._main_cost
    monkeypatch.setattr(cost, "probe", lambda *args, **kw: None)  # no background probe: exploration alone
    for ms in (300.0, 300.0, 2.0):  # two cold runs and a fast one, measured in routes
        cost.learn(10, ms)
    assert cost.predict(10) == 300.0
    escalated = [router.route(f"bread stock {i}", strategy="semantic").escalated for i in range(costs_mod.COST_EXPLORE_EVERY)]
    assert escalated == [False] * (costs_mod.COST_EXPLORE_EVERY - 1) + [True]
    assert len(cost.samples[0]) == 4 and cost.samples[0][-1] < 50.0 and router.statistics()["cancelled"] == 0
    fresh = costs_mod.EncoderCost(base_ms=300.0)  # a probe's reading is no floor for exploring
    fresh.learn(10, 1.0, probe=True)
    fresh.learn(10, 300.0)
    fresh.learn(10, 300.0)
    assert not any(fresh.explore(40.0, 10) for _ in range(3 * costs_mod.COST_EXPLORE_EVERY))
    fresh.learn(10, 2.0)  # one measured in a route
    assert any(fresh.explore(40.0, 10) for _ in range(costs_mod.COST_EXPLORE_EVERY))

    plain, _ = fast_router(budget=50.0)  # the hash encoder takes no RunOptions
    for ms in (300.0, 300.0, 2.0):
        plain._main_cost.learn(10, ms)
    assert not any(plain.route(f"bread stock {i}", strategy="semantic").escalated for i in range(40))


def test_the_deadline_holds_back_the_search_after_it_and_what_recent_plans_overran() -> None:
    """An escalation's deadline leaves the route its search (``reserve_ms``) and, once 16 plans were checked at
    the route's end, the 99.5th percentile of how far they overran (never negative)."""
    import time

    cost = costs_mod.EncoderCost()
    end = time.perf_counter() + 1.0
    assert cost.deadline(end, 2.0) == pytest.approx(end - 0.002) and cost.hold() == 0.0
    cost.settle()  # this "route" ended ~1 s before its plan's end: a large negative overrun
    assert len(cost.overrun.samples) == 1 and cost.overrun.samples[0] < -900.0
    cost.settle()  # no plan pending: nothing learned
    assert len(cost.overrun.samples) == 1
    assert cost.deadline(float("inf"), 2.0) == float("inf")  # no budget: no plan either
    cost.settle()
    assert len(cost.overrun.samples) == 1
    cost.overrun.samples.extend([-1.0] * 14)
    assert cost.hold() == 0.0  # 15 samples: not yet
    cost.overrun.samples.extend([0.3] * 10 + [0.8])
    want = float(np.percentile(list(cost.overrun.samples), costs_mod.PLAN_ERROR_PERCENTILE))
    assert costs_mod.PLAN_ERROR_PERCENTILE == 99.5 and want > 0.3 and cost.hold() == pytest.approx(want)
    assert cost.deadline(end, 2.0) == pytest.approx(end - (2.0 + want) / 1e3)
    cost.overrun.samples.extend([-5.0] * costs_mod.PLAN_ERROR_SAMPLES)  # routes that end early hold nothing back
    assert cost.hold() == 0.0


class _ColdStartEncoder(HashEncoder):
    """A main encoder whose first call is slow (a cold start), then fast."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            import time

            time.sleep(0.2)
        return super().encode(texts)


def test_one_slow_cold_start_does_not_forbid_escalating_for_good(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cost model learns only from escalations: after one 200 ms cold start it would refuse the main encoder
    forever at a 20 ms budget; the background probe re-measures it and escalation resumes."""
    import time

    monkeypatch.setattr(costs_mod, "COST_PROBE_INTERVAL_S", 0.0)
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False, routing_latency_budget_ms=20.0, embedding_cache_size=0,
                        routing_threshold=-1.0)  # fmt: skip
    main = _ColdStartEncoder()
    router = Router(config, None, lambda ks: [names.get(k, "") for k in ks], encoder=main, fast_encoder=HashEncoder())
    create(router, names, list(range(len(TOPICS))), bulk=True)
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)  # every fast answer is unsure
    router._main_cost.terms[:] = [300.0, 0.0]  # as if a cold start had been learned
    router._main_cost.samples[0].extend([300.0] * 3)
    first = router.route("bread stock one", strategy="semantic")
    assert first.degraded and not first.escalated
    deadline = time.monotonic() + 10.0
    while router._main_cost.predict(len("bread stock two")) > 20.0 and time.monotonic() < deadline:
        router.route("bread stock three", strategy="semantic")  # each refusal may start one probe
        time.sleep(0.05)
    later = router.route("bread stock four", strategy="semantic")
    assert later.escalated and not later.degraded


def test_a_cpu_bound_encoders_probe_is_timed_on_its_threads_cpu_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The background probe shares the GIL with the routes in flight: on the wall clock it also counted the time it
    waited for them (a busy 1M-key router: 6-10 ms for a 4-5 ms encoder, and a 10 ms budget never escalated). A
    ``cpu_bound`` encoder is timed on the probe thread's CPU clock (a wait costs it nothing, here a sleep); any
    other encoder (a GPU, a remote service) keeps the wall clock."""
    import time

    monkeypatch.setattr(costs_mod, "COST_PROBE_INTERVAL_S", 0.0)

    def waits(texts: list[str]) -> None:
        time.sleep(0.03)

    for cpu_clock in (True, False):
        cost = costs_mod.EncoderCost(base_ms=100.0)
        cost.probe(waits, 40, cpu_clock=cpu_clock)
        deadline = time.monotonic() + 10.0
        while not cost.samples[0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cost.samples[0], "the probe did not run"
        assert (cost.predict(40) < 10.0) if cpu_clock else (30.0 <= cost.predict(40) < 100.0)
    for enc in (OnnxInt8Encoder(threads=1), HashEncoder()):
        assert enc.cpu_bound
    assert not OnnxInt8Encoder(threads=2).cpu_bound


def test_the_probe_keeps_the_wall_clock_while_the_query_lora_trains(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused escalation probes a ``cpu_bound`` main encoder on the CPU clock, except while the query LoRA trains
    beside the routes: an escalation then really waits for that thread (the GIL), as the wall clock says."""
    monkeypatch.setattr(costs_mod, "COST_PROBE_INTERVAL_S", 0.0)
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False, routing_latency_budget_ms=20.0, embedding_cache_size=0,
                        routing_threshold=-1.0)  # fmt: skip
    router = Router(config, None, lambda ks: [names.get(k, "") for k in ks], encoder=HashEncoder(),
                    fast_encoder=HashEncoder())  # fmt: skip
    create(router, names, list(range(len(TOPICS))), bulk=True)
    monkeypatch.setattr(router_mod, "CASCADE_MARGIN", 2.0)  # every fast answer is unsure
    router._main_cost.terms[:] = [300.0, 0.0]  # the main encoder never fits: each route probes it
    clocks: list[bool] = []
    monkeypatch.setattr(router._main_cost, "probe", lambda encode, chars, cpu_clock=False: clocks.append(cpu_clock))
    router.route("bread stock one", strategy="semantic")
    with router._adapt_lock:  # as adapt() holds it while the LoRA trains
        router.route("bread stock two", strategy="semantic")
    router.route("bread stock three", strategy="semantic")
    assert clocks == [True, False, True]


# ---------------------------------------------------------------------------------------------- persistence
def test_learned_state_persists_and_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    names: dict[int, str] = {}
    config = SMoAConfig(encoder="hash", enable_caching=False)
    router = Router(config, tmp_path, lambda ks: [names.get(k, "") for k in ks])
    create(router, names, list(range(len(TOPICS))), bulk=True)
    learned = router.key_vectors(1)
    threshold = router.threshold()
    router.save()
    again = Router(config, tmp_path, lambda ks: [names.get(k, "") for k in ks])
    assert again.load(10) == 1
    np.testing.assert_allclose(again.key_vectors(1), learned, atol=1e-2)
    assert again.threshold() == pytest.approx(threshold)
    assert again.statistics()["learned_adapters"] == len(TOPICS)
    (tmp_path / "learner.npz").write_bytes(b"not an npz")
    third = Router(config, tmp_path, lambda ks: [names.get(k, "") for k in ks])
    assert third.load(10) is None  # refused whole (checksum), never half-loaded: the core rebuilds
    assert third.statistics()["learned_adapters"] == 0


def test_learner_load_refuses_inconsistent_arrays(tmp_path: Path) -> None:
    lrn = KeyLearner(4)
    lrn.remember(1, np.ones(4), np.eye(4))
    lrn.initial[1] = (b"x" * 16, np.eye(4)[:1].astype(np.float32))
    path = tmp_path / "l.npz"
    arrays = lrn.to_arrays()
    arrays["counts"] = np.array([9])
    np.savez(path, **arrays)
    with pytest.raises(ValueError):
        KeyLearner.load(path, 4, 4)
    lrn.save(path)
    back = KeyLearner.load(path, 4, 4)
    assert back.with_examples() == [1] and back.stored[1].examples.shape == (4, 4)


def test_text_only_rivals_arriving_later_refit_the_learned_adapters_they_land_on() -> None:
    """Adapters keyed by examples first, then example-less rivals described with the same words: the rivals must
    not keep the keys as they were fitted without them; routes match the library built in the other order."""
    rivals = [RoutingText([f"rival{t}{j}"], ["help"], " ".join(TOPICS[t].split()[j : j + 3]), [])
              for t in ("stocks", "heart") for j in (0, 3)]  # fmt: skip
    queries = [(q, t) for t in TOPICS for q in topic_examples(t, 8, seed=9)]

    def build(rivals_first: bool) -> tuple[Router, list[str]]:
        router, names = make()
        its = items()
        rival_keys = list(range(100, 100 + len(rivals)))
        names.update({k: f"rival{k}" for k in rival_keys})
        names.update({i + 1: t for i, t in enumerate(TOPICS)})
        topic_entries = [KeyEntry(i + 1, k, it.domain_tags, it.skill_tags) for i, (it, k) in enumerate(zip(its, router.encode_keys(its)))]
        rival_entries = [KeyEntry(k, v, r.domain_tags, r.skill_tags) for k, r, v in zip(rival_keys, rivals, router.encode_keys(rivals))]
        batches = [rival_entries, topic_entries] if rivals_first else [topic_entries, rival_entries]
        before = None
        for g, batch in enumerate(batches):
            router.apply(batch, [], g + 1)
            if g == 0 and not rivals_first:
                before = router.key_vectors(2).copy()  # "stocks", learned without its rivals
        if before is not None:
            assert not np.allclose(before, router.key_vectors(2)), "the rivals landing on 'stocks' did not refit it"
        return router, [(router.route(q, strategy="semantic").adapter_ids or [""])[0] for q, _ in queries]

    _, late = build(rivals_first=False)
    _, early = build(rivals_first=True)
    truth = [t for _, t in queries]
    acc_late, acc_early = np.mean(np.array(late) == truth), np.mean(np.array(early) == truth)
    assert acc_late >= acc_early - 0.05 and acc_late >= 0.85, (acc_late, acc_early)
    assert np.mean(np.array(late) == np.array(early)) >= 0.9


def test_the_encoder_cost_model_learns_per_character_cost_only_from_long_texts() -> None:
    """A 70-character sample over a stale 3 ms base once taught 0.67 ms per character (27 ms predicted for a
    100-character query, so no escalation at a 10 ms budget); short-to-medium texts now move the base, long ones
    the per-character slope, each measured against the other."""
    config = SMoAConfig(encoder="hash", enable_caching=False)
    router = Router(config, None, lambda ks: [str(k) for k in ks], fast_encoder=HashEncoder())
    cost = router._main_cost
    cost.learn(70, 7.0)  # a typical CLINC-length query measured at 7 ms
    assert cost.predict(100) == pytest.approx(7.0 + 0.02 * 36 - 0.02 * 6, abs=0.01)
    for _ in range(5):  # 400-character texts at 15 ms: the slope is (15 - base) / 336
        cost.learn(400, 15.0)
    base, per_char = cost.terms
    assert per_char == pytest.approx((15.0 - base) / 336, rel=0.05)
    assert cost.predict(400) == pytest.approx(15.0, rel=0.05)
    assert 6.0 < cost.predict(60) < 8.0


def test_the_beam_planner_reads_the_same_percentiles_as_numpy() -> None:
    """The walk-cost model's percentiles (plain Python, once per route) equal ``np.percentile`` (linear)."""
    from smoa.routing.costs import SEARCH_COST_SAMPLES, WalkCost, Window

    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 63, SEARCH_COST_SAMPLES):
        values = Window(SEARCH_COST_SAMPLES)
        values.extend(rng.exponential(size=n).tolist())
        for q in (0, 50, 90, 99, 100):
            assert values.percentile(q) == pytest.approx(float(np.percentile(list(values), q)), abs=1e-12)
    cost = WalkCost()
    for walk, after in zip(rng.uniform(0.6, 1.0, 64), rng.uniform(0.1, 0.2, 64)):  # 192 units do not fit 1 ms
        cost.record(float(walk), 100, float(after))
    per_ef, after = float(np.percentile(cost.per_ef, 90)), float(np.percentile(cost.after, 90))
    left = 1.0
    want = int(min(192 - 16, max(16, 16 * ((left - after) / per_ef // 16))))
    assert per_ef * 192 > left - after and cost.beam(left, 192) == want and cost.beam(1e9, 192) is None


def test_a_cost_window_keeps_its_samples_sorted_through_evictions_and_edits() -> None:
    """A :class:`~smoa.routing.costs.Window` reads the same percentiles as ``np.percentile`` over its last ``size``
    samples, after evictions, repeated values and edits of the newest sample (what the planner reads per route)."""
    from smoa.routing.costs import Window

    rng = np.random.default_rng(1)
    win = Window(16)
    assert win.percentile(90) == 0.0 and len(win) == 0
    shadow: list[float] = []
    for i in range(200):
        x = float(rng.choice([0.25, 0.5, rng.exponential()]))  # ties exercise the bisect on removal
        win.append(x)
        shadow = (shadow + [x])[-16:]
        if i % 7 == 0:
            win.add_to_last(0.125)
            shadow[-1] += 0.125
        assert list(win) == shadow and win[-1] == shadow[-1]
        for q in (0, 50, 90, 99, 100):
            assert win.percentile(q) == pytest.approx(float(np.percentile(shadow, q)), abs=1e-12)


def test_the_beam_planner_holds_back_what_its_plans_under_predicted(monkeypatch) -> None:
    """Each beam plan is checked when the route's search side ends; once the plans ran 0.3 ms over (a walk's fixed
    part, Python, jitter), 0.3 ms of the budget is held back and the beam narrows to fit; plans that ran early are
    not credited (the slack never goes negative)."""
    from types import SimpleNamespace

    from smoa.routing.costs import PLAN_ERROR_MIN_SAMPLES, WalkCost

    # a stopped clock: the plans' errors are the 0.3 ms set below, not that plus however long this test ran
    # between a plan and its check (on a loaded box, enough to narrow the beam one more step)
    monkeypatch.setattr(costs_mod, "time", SimpleNamespace(perf_counter=lambda: 1000.0))

    cost = WalkCost()
    for _ in range(64):
        cost.record(0.96, 192, 0.1)  # 0.005 ms per beam unit, 0.1 ms after the walk
    assert cost.beam(0.92, 192) == 160 and cost.slack() == 0.0  # (0.92 - 0.1) / 0.005 = 164 -> 160 (step 16)
    for _ in range(PLAN_ERROR_MIN_SAMPLES):
        cost.beam(0.92, 192)
        start, planned = cost.error._plan
        cost.error.plan(start - (planned + 0.3) / 1e3, planned)  # this route took 0.3 ms more than planned
        cost.settle()
    assert cost.slack() == pytest.approx(0.3, abs=0.05)
    assert cost.beam(0.92, 192) == 96  # (0.92 - 0.1 - 0.3) / 0.005 = 104 -> 96
    early = WalkCost()
    for _ in range(64):
        early.record(0.96, 192, 0.1)
    for _ in range(PLAN_ERROR_MIN_SAMPLES):
        early.beam(0.92, 192)
        early.settle()  # at once: far under the plan
    assert early.slack() == 0.0 and early.beam(0.92, 192) == 160


def test_a_refused_tag_side_still_runs_now_and_then_to_stay_measured() -> None:
    """The tag side's cost is learned only from routes that run it: once refused (its reserve over what is left),
    one route in TAG_EXPLORE_EVERY runs it anyway, so stale slow samples cannot refuse it for good."""
    from smoa.routing.costs import TAG_EXPLORE_EVERY, WalkCost

    cost = WalkCost()
    assert cost.tag_fits(0.5) and not cost.tag_fits(0.0) and cost.tag_fits(float("inf"))  # unmeasured: fits
    cost.tag.extend([0.4] * 8)
    cost.tail.extend([0.3] * 8)
    assert cost.tag_reserve() == pytest.approx(0.7) and cost.tag_fits(0.8)
    runs = [cost.tag_fits(0.5) for _ in range(3 * TAG_EXPLORE_EVERY)]
    assert sum(runs) == 3 and runs[TAG_EXPLORE_EVERY - 1] and not any(runs[: TAG_EXPLORE_EVERY - 1])


def test_refit_keys_installed_a_few_adapters_per_lock_hold_end_as_installed_at_once(monkeypatch) -> None:
    """A refit installs its learned keys a few adapters per hold of the router's lock (routes go on between the
    blocks); once done, the index holds what one install under one hold gave: each adapter's keys and the routes,
    bit for bit. An install whose learner was replaced meanwhile stops (its keys would be stale)."""
    routers = []
    for per_hold in (1, 10_000):
        monkeypatch.setattr(router_mod, "INSTALL_ADAPTERS", per_hold)
        router, names = make()
        create(router, names, list(range(len(TOPICS))), bulk=True)
        router.refit_keys()
        routers.append(router)
    blocks, once = routers
    for key in range(1, len(TOPICS) + 1):
        np.testing.assert_array_equal(blocks.key_vectors(key), once.key_vectors(key))
    queries = [" ".join(topic_examples(t, 3, seed=7)[j].split()) for t in TOPICS for j in range(3)]
    for q in queries:
        a, b = blocks.route(q), once.route(q)
        assert (a.adapter_ids, a.routing_scores) == (b.adapter_ids, b.routing_scores)

    # the learner replaced after the first block: the rest is not installed
    monkeypatch.setattr(router_mod, "INSTALL_ADAPTERS", 1)
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=True)
    before = {k: router.key_vectors(k) for k in range(1, len(TOPICS) + 1)}
    stale = {k: -router.key_vectors(k) for k in before}  # any keys but the current ones
    real_yield = router_mod.yield_gil
    replaced = []

    def replace_learner() -> None:
        if not replaced:
            replaced.append(router._learner)
            router._learner = router._rebase(router._learner) or router._learner.__class__(router.dim)
        real_yield()

    monkeypatch.setattr(router_mod, "yield_gil", replace_learner)
    router._install_learned(stale, {})
    changed = [k for k in before if not np.array_equal(router.key_vectors(k), before[k])]
    assert changed == [1]


class _Rotated(HashEncoder):
    """A second space for an adaptation's swap: the hash encoder's vectors under a fixed rotation."""

    name = "hash+rotated"

    def __init__(self) -> None:
        super().__init__()
        self.rotation = np.linalg.qr(np.random.default_rng(3).standard_normal((self.dim, self.dim)))[0].astype(
            np.float32)

    def encode(self, texts: list[str]) -> np.ndarray:
        return super().encode(texts) @ self.rotation


def _swapped(monkeypatch, between=None) -> tuple[Router, dict[int, str], list[str]]:
    """A router whose adaptation's swap (``Router._swap``) installs keys fitted in the rotated space; ``between``
    (router, staged) runs after the keys were staged, before the swap's hold."""
    from smoa.routing import learner as learner_mod
    from smoa.routing.encoders import CachedEncoder

    monkeypatch.setattr(learner_mod, "FIT_IN_CHILD", False)
    router, names = make()
    create(router, names, list(range(len(TOPICS))), bulk=True)
    router.refit_keys()
    enc = CachedEncoder(_Rotated(), 0)
    fresh = router._reencoded(enc, set(router._learner.with_examples()))
    keys, evidence = router._fit_fresh(fresh)
    if between is not None:
        stage = router._stage

        def staged_then(keys):
            out = stage(keys)
            between(router, out)
            return out

        monkeypatch.setattr(router, "_stage", staged_then)
    router._swap(enc, fresh, keys, evidence)
    queries = [" ".join(topic_examples(t, 3, seed=7)[j].split()) for t in TOPICS for j in range(3)]
    return router, names, queries


def test_an_adaptations_keys_are_staged_a_few_keys_per_lock_hold_and_the_swap_only_reveals_them(
    monkeypatch,
) -> None:
    """An adaptation's swap flips encoder and keys at once, under one hold of the router's lock. Its keys are first
    inserted into the index hidden, a few keys per hold (routes go on between them, still on the old keys);
    the swap's hold only makes them live, inserting nothing. The result is what inserting them all in the swap's
    hold gave (the path taken when nothing was staged, or the staged keys are gone): each adapter's keys and the
    routes, bit for bit. An adapter removed after its keys were staged never routes again."""
    from smoa.routing.index import VectorIndex

    monkeypatch.setattr(router_mod, "INSTALL_ADAPTERS", 2)
    inserted: list[tuple[bool, int]] = []  # (live, rows) per faiss insert
    append = VectorIndex._append

    def spy(self, keys, x, alive):
        inserted.append((alive, len(keys)))
        return append(self, keys, x, alive)

    # the reference: nothing staged, every key inserted in the swap's one hold
    monkeypatch.setattr(Router, "_stage", lambda self, keys: (0, {}))
    once, _, queries = _swapped(monkeypatch)
    monkeypatch.undo()
    monkeypatch.setattr(router_mod, "INSTALL_ADAPTERS", 2)
    monkeypatch.setattr(router_mod, "STAGE_ROWS", 2)  # (one key per adapter in the learned space: 2 adapters)
    holds: list[int] = []
    real_stage = VectorIndex.stage
    monkeypatch.setattr(VectorIndex, "stage", lambda self, k, v: holds.append(len(k)) or real_stage(self, k, v))
    monkeypatch.setattr(VectorIndex, "_append", spy)
    at_swap = []
    staged, _, _ = _swapped(monkeypatch, between=lambda r, s: at_swap.append(len(inserted)))
    assert len(holds) == 3 and sum(holds) == sum(n for live, n in inserted[: at_swap[0]] if not live), holds
    assert inserted[at_swap[0] :] == [], inserted  # the swap's hold inserted nothing
    # the lost case: the index compacted after the staging (its hidden keys gone): installed the slow way
    lost, _, _ = _swapped(monkeypatch, between=lambda r, s: r._vectors.compact())
    for other in (staged, lost):
        assert other.query_encoder.inner.name == "hash+rotated"
        assert len(other._vectors) == len(once._vectors)
        for key in range(1, len(TOPICS) + 1):
            np.testing.assert_array_equal(other.key_vectors(key), once.key_vectors(key))
        for q in queries:
            a, b = other.route(q), once.route(q)
            assert (a.adapter_ids, a.routing_scores) == (b.adapter_ids, b.routing_scores)

    # adapter 2 removed once its keys were staged: they stay hidden
    gone, names, _ = _swapped(monkeypatch, between=lambda r, s: r.remove([2], r.generation + 1))
    assert len(gone.key_vectors(2)) == 0 and 2 not in gone._learner.stored
    assert len(gone._vectors) == sum(len(gone.key_vectors(k)) for k in range(1, len(TOPICS) + 1))
    _, hits = gone._vectors.search(gone.query_encoder.encode_batch([TOPICS["stocks"]]), len(gone._vectors))
    assert 2 not in set(owner_of(hits[0]).tolist())
