"""The same library tests on every backend: SQLite in a directory, and PostgreSQL + S3 (real server, moto).

Through the one core (:class:`smoa.core.LibraryCore`): create / update / delete / archive / merge round trips
with weights compared bit for bit, reopen, several processes on one PostgreSQL library, SIGKILL during writes,
the object store refusing connections, the database restarting.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from smoa.errors import LibraryLockedError, StorageError

from .helpers import open_core, same, spec, wait_for, weights

WORKERS = Path(__file__).with_name("workers.py")


def test_round_trips_and_reopen(backend: dict[str, Any]) -> None:
    core = open_core(backend)
    made = core.create_many([spec(i, rank=1 if i % 3 == 0 else 2) for i in range(12)])  # inline and file weights
    ids = [a.id for a in made]
    for i, aid in enumerate(ids):
        assert same(core.get_weights(aid), weights(i, rank=1 if i % 3 == 0 else 2))
    updated = core.update_weights(ids[1], weights(101))
    assert updated.version == 2 and same(core.get_weights(ids[1]), weights(101))
    core.update_adapter(ids[2], domain_tags=["renamed"], description="renamed adapter")
    assert core.route("renamed adapter", {"domain": "renamed"}, "task_based", 1).adapter_ids == [ids[2]]
    core.archive(ids[3])
    assert all(ids[3] not in core.route(f"topic {k}", None, None, 5).adapter_ids for k in range(5))
    core.restore(ids[3])
    merged, merge_id = core.merge([ids[4], ids[5]], spec(200), "svd")
    assert core.get_adapter(ids[4]).id == merged.id  # the old id is an alias now
    core.undo_merge(merge_id)
    assert core.get_adapter(ids[4]).status == "active" and same(core.get_weights(ids[5]), weights(5))
    core.delete(ids[6])
    expect = {aid: core.get_weights(aid) for aid in ids if aid != ids[6]}
    statuses = {a.id: a.status for a in core.iter_adapters(("active", "archived"))}
    core.close()
    core = open_core(backend)
    try:
        assert {a.id: a.status for a in core.iter_adapters(("active", "archived"))} == statuses
        for aid, w in expect.items():
            assert same(core.get_weights(aid), w), aid
        assert ids[6] not in core
    finally:
        core.close()


def test_directory_catalog_with_weights_in_s3(tmp_path: Path, s3_url: str) -> None:
    """local <-> S3 without PostgreSQL: the SQLite catalog in a directory, the weights in a bucket."""
    backend = {"storage_path": str(tmp_path / "lib"), "weights_path": s3_url, "name": "sqlite+s3",
               "cache_dir": str(tmp_path / "tier")}  # fmt: skip
    test_round_trips_and_reopen(backend)
    assert not (tmp_path / "lib" / "weights").exists()  # nothing went to the directory's own store
    core = open_core(backend)
    try:
        assert core.store.files.owned_files()  # they are objects
    finally:
        core.close()


def test_weights_live_in_the_object_store(backend: dict[str, Any]) -> None:
    if backend["name"] == "sqlite":
        pytest.skip("files in a directory: covered by tests/core and tests/reliability")
    import boto3

    core = open_core(backend)
    try:
        a = core.create(spec(1))
        stats = core.store.files.statistics()
        assert stats["uploads"] >= 1
        bucket, prefix = backend["weights_path"][5:].split("/", 1)
        s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}
        assert len(keys) == 1 and next(iter(keys)).startswith(f"{prefix}/weights/hot/")
        core.delete(a.id)
        assert not s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents")  # deleted after the row
    finally:
        core.close()


def test_a_second_process_opens_the_same_library(backend: dict[str, Any]) -> None:
    core = open_core(backend)
    try:
        core.create(spec(0, tag="first"))
        if backend["name"] == "sqlite":
            with pytest.raises(LibraryLockedError):
                open_core(backend)
            return
        env = {**os.environ, "SMOA_TEST_BACKEND": repr(backend)}
        done = subprocess.run([sys.executable, str(WORKERS), "core-create", "1", "second"], env=env,
                              capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        other = done.stdout.split()[-1]
        lag = wait_for(lambda: core.route("topic 1", {"domain": "second"}, "task_based", 1).adapter_ids == [other],
                       timeout=3.0)  # fmt: skip
        assert lag < 3.0
        assert same(core.get_weights(other), weights(1))
    finally:
        core.close()


def test_sigkill_during_creates_keeps_every_acknowledged_adapter(backend: dict[str, Any]) -> None:
    env = {**os.environ, "SMOA_TEST_BACKEND": repr(backend)}
    p = subprocess.Popen([sys.executable, str(WORKERS), "core-create-loop"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    acked: dict[str, int] = {}
    deadline = time.monotonic() + 90
    while len(acked) < 12 and time.monotonic() < deadline:
        line = p.stdout.readline()
        if line.startswith("ACK"):
            _, seed, aid = line.split()
            acked[aid] = int(seed)
    os.kill(p.pid, signal.SIGKILL)
    rest, err = p.communicate(timeout=30)
    for line in rest.splitlines():
        if line.startswith("ACK"):
            _, seed, aid = line.split()
            acked[aid] = int(seed)
    assert len(acked) >= 12, err[-2000:]
    core = open_core(backend)
    try:
        present = {a.id for a in core.iter_adapters(("active",))}
        assert set(acked) <= present
        for aid, seed in acked.items():
            assert same(core.get_weights(aid), weights(seed))
        for aid in present:  # nothing half-written: every stored adapter loads
            core.get_weights(aid)
        assert core.create(spec(999)).id in core
    finally:
        core.close()


def test_object_store_refusing(backend: dict[str, Any], s3_server: Any) -> None:
    if backend["name"] == "sqlite":
        pytest.skip("no object store")
    core = open_core(backend, extra={"s3_connect_timeout_s": 0.5, "s3_read_timeout_s": 1, "s3_max_attempts": 1})
    try:
        kept = core.create(spec(1))
        count = len(core)
        s3_server.stop()
        try:
            with pytest.raises(StorageError, match="object store"):
                core.create(spec(2))
            assert len(core) == count  # nothing half-written: no row for the failed upload
            assert same(core.get_weights(kept.id), weights(1))  # memory cache / local tier
        finally:
            s3_server.start()
        assert core.create(spec(3)).id in core
    finally:
        core.close()


def test_database_restart_between_and_during_operations(backend: dict[str, Any], pg_server: Any) -> None:
    if backend["name"] == "sqlite":
        pytest.skip("no server")
    core = open_core(backend)
    try:
        first = core.create(spec(1))
        pg_server.restart()
        second = core.create(spec(2))  # reconnects before BEGIN: nothing lost, nothing to retry by hand
        assert same(core.get_weights(first.id), weights(1)) and second.id in core
        pg_server.restart("immediate")
        assert len(core.list_adapters(None, 0, 10, "active")) == 2
    finally:
        core.close()


def test_migrate_a_library_there_and_back(tmp_path: Path, pg_url: str, s3_url: str) -> None:
    from smoa.storage.catalog import Catalog
    from smoa.storage.migrate import migrate

    from .helpers import dump

    local = {"storage_path": str(tmp_path / "lib"), "weights_path": None, "name": "sqlite"}
    shared = {"storage_path": pg_url, "weights_path": s3_url, "name": "postgres+s3", "cache_dir": str(tmp_path / "t")}
    core = open_core(local)
    ids = [a.id for a in core.create_many([spec(i, rank=1 if i % 3 == 0 else 2) for i in range(15)])]
    core.archive(ids[0])
    core.merge([ids[1], ids[2]], spec(300), "svd")
    queries = [(f"topic {k}", {"domain": f"topic{k}"}) for k in range(5)]
    routes = [core.route(q, m, "hybrid", 3).adapter_ids for q, m in queries]
    live = {a.id: (a.status, a.version) for a in core.iter_adapters(("active", "archived"))}
    expect = {aid: core.get_weights(aid) for aid in live}
    core.close()

    assert migrate(local["storage_path"], pg_url, dst_weights=s3_url, verify=True).verified
    back = tmp_path / "back"
    assert migrate(pg_url, str(back), src_weights=s3_url, verify=True).verified
    a, b = Catalog(tmp_path / "lib" / "catalog.sqlite3"), Catalog(back / "catalog.sqlite3")
    try:
        assert dump(a) == dump(b)  # every table, every column
    finally:
        a.close()
        b.close()
    files = lambda d: {str(p.relative_to(d)): p.read_bytes() for p in (d / "weights").rglob("*") if p.is_file()}
    assert files(tmp_path / "lib") == files(back)

    there = open_core(shared)  # the copy in PostgreSQL + S3 is the same library to the core
    try:
        assert {a.id: (a.status, a.version) for a in there.iter_adapters(("active", "archived"))} == live
        assert all(same(there.get_weights(aid), w) for aid, w in expect.items())
        assert [there.route(q, m, "hybrid", 3).adapter_ids for q, m in queries] == routes
        assert there.restore(ids[0]).status == "active"  # its cold weights came along (now an S3 object)
    finally:
        there.close()
