"""Management endpoints (admin key): upload (strict, pickles refused), list / get / patch / delete, archive and
restore, route, optimize, stats — each checked against what inference then serves."""

from __future__ import annotations

import io
import json
import pickle

import httpx
import pytest

from smoa.interop.peft import write_peft_dir

from .conftest import ADMIN_KEY, USER_KEY
from .helpers import load_model, random_lora

A = {"Authorization": f"Bearer {ADMIN_KEY}"}
U = {"Authorization": f"Bearer {USER_KEY}"}


class Boom:
    """Unpickling this would create a marker file: the test proves nothing is ever unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory, model_dir) -> dict[str, bytes]:
    model, _ = load_model(model_dir)
    d = tmp_path_factory.mktemp("peft") / "adapter"
    write_peft_dir(random_lora(model, seed=77), d, base_model_name_or_path="tiny")
    return {p.name: p.read_bytes() for p in d.iterdir()}


def count(server) -> int:
    return len(httpx.get(server.url + "/v1/adapters", params={"limit": 1000}, headers=A).json()["data"])


def upload(server, files: dict[str, tuple[str, bytes]], **fields) -> httpx.Response:
    return httpx.post(server.url + "/v1/adapters", headers=A, timeout=60,
                      files={k: (name, io.BytesIO(data)) for k, (name, data) in files.items()}, data=fields)  # fmt: skip


def test_upload_then_serve_it(server, peft_files) -> None:
    n = count(server)
    r = upload(server, {"adapter_config": ("adapter_config.json", peft_files["adapter_config.json"]),
                        "adapter_model": ("adapter_model.safetensors", peft_files["adapter_model.safetensors"])},
               domain_tags="astronomy,space", skill_tags="astronomer", description="stars and planets",
               examples=json.dumps(["how far is the moon"]))  # fmt: skip
    assert r.status_code == 201, r.text
    ad = r.json()
    assert ad["domain_tags"] == ["astronomy", "space"] and ad["description"] == "stars and planets"
    assert count(server) == n + 1
    out = httpx.post(server.url + "/v1/completions", headers=U, json={"model": ad["id"], "prompt": "hi",
                                                                      "max_tokens": 2}).json()  # fmt: skip
    assert out["smoa"]["route"]["adapter_ids"] == [ad["id"]]
    routed = httpx.post(server.url + "/v1/route", headers=A, json={"query": "how far is the moon"}).json()
    assert ad["id"] in routed["adapter_ids"], routed


def test_pickled_bin_refused_nothing_stored_nothing_executed(server, peft_files, tmp_path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"x": Boom(str(marker))})
    n = count(server)
    cfg = ("adapter_config.json", peft_files["adapter_config.json"])
    r = upload(server, {"adapter_config": cfg, "adapter_model": ("adapter_model.bin", payload)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsafe_adapter_file"
    # the same pickle under the safetensors name: refused by the strict reader
    r = upload(server, {"adapter_config": cfg, "adapter_model": ("adapter_model.safetensors", payload)})
    assert r.status_code == 400, r.text
    assert not marker.exists() and count(server) == n
    r = upload(server, {"adapter_config": cfg})
    assert r.status_code == 400 and r.json()["error"]["param"] == "adapter_model"
    huge = b"\0" * (5 * 1024 * 1024)
    r = upload(server, {"adapter_config": cfg, "adapter_model": ("adapter_model.safetensors", huge)})
    assert r.status_code == 413 and count(server) == n


def test_list_filter_and_paginate(server, adapter_ids) -> None:
    page1 = httpx.get(server.url + "/v1/adapters", params={"limit": 3}, headers=A).json()
    page2 = httpx.get(server.url + "/v1/adapters", params={"offset": 3, "limit": 3}, headers=A).json()
    assert [a["id"] for a in page1["data"] + page2["data"]] == adapter_ids[:6] and page1["has_more"]
    law = httpx.get(server.url + "/v1/adapters", params={"tag": "law"}, headers=A).json()["data"]
    assert law and all("law" in a["domain_tags"] for a in law)
    q = httpx.get(server.url + "/v1/adapters", params={"q": "recipes"}, headers=A).json()["data"]
    assert q and all("cooking" in a["domain_tags"] for a in q)
    assert httpx.get(server.url + "/v1/adapters", params={"limit": 0}, headers=A).status_code == 422


def test_get_patch_delete(server, adapter_ids) -> None:
    aid = adapter_ids[5]
    got = httpx.get(f"{server.url}/v1/adapters/{aid}", headers=A).json()
    assert got["id"] == aid and got["object"] == "adapter"
    r = httpx.patch(f"{server.url}/v1/adapters/{aid}", headers=A, json={"domain_tags": ["geology"],
                                                                        "description": "rocks"})  # fmt: skip
    assert r.status_code == 200 and r.json()["domain_tags"] == ["geology"] and r.json()["description"] == "rocks"
    assert httpx.patch(f"{server.url}/v1/adapters/{aid}", headers=A, json={"colour": "red"}).status_code == 422
    routed = httpx.post(server.url + "/v1/route", headers=A, json={"query": "geology rocks",
                                                                   "metadata": {"domain": "geology"}}).json()
    assert routed["adapter_ids"][0] == aid
    assert httpx.delete(f"{server.url}/v1/adapters/{aid}", headers=A).json()["deleted"] is True
    assert httpx.get(f"{server.url}/v1/adapters/{aid}", headers=A).status_code == 404
    r = httpx.post(server.url + "/v1/completions", headers=U, json={"model": aid, "prompt": "x", "max_tokens": 1})
    assert r.status_code == 404
    assert httpx.delete(f"{server.url}/v1/adapters/{aid}", headers=A).status_code == 404


def test_archive_and_restore(server, adapter_ids) -> None:
    aid = adapter_ids[6]
    ad = httpx.get(f"{server.url}/v1/adapters/{aid}", headers=A).json()
    query = {"query": " ".join(ad["domain_tags"] + ad["skill_tags"]), "metadata": {"domain": ad["domain_tags"][0]}}
    assert aid in httpx.post(server.url + "/v1/route", headers=A, json=query).json()["adapter_ids"]
    assert httpx.post(f"{server.url}/v1/adapters/{aid}/archive", headers=A).json()["status"] == "archived"
    assert aid not in httpx.post(server.url + "/v1/route", headers=A, json=query).json()["adapter_ids"]
    models = httpx.get(server.url + "/v1/models", headers=U, params={"limit": 1000}).json()["data"]
    assert aid not in [m["id"] for m in models]
    assert httpx.post(f"{server.url}/v1/adapters/{aid}/restore", headers=A).json()["status"] == "active"
    assert aid in httpx.post(server.url + "/v1/route", headers=A, json=query).json()["adapter_ids"]


def test_optimize_and_stats(server) -> None:
    r = httpx.post(server.url + "/v1/optimize", headers=A, json={"dry_run": True}, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), dict)
    s = httpx.get(server.url + "/v1/stats", headers=A).json()
    assert {"library", "cache", "routing", "server"} <= set(s)
    assert s["server"]["max_batch"] == server.config.max_batch
    assert httpx.post(server.url + "/v1/optimize", headers=A, json={"bogus": 1}).status_code == 422
