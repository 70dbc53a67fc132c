"""Issue 11: a library's routing quality must not depend on how or in what order its adapters arrived.

CLINC150 intent adapters (examples = their train texts), created one at a time in a shuffled order vs in one
bulk change set; top-1 on their val queries. The fast test uses the 30 intents of two domains (hard
neighbours) with the static encoder (seconds); ``-m slow`` runs all 150 intents with the default encoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from smoa.config import SMoAConfig
from smoa.routing.router import KeyEntry, Router, RoutingText


def clinc_or_skip():  # -> (train, val)
    from smoa.data.clinc import clinc150

    try:
        return clinc150("train"), clinc150("val")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def library(encoder: str, domains: set[str] | None, order_seed: int | None, refit: bool) -> tuple[float, Router]:
    train, val = clinc_or_skip()
    if domains is not None:
        train = [e for e in train if e.domain in domains]
        val = [e for e in val if e.domain in domains]
    intents = sorted({e.intent for e in train})
    domain = {e.intent: e.domain for e in train}
    order = list(intents) if order_seed is None else [str(i) for i in np.random.default_rng(order_seed).permutation(intents)]
    names: dict[int, str] = {}
    cfg = SMoAConfig(encoder=encoder, enable_caching=False, routing_threshold=-1.0)
    router = Router(cfg, None, lambda ks: [names.get(k, "") for k in ks])
    router.wait_fast_path(300)
    items = [RoutingText([domain[i]], [i], "", [e.text for e in train if e.intent == i]) for i in order]
    for j, i in enumerate(order):
        names[j + 1] = i
    if order_seed is None:
        keys = router.encode_keys(items)
        router.apply([KeyEntry(j + 1, k, it.domain_tags, it.skill_tags) for j, (k, it) in enumerate(zip(keys, items))],
                     [], 1)  # fmt: skip
    else:
        for j, it in enumerate(items):
            router.apply([KeyEntry(j + 1, router.encode_keys([it])[0], it.domain_tags, it.skill_tags)], [], j + 1)
    if refit:
        router.refit()
    top1 = np.mean([router.route(e.text, strategy="semantic").adapter_ids[:1] == [e.intent] for e in val])
    return 100 * float(top1), router


def test_shuffled_one_by_one_matches_bulk_on_a_clinc_subset() -> None:
    doms = {"banking", "credit_cards"}
    bulk, _ = library("static", doms, None, refit=True)
    one, router = library("static", doms, 7, refit=True)
    assert router.statistics()["learned_adapters"] == 30
    assert bulk > 85.0, bulk
    assert abs(bulk - one) <= 0.5, (bulk, one)


@pytest.mark.slow
def test_shuffled_one_by_one_as_created_matches_bulk_on_clinc150() -> None:
    # as created (no refit): 150 adapters one at a time get their last full key refit at 137; the 13 after it are
    # local updates, whose refitted neighbours must not grow over the adapters outside the update (their
    # examples are fixed classes of the fit); with 32 of them only: 93.5 vs 95.2 % top-1 (default encoder)
    bulk, _ = library("default", None, None, refit=False)
    one, router = library("default", None, 1, refit=False)
    assert router._refit_size < 150  # the tail was learned by local updates
    assert abs(bulk - one) <= 0.5, (bulk, one)


@pytest.mark.slow
def test_shuffled_one_by_one_matches_bulk_on_clinc150_default_encoder() -> None:
    bulk, _ = library("default", None, None, refit=True)
    one, _ = library("default", None, 3, refit=True)
    assert bulk >= 94.0, bulk
    assert abs(bulk - one) <= 0.5, (bulk, one)


def test_hybrid_learns_its_query_word_tag_weight_from_the_examples(tmp_path) -> None:
    # CLINC150 intents share tag words ("credit", "card", "account"...): the tag weight learned on the adapters'
    # example texts must route the (unseen) val queries at least as well as the fixed default, and persist
    from smoa.routing.learner import KeyLearner
    from smoa.routing.router import TAG_WEIGHTS
    from smoa.routing.strategies import TEXT_TAG_WEIGHT

    doms = {"banking", "credit_cards"}
    _, router = library("static", doms, None, refit=True)
    w = router.text_tag_weight
    assert w in TAG_WEIGHTS and router.statistics()["text_tag_weight"] == w
    _, val = clinc_or_skip()
    val = [e for e in val if e.domain in doms]

    def hybrid_top1(weight: float) -> float:
        router._learner.text_tag_weight = weight
        router._cache.clear()
        return float(np.mean([router.route(e.text, strategy="hybrid").adapter_ids[:1] == [e.intent] for e in val]))

    assert hybrid_top1(w) >= hybrid_top1(TEXT_TAG_WEIGHT), w
    router._learner.text_tag_weight = 0.05
    router._learner.save(tmp_path / "learner.npz")
    assert KeyLearner.load(tmp_path / "learner.npz", router.dim, 4).text_tag_weight == 0.05
    router._learner.text_tag_weight = None
    router._learner.save(tmp_path / "learner.npz")
    assert KeyLearner.load(tmp_path / "learner.npz", router.dim, 4).text_tag_weight is None
