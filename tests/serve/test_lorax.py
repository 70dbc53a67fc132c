"""LoRAX compatibility: the real `lorax-client` (0.6.3) against the server; merged adapters exact or cached."""

from __future__ import annotations

import asyncio

import httpx
import pytest

lorax = pytest.importorskip("lorax")

from .conftest import USER_KEY

H = {"Authorization": f"Bearer {USER_KEY}"}


@pytest.fixture(scope="module")
def client(server):
    return lorax.Client(server.url, headers=H, timeout=60)


def test_generate_with_adapter_id_and_details(client, adapter_ids) -> None:
    out = client.generate("Tell me a story", adapter_id=adapter_ids[0], max_new_tokens=6, details=True)
    assert out.details.generated_tokens == 6 and out.details.finish_reason.value == "length"
    assert len(out.details.tokens) == 6 and out.details.prompt_tokens > 0
    assert out.generated_text == "".join(t.text for t in out.details.tokens)
    base = client.generate("Tell me a story", max_new_tokens=6)
    assert base.generated_text != out.generated_text


def test_generate_stream_matches_generate(client, adapter_ids) -> None:
    full = client.generate("The sea", adapter_id=adapter_ids[1], max_new_tokens=8).generated_text
    events = list(client.generate_stream("The sea", adapter_id=adapter_ids[1], max_new_tokens=8))
    assert "".join(e.token.text for e in events) == full
    assert events[-1].generated_text == full and events[-1].details.generated_tokens == 8


def test_generate_stream_endpoint(server, adapter_ids) -> None:
    body = {"inputs": "x", "parameters": {"adapter_id": adapter_ids[0], "max_new_tokens": 3}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, headers=H) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert len(lines) == 3 and all(ln.startswith("data:") for ln in lines)
    plain = httpx.post(server.url + "/generate", json=body, headers=H).json()
    assert "generated_text" in plain and plain["smoa"]["route"]["adapter_ids"] == [adapter_ids[0]]


def test_merged_linear_is_the_exact_mixture(client, server, adapter_ids) -> None:
    ids, weights = adapter_ids[:3], [0.5, 0.3, 0.2]
    merged = lorax.types.MergedAdapters(ids=ids, weights=weights, merge_strategy="linear", density=1.0)
    out = client.generate("Recipe for soup", merged_adapters=merged, max_new_tokens=8).generated_text
    oa = httpx.post(server.url + "/v1/completions", headers=H, json={
        "model": server.serving.model_name, "prompt": "Recipe for soup", "max_tokens": 8, "temperature": 0,
        "adapters": [{"id": i, "weight": w} for i, w in zip(ids, weights)]}).json()
    assert out == oa["choices"][0]["text"]


def test_merged_ties_cached_per_mixture(client, server, adapter_ids) -> None:
    m = lorax.types.MergedAdapters(ids=adapter_ids[:2], weights=[0.6, 0.4], merge_strategy="ties", density=0.5)
    before = server.serving.metrics.merge_cache_hits._value.get()
    a = client.generate("Hello", merged_adapters=m, max_new_tokens=5).generated_text
    b = client.generate("Hello", merged_adapters=m, max_new_tokens=5).generated_text
    assert a == b and server.serving.metrics.merge_cache_hits._value.get() == before + 1
    m2 = lorax.types.MergedAdapters(ids=adapter_ids[:2], weights=[0.6, 0.4], merge_strategy="dare_linear",
                                    density=0.5)  # fmt: skip
    client.generate("Hello", merged_adapters=m2, max_new_tokens=5)
    assert server.serving.metrics.merge_cache_hits._value.get() == before + 1  # another strategy: another entry


def test_async_client_and_errors(server, adapter_ids) -> None:
    async def main() -> list[str]:
        c = lorax.AsyncClient(server.url, headers=H, timeout=60)
        outs = await asyncio.gather(*[c.generate(f"q{i}", adapter_id=adapter_ids[i % 3], max_new_tokens=4)
                                      for i in range(4)])  # fmt: skip
        return [o.generated_text for o in outs]

    assert len(asyncio.run(main())) == 4
    with pytest.raises(lorax.errors.NotFoundError):
        lorax.Client(server.url, headers=H).generate("x", adapter_id="ad_missing", max_new_tokens=2)
    with pytest.raises(Exception):  # noqa: B017 - lorax maps 401 to UnknownError
        lorax.Client(server.url).generate("x", max_new_tokens=2)
