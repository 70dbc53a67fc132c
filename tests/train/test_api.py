"""``train_adapter`` through the facade on a tiny Llama: stored, re-keyed, routable — and continual learning:
training a new adapter leaves every other adapter (weights, version, routing key) and the base model bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoa.config import SMoAConfig
from smoa.errors import CompositionError, InvalidInputError
from smoa.mixture import SparseAdapterMixture
from smoa.train.api import routing_examples, train_adapter
from smoa.train.loop import evaluate_loss

from .helpers import TOPICS

MODULES = ["q_proj", "v_proj", "o_proj", "down_proj"]


@pytest.fixture
def smoa(model, tokenizer):
    s = SparseAdapterMixture(SMoAConfig(encoder="hash", seed=0, max_active_adapters=2), base_model=model, tokenizer=tokenizer)
    yield s
    s.close()


def _spec(topic: str, **extra):
    return {"domain_tags": [topic], "skill_tags": ["generation"], "rank": 4, "target_modules": MODULES, **extra}


def _snapshot(smoa) -> dict[str, tuple[bytes, int, bytes]]:
    out = {}
    for ad in smoa.library.iter_adapters():
        row = smoa.library.routing_row(ad.key)
        out[ad.id] = (smoa.library.get_weights(ad.id).to_bytes(), ad.version, row[1].tobytes())
    return out


def test_train_from_spec_stores_weights_and_rekeys(smoa) -> None:
    res = train_adapter(smoa, _spec("cooking"), TOPICS["cooking"], steps=40, lr=1e-2, batch_size=5, progress=False)
    assert res.created and res.routing_examples == 5 and res.history.steps == 40
    stored = smoa.library.get_weights(res.adapter.id)
    assert res.adapter.version >= 2  # created (1), then new weights
    assert res.history.final_loss < res.history.initial_loss - 0.5
    loss_trained = evaluate_loss(smoa.engine, stored, TOPICS["cooking"])
    assert loss_trained < evaluate_loss(smoa.engine, None, TOPICS["cooking"]) - 0.5
    # the key is now the blend of the tags' embedding and the training texts' centroid (recomputed independently)
    from smoa.routing.router import RoutingText

    expect = smoa.router.encode_keys([RoutingText(["cooking"], ["generation"], "", TOPICS["cooking"])])[0]
    np.testing.assert_allclose(smoa.library.routing_keys_of(res.adapter.id), expect, rtol=0, atol=1e-6)
    # it is now routed to, and the facade's forward under that route applies the stored weights
    route = smoa.query_adapters_sync(TOPICS["cooking"][0], k=1)
    assert route.adapter_ids == [res.adapter.id]
    with torch.no_grad():
        via_facade = smoa.forward_sync([TOPICS["cooking"][0]], routes=[route]).logits
        direct = smoa.engine.forward([TOPICS["cooking"][0]], [(stored, 1.0)]).logits
    torch.testing.assert_close(via_facade, direct)


def test_continual_learning_leaves_others_bit_for_bit(smoa, model) -> None:
    first = [train_adapter(smoa, _spec(t), TOPICS[t], steps=8, lr=1e-2, batch_size=5, seed=i, progress=False).adapter
             for i, t in enumerate(["weather", "cooking"])]  # fmt: skip
    untouched = smoa.create_adapter_sync(domain_tags=["legal"], rank=4, target_modules=MODULES)
    before = _snapshot(smoa)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    routes = {t: smoa.query_adapters_sync(TOPICS[t][1], k=1).adapter_ids for t in ("weather", "cooking")}
    new = train_adapter(smoa, _spec("finance"), TOPICS["finance"], steps=8, lr=1e-2, batch_size=5, progress=False)
    again = train_adapter(smoa, first[0].id, TOPICS["weather"], steps=4, lr=1e-2, batch_size=5, progress=False)
    after = _snapshot(smoa)
    for aid in (first[1].id, untouched.id):
        assert after[aid] == before[aid]  # weights bytes, version and routing key unchanged
    assert after[first[0].id][1] > before[first[0].id][1] and again.adapter.id == first[0].id
    assert new.adapter.id not in before
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    assert smoa.query_adapters_sync(TOPICS["cooking"][1], k=1).adapter_ids == routes["cooking"]
    assert smoa.query_adapters_sync(TOPICS["finance"][2], k=1).adapter_ids == [new.adapter.id]


def test_deterministic_through_the_facade(model, tokenizer) -> None:
    from .helpers import tiny_llama

    results = []
    for m in (model, tiny_llama()):
        with SparseAdapterMixture(SMoAConfig(encoder="hash", seed=3), base_model=m, tokenizer=tokenizer) as s:
            res = train_adapter(s, _spec("weather"), TOPICS["weather"], steps=5, lr=1e-2, batch_size=2, seed=4,
                                progress=False)  # fmt: skip
            results.append(s.library.get_weights(res.adapter.id).to_bytes())
    assert results[0] == results[1]


def test_errors(smoa) -> None:
    ad = smoa.create_adapter_sync(domain_tags=["x"], rank=4, target_modules=MODULES)
    comp = smoa.compose_adapters_sync([ad.id])
    with pytest.raises(CompositionError, match="COMPOSITE"):
        train_adapter(smoa, comp.id, TOPICS["weather"], steps=1, progress=False)
    with pytest.raises(InvalidInputError, match="adapter_or_spec"):
        train_adapter(smoa, 42, TOPICS["weather"], steps=1, progress=False)
    with SparseAdapterMixture(SMoAConfig(encoder="hash")) as bare, pytest.raises(InvalidInputError, match="base model"):
        train_adapter(bare, _spec("x"), TOPICS["weather"], steps=1, progress=False)


def test_routing_examples_spread_and_pairs() -> None:
    assert routing_examples([("in a", "out a"), "text b", [1, 2]]) == ["in a", "text b"]
    picked = routing_examples([f"t{i}" for i in range(1000)], limit=4)
    assert picked == ["t0", "t250", "t500", "t750"]
