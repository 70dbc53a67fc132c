"""The user's negative examples (``add_negative_examples``) are library data: kept in the catalog, not only beside
the routing index, so they survive a reopen, a lost index and a bad call."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from smoa import InvalidInputError

from .helpers import open_lib

NEGATIVES = ["zebra quantum violin", "glacier nebula tundra"]


def _library(path: Path):
    lib = open_lib(path)
    lib.create_adapters_sync([
        {"specialization": "domain", "domain_tags": [t], "granularity": "nano", "rank": 2,
         "examples": [f"{t} {w} question" for w in ("one", "two", "three", "four", "five", "six")]}
        for t in ("bread", "stocks", "heart")
    ])  # fmt: skip
    return lib


def test_negatives_survive_reopen_and_a_deleted_index(tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib")
    assert lib.add_negative_examples_sync(NEGATIVES) == 2
    threshold = lib.router.threshold()
    lib.close()

    lib = open_lib(tmp_path / "lib")
    assert lib.router.negative_texts() == NEGATIVES and lib.router.threshold() == pytest.approx(threshold)
    lib.close()

    shutil.rmtree(tmp_path / "lib" / "index")  # the index (and the learner state beside it) is lost
    lib = open_lib(tmp_path / "lib")
    assert lib.router.negative_texts() == NEGATIVES
    assert lib.router.statistics()["negatives"] == 2
    lib.close()


def test_a_bad_negatives_call_writes_nothing(tmp_path: Path) -> None:
    lib = _library(tmp_path / "lib")
    lib.add_negative_examples_sync(["first one"])
    with pytest.raises(InvalidInputError, match="texts"):
        lib.add_negative_examples_sync(["fine", "\ud800 lone surrogate"])
    with pytest.raises(InvalidInputError, match="texts"):
        lib.add_negative_examples_sync(["fine", 3])  # type: ignore[list-item]
    assert lib.router.negative_texts() == ["first one"]
    lib.close()
    lib = open_lib(tmp_path / "lib")
    assert lib.router.negative_texts() == ["first one"]
    lib.close()
