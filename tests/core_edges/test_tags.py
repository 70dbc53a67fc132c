"""Tags are compared by their normal form (NFKC + casefold): `医学`, full-width letters, `c++` vs `c#`."""

from __future__ import annotations

import pytest

from smoa import AdapterSpecialization, InvalidInputError
from smoa.adapter.tags import normalize_tag, normalize_tags, terms

from .helpers import open_lib


@pytest.mark.parametrize(
    ("given", "normal"),
    [("Medical", "medical"), ("ＭＥＤＩＣＡＬ", "medical"), ("医学", "医学"), ("  machine\u3000 learning ", "machine learning"),
     ("Straße", "strasse"), ("C++", "c++"), ("C#", "c#"), ("ﬁnance", "finance"), ("med\u200bical", "medical")],
)  # fmt: skip
def test_normal_form(given: str, normal: str) -> None:
    assert normalize_tag(given) == normal


def test_cpp_and_csharp_stay_distinct_and_duplicates_drop() -> None:
    assert normalize_tags(["c++", "c#", "C", "C++", "ｃ＋＋"]) == ["c++", "c#", "c"]
    assert terms("I write C++ and C#") == ["i", "write", "c++", "and", "c#"]


@pytest.mark.parametrize("bad", ["", "   ", "\u200b", "\u200b\ufeff\u2060", "\u202e"])
def test_invisible_tags_are_refused_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="`domain_tags`"):
        normalize_tags(["ok", bad], "domain_tags")


@pytest.mark.parametrize("bad", ["a\x00b", "\ud800", "bell\x07", "a\nb", "a\tb"])
def test_control_characters_and_surrogates_are_refused(bad: str) -> None:
    with pytest.raises(InvalidInputError, match="`skill_tags`"):
        normalize_tags([bad], "skill_tags")


def test_unspaced_scripts_meet_inside_a_sentence() -> None:
    assert "医学" in terms("我需要医学帮助")
    assert set(terms("医学")) <= set(terms("我需要医学帮助"))


def test_library_stores_normal_forms_and_refuses_invisible_tags() -> None:
    with open_lib() as smoa:
        ad = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["ＭＥＤＩＣＡＬ", "medical", "医学"], ["C++", "c#"])
        assert ad.domain_tags == ["medical", "医学"] and ad.skill_tags == ["c++", "c#"]
        with pytest.raises(InvalidInputError, match="domain_tags"):
            smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["\u200b"])
        assert smoa.get_statistics()["library"]["total_adapters"] == 1


def test_routing_matches_cjk_fullwidth_and_cpp_tags() -> None:
    with open_lib() as smoa:
        med = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["医学"])
        cpp = smoa.create_adapter_sync(AdapterSpecialization.SKILL, [], ["c++"])
        csharp = smoa.create_adapter_sync(AdapterSpecialization.SKILL, [], ["c#"])
        fw = smoa.create_adapter_sync(AdapterSpecialization.DOMAIN, ["ｆｉｎａｎｃｅ"])
        assert smoa.query_adapters_sync("x", {"domain": "医学"}, "task_based", 1).adapter_ids == [med.id]
        assert smoa.query_adapters_sync("x", {"skill": "C++"}, "task_based", 1).adapter_ids == [cpp.id]
        assert smoa.query_adapters_sync("x", {"skill": "c#"}, "task_based", 1).adapter_ids == [csharp.id]
        assert smoa.query_adapters_sync("x", {"domain": "Finance"}, "task_based", 1).adapter_ids == [fw.id]
        assert smoa.query_adapters_sync("我需要医学帮助", None, "task_based", 1).adapter_ids == [med.id]
