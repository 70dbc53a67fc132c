"""Finding 8: a constructor that fails releases everything it took (lock, database, temporary directory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from smoa.config import SMoAConfig
from smoa.errors import ConfigError
from smoa.mixture import SparseAdapterMixture

from .conftest import TINY, config, open_core


def _temp_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("smoa-*")}


def test_seed_out_of_range_is_a_config_error_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    with pytest.raises(ConfigError, match="seed"):
        SparseAdapterMixture(SMoAConfig(storage_path=path, seed=2**80, encoder="hash", base_profile=TINY))
    open_core(path).close()  # not "open in another process"


@pytest.mark.parametrize("temporary", [False, True])
def test_failure_after_opening_releases_lock_db_and_temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             temporary: bool) -> None:  # fmt: skip
    import smoa.routing.router as router_mod

    path = None if temporary else tmp_path / "lib"
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))  # only this test's temporary libraries are seen
    before = _temp_dirs()

    def broken(self, *a, **k):  # the router fails after the catalog is open and the directory locked
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(router_mod.Router, "__init__", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        SparseAdapterMixture(config(path))
    assert _temp_dirs() == before
    monkeypatch.undo()
    if not temporary:
        core = open_core(path)  # the lock was released and the database closed
        core.close()


def test_a_temporary_library_never_closed_is_removed(tmp_path: Path) -> None:
    import gc

    core = open_core(None)
    directory = core.directory
    assert directory.exists()
    del core
    gc.collect()
    assert not directory.exists()
