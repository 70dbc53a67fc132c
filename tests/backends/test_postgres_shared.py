"""One PostgreSQL library shared by several processes; SIGKILL during writes; the server restarting.

Invariants after every scenario: every acknowledged batch is there, complete; every batch that is there is
complete (one transaction = all rows, tags, weights, change-log rows, or none); keys are unique.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from smoa.errors import StorageError
from smoa.storage.postgres import PostgresCatalog

from .helpers import make_row, wait_for

WORKERS = Path(__file__).with_name("workers.py")


def _writer(url: str, prefix: str, batches: int, size: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKERS), "write", url, prefix, str(batches), str(size)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _batches(cat: PostgresCatalog) -> dict[tuple[str, int], list[int]]:
    """``(prefix, batch) -> keys`` of every stored adapter whose id looks like ``prefix_b_j``."""
    out: dict[tuple[str, int], list[int]] = defaultdict(list)
    for key, aid in cat._read("SELECT key, id FROM adapters ORDER BY key"):
        prefix, b, _j = str(aid).rsplit("_", 2)
        out[(prefix, int(b))].append(int(key))
    return out


def _assert_whole(cat: PostgresCatalog, size: int, acked: dict[str, int]) -> int:
    """Every acknowledged batch present; every present batch complete (rows, tags, weights, log)."""
    batches = _batches(cat)
    for prefix, n in acked.items():
        for b in range(n):
            assert (prefix, b) in batches, f"acknowledged batch {prefix}/{b} was lost"
    for (prefix, b), keys in batches.items():
        assert len(keys) == size, f"batch {prefix}/{b} is half-written: {len(keys)} of {size} rows"
    n_rows = sum(len(k) for k in batches.values())
    counts = {t: int(cat._read(f"SELECT COUNT(*) FROM {t}")[0][0]) for t in ("adapters", "weights", "tags")}
    assert counts == {"adapters": n_rows, "weights": n_rows, "tags": 3 * n_rows}
    logged = set(cat.changes_since(0) or [])
    assert {k for keys in batches.values() for k in keys} <= logged
    return n_rows


def test_writers_in_several_processes_serialise(pg_url: str) -> None:
    procs = [_writer(pg_url, f"p{i}", 10, 8) for i in range(3)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert out.split().count("ACK") == 10
    cat = PostgresCatalog(pg_url)
    try:
        assert _assert_whole(cat, 8, {"p0": 10, "p1": 10, "p2": 10}) == 240
        keys = [k for (k,) in cat._read("SELECT key FROM adapters ORDER BY key")]
        assert keys == list(range(1, 241))  # serialised: no two writers took the same keys
        for batch in _batches(cat).values():  # each transaction's keys are one contiguous run
            assert batch == list(range(batch[0], batch[0] + 8))
        assert cat.generation == 30 == len({g for (g,) in cat._read("SELECT DISTINCT generation FROM changes")})
    finally:
        cat.close()


def test_another_process_sees_commits_within_the_documented_lag(pg_url: str) -> None:
    reader = PostgresCatalog(pg_url, poll_interval_s=1.0)
    try:
        seen = reader.generation
        p = _writer(pg_url, "w", 1, 5)
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        lag_from_exit = wait_for(lambda: reader.generation > seen, timeout=2.0)  # NOTIFY, or the 1 s poll at worst
        assert lag_from_exit < 1.5
        changed = reader.changes_since(seen)
        assert changed is not None and len(changed) == 5
        assert {r.id for r in reader.directory_rows(changed)} == {f"w_0_{j}" for j in range(5)}
    finally:
        reader.close()


@pytest.mark.parametrize("round_", [0, *(pytest.param(i, marks=pytest.mark.slow) for i in range(1, 8))])
def test_sigkill_during_writes_loses_nothing_acknowledged(pg_url: str, round_: int) -> None:
    size = 40
    p = _writer(pg_url, "k", 0, size)
    acked = 0
    deadline = time.monotonic() + 60
    assert p.stdout is not None
    while acked < 2 + round_ and time.monotonic() < deadline:  # let a few batches commit first
        line = p.stdout.readline()
        if line.startswith("ACK"):
            acked += 1
    time.sleep(random.Random(round_).uniform(0.0, 0.3))
    os.kill(p.pid, signal.SIGKILL)
    rest, _ = p.communicate(timeout=30)
    acked += rest.split().count("ACK")
    assert acked >= 2
    cat = PostgresCatalog(pg_url)
    try:
        _assert_whole(cat, size, {"k": acked})
        assert cat.insert_many([make_row(999_999)])  # the library is still writable
    finally:
        cat.close()


def test_database_restart_mid_writes(pg_url: str, pg_server: Any) -> None:
    cat = PostgresCatalog(pg_url, poll_interval_s=0.2)
    acked: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    size = 20

    def write_loop() -> None:
        b = 0
        while not stop.is_set():
            rows = []
            for j in range(size):
                row = make_row(j)
                row.id = f"r_{b}_{j}"
                rows.append(row)
            try:
                cat.insert_many(rows)
                acked.append(b)
            except StorageError as exc:  # refused while the server is down: not acknowledged
                errors.append(exc)
            except BaseException as exc:
                errors.append(exc)
                raise
            b += 1

    t = threading.Thread(target=write_loop)
    t.start()
    try:
        wait_for(lambda: len(acked) >= 3, timeout=30)
        pg_server.restart()
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 3, timeout=60)  # writes resume on their own after the restart
        pg_server.restart("immediate")  # crash-like stop: in-flight transactions are aborted, WAL replayed
        n = len(acked)
        wait_for(lambda: len(acked) >= n + 3, timeout=60)
    finally:
        stop.set()
        t.join(timeout=60)
    assert all(isinstance(e, StorageError) for e in errors), errors
    stored = _batches(cat)
    for b in acked:
        assert ("r", b) in stored, f"acknowledged batch {b} lost in a restart"
    for key, keys in stored.items():
        assert len(keys) == size, f"batch {key} half-written"
    # a batch whose commit outcome was unknown is either wholly there or wholly absent, and was reported as such
    assert cat.reconnects >= 2
    assert cat.count() == size * len(stored)
    # reads work after a restart too (retried once after reconnecting)
    pg_server.restart()
    assert cat.count() == size * len(stored)
    cat.close()
