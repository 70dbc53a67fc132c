"""SIGKILL in the middle of ingestion: every adapter whose creation returned survives intact.

A forked child ingests adapters (single creates, bulk creates, large file-backed adapters) and reports each id and
checksum on a pipe only *after* the call returned; the parent kills it with SIGKILL at a random moment, reopens the
library and checks it. The default run does 25 kills; ``-m slow`` runs 200.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time

import pytest
import torch

from smoa import AdapterLibrary, AdapterSpec, SMoAConfig
from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import checksum

TINY = BaseProfile("tiny", tuple((f"layers.{i}.{n}", 64, o) for i in range(4) for n, o in (("q", 64), ("v", 32))))


def _config(path) -> SMoAConfig:
    # blob_inline_max_bytes=1500: larger adapters go to content-addressed files, exercising both paths
    return SMoAConfig(storage_path=path, blob_inline_max_bytes=1500)


def _child(path, fd: int, seed: int) -> None:  # runs in the forked child; never returns
    try:
        lib = AdapterLibrary(_config(path), TINY)
        rng = random.Random(seed)
        while True:
            choice = rng.random()
            if choice < 0.4:
                made = [lib.create(AdapterSpec(domain_tags=["t"], rank=2))]
            elif choice < 0.8:
                made = lib.create_many([AdapterSpec(skill_tags=["s"], rank=2) for _ in range(rng.randint(2, 50))])
            else:
                made = [lib.create(AdapterSpec(rank=16, target_modules=["layers.0.q", "layers.1.q"]))]
            os.write(fd, "".join(f"{a.id} {a.checksum}\n" for a in made).encode())
    finally:
        os._exit(0)


def _kill_loop(tmp_path, kills: int) -> int:
    path = tmp_path / "lib"
    AdapterLibrary(_config(path), TINY).close()
    expected: dict[str, str] = {}
    rng = random.Random(1234)
    for i in range(kills):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _child(path, w, seed=i)
        os.close(w)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            for line in f.read().decode().splitlines():
                parts = line.split()
                if len(parts) == 2:  # a torn last line means that report never completed: nothing promised
                    expected[parts[0]] = parts[1]
        _verify(path, expected)
    return len(expected)


def _verify(path, expected: dict[str, str]) -> None:
    db = sqlite3.connect(path / "catalog.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    lib = AdapterLibrary(_config(path), TINY)  # opens cleanly, collects orphan files
    try:
        for aid, digest in expected.items():
            ad = lib.get_adapter(aid)
            assert ad.checksum == digest
            w = lib.get_weights(aid)  # checksum verified on load
            assert checksum(w.to_bytes()) == digest
        # nothing half-written: every row has its weights and tags, every file is referenced
        n_rows = lib.catalog._read("SELECT COUNT(*) FROM adapters")[0][0]
        n_weights = lib.catalog._read("SELECT COUNT(*) FROM weights")[0][0]
        assert n_rows == n_weights == lib.total_adapters
        assert lib.files.all_files() == lib.catalog.all_files()
        assert not list((path / "blobs").glob("*/.tmp-*"))
    finally:
        lib.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_ingestion(tmp_path) -> None:
    torch.set_num_threads(1)
    survived = _kill_loop(tmp_path, kills=int(os.environ.get("SMOA_KILLS", "25")))
    assert survived > 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_ingestion_200(tmp_path) -> None:
    torch.set_num_threads(1)
    assert _kill_loop(tmp_path, kills=200) > 0
