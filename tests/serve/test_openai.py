"""The OpenAI endpoints driven by the real `openai` client (sync, async, streaming) against a real uvicorn server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from .conftest import USER_KEY

MODEL = "model"  # the tiny model's directory name is the served base-model name (see ServeConfig.model_name)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.serving.model_name


def test_models_lists_base_smoa_and_adapters(client, base, adapter_ids) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == [base, "smoa"]
    assert set(adapter_ids) <= set(ids)


def test_models_paginated(server, adapter_ids) -> None:
    h = {"Authorization": f"Bearer {USER_KEY}"}
    first = httpx.get(server.url + "/v1/models", params={"limit": 3}, headers=h).json()
    rest = httpx.get(server.url + "/v1/models", params={"offset": 3, "limit": 100}, headers=h).json()
    assert len(first["data"]) == 3 and first["has_more"] is True
    assert [m["id"] for m in first["data"] + rest["data"]][2:] == adapter_ids
    assert rest["has_more"] is False


def test_routed_completion_reports_route_and_header(client) -> None:
    raw = client.completions.with_raw_response.create(model="smoa", prompt="the patient has a fever and a cough",
                                                      max_tokens=6, temperature=0)  # fmt: skip
    out = raw.parse()
    route = out.model_extra["smoa"]["route"]
    assert set(route) == {"adapter_ids", "weights", "scores", "latency_ms", "strategy"}
    assert 1 <= len(route["adapter_ids"]) <= 3 and abs(sum(route["weights"]) - 1) < 1e-6
    assert raw.headers["x-smoa-adapters"].split(",")[0].split("=")[0] == route["adapter_ids"][0]
    assert out.usage.completion_tokens == 6 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    assert out.choices[0].finish_reason == "length"


def test_adapter_choices_change_the_output(client, base, adapter_ids) -> None:
    def text(**kw) -> str:
        return client.completions.create(prompt="Once upon a time", max_tokens=8, temperature=0, **kw).choices[0].text

    plain = text(model=base)
    one = text(model=adapter_ids[0])
    explicit = text(model=base, extra_body={"adapters": [{"id": adapter_ids[0], "weight": 1.0}]})
    mixed = text(model=base, extra_body={"adapters": [{"id": adapter_ids[0], "weight": 0.5},
                                                      {"id": adapter_ids[1], "weight": 0.5}]})  # fmt: skip
    assert one == explicit  # the same mixture, two ways of asking
    assert plain != one and mixed != one
    routed = client.completions.create(model=base, prompt="a doctor and a patient", max_tokens=2, temperature=0,
                                       extra_body={"route": True})  # fmt: skip
    assert routed.model_extra["smoa"]["route"]["adapter_ids"]
    none = client.completions.create(model=base, prompt="Once upon a time", max_tokens=2, temperature=0)
    assert none.model_extra["smoa"]["route"]["adapter_ids"] == []


def test_route_follows_metadata_and_strategy(client) -> None:
    out = client.completions.create(model="smoa", prompt="help me", max_tokens=1, temperature=0,
                                    extra_body={"metadata": {"domain": "cooking"}, "strategy": "task_based"})  # fmt: skip
    assert out.model_extra["smoa"]["route"]["strategy"] == "task_based"


def test_chat_completion_and_n(client, adapter_ids) -> None:
    out = client.chat.completions.create(model=adapter_ids[2], messages=[{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "How do I bake bread?"}],
                                         max_tokens=5, n=2, temperature=1.0, seed=7)  # fmt: skip
    assert len(out.choices) == 2 and out.object == "chat.completion"
    assert all(c.message.role == "assistant" for c in out.choices)
    assert out.usage.completion_tokens <= 10
    again = client.chat.completions.create(model=adapter_ids[2], messages=[{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "How do I bake bread?"}],
                                           max_tokens=5, n=2, temperature=1.0, seed=7)  # fmt: skip
    assert [c.message.content for c in out.choices] == [c.message.content for c in again.choices]  # seeded


def test_streaming_equals_non_streaming(client, adapter_ids) -> None:
    kw = {"model": adapter_ids[1], "prompt": "The weather today", "max_tokens": 10, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all("smoa" in c.model_extra for c in chunks)
    chat = list(client.chat.completions.create(model="smoa", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=4, stream=True, temperature=0,
                                               stream_options={"include_usage": True}))  # fmt: skip
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage is not None and chat[-1].usage.completion_tokens == 4


def test_stream_ends_with_done(server, adapter_ids) -> None:
    body = {"model": adapter_ids[0], "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {USER_KEY}"}) as r:  # fmt: skip
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)


def test_stop_strings_cut_the_text(client, adapter_ids) -> None:
    kw = {"model": adapter_ids[3], "prompt": "Count with me", "max_tokens": 12, "temperature": 0}
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip()
    cut = client.completions.create(stop=[stop], **kw).choices[0]
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == cut.text


def test_async_client_concurrent(server, adapter_ids) -> None:
    async def main() -> list[str]:
        ac = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)
        reqs = [ac.completions.create(model=adapter_ids[i % 4], prompt=f"story {i}", max_tokens=5, temperature=0)
                for i in range(8)]  # fmt: skip
        outs = await asyncio.gather(*reqs)
        await ac.close()
        return [o.choices[0].text for o in outs]

    texts = asyncio.run(main())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)
    alone = [client.completions.create(model=adapter_ids[i % 4], prompt=f"story {i}", max_tokens=5,
                                       temperature=0).choices[0].text for i in range(8)]  # fmt: skip
    assert texts == alone
