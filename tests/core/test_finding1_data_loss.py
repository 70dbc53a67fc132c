"""Finding 1: a lost catalog must never turn into deleted weights, and user folders are never touched."""

from __future__ import annotations

from pathlib import Path

import pytest

from smoa.adapter.spec import AdapterSpec
from smoa.errors import StorageError

from .conftest import open_core, weights


def _library_with_files(path: Path) -> list[Path]:
    core = open_core(path, blob_inline_max_bytes=0)  # every adapter in a weight file
    core.create_many([AdapterSpec(weights=weights(i), domain_tags=[f"t{i}"]) for i in range(3)])
    core.close()
    files = sorted(p for p in path.rglob("*") if p.is_file() and len(p.name) == 64)
    assert len(files) == 3
    return files


@pytest.mark.parametrize("damage", ["missing", "empty"])
def test_lost_catalog_refuses_to_open_and_deletes_nothing(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "lib"
    files = _library_with_files(path)
    for suffix in ("", "-wal", "-shm"):
        (path / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    if damage == "empty":
        (path / "catalog.sqlite3").write_bytes(b"")
    with pytest.raises(StorageError, match=r"smoa fsck .* --repair") as info:
        open_core(path)
    assert ("missing" if damage == "missing" else "empty") in str(info.value)
    assert all(f.exists() for f in files)  # not one weight file swept
    with pytest.raises(StorageError):  # and refusing twice is still refusing (nothing was created)
        open_core(path)


def test_unreadable_catalog_names_the_recovery_command(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    files = _library_with_files(path)
    for suffix in ("-wal", "-shm"):
        (path / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    (path / "catalog.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="fsck"):
        open_core(path)
    assert all(f.exists() for f in files)


def test_user_folders_named_blobs_and_cold_are_never_touched(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    user = {path / "blobs" / "images" / "photo.jpg": b"\xff\xd8jpeg", path / "cold" / "notes.txt": b"mine",
            path / "blobs" / "ab" / "readme.md": b"keep me"}  # fmt: skip
    for p, data in user.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    core = open_core(path, blob_inline_max_bytes=0)
    made = core.create_many([AdapterSpec(weights=weights(i)) for i in range(4)])
    core.archive(made[0].id)
    core.delete_many([a.id for a in made[1:3]])
    core.close()
    core = open_core(path)  # the orphan sweep at open
    core.delete(made[3].id)
    core.close()
    for p, data in user.items():
        assert p.read_bytes() == data
