"""Tag index: the idf-weighted overlap formula by hand, stemming, metadata parsing."""

from __future__ import annotations

import math

import pytest

from smoa.errors import InvalidInputError
from smoa.routing.index.tags import BOTH, DOMAIN, SKILL, TagIndex, query_terms_from_metadata, stem, terms_of


def lib() -> TagIndex:
    t = TagIndex()
    t.add(1, ["medical", "radiology"], ["diagnosis"])
    t.add(2, ["medical", "cardiology"], ["diagnosis", "treatment"])
    t.add(3, ["legal", "contract"], ["review"])
    t.add(4, ["finance"], ["prediction", "analysis"])
    return t


def idf(n: int, df: int) -> float:
    return math.log(1 + (n - df + 0.5) / (df + 0.5))


def test_stem_and_terms() -> None:
    assert stem("translation") == stem("translate") == stem("translating") == "translat"
    assert terms_of("Translate THIS to Spanish, please") == ["translat", "spanish"]


def test_score_matches_hand_formula() -> None:
    t = lib()
    terms = [("medical", DOMAIN), (stem("diagnosis"), SKILL), ("radiology", DOMAIN)]
    got = t.score(terms)
    w_med, w_diag, w_rad = idf(4, 2), idf(4, 2), idf(4, 1)
    total = w_med + w_diag + w_rad
    assert got[1] == pytest.approx((w_med + w_diag + w_rad) / total)
    assert got[2] == pytest.approx((w_med + w_diag) / total)
    assert set(got) == {1, 2}
    assert t.score_keys(terms, [1, 2, 3]) == pytest.approx({1: got[1], 2: got[2], 3: 0.0})


def test_cross_field_match_counts_half() -> None:
    t = lib()
    got = t.score([("review", DOMAIN)])  # "review" is a skill tag of 3
    assert got[3] == pytest.approx(0.5)
    assert t.score([("review", BOTH)])[3] == pytest.approx(1.0)


def test_remove_and_replace() -> None:
    t = lib()
    assert t.remove(3) and not t.remove(3)
    assert "contract" not in t.vocabulary
    t.add(1, ["legal"], [])
    assert t.tags_of(1) == (("legal",), ())
    assert 1 not in t.score([("radiology", DOMAIN)])


def test_match_text_uses_vocabulary() -> None:
    t = lib()
    assert dict(t.match_text("Please review this contract for me")) == {"review": BOTH, "contract": BOTH}


def test_metadata_terms_fields_and_unknown_keys() -> None:
    terms = dict(query_terms_from_metadata({"task": "Diagnosis", "domain": ["medical"], "colour": "blue"}))
    assert terms == {stem("diagnosis"): SKILL, "medical": DOMAIN}


@pytest.mark.parametrize("bad", [3, {"a": "b"}, ["ok", 2]])
def test_non_string_metadata_value_names_the_key(bad: object) -> None:
    with pytest.raises(InvalidInputError, match="`task`"):
        query_terms_from_metadata({"task": bad})


def test_json_roundtrip() -> None:
    t = lib()
    back = TagIndex.from_json(t.to_json())
    terms = [("medical", DOMAIN), ("review", BOTH)]
    assert back.score(terms) == t.score(terms)


def test_ascii_words_take_the_regex_path_with_the_same_terms() -> None:
    """ASCII text (nearly every query) is split by one regex; it must give exactly the terms of the general path
    (NFKC + casefold, word-character runs with their ``+``/``#`` suffix, unspaced scripts split)."""
    import random
    import string

    from smoa.adapter.tags import _split_unspaced, _words, normalize_text, terms

    def general(text: str) -> list[str]:
        return list(dict.fromkeys(t for w in _words(normalize_text(text)) for t in _split_unspaced(w)))

    rng = random.Random(0)
    alphabet = string.printable + "+#+#\x00\x07\x1b"
    samples = ["C++ and C# for .NET", "what's my BALANCE?", "a+b#c ++x ##", "", "  \t\n", "1st 2nd_3rd x-ray"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(3000)]
    for text in samples:
        assert text.isascii() and terms(text) == general(text), text
    assert terms("C++ and ＣＵＤＡ; 医学") == ["c++", "and", "cuda", "医", "学", "医学"]  # non-ASCII: the general path


def test_carrying_is_whether_a_key_holds_one_of_the_names_in_either_field() -> None:
    t = lib()
    t.add(5, ["finance"], ["prediction", "analysis"])  # the same combination as key 4
    keys = [4, 1, 99, 3, 5, 2, 4, -7]  # 99 and -7 are not keys
    for names in ({"medical"}, {"review"}, {"finance", "legal"}, {"diagnosis"}, {"nothing"}, set()):
        want = [t.tags_of(k) is not None and bool(names & {x for tags in t.tags_of(k) for x in tags}) for k in keys]
        assert t.carrying(keys, names) == want, names
    assert t.carrying([], {"medical"}) == []
    t.remove(4)
    assert t.carrying([4, 5], {"finance"}) == [False, True]
