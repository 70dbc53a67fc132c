"""GET /metrics: Prometheus text with every contract metric, moving as requests are served."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import USER_KEY

NAMES = {
    "smoa_requests", "smoa_request_duration_seconds", "smoa_queue_duration_seconds",
    "smoa_inference_duration_seconds", "smoa_time_to_first_token_seconds", "smoa_generated_tokens",
    "smoa_route_latency_seconds", "smoa_route_cache_hits", "smoa_weight_cache_hits", "smoa_loaded_adapters",
    "smoa_batch_size", "smoa_queue_depth",
}  # fmt: skip


def scrape(server) -> dict[str, list]:
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_move_with_requests(server) -> None:
    before = scrape(server)
    assert NAMES <= set(before), NAMES - set(before)
    assert all(n.startswith("smoa_") for n in before if not n.startswith(("python_", "process_")))
    h = {"Authorization": f"Bearer {USER_KEY}"}
    for _ in range(2):  # the same query twice: the second route is a cache hit
        r = httpx.post(server.url + "/v1/completions", headers=h,
                       json={"model": "smoa", "prompt": "metrics about cooking", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200
    httpx.post(server.url + "/v1/completions", json={"model": "smoa", "prompt": "x"})  # 401
    after = scrape(server)
    ep = "/v1/completions"
    assert value(after["smoa_requests"], "smoa_requests_total", endpoint=ep, status="200") == \
        value(before["smoa_requests"], "smoa_requests_total", endpoint=ep, status="200") + 2  # fmt: skip
    assert value(after["smoa_requests"], "smoa_requests_total", endpoint=ep, status="401") >= 1
    assert value(after["smoa_generated_tokens"], "smoa_generated_tokens_total") >= \
        value(before["smoa_generated_tokens"], "smoa_generated_tokens_total") + 8  # fmt: skip
    assert value(after["smoa_route_cache_hits"], "smoa_route_cache_hits_total") >= \
        value(before["smoa_route_cache_hits"], "smoa_route_cache_hits_total") + 1  # fmt: skip
    assert value(after["smoa_time_to_first_token_seconds"], "smoa_time_to_first_token_seconds_count") >= 2
    assert value(after["smoa_batch_size"], "smoa_batch_size_count") > 0
    assert value(after["smoa_loaded_adapters"], "smoa_loaded_adapters") >= 1
