"""`smoa.storage.fsck`: rows checked against weight files; a lost catalog rebuilt from the files' headers."""

from __future__ import annotations

from pathlib import Path

import pytest

from smoa import StorageError
from smoa.adapter.safetensors_io import read_adapter_meta, with_row_meta
from smoa.adapter.weights import LoraWeights
from smoa.storage.fsck import fsck, holds_library

from .helpers import open_lib

V = [f"model.layers.{i}.self_attn.v_proj" for i in range(4)]


def make_library(path: Path) -> dict[str, dict]:
    """Three file-stored adapters (one archived); returns id -> what the user gave."""
    given = {}
    with open_lib(path, blob_inline_max_bytes=0) as smoa:
        for i, (tags, desc) in enumerate([(["medical", "医学"], "doctors"), (["finance"], "banks"), (["code"], "c++")]):
            ad = smoa.create_adapter_sync("domain", tags, ["answer"], rank=2 + i, target_modules=[V[i]],
                                          description=desc, metadata={"owner": f"u{i}", "none": None})  # fmt: skip
            given[ad.id] = {"tags": ad.domain_tags, "rank": ad.rank, "description": desc, "metadata": ad.metadata,
                            "modules": ad.target_modules, "status": "active"}  # fmt: skip
        archived = list(given)[2]
        smoa.archive_adapter_sync(archived)
        given[archived]["status"] = "archived"
    return given


def weight_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and len(p.name) == 64)


def test_row_meta_round_trips_through_the_header() -> None:
    w = LoraWeights({}, 4.0, 2)
    import torch

    w = LoraWeights({V[0]: (torch.ones(2, 576), torch.zeros(576, 2))}, 4.0, 2)
    data = with_row_meta(w.to_bytes(), {"id": "ad_x", "domain_tags": ["医学"], "metadata": {"a": None}, "junk": 1})
    meta = read_adapter_meta(data)
    assert meta["id"] == "ad_x" and meta["domain_tags"] == ["医学"] and meta["metadata"] == {"a": None}
    assert "junk" not in meta and meta["alpha"] == 4.0 and meta["rank"] == 2
    back = LoraWeights.from_bytes(data)
    assert torch.equal(back.factors[V[0]][0], w.factors[V[0]][0])


def test_clean_library_reports_clean(tmp_path: Path) -> None:
    make_library(tmp_path / "lib")
    report = fsck(tmp_path / "lib")
    assert report.catalog == "ok" and report.clean and report.rows == 3 and not report.issues


def test_no_library_is_refused_and_nothing_is_created(tmp_path: Path) -> None:
    for path in (tmp_path / "absent", tmp_path):
        assert not holds_library(path)
        with pytest.raises(StorageError, match="no smoa library"):
            fsck(path)
    assert not (tmp_path / "absent").exists() and list(tmp_path.iterdir()) == []


def test_missing_corrupt_and_orphan_files_are_reported(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    make_library(lib)
    files = weight_files(lib)
    assert len(files) == 3
    files[0].unlink()
    files[1].write_bytes(files[1].read_bytes()[:-8] + b"\xff" * 8)
    orphan = lib / "weights" / "hot" / ("ab" ) / ("ab" + "0" * 62)
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x")
    report = fsck(lib)
    assert not report.clean
    assert len(report.missing) == 1 and len(report.corrupt) == 1 and len(report.orphans) == 1
    assert report.orphans[0].path == f"weights/hot/ab/{orphan.name}"


@pytest.mark.parametrize("damage", ["delete", "empty", "garbage"])
def test_repair_rebuilds_a_lost_catalog_from_the_headers(tmp_path: Path, damage: str) -> None:
    lib = tmp_path / "lib"
    given = make_library(lib)
    cat = lib / "catalog.sqlite3"
    for suffix in ("-wal", "-shm"):
        (lib / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    if damage == "delete":
        cat.unlink()
    elif damage == "empty":
        cat.write_bytes(b"")
    else:
        cat.write_bytes(b"this is not sqlite" * 100)
    before = fsck(lib)
    assert before.catalog == {"delete": "missing", "empty": "empty", "garbage": "unreadable"}[damage]
    assert not before.clean and {p.stat().st_size for p in weight_files(lib)}  # nothing deleted by checking
    report = fsck(lib, repair=True)
    assert report.repaired and report.rebuilt_rows == 3
    assert fsck(lib).clean
    with open_lib(lib) as smoa:
        got = {a.id: a for a in smoa.list_adapters_sync(status=("active", "archived"))}
        assert set(got) == set(given)
        for aid, g in given.items():
            a = got[aid]
            assert (a.domain_tags, a.rank, a.description, a.metadata, a.target_modules, a.status) == (
                g["tags"], g["rank"], g["description"], g["metadata"], g["modules"], g["status"])
            assert smoa.core.get_weights(aid).rank == g["rank"]
        active = [aid for aid, g in given.items() if g["status"] == "active"]
        route = smoa.query_adapters_sync("medical", {"domain": "medical"}, "task_based", 1)
        assert route.adapter_ids == [active[0]]


def test_fsck_refuses_a_library_open_elsewhere(tmp_path: Path) -> None:
    from smoa import LibraryLockedError

    with open_lib(tmp_path / "lib") as smoa:
        smoa.create_adapter_sync("domain", ["a"])
        with pytest.raises(LibraryLockedError):
            fsck(tmp_path / "lib")


def test_repair_readds_orphans_a_readable_catalog_lacks(tmp_path: Path) -> None:
    """A file whose row was lost (e.g. a catalog restored from an older backup) comes back with its id."""
    lib = tmp_path / "lib"
    given = make_library(lib)
    import shutil

    with open_lib(tmp_path / "empty") as smoa:  # a readable catalog without those rows
        pass
    for suffix in ("", "-wal", "-shm"):
        (lib / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
        src = tmp_path / "empty" / f"catalog.sqlite3{suffix}"
        if src.exists():
            shutil.copy(src, lib / f"catalog.sqlite3{suffix}")
    report = fsck(lib)
    assert report.catalog == "ok" and len(report.orphans) == 3
    report = fsck(lib, repair=True)
    assert report.rebuilt_rows == 3
    with open_lib(lib) as smoa:
        assert {a.id for a in smoa.list_adapters_sync(status=("active", "archived"))} == set(given)


def test_a_file_without_row_metadata_comes_back_under_a_fresh_id(tmp_path: Path) -> None:
    import torch

    from smoa.adapter.weights import checksum

    lib = tmp_path / "lib"
    given = make_library(lib)
    w = LoraWeights({V[3]: (torch.full((2, 576), 0.01), torch.full((192, 2), 0.01))}, 4.0, 2)
    data = w.to_bytes()  # a file written before headers carried rows
    digest = checksum(data)
    legacy = lib / "weights" / "hot" / digest[:2] / digest
    legacy.parent.mkdir(parents=True, exist_ok=True)
    legacy.write_bytes(data)
    for suffix in ("", "-wal", "-shm"):
        (lib / f"catalog.sqlite3{suffix}").unlink(missing_ok=True)
    assert fsck(lib, repair=True).rebuilt_rows == 4
    with open_lib(lib) as smoa:
        ads = smoa.list_adapters_sync(status=("active", "archived"))
        fresh = [a for a in ads if a.id not in given]
        assert len(fresh) == 1 and fresh[0].metadata == {"recovered_from": f"weights/hot/{digest[:2]}/{digest}"}
        got = smoa.core.get_weights(fresh[0].id)
        assert torch.equal(got.factors[V[3]][1], w.factors[V[3]][1]) and got.alpha == 4.0
