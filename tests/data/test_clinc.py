"""CLINC150 from the shared data folder: found from the project root or $SMOA_SHARED_DIR, the dataset's splits."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from smoa.data import clinc as clinc_mod
from smoa.data.clinc import clinc150, clinc150_by_domain, clinc_domains, find_clinc_dir
from smoa.errors import InvalidInputError


@pytest.fixture
def real_dir():
    try:
        return find_clinc_dir()
    except FileNotFoundError:
        pytest.skip("CLINC150 is not beside this checkout")


def test_splits_and_domains(real_dir) -> None:
    train, val = clinc150("train"), clinc150("val")
    assert len(train) == 15_000 and len(val) == 3_000
    assert len(clinc150("oos_train")) == 100 and {e.domain for e in clinc150("oos_val")} == {"oos"}
    domains = clinc_domains()
    assert len(domains) == 10 and all(len(v) == 15 for v in domains.values())
    assert Counter(e.domain for e in val) == dict.fromkeys(domains, 300)
    by = clinc150_by_domain("val")
    assert list(by) == list(domains) and all(len(v) == 300 for v in by.values())
    assert {e.text for e in train}.isdisjoint({e.text for e in val}) or len({e.text for e in train} & {e.text for e in val}) < 30


def test_env_var_wins(tmp_path, monkeypatch) -> None:
    folder = tmp_path / "data" / "clinc150"
    folder.mkdir(parents=True)
    (folder / "clinc150_train_val.json").write_text(json.dumps({
        "train": [["book a flight", "book_flight"], ["what is my balance", "balance"]], "val": [["fly me", "book_flight"]],
        "oos_train": [], "oos_val": [["hm", "oos"]],
    }))  # fmt: skip
    (folder / "domains.json").write_text(json.dumps({"travel": ["book_flight"], "banking": ["balance"]}))
    monkeypatch.setenv("SMOA_SHARED_DIR", str(tmp_path))
    assert find_clinc_dir() == folder
    assert [e.domain for e in clinc150("train")] == ["travel", "banking"]
    assert clinc150_by_domain("val") == {"travel": ["fly me"], "banking": []}


def test_missing_and_bad_split(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SMOA_SHARED_DIR", str(tmp_path))
    monkeypatch.setattr(clinc_mod, "_candidates", lambda: [tmp_path / "data" / "clinc150"])
    with pytest.raises(FileNotFoundError, match="SMOA_SHARED_DIR"):
        find_clinc_dir()
    with pytest.raises(InvalidInputError, match="`split`"):
        clinc150("test", folder=tmp_path)
