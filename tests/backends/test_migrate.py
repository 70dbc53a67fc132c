"""``smoa migrate``: SQLite -> PostgreSQL + S3 -> SQLite is the same library bit for bit, and an interrupted
copy (an exception, or SIGKILL of the command) resumes where it stopped."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from smoa.errors import InvalidInputError
from smoa.storage.catalog import Catalog
from smoa.storage.files import FileStore
from smoa.storage.migrate import migrate, open_endpoint

from .helpers import dump, make_row


def _make_library(directory: Path, n: int = 120) -> None:
    """A library directory with inline and file weights, a composite, an archived adapter, a merge, meta."""
    directory.mkdir(parents=True)
    cat, files = Catalog(directory / "catalog.sqlite3"), FileStore(directory)
    rng = random.Random(0)
    rows = []
    for i in range(n):
        data = rng.randbytes(200 + i)
        if i % 4 == 0:  # "large" adapters live in weight files
            rel = files.write("weights/hot", hashlib.sha256(data).hexdigest(), data)
            rows.append(make_row(i, rng, file=rel, data=data))
        else:
            rows.append(make_row(i, rng, data=data))
    keys = cat.insert_many(rows)
    cat.insert_many([make_row(n, members=[(rows[1].id, 0.5), (rows[2].id, 0.5)])])
    blob, file, _, _ = cat.read_weights(keys[8])
    data = files.read(file, name="x") if file else blob
    old = cat.set_status(keys[8], "archived", None, files.write("weights/cold", hashlib.sha256(data).hexdigest(), data))
    files.delete(old)  # as the library does: the hot copy goes once the row names the cold one
    cat.record_merge([(keys[5], rows[5].id, files.write("weights/cold", rows[5].checksum, rows[5].blob))],
                     rows[6].id, "svd")  # fmt: skip
    cat.record_usage({keys[3]: 4}, {keys[3]: (1_700_000_123.25, 17)}, 42)
    for k, v in (("profile", '{"name": "tiny"}'), ("encoder", "hash"), ("encoder_dim", "384")):
        cat.set_meta(k, v)
    cat.close()


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted((directory / "weights").rglob("*")) if p.is_file()}


def test_sqlite_to_postgres_s3_and_back_is_bit_for_bit(tmp_path: Path, pg_url: str, s3_url: str) -> None:
    src = tmp_path / "src"
    _make_library(src)
    report = migrate(str(src), pg_url, dst_weights=s3_url, batch=25, verify=True)
    assert report.verified and report.adapters_copied == 121 and report.files_copied == 31, report.differences  # 30 hot + 1 cold (merge source)
    back = tmp_path / "back"
    report = migrate(pg_url, str(back), src_weights=s3_url, batch=40, verify=True)
    assert report.verified, report.differences
    a, b = Catalog(src / "catalog.sqlite3"), Catalog(back / "catalog.sqlite3")
    try:
        assert dump(a) == dump(b)  # every table, every column, file paths included
        assert a.generation == b.generation
    finally:
        a.close()
        b.close()
    assert _files(src) == _files(back)  # the weight files, byte for byte
    # running it again is a no-op; into a foreign library it is refused
    assert migrate(pg_url, str(back), src_weights=s3_url).already_complete
    with pytest.raises(InvalidInputError, match="finished copy"):
        migrate(str(src), str(back))


def test_postgres_without_object_store_keeps_weights_in_the_database(tmp_path: Path, pg_url: str) -> None:
    src = tmp_path / "src"
    _make_library(src, n=12)
    report = migrate(str(src), pg_url, verify=True)
    assert report.verified, report.differences
    end = open_endpoint(pg_url, None, create=False)
    try:  # the rows name the same files; the files are bytea rows of the `blobs` table
        assert end.store.owned_files() == set(_files(src))
    finally:
        end.close()
    back = tmp_path / "back"
    assert migrate(pg_url, str(back), verify=True).verified
    assert _files(src) == _files(back)


def test_interrupted_copy_resumes(tmp_path: Path, pg_url: str, s3_url: str) -> None:
    src = tmp_path / "src"
    _make_library(src)

    class Interrupt(Exception):
        pass

    def stop_at_60(done: int, total: int) -> None:
        if done >= 60:
            raise Interrupt

    with pytest.raises(Interrupt):
        migrate(str(src), pg_url, dst_weights=s3_url, batch=20, on_batch=stop_at_60)
    report = migrate(str(src), pg_url, dst_weights=s3_url, batch=20, verify=True)
    assert report.resumed_after_key == 60 and report.adapters_copied == 61 and report.verified, report.differences


def test_sigkilled_migrate_command_resumes(tmp_path: Path, pg_url: str, s3_url: str) -> None:
    src = tmp_path / "src"
    _make_library(src, n=150)
    cmd = [sys.executable, "-m", "smoa.cli", "migrate", str(src), pg_url, "--dst-weights", s3_url,
           "--batch", "5", "--progress"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    assert p.stdout is not None
    seen = 0
    deadline = time.monotonic() + 60
    while seen < 5 and time.monotonic() < deadline:
        if p.stdout.readline().startswith("copied"):
            seen += 1
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert seen >= 5
    done = subprocess.run([*cmd[:-1], "--verify"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed after key" in done.stdout and "verified equal" in done.stdout, done.stdout


def test_refuses_bad_endpoints(tmp_path: Path, pg_url: str) -> None:
    with pytest.raises(InvalidInputError, match="holds no library"):
        migrate(str(tmp_path / "nothing"), pg_url)
    src = tmp_path / "src"
    _make_library(src, n=12)
    migrate(str(src), pg_url)
    other = tmp_path / "other"
    _make_library(other, n=12)
    with pytest.raises(InvalidInputError, match="finished copy"):
        migrate(str(other), pg_url)
