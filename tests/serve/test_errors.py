"""Auth, limits and errors: every status of the contract, in the OpenAI error shape."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import openai
import pytest

from smoa.serve import ServeConfig
from smoa.serve.auth import authorize, key_matches

from .conftest import ADMIN_KEY, OTHER_KEY, USER_KEY
from .helpers import ThreadServer, make_library


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def test_keys_401_and_403(server) -> None:
    u = server.url
    body = {"model": "smoa", "prompt": "hi", "max_tokens": 1}
    assert_error(httpx.post(u + "/v1/completions", json=body), 401)
    assert_error(httpx.post(u + "/v1/completions", json=body, headers=auth("wrong")), 401)
    assert_error(httpx.post(u + "/v1/completions", json=body, headers={"Authorization": USER_KEY}), 401)  # no Bearer
    assert httpx.post(u + "/v1/completions", json=body, headers=auth(OTHER_KEY)).status_code == 200  # 2nd key
    assert httpx.post(u + "/v1/completions", json=body, headers=auth(ADMIN_KEY)).status_code == 200  # admin too
    assert_error(httpx.get(u + "/v1/stats", headers=auth(USER_KEY)), 403)
    assert_error(httpx.get(u + "/v1/adapters"), 401)
    assert httpx.get(u + "/v1/stats", headers=auth(ADMIN_KEY)).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=u + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=u + "/v1", api_key=USER_KEY, max_retries=0).post(
            "/route", body={"query": "x"}, cast_to=object)


def test_key_comparison_is_constant_time_and_exact() -> None:
    assert key_matches("abc", ["x", "abc"]) and not key_matches("abd", ["abc"]) and not key_matches("ab", ["abc"])
    assert authorize(None, [], [], admin=True) == "anonymous"
    assert authorize("Bearer k1", ["k1"], [], admin=False).startswith("key-")


def test_unknown_adapter_404(server) -> None:
    h = auth(USER_KEY)
    err = assert_error(httpx.post(server.url + "/v1/completions", json={"model": "ad_doesnotexist", "prompt": "x"},
                                  headers=h), 404, "model")  # fmt: skip
    assert err["code"] == "model_not_found"
    assert_error(httpx.post(server.url + "/v1/completions", headers=h, json={
        "model": "smoa", "prompt": "x", "adapters": [{"id": "ad_nope", "weight": 1}]}), 404, "adapters")
    assert_error(httpx.get(server.url + "/v1/adapters/ad_nope", headers=auth(ADMIN_KEY)), 404)
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0).chat.completions.create(
            model="ad_nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "smoa", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "smoa", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),  # over the server's cap (64)
    ({"model": "smoa", "prompt": "x", "n": 5}, 400, "n"),  # over max_n (4)
    ({"model": "smoa", "prompt": "x", "temperature": 3}, 422, "temperature"),
    ({"model": "smoa", "prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"model": "smoa", "prompt": "x", "strategy": "magic"}, 422, "strategy"),
    ({"model": "smoa"}, 422, "prompt"),
    ({"model": "smoa", "prompt": "x", "adapters": [{"id": "a", "weight": "heavy"}]}, 422, "adapters.0.weight"),
    ({"model": "smoa", "prompt": "word " * 600, "max_tokens": 1}, 400, "prompt"),  # over the 512-token context
    ({"model": "smoa", "prompt": "word " * 500, "max_tokens": 60}, 400, "max_tokens"),  # prompt + max_tokens
])  # fmt: skip
def test_bad_fields_name_the_field(server, body, status, param) -> None:
    assert_error(httpx.post(server.url + "/v1/completions", json=body, headers=auth(USER_KEY)), status, param)


def test_malformed_json_and_chat_fields(server) -> None:
    h = {**auth(USER_KEY), "content-type": "application/json"}
    assert_error(httpx.post(server.url + "/v1/completions", content=b"{not json", headers=h), 422)
    assert_error(httpx.post(server.url + "/v1/chat/completions", headers=h,
                            json={"model": "smoa", "messages": [{"role": "wizard", "content": "x"}]}), 422,
                 "messages.0.role")  # fmt: skip
    assert_error(httpx.post(server.url + "/v1/chat/completions", headers=h,
                            json={"model": "smoa", "messages": []}), 422, "messages")  # fmt: skip


def test_body_over_the_cap_is_refused_before_it_is_read(server) -> None:
    big = {"model": "smoa", "prompt": "x" * (70 * 1024)}
    assert_error(httpx.post(server.url + "/v1/completions", json=big, headers=auth(USER_KEY)), 413)
    # announce 1 GB, send 10 bytes: the answer comes at once, the server never waits for the rest
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + USER_KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{\"model\":")
        t0 = time.monotonic()
        head = s.recv(4096).decode()
    assert head.startswith("HTTP/1.1 413") and time.monotonic() - t0 < 5
    # chunked (no Content-Length): cut off as soon as the streamed bytes pass the cap
    def chunks():
        yield b'{"model": "smoa", "prompt": "'
        for _ in range(200):
            yield b"y" * 1024

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={**auth(USER_KEY),
                   "content-type": "application/json"})  # fmt: skip
    assert_error(r, 413)


def test_queue_full_429_with_retry_after_and_not_ready_503(tmp_path, model_dir) -> None:
    lib = tmp_path / "lib"
    make_library(lib, model_dir, 1)
    cfg = ServeConfig(library=lib, model_dir=model_dir, encoder="hash", max_batch=1, max_queue=1,
                      max_tokens_cap=64)  # fmt: skip
    with ThreadServer(cfg) as srv:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                body = {"model": srv.serving.model_name, "prompt": "go", "max_tokens": 60, "temperature": 0}
                return await asyncio.gather(*[c.post(srv.url + "/v1/completions", json=body) for _ in range(8)])

        rs = asyncio.run(burst())
        codes = sorted(r.status_code for r in rs)
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        limited = next(r for r in rs if r.status_code == 429)
        assert int(limited.headers["retry-after"]) >= 1 and limited.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            async def many() -> None:
                c = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
                await asyncio.gather(*[c.completions.create(model=srv.serving.model_name, prompt="go", max_tokens=60)
                                       for _ in range(6)])  # fmt: skip
            asyncio.run(many())


def test_health_503_until_loaded(tmp_path, model_dir) -> None:
    from fastapi.testclient import TestClient

    from smoa.serve import SmoaServing, build_app

    lib = tmp_path / "lib"
    make_library(lib, model_dir, 1)
    cfg = ServeConfig(library=lib, model_dir=model_dir, encoder="hash")
    serving = SmoaServing(cfg)
    app = build_app(cfg, serving, load=False)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/completions", json={"model": "smoa", "prompt": "x"}), 503)
        serving.load()
        assert c.get("/health").status_code == 200
        assert c.post("/v1/completions", json={"model": "smoa", "prompt": "x", "max_tokens": 1}).status_code == 200
        serving.begin_drain()
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/completions", json={"model": "smoa", "prompt": "x"}), 503)


def test_missing_library_refused_without_create(tmp_path, model_dir) -> None:
    from smoa.serve import SmoaServing

    with pytest.raises(Exception, match="--create"):
        SmoaServing(ServeConfig(library=tmp_path / "none", model_dir=model_dir)).load()
    assert not (tmp_path / "none").exists()


def test_client_disconnect_cancels_its_work(tmp_path, model_dir) -> None:
    lib = tmp_path / "lib"
    make_library(lib, model_dir, 1)
    cfg = ServeConfig(library=lib, model_dir=model_dir, encoder="hash", max_tokens_cap=480)
    with ThreadServer(cfg) as srv:
        sched = srv.serving.scheduler
        body = {"model": srv.serving.model_name, "prompt": "go", "max_tokens": 480, "ignore_eos": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk: it is running
        # a non-streamed request whose client gives up
        with pytest.raises(httpx.TimeoutException):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=0.5)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (sched.cancelled < 2 or sched.num_running):
            time.sleep(0.05)
        assert sched.cancelled == 2 and sched.num_running == 0 and sched.queue_depth == 0
