"""Two Ray replicas sharing one PostgreSQL + S3 (moto server) library: a write through one is seen by the other.

The documented lag (docs/scale.md): another process's commit reaches a replica's routing index through Postgres
``LISTEN``/``NOTIFY`` (milliseconds) and never later than the catalog's ``poll_interval_s`` (1 s) plus one catch-up.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .fixtures import build_library, peft_directory, tiny_model_dir

serve = pytest.importorskip("ray.serve")
ROOT = Path(__file__).resolve().parents[2]
APP = "smoa-shared"
LAG_BOUND_S = 5.0  # poll_interval_s (1 s) + one catch-up + Ray and HTTP round trips, with margin for 2 busy cores


def _services() -> Any:
    sys.path.insert(0, str(ROOT / "scripts"))
    import local_services

    return local_services


@pytest.fixture(scope="module")
def shared(local_ray: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    services = _services()
    try:
        pg = services.LocalPostgres().start()
        s3 = services.LocalS3().start()
    except (services.ServiceUnavailable, ImportError, OSError) as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"PostgreSQL / moto S3 not available in CI: {exc}")
        pytest.skip(f"PostgreSQL / moto S3 not available here: {exc}")
    saved = {k: os.environ.get(k) for k in s3.env()}
    os.environ.update(s3.env())
    root = tmp_path_factory.mktemp("ray-shared")
    model_dir = tiny_model_dir(root)
    url, weights = pg.create_database(), f"s3://{s3.create_bucket()}/lib"
    cwd = os.getcwd()
    os.chdir(root)  # a core that took the URL for a directory would create "postgresql:/..." here, not in the repo
    try:
        ids = build_library(url, model_dir, topics=("astronomy", "baking", "chess", "diving"), weights_path=weights)
    finally:
        os.chdir(cwd)
    assert not (root / "postgresql:").exists(), "the core took the postgresql:// URL for a directory"
    from smoa.serve.config import ServeConfig
    from smoa.serve.ray import RayOptions, build_app, shared_library_config

    config = shared_library_config(ServeConfig(library=root / "unused", model_dir=model_dir, encoder="hash"), url,
                                   weights)  # fmt: skip
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config, RayOptions(replicas=2, env_vars=s3.env())), name=APP, route_prefix="/")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "ids": ids, "model_dir": model_dir, "root": root}
    finally:
        serve.shutdown()
        pg.cleanup()
        s3.stop()
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_adapter_uploaded_through_one_replica_is_routed_by_the_other(shared: dict[str, Any]) -> None:
    peft_dir = peft_directory(shared["model_dir"], shared["root"] / "peft-volcano")
    query = {"query": "volcanoes: lava and eruptions"}
    with httpx.Client(base_url=shared["url"], timeout=120) as client:
        before = {client.post("/v1/route", json=query).headers["x-smoa-replica"] for _ in range(12)}
        assert len(before) == 2, before  # keyless requests reach both replicas
        files = {
            "adapter_config": ("adapter_config.json", (peft_dir / "adapter_config.json").read_bytes()),
            "adapter_model": ("adapter_model.safetensors", (peft_dir / "adapter_model.safetensors").read_bytes()),
        }
        r = client.post("/v1/adapters", files=files, data={"domain_tags": "volcanoes", "specialization": "domain",
                                                           "description": "volcanoes, lava and eruptions"})  # fmt: skip
        assert r.status_code == 201, r.text
        created_at, writer, new_id = time.monotonic(), r.headers["x-smoa-replica"], r.json()["id"]
        seen_by_other = None
        while time.monotonic() - created_at < 3 * LAG_BOUND_S:
            r = client.post("/v1/route", json=query)
            assert r.status_code == 200, r.text
            if r.headers["x-smoa-replica"] != writer and new_id in r.json()["adapter_ids"]:
                seen_by_other = time.monotonic() - created_at
                break
        assert seen_by_other is not None, "the other replica never routed to the new adapter"
        print(f"adapter created on {writer}, routed by the other replica after {seen_by_other * 1000:.0f} ms")
        assert seen_by_other <= LAG_BOUND_S
        # ... and the other replica loads its weights from the shared object store and applies them
        client.post("/ray/affinity", json={"enabled": False})
        try:
            deadline = time.monotonic() + 30
            served: set[str] = set()
            while served != before and time.monotonic() < deadline:
                r = client.post("/v1/completions", json={"model": new_id, "prompt": "the mountain", "max_tokens": 3,
                                                         "temperature": 0})  # fmt: skip
                assert r.status_code == 200, r.text
                assert r.json()["smoa"]["route"]["adapter_ids"] == [new_id]
                served.add(r.headers["x-smoa-replica"])
            assert served == before
        finally:
            client.post("/ray/affinity", json={"enabled": True})
