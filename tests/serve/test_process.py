"""`smoa serve` as a real process: refuses a path without a library, --create, SIGTERM drains, SIGKILL during an
upload leaves the library consistent."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from smoa import SMoAConfig, SparseAdapterMixture

from .helpers import load_model, make_library, process_server, wait_healthy

ADMIN = "sk-admin-proc"


def test_refuses_a_path_without_library_unless_create(tmp_path, model_dir, capsys) -> None:
    from smoa.cli import main
    from smoa.serve import ServeConfig

    from .helpers import ThreadServer

    target = tmp_path / "nolib"
    assert main(["serve", "--library", str(target), "--model", str(model_dir)]) == 2
    assert "--create" in capsys.readouterr().err and not target.exists()
    with ThreadServer(ServeConfig(library=target, model_dir=model_dir, create=True, encoder="hash")) as srv:
        out = httpx.post(srv.url + "/v1/completions", json={"model": "smoa", "prompt": "hi", "max_tokens": 2}).json()
        assert out["smoa"]["route"]["adapter_ids"] == []  # empty library: the base model
    model, tok = load_model(model_dir)
    with SparseAdapterMixture(SMoAConfig(storage_path=target, encoder="hash"), base_model=model, tokenizer=tok) as s:
        assert s.get_statistics()["library"]["total_adapters"] == 0


def test_sigterm_drains(tmp_path, model_dir) -> None:
    lib = tmp_path / "lib"
    ids = [a for a, _ in make_library(lib, model_dir, 3)]
    with process_server(["--library", str(lib), "--model", str(model_dir), "--encoder", "hash", "--max-batch", "1",
                         "--max-tokens", "500"]) as (url, proc):  # fmt: skip
        wait_healthy(url, proc=proc)
        results: dict[int, dict] = {}
        started = threading.Event()

        def call(i: int) -> None:
            body = {"model": ids[i % 3], "prompt": f"long story {i}", "max_tokens": 80, "temperature": 0}
            if i == 0:  # a stream: we know it is in flight once its first chunk arrived
                with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
                    lines = []
                    for ln in r.iter_lines():
                        started.set()
                        if ln:
                            lines.append(ln)
                results[i] = {"status": r.status_code, "done": lines[-1] == "data: [DONE]"}
            else:
                r = httpx.post(url + "/v1/completions", json=body, timeout=120)
                results[i] = {"status": r.status_code, "tokens": r.json().get("usage", {}).get("completion_tokens")}

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        threads[0].start()
        assert started.wait(60)
        for t in threads[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until the two others are queued behind the stream (max batch 1)
            text = httpx.get(url + "/metrics", timeout=30).text
            if "smoa_queue_depth 2.0" in text:
                break
            time.sleep(0.02)
        else:
            pytest.fail("the requests never queued")
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        late = httpx.post(url + "/v1/completions", json={"model": "smoa", "prompt": "x", "max_tokens": 1}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(url + "/health", timeout=30).status_code == 503
        for t in threads:
            t.join(120)
        assert proc.wait(timeout=60) == 0
    assert results[0] == {"status": 200, "done": True}
    assert all(results[i]["status"] == 200 and results[i]["tokens"] > 0 for i in (1, 2)), results
    model, tok = load_model(model_dir)  # closed cleanly: the lock is free, every adapter is there
    with SparseAdapterMixture(SMoAConfig(storage_path=lib, encoder="hash"), base_model=model, tokenizer=tok) as s:
        assert [a.id for a in s.list_adapters_sync()] == ids


@pytest.mark.parametrize("when", ["mid-body", pytest.param("after-body", marks=pytest.mark.slow)])
def test_sigkill_during_upload_leaves_the_library_consistent(tmp_path, model_dir, when) -> None:
    from smoa.interop.peft import write_peft_dir

    from .helpers import random_lora

    lib = tmp_path / "lib"
    ids = [a for a, _ in make_library(lib, model_dir, 2)]
    model, tok = load_model(model_dir)
    peft = tmp_path / "peft"
    write_peft_dir(random_lora(model, seed=5), peft)
    files = {"adapter_config": ("adapter_config.json", (peft / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (peft / "adapter_model.safetensors").read_bytes())}
    with process_server(["--library", str(lib), "--model", str(model_dir), "--encoder", "hash",
                         "--admin-key", ADMIN]) as (url, proc):  # fmt: skip
        wait_healthy(url, proc=proc)
        h = {"Authorization": f"Bearer {ADMIN}"}
        killed = threading.Event()
        if when == "mid-body":
            body, ctype = httpx._multipart.MultipartStream(data={"domain_tags": "x"}, files=files), None
            raw = b"".join(body)
            ctype = body.content_type

            def slow():
                yield raw[: len(raw) // 2]
                killed.wait(30)  # the server is killed before the rest is sent
                yield raw[len(raw) // 2 :]

            t = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
                url + "/v1/adapters", content=slow(), headers={**h, "content-type": ctype}, timeout=60)))
            t.start()
            time.sleep(1.0)
        else:
            t = threading.Thread(target=lambda: _swallow(lambda: httpx.post(
                url + "/v1/adapters", files=files, headers=h, timeout=60)))
            t.start()
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        killed.set()
        t.join(60)
    with SparseAdapterMixture(SMoAConfig(storage_path=lib, encoder="hash"), base_model=model, tokenizer=tok) as s:
        now = [a.id for a in s.list_adapters_sync()]
        assert now[:2] == ids and len(now) in (2, 3)
        if when == "mid-body":
            assert len(now) == 2
        for aid in now:  # every listed adapter's weights load and mix
            assert s.mixture_for([(aid, 1.0)])


def _swallow(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - the server was killed under it
        pass
