"""Hostile names, tags, descriptions, metadata and ids: never a path, size-capped, exact or clearly refused.

Each hostile string is offered in every text field. It is either stored and returned exactly — tags in their normal
form, see :mod:`smoa.adapter.tags` — (at creation, after
a reopen, and through the facade with its router index on disk) or refused with an InvalidInputError naming the
field, writing nothing. After all of it, every file in the library directory has one of the fixed names
(``catalog.sqlite3*``, ``LOCK``, ``blobs/ab/<sha256>``, ``index/...``) and nothing appeared next to it.
Hostile ids given to every id-taking call raise AdapterNotFoundError or InvalidInputError with a bounded message.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from smoa import (
    AdapterNotFoundError,
    AdapterSpec,
    AdapterSpecialization,
    InvalidInputError,
    SMoAConfig,
    SparseAdapterMixture,
)
from smoa.adapter.spec import (
    MAX_DESCRIPTION_CHARS,
    MAX_METADATA_BYTES,
    MAX_METADATA_VALUE_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
)
from smoa.adapter.tags import normalize_tags

from .helpers import TINY, files_under, open_lib, seeded_weights, state

HOSTILE = {
    "dotdot": "../../../../tmp/smoa-escape",
    "absolute": "/etc/passwd",
    "windows": "..\\..\\Windows\\System32\\evil.dll",
    "url-encoded": "%2e%2e%2f%2e%2e%2fetc",
    "home": "~/.ssh/authorized_keys",
    "dev": "/dev/sda",
    "sql": "x'); DROP TABLE adapters; --",
    "rtl-override": "\u202egpj.exe",
    "bidi-isolates": "\u2066abc\u2069\u200f",
    "zero-width": "a\u200b\u200c\u200d\ufeffb",
    "emoji": "🔥🧪👩‍👩‍👧‍👦🏳️‍🌈",
    "combining": "e\u0301\u0308\u20dd",
    "cjk": "医学・放射線科",
    "max-plane": "\U0010fffd\U000e0001",
    "json-ish": '{"__proto__": {"x": 1}}',
    "format": "%s%n{0}{__class__}",
    "long-ok": "x" * MAX_TAG_CHARS,
}
REFUSED_TAGS = {
    "nul": "a\x00b",
    "newline": "a\nb",
    "tab": "a\tb",
    "escape": "\x1b[31mred",
    "lone-surrogate": "a\ud800b",
    "too-long": "x" * (MAX_TAG_CHARS + 1),
    "blank": "   ",
    "empty": "",
}
ALLOWED = re.compile(
    r"^(LOCK|catalog\.sqlite3(-wal|-shm|-journal)?|weights|weights/(hot|cold)|index|weights/(hot|cold)/[0-9a-f]{2}"
    r"|weights/(hot|cold)/[0-9a-f]{2}/[0-9a-f]{64}|index/[A-Za-z0-9_.-]+)$"
)


def _assert_only_fixed_names(root: Path, lib_dir: Path) -> None:
    outside = files_under(root) - {str(lib_dir.relative_to(root))}
    outside = {p for p in outside if not p.startswith(str(lib_dir.relative_to(root)) + "/")}
    assert not outside, f"files appeared outside the library: {sorted(outside)[:5]}"
    bad = sorted(p for p in files_under(lib_dir) if not ALLOWED.match(p))
    assert not bad, f"unexpected names in the library: {bad[:5]}"


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_text_is_stored_and_returned_exactly(tmp_path: Path, name: str) -> None:
    text = HOSTILE[name]
    path = tmp_path / "lib"
    lib = open_lib(path)
    meta = {text: text, "nested": [text, {text: [text]}], "nul": "a\x00b", "neg0": -0.0, "big": 10**30}
    desc = (text * (MAX_DESCRIPTION_CHARS // len(text)))[:MAX_DESCRIPTION_CHARS]
    made = [
        lib.create(AdapterSpec(domain_tags=[text], skill_tags=[text, text], description=desc, metadata=meta)),
        lib.create(AdapterSpec(weights=seeded_weights(1, ("layers.0.q",), rank=8), domain_tags=[text])),  # a file
    ]
    tag = normalize_tags([text])  # tags are stored in normal form (NFKC + casefold, invisible chars dropped, deduped)
    for ad in (made[0], lib.get_adapter(made[0].id)):
        assert ad.domain_tags == tag and ad.skill_tags == tag and ad.description == desc
        assert json.dumps(ad.metadata, sort_keys=True) == json.dumps(meta, sort_keys=True)
    lib.close()
    lib = open_lib(path)
    ad = lib.get_adapter(made[0].id)
    assert ad.domain_tags == tag and ad.description == desc
    assert json.dumps(ad.metadata, sort_keys=True) == json.dumps(meta, sort_keys=True)
    assert lib.get_adapter(made[1].id).domain_tags == tag
    lib.close()
    _assert_only_fixed_names(tmp_path, path)


def test_hostile_text_through_the_facade_and_its_index_files(tmp_path: Path) -> None:
    path = tmp_path / "lib"
    cfg = SMoAConfig(storage_path=path, base_profile=TINY, encoder="hash", seed=0)
    with SparseAdapterMixture(cfg) as smoa:
        ids = {}
        for name, text in HOSTILE.items():
            ids[name] = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, [text], [name], description=text).id
        route = smoa.query_adapters_sync(HOSTILE["dotdot"], metadata={"domain": HOSTILE["dotdot"]})
        assert ids["dotdot"] in route.adapter_ids
        smoa.query_adapters_sync(HOSTILE["rtl-override"] + "\x00", metadata={"domain": [HOSTILE["emoji"]]})
    with SparseAdapterMixture(cfg) as smoa:  # reopened from disk, index files included
        for name, text in HOSTILE.items():
            ad = smoa.library.get_adapter(ids[name])
            assert ad.domain_tags == normalize_tags([text]) and ad.description == text
    _assert_only_fixed_names(tmp_path, path)


@pytest.mark.parametrize("field", ["domain_tags", "skill_tags"])
@pytest.mark.parametrize("name", sorted(REFUSED_TAGS))
def test_bad_tags_are_refused_naming_the_field(tmp_path: Path, field: str, name: str) -> None:
    lib = open_lib(tmp_path / "lib")
    lib.create(AdapterSpec(domain_tags=["kept"]))
    before = state(lib)
    with pytest.raises(InvalidInputError, match=f"`{field}`"):
        lib.create(AdapterSpec(**{field: ["fine", REFUSED_TAGS[name]]}))
    with pytest.raises(InvalidInputError, match=f"`{field}`"):  # the bulk path: nothing of the batch written
        lib.create_many([AdapterSpec(domain_tags=["ok"]), AdapterSpec(**{field: [REFUSED_TAGS[name]]})])
    assert state(lib) == before
    lib.close()


CAPS: dict[str, tuple[dict[str, Any], str]] = {
    "too-many-tags": ({"domain_tags": [f"t{i}" for i in range(MAX_TAGS + 1)]}, "`domain_tags`"),
    "description-too-long": ({"description": "x" * (MAX_DESCRIPTION_CHARS + 1)}, "`description`"),
    "description-nul": ({"description": "a\x00"}, "`description`"),
    "description-surrogate": ({"description": "a\udfff"}, "`description`"),
    "metadata-too-big": ({"metadata": {"k": "x" * MAX_METADATA_BYTES}}, "`metadata`"),
    "metadata-multibyte-too-big": ({"metadata": {"k": "é" * (MAX_METADATA_BYTES // 2)}}, "`metadata`"),
    "metadata-surrogate-key": ({"metadata": {"a\ud800": 1}}, "`metadata`"),
    "metadata-surrogate-value": ({"metadata": {"a": ["\udc00"]}}, "`metadata`"),
    "metadata-nan": ({"metadata": {"a": float("nan")}}, "`metadata`"),
    "metadata-bytes": ({"metadata": {"a": b"\x00"}}, "`metadata`"),
    "metadata-object": ({"metadata": {"a": object()}}, "`metadata`"),
    "metadata-int-key": ({"metadata": {1: "a"}}, "`metadata`"),
    "metadata-not-mapping": ({"metadata": [("a", 1)]}, "`metadata`"),
    "examples-surrogate": ({"examples": ["ok", "\ud800"]}, "`examples`"),
    "examples-string": ({"examples": "one string"}, "`examples`"),
}


def _nested(depth: int) -> list[Any]:
    x: list[Any] = []
    for _ in range(depth):
        x = [x]
    return x


CAPS["metadata-deep"] = ({"metadata": {"a": _nested(5000)}}, "`metadata`")
_cycle: dict[str, Any] = {"a": []}
_cycle["a"].append(_cycle)
CAPS["metadata-cycle"] = ({"metadata": _cycle}, "`metadata`")


@pytest.mark.parametrize("name", sorted(CAPS))
def test_caps_and_unstorable_values_are_refused(tmp_path: Path, name: str) -> None:
    lib = open_lib(tmp_path / "lib")
    before = state(lib)
    kwargs, field = CAPS[name]
    with pytest.raises(InvalidInputError, match=field) as info:
        lib.create(AdapterSpec(**kwargs))
    assert len(str(info.value)) < 1000  # the bad value is quoted, not echoed whole
    assert state(lib) == before
    lib.close()


def test_limits_themselves_are_accepted(tmp_path: Path) -> None:
    lib = open_lib(tmp_path / "lib")
    tags = [("é" * MAX_TAG_CHARS)[:-3] + f"{i:03d}" for i in range(MAX_TAGS)]  # distinct: duplicates are dropped
    meta = {f"k{i}": "x" * MAX_METADATA_VALUE_CHARS for i in range(MAX_METADATA_BYTES // MAX_METADATA_VALUE_CHARS - 1)}
    ad = lib.create(AdapterSpec(domain_tags=tags, description="d" * MAX_DESCRIPTION_CHARS, metadata=meta))
    assert lib.get_adapter(ad.id).domain_tags == tags and lib.get_adapter(ad.id).metadata == meta
    lib.close()


HOSTILE_IDS: list[Any] = [
    "../catalog.sqlite3", "/etc/passwd", "blobs/00/" + "0" * 64, "LOCK", "", " ", "\x00", "ad_\x00", "a\ud800",
    "ad_' OR '1'='1", "ad_%", "ad__", "*", "x" * 100_000, "\u202ead_0000000000000000", None, 7, b"ad_00", ["ad_"],
]
ID_CALLS = ("get_adapter", "get_weights", "delete", "pin", "unpin", "archive", "restore", "flatten", "resolve",
            "update_weights")  # fmt: skip


@pytest.mark.parametrize("call", ID_CALLS)
def test_hostile_ids_are_not_found_or_invalid(tmp_path: Path, call: str) -> None:
    path = tmp_path / "lib"
    lib = open_lib(path)
    lib.create(AdapterSpec(weights=seeded_weights(1)))
    before = state(lib)
    for bad in HOSTILE_IDS:
        args = (bad, seeded_weights(2)) if call == "update_weights" else (bad,)
        try:
            out = getattr(lib, call)(*args)
        except (AdapterNotFoundError, InvalidInputError) as exc:
            assert len(str(exc)) < 1000, f"{call}: message echoes the whole id"
        else:
            assert call == "resolve" and out == bad  # resolving an unknown id is the id itself
        assert (bad in lib) is False if isinstance(bad, str) else True
    assert state(lib) == before
    lib.close()
    _assert_only_fixed_names(tmp_path, path)


def test_hostile_composite_members(tmp_path: Path) -> None:
    lib = open_lib(tmp_path / "lib")
    good = lib.create(AdapterSpec(weights=seeded_weights(1)))
    before = state(lib)
    for bad in ("../x", "a\ud800", "x" * 10_000, ""):
        with pytest.raises((AdapterNotFoundError, InvalidInputError)):
            lib.create(AdapterSpec(specialization="composite", members=[(good.id, 0.5), (bad, 0.5)]))
    with pytest.raises(InvalidInputError, match="`members`"):
        lib.create(AdapterSpec(specialization="composite", members=[(good.id, float("inf"))]))
    assert state(lib) == before
    lib.close()
