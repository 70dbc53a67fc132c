"""Text entering smoa: lone surrogates (finding 11), empty texts and 1 MB texts (finding 12)."""

from __future__ import annotations

import pytest
import torch

from smoa import InvalidInputError
from smoa.inject.engine import InferenceEngine
from smoa.textcheck import validate_query_text, validate_texts

from .helpers import open_lib, tiny_llama, with_model, word_tokenizer


@pytest.mark.parametrize("query", ["\ud800 medical", "medical \udfff", "a\udc80b"])
def test_finding_11_lone_surrogate_query_is_invalid_input(query: str) -> None:
    with pytest.raises(InvalidInputError, match="`query`.*surrogate"):
        validate_query_text(query)
    with open_lib() as smoa:
        smoa.create_adapter_sync("domain", ["medical"])
        for strategy in ("semantic", "task_based", "hybrid", "hierarchical"):
            with pytest.raises(InvalidInputError, match="`query`"):
                smoa.query_adapters_sync(query, None, strategy)


def test_validate_texts_names_the_row() -> None:
    with pytest.raises(InvalidInputError, match=r"`texts\[1\]`"):
        validate_texts(["ok", "\ud800"])
    with pytest.raises(InvalidInputError, match="`texts`"):
        validate_texts("one string")


def test_finding_11_forward_with_a_surrogate_is_invalid_input() -> None:
    engine = InferenceEngine(tiny_llama(), word_tokenizer())
    with pytest.raises(InvalidInputError, match=r"`inputs\[0\]`"):
        engine.forward(["\ud800 rain"], None)


def test_finding_12_empty_text_is_a_clear_error() -> None:
    engine = InferenceEngine(tiny_llama(), word_tokenizer())
    for inputs in ([""], ["rain", ""], ["   "]):
        with pytest.raises(InvalidInputError, match="no token"):
            engine.forward(inputs, None)
    with with_model() as smoa, pytest.raises(InvalidInputError, match="no token"):
        smoa.forward_sync([""])


def test_finding_12_long_text_is_cut_to_the_context() -> None:
    engine = InferenceEngine(tiny_llama(context=32), word_tokenizer())
    text = "rain " * 200_000  # 1 MB
    batch = engine.encode([text, "sun"])
    assert batch["input_ids"].shape == (2, 32)
    out = engine.forward([text], None)
    assert out.logits.shape[:2] == (1, 32) and torch.isfinite(out.logits).all()
    assert engine.encode([[5] * 1000])["input_ids"].shape == (1, 32)  # token-id lists too
    assert engine.encode([text], max_length=8)["input_ids"].shape == (1, 8)


def test_finding_12_long_text_through_the_facade() -> None:
    with with_model(context=32) as smoa:
        smoa.create_adapter_sync("domain", ["rain"])
        out = smoa.forward_sync(["rain " * 200_000])
        logits = out.logits if hasattr(out, "logits") else out
        assert logits.shape[1] == 32


def test_query_metadata_unknown_keys_are_ignored_whatever_their_value() -> None:
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync("domain", ["medical"])
        for meta in ({"user": None}, {"session_id": 123, "domain": "medical"}, {"trace": {"nested": [1, 2]}}):
            route = smoa.query_adapters_sync("medical question", meta, "task_based", 1)
            assert route.adapter_ids == [ad.id], meta
        with pytest.raises(InvalidInputError, match="`domain`"):
            smoa.query_adapters_sync("q", {"domain": 5})


def test_query_metadata_none_means_no_value() -> None:
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync("domain", ["medical"])
        for meta in ({"domain": None}, {"domain": ["medical", None]}):
            route = smoa.query_adapters_sync("medical question", meta, "task_based", 1)
            assert route.adapter_ids == [ad.id], meta
