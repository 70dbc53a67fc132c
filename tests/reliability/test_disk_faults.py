"""Disk full and I/O errors during writes: a clear StorageError, nothing half-visible, the library reopens.

Three ways of failing, from the most real to the most systematic:

* a real 1 MiB tmpfs filled until the kernel says ENOSPC (needs root and ``mount``; skipped otherwise);
* SQLite's own "database or disk is full" (``PRAGMA max_page_count``), no privileges needed;
* every SQL statement of an operation failing in turn with ``disk I/O error`` (the SQLite test-suite idea of
  failing the N-th I/O call for N = 1, 2, ...), and every step of a weight-file write failing with ENOSPC/EIO.

After each failure: the error is a :class:`smoa.errors.StorageError`; the persisted state is exactly the state
before the call (or, where the failure came after the commit, exactly the completed change); the in-memory count
and generation agree with the catalog; every adapter loads with its checksum; a reopen collects stray files.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from smoa import AdapterSpec, StorageError
from smoa.adapter.weights import checksum
from smoa.library import AdapterLibrary

from .helpers import assert_consistent, open_lib, seeded_weights, state

FILE_MODULES = ("layers.0.q", "layers.1.q", "layers.2.q")  # rank 4: 4 KiB > 1500 bytes -> a blob file


# -- a real full filesystem ---------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str) -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("inline", [True, False], ids=["inline-blobs", "blob-files"])
def test_real_disk_full_gives_storage_error_and_keeps_the_library(tmp_path: Path, inline: bool) -> None:
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    if not _mount_tmpfs(mnt, "1m"):
        pytest.skip("needs root and a mountable tmpfs (the injected-fault tests below cover the same paths)")
    try:
        path = mnt / "lib"
        lib = open_lib(path, blob_inline_max_bytes=1 << 20 if inline else 1500)
        made: dict[str, str] = {}
        error: StorageError | None = None
        for i in range(10_000):
            before = lib.total_adapters
            try:
                if i % 3 == 0:
                    out = lib.create_many([AdapterSpec(rank=4, target_modules=list(FILE_MODULES)) for _ in range(8)])
                else:
                    out = [lib.create(AdapterSpec(weights=seeded_weights(i, FILE_MODULES, rank=4)))]
            except StorageError as exc:
                error = exc
                assert lib.total_adapters == before == lib.catalog.count()  # the failed call added nothing
                break
            made.update((a.id, a.checksum) for a in out)
        assert error is not None, "the 1 MiB filesystem never filled up"
        assert "No space left" in str(error) or "disk is full" in str(error), str(error)
        assert len(made) > 10
        assert_consistent(lib)
        for aid, digest in made.items():  # still full: every returned adapter reads back intact
            assert checksum(lib.get_weights(aid).to_bytes()) == digest
        lib.close()
        lib = open_lib(path)  # reopens on a full disk
        assert lib.total_adapters == len(made)
        assert lib.files.all_files() == lib.catalog.all_files()  # strays collected at open
        for aid, digest in made.items():
            assert lib.get_adapter(aid).checksum == digest
            assert checksum(lib.get_weights(aid).to_bytes()) == digest
        lib.close()
    finally:
        _umount(mnt)


# -- SQLite "database or disk is full" ----------------------------------------------------------------------------
def test_sqlite_full_refuses_writes_cleanly_and_recovers(tmp_path: Path) -> None:
    lib = open_lib(tmp_path / "lib")
    kept = lib.create_many([AdapterSpec(weights=seeded_weights(i)) for i in range(5)])
    db = lib.catalog._db
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 2}")
    before = state(lib)
    failures = 0
    for i in range(20):
        try:
            lib.create_many([AdapterSpec(weights=seeded_weights(100 + i, rank=8)) for _ in range(4)])
        except StorageError as exc:
            failures += 1
            assert "full" in str(exc) and "nothing was changed" in str(exc)
            break
    assert failures == 1
    assert state(lib) == before or lib.total_adapters > len(kept)
    assert_consistent(lib)
    db.execute("PRAGMA max_page_count = 1073741823")  # space again: writes work
    lib.create(AdapterSpec(weights=seeded_weights(999)))
    lib.close()
    lib = open_lib(tmp_path / "lib")
    for a in kept:
        assert checksum(lib.get_weights(a.id).to_bytes()) == a.checksum
    assert_consistent(lib)
    lib.close()


# -- every SQL statement failing in turn --------------------------------------------------------------------------
class FailingConnection:
    """Wraps a ``sqlite3.Connection``; the ``fail_at``-th statement (ROLLBACK excepted) raises ``disk I/O error``."""

    def __init__(self, real: sqlite3.Connection, fail_at: int) -> None:
        self.real = real
        self.fail_at = fail_at
        self.count = 0

    def _tick(self, sql: str) -> None:
        if sql.lstrip().upper().startswith("ROLLBACK"):
            return
        self.count += 1
        if self.count == self.fail_at:
            raise sqlite3.OperationalError("disk I/O error")

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._tick(sql)
        return self.real.execute(sql, params)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        self._tick(sql)
        return self.real.executemany(sql, rows)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def _setup(lib: AdapterLibrary) -> dict[str, Any]:
    """A small library: inline and file-backed adapters, one archived; returns the ids by role."""
    inline = lib.create(AdapterSpec(weights=seeded_weights(1), domain_tags=["a"]))
    shared = seeded_weights(2, FILE_MODULES, rank=4)
    filed = lib.create(AdapterSpec(weights=shared, skill_tags=["b"]))
    archived = lib.create(AdapterSpec(weights=seeded_weights(3, FILE_MODULES, rank=4)))
    lib.archive(archived.id)
    victim = lib.create(AdapterSpec(weights=seeded_weights(4, FILE_MODULES, rank=4)))
    return {"inline": inline.id, "filed": filed.id, "shared": shared, "archived": archived.id, "victim": victim.id}


OPS: dict[str, Callable[[AdapterLibrary, dict[str, Any], int], Any]] = {
    # bulk create; one spec repeats an existing adapter's bytes (same content-addressed file)
    "create_many": lambda lib, ids, n: lib.create_many(
        [AdapterSpec(weights=seeded_weights(50 + n)), AdapterSpec(weights=seeded_weights(60 + n, FILE_MODULES, rank=4)),
         AdapterSpec(weights=ids["shared"])]),
    "update_weights": lambda lib, ids, n: lib.update_weights(ids["filed"], seeded_weights(70 + n, FILE_MODULES, rank=4)),
    "update_inline": lambda lib, ids, n: lib.update_weights(ids["inline"], seeded_weights(80 + n)),
    "delete": lambda lib, ids, n: lib.delete(ids["victim"]),
    "archive": lambda lib, ids, n: lib.archive(ids["filed"]),
    "restore": lambda lib, ids, n: lib.restore(ids["archived"]),
    "pin": lambda lib, ids, n: lib.pin(ids["inline"]),
    "merge_into": lambda lib, ids, n: lib.merge_into([ids["filed"], ids["victim"]], ids["inline"], "linear"),
}


def _check_live(lib: AdapterLibrary) -> None:
    """In-memory view == catalog; every adapter loads (checksum verified) and equals its stored bytes."""
    assert lib.total_adapters == lib.catalog.count()
    assert lib.generation == int(lib.catalog.get_meta("generation") or 0)
    assert_consistent(lib)
    for ad in lib.iter_adapters():
        assert checksum(lib.get_weights(ad.id).to_bytes()) == lib.get_adapter(ad.id).checksum


@pytest.mark.parametrize("op", sorted(OPS))
def test_io_error_at_every_statement_leaves_before_or_after(tmp_path: Path, op: str) -> None:
    path = tmp_path / "lib"
    lib = open_lib(path)
    ids = _setup(lib)
    real = lib.catalog._db
    lib.get_weights(ids["inline"])  # something cached
    fail_at, failed = 1, 0
    while True:
        before = state(lib)
        lib.catalog._db = FailingConnection(real, fail_at)  # type: ignore[assignment]
        try:
            OPS[op](lib, ids, fail_at)
            ok = True
        except StorageError as exc:
            ok = False
            failed += 1
            assert "disk I/O error" in str(exc)
        finally:
            lib.catalog._db = real
        if ok and lib.catalog._db is real and fail_at > 200:
            pytest.fail("operation never finished")
        after = state(lib)
        if not ok:
            if _rows(after) == _rows(before):  # rolled back: not even a stray file may be left
                assert after["files"] == before["files"], f"{op} failed at statement {fail_at} and left files"
            else:  # the failure came after the commit: the change is complete
                _assert_complete(op, lib, ids, before)
        _check_live(lib)
        if ok:
            break
        lib.close()  # the next attempt starts from a reopened library: nothing in memory hides a problem
        lib = open_lib(path)
        real = lib.catalog._db
        fail_at += 1
    assert failed >= 2, f"{op}: only {failed} statement(s) could fail"
    lib.close()
    lib = open_lib(path)
    _check_live(lib)
    assert lib.files.all_files() == lib.catalog.all_files()
    lib.close()


def _rows(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st.items() if k != "files"}


def _assert_complete(op: str, lib: AdapterLibrary, ids: dict[str, Any], before: dict[str, Any]) -> None:
    n_before = len(before["adapters"])
    if op == "create_many":
        assert lib.catalog.count(("active", "archived", "merged")) == n_before + 3
    elif op in ("update_weights", "update_inline"):
        aid = ids["filed" if op == "update_weights" else "inline"]
        old = next(r for r in before["adapters"] if r[1] == aid)
        assert lib.get_adapter(aid).version == old[10] + 1 and lib.get_adapter(aid).checksum != old[11]
    elif op == "delete":
        assert ids["victim"] not in lib
    elif op == "archive":
        assert lib.get_adapter(ids["filed"]).status == "archived"
    elif op == "restore":
        assert lib.get_adapter(ids["archived"]).status == "active"
    elif op == "pin":
        assert lib.get_adapter(ids["inline"]).pinned
    elif op == "merge_into":
        assert lib.resolve(ids["filed"]) == lib.resolve(ids["victim"]) == ids["inline"]
    else:
        raise AssertionError(op)


# -- weight-file writes failing at every step ---------------------------------------------------------------------
def _fail(exc: OSError) -> Callable[..., Any]:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise exc

    return boom


class _ShortWriteFile:
    """A file object whose ``write`` stores half the bytes, then fails with ENOSPC (a torn temp file)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self) -> _ShortWriteFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


FILE_FAULTS = {
    "mkdir": ("mkdir", OSError(errno.EROFS, "Read-only file system")),
    "mkstemp": ("mkstemp", OSError(errno.ENOSPC, "No space left on device")),
    "short-write": ("fdopen", None),
    "fsync": ("fsync", OSError(errno.EIO, "Input/output error")),
    "rename": ("replace", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("fault", sorted(FILE_FAULTS))
@pytest.mark.parametrize("op", ["create", "create_many", "update_weights", "archive"])
def test_weight_file_write_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, op: str) -> None:
    import smoa.storage.files as files_mod

    path = tmp_path / "lib"
    lib = open_lib(path)
    ids = _setup(lib)
    before = state(lib)
    what, exc = FILE_FAULTS[fault]
    with monkeypatch.context() as mp:
        if what == "mkdir":
            mp.setattr(Path, "mkdir", _fail(exc))
        elif what == "mkstemp":
            mp.setattr(files_mod.tempfile, "mkstemp", _fail(exc))
        elif what == "fdopen":
            real_fdopen = os.fdopen
            mp.setattr(files_mod.os, "fdopen", lambda fd, *a, **k: _ShortWriteFile(real_fdopen(fd, *a, **k)))
        else:
            mp.setattr(files_mod.os, what, _fail(exc))
        with pytest.raises(StorageError, match="weight file") as info:
            if op == "create":
                lib.create(AdapterSpec(weights=seeded_weights(90, FILE_MODULES, rank=4)))
            elif op == "create_many":
                lib.create_many([AdapterSpec(weights=seeded_weights(91)),
                                 AdapterSpec(weights=seeded_weights(92, FILE_MODULES, rank=4))])  # fmt: skip
            elif op == "update_weights":
                lib.update_weights(ids["filed"], seeded_weights(93, FILE_MODULES, rank=4))
            else:
                lib.archive(ids["victim"])
        assert exc is None or str(exc.strerror) in str(info.value)
    assert state(lib) == before  # nothing visible, no temp file, no orphan
    _check_live(lib)
    lib.close()
    lib = open_lib(path)
    assert state(lib) == before
    lib.close()


def test_close_with_a_failing_catalog_still_releases_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    lib = open_lib(path)
    a = lib.create(AdapterSpec(weights=seeded_weights(1)))
    lib.record_usage([a.id])
    real = lib.catalog._db
    lib.catalog._db = FailingConnection(real, 1)  # type: ignore[assignment]
    with pytest.raises(StorageError):
        lib.close()  # the usage flush fails ...
    real.close()
    again = open_lib(path)  # ... but the lock and the connection are released
    assert again.get_adapter(a.id).checksum == a.checksum
    again.close()


def test_merge_of_a_source_deleted_meanwhile_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A source deleted between merge_into's reads and its commit (the optimizer runs beside other writers)."""
    from smoa import AdapterNotFoundError

    lib = open_lib(tmp_path / "lib")
    ids = _setup(lib)
    real_record = lib.catalog.record_merge

    def delete_then_record(*args: Any, **kwargs: Any) -> int:
        lib.delete(ids["victim"])  # the concurrent delete lands just before the merge commits
        return real_record(*args, **kwargs)

    monkeypatch.setattr(lib.catalog, "record_merge", delete_then_record)
    before_count = lib.total_adapters
    with pytest.raises(AdapterNotFoundError, match=ids["victim"]):
        lib.merge_into([ids["filed"], ids["victim"]], ids["inline"], "linear")
    assert lib.total_adapters == before_count - 1 == lib.catalog.count()  # only the delete happened
    assert lib.resolve(ids["filed"]) == ids["filed"] and lib.get_adapter(ids["filed"]).status == "active"
    _check_live(lib)
    assert lib.files.all_files() == lib.catalog.all_files()  # the cold copies of the failed merge are gone
    lib.close()
