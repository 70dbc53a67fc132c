"""The oracle: 32 concurrent requests, each with its own explicit mixture, greedy, through the real server, come
back exactly equal to the same requests run one at a time through in-process ``generate`` — no cross-talk
between rows of a batch, with the weight cache far smaller than the working set (adapters are evicted and
reloaded while others decode). float64 on both sides so that summation order cannot flip an argmax."""

from __future__ import annotations

import asyncio
import random

import openai
import torch

from smoa.inject.engine import InferenceEngine
from smoa.serve import ServeConfig

from .helpers import ThreadServer, load_model, make_library

N_ADAPTERS = 16
N_REQUESTS = 32


def test_concurrent_mixtures_equal_one_at_a_time(tmp_path, model_dir) -> None:
    lib = tmp_path / "lib"
    adapters = make_library(lib, model_dir, N_ADAPTERS)
    adapter_bytes = sum(a.numel() * 4 + b.numel() * 4 for a, b in adapters[0][1].factors.values())
    cache = 3 * adapter_bytes  # room for 3 of the 16 adapters
    rng = random.Random(5)
    requests = []
    for i in range(N_REQUESTS):
        members = rng.sample(range(N_ADAPTERS), k=1 + i % 4)
        weights = [round(rng.uniform(0.1, 1.0), 3) for _ in members]
        requests.append((f"request {i}: tell me about {rng.choice(['bread', 'law', 'stocks', 'songs'])}",
                         members, weights, 3 + i % 10))  # fmt: skip
    assert len({(tuple(m), tuple(w)) for _, m, w, _ in requests}) == N_REQUESTS  # every mixture different

    cfg = ServeConfig(library=lib, model_dir=model_dir, encoder="hash", dtype="float64", max_batch=12,
                      smoa_overrides={"cache_max_bytes": cache, "max_loaded_adapters": 3})  # fmt: skip
    with ThreadServer(cfg) as srv:

        async def run_all() -> list[str]:
            client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
            calls = [client.completions.create(model=srv.serving.model_name, prompt=p, max_tokens=n, temperature=0,
                                               extra_body={"adapters": [{"id": adapters[m][0], "weight": w}
                                                                        for m, w in zip(ms, ws)]})
                     for p, ms, ws, n in requests]  # fmt: skip
            outs = await asyncio.gather(*calls)
            await client.close()
            return [o.choices[0].text for o in outs]

        served = asyncio.run(run_all())
        stats = srv.serving.smoa.get_statistics()
        batches = srv.serving.scheduler.steps
    assert stats["cache"]["evictions"] > 0  # the working set did not fit: weights were reloaded mid-flight
    assert batches < sum(n for *_, n in requests)  # rows really shared decode steps

    model, tok = load_model(model_dir, torch.float64)
    engine = InferenceEngine(model, tok)
    alone = [engine.generate([p], [(adapters[m][1], w) for m, w in zip(ms, ws)], max_new_tokens=n)[0]
             for p, ms, ws, n in requests]  # fmt: skip
    assert served == alone
    assert len(set(alone)) > N_REQUESTS // 2  # the mixtures really differ
