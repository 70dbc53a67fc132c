"""SIGKILL in the middle of ingestion: every adapter whose creation returned survives intact.

A forked child ingests adapters (single creates, bulk creates, large file-backed adapters) and reports each id and
checksum on a pipe only *after* the call returned; the parent kills it with SIGKILL at a random moment, reopens the
library and checks it. The default run does 25 kills; ``-m slow`` runs 200. A second loop kills a child that
updates, deletes, archives and restores adapters (15 kills by default, 200 under ``-m slow``).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time

import pytest
import torch

from smoa import AdapterSpec, SMoAConfig
from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights, checksum
from smoa.library import AdapterLibrary

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
    verified: set[str] = set()
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
        _verify(path, expected, verified)
    return len(expected)


def _verify(path, expected: dict[str, str], verified: set[str]) -> None:
    """Every promised adapter's row and checksum (one query); the weights of the new ones and of 200 older ones.

    Loading every adapter after every kill made the 200-kill run quadratic (tens of thousands of adapters).
    """
    db = sqlite3.connect(path / "catalog.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    lib = AdapterLibrary(_config(path), TINY)  # opens cleanly, collects orphan files
    try:
        stored = dict(lib.catalog._read("SELECT id, checksum FROM adapters"))
        missing = [aid for aid, digest in expected.items() if stored.get(aid) != digest]
        assert not missing, f"{len(missing)} promised adapters missing or changed, e.g. {missing[:3]}"
        new = [aid for aid in expected if aid not in verified]
        old = random.Random(len(expected)).sample(sorted(verified), min(200, len(verified)))
        for aid in new + old:
            w = lib.get_weights(aid)  # checksum verified on load
            assert checksum(w.to_bytes()) == expected[aid]
        verified.update(new)
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


# -- SIGKILL during updates, deletes, archives and restores -------------------------------------------------------
# The child announces each change before the call ("u id digest", "d id", ...) and confirms it after ("U ...").
# After a kill, a confirmed change must be in place; an announced, unconfirmed one may be either fully there or
# fully absent (never a third state); the weights always load with their checksum.
MUTATE_MODULES = (("layers.0.q", "layers.2.v"), ("layers.0.q", "layers.1.q", "layers.3.q"))  # inline / file


def _mutation_weights(rng: random.Random) -> LoraWeights:
    modules = MUTATE_MODULES[rng.randrange(2)]
    rank = 2 if modules is MUTATE_MODULES[0] else 8
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    factors = {m: (torch.randn(rank, TINY.shape(m)[0], generator=g), torch.randn(TINY.shape(m)[1], rank, generator=g))
               for m in TINY.module_names if m in modules}  # fmt: skip
    return LoraWeights(factors, 2.0 * rank, rank)


def _mutating_child(path, fd: int, seed: int, ids: list[str]) -> None:  # forked; never returns
    try:
        lib = AdapterLibrary(_config(path), TINY)
        rng = random.Random(seed)
        live = list(ids)
        while True:
            choice = rng.random()
            if choice < 0.15 or len(live) < 5:
                ad = lib.create(AdapterSpec(weights=_mutation_weights(rng)))
                live.append(ad.id)
                os.write(fd, f"C {ad.id} {ad.checksum}\n".encode())
                continue
            aid = rng.choice(live)
            if choice < 0.6:
                w = _mutation_weights(rng)
                digest = checksum(w.to_bytes())
                os.write(fd, f"u {aid} {digest}\n".encode())
                lib.update_weights(aid, w)
                os.write(fd, f"U {aid} {digest}\n".encode())
            elif choice < 0.75:
                os.write(fd, f"d {aid}\n".encode())
                lib.delete(aid)
                live.remove(aid)
                os.write(fd, f"D {aid}\n".encode())
            elif choice < 0.9:
                os.write(fd, f"a {aid}\n".encode())
                lib.archive(aid)
                os.write(fd, f"A {aid}\n".encode())
            else:
                os.write(fd, f"r {aid}\n".encode())
                lib.restore(aid)
                os.write(fd, f"R {aid}\n".encode())
    finally:
        os._exit(0)


def _apply_reports(data: bytes, allowed: dict[str, set[str]], maybe_deleted: set[str]) -> None:
    """Fold the child's complete report lines into ``allowed`` (id -> checksums it may have)."""
    for line in data.decode().split("\n")[:-1]:  # the text after the last newline never completed
        op, aid, *rest = line.split()
        if op == "C":
            allowed[aid] = {rest[0]}
        elif op == "u":
            allowed[aid] = allowed[aid] | {rest[0]}  # until confirmed: old or new, nothing else
        elif op == "U":
            allowed[aid] = {rest[0]}
        elif op == "d":
            maybe_deleted.add(aid)
        elif op == "D":
            allowed[aid] = set()  # a tombstone: must stay absent
            maybe_deleted.discard(aid)


def _mutation_loop(tmp_path, kills: int) -> int:
    path = tmp_path / "lib"
    lib = AdapterLibrary(_config(path), TINY)
    seed_rng = random.Random(99)
    allowed = {a.id: {a.checksum} for a in (lib.create(AdapterSpec(weights=_mutation_weights(seed_rng))) for _ in range(8))}
    lib.close()
    rng = random.Random(4321)
    changes = 0
    for i in range(kills):
        maybe_deleted: set[str] = set()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _mutating_child(path, w, seed=i, ids=sorted(a for a, sums in allowed.items() if sums))
        os.close(w)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            data = f.read()
        changes += data.count(b"\n")
        _apply_reports(data, allowed, maybe_deleted)
        _verify_mutations(path, allowed, maybe_deleted)
    return changes


def _verify_mutations(path, allowed: dict[str, set[str]], maybe_deleted: set[str]) -> None:
    db = sqlite3.connect(path / "catalog.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    lib = AdapterLibrary(_config(path), TINY)
    try:
        for ad in lib.iter_adapters():
            if ad.id not in allowed:  # created, then killed before its report: must be whole
                assert checksum(lib.get_weights(ad.id).to_bytes()) == ad.checksum
                allowed[ad.id] = {ad.checksum}
        for aid in list(allowed):
            if not allowed[aid]:
                assert aid not in lib, f"deleted adapter {aid} is back"
                continue
            if aid not in lib:
                assert aid in maybe_deleted, f"{aid} vanished without a delete"
                allowed[aid] = set()
                continue
            ad = lib.get_adapter(aid)
            assert ad.checksum in allowed[aid], f"{aid}: checksum {ad.checksum[:8]} is neither old nor new"
            assert checksum(lib.get_weights(aid).to_bytes()) == ad.checksum  # loads, whole, verified
            allowed[aid] = {ad.checksum}
        n_rows = lib.catalog._read("SELECT COUNT(*) FROM adapters")[0][0]
        assert n_rows == lib.catalog._read("SELECT COUNT(*) FROM weights")[0][0] == lib.total_adapters
        assert lib.files.all_files() == lib.catalog.all_files()  # strays of the killed change collected
        for area in ("blobs", "cold"):
            assert not list((path / area).glob("*/.tmp-*"))
    finally:
        lib.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_updates_deletes_archives(tmp_path) -> None:
    torch.set_num_threads(1)
    assert _mutation_loop(tmp_path, kills=int(os.environ.get("SMOA_KILLS", "15"))) > 0


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_during_updates_deletes_archives_200(tmp_path) -> None:
    torch.set_num_threads(1)
    assert _mutation_loop(tmp_path, kills=200) > 0
