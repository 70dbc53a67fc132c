"""Inverted index over adapters' domain and skill tags, scored by idf-weighted overlap.

Tags are split into words and each word is reduced to a crude stem (``"translation"``, ``"translate"`` ->
``"translat"``), so query words meet tags in any inflection. A query is a bag of *terms*, each with a field:

* from metadata: ``domain`` / ``specialty`` / ``field`` / ``area`` / ``topic`` values look in domain tags,
  ``task`` / ``skill`` / ``skills`` / ``capability`` values in skill tags, ``tag`` / ``tags`` in both; other keys
  are ignored (not an error);
* without metadata: the words of the query text that occur in the tag vocabulary (field: both).

Score of adapter ``a`` for query terms ``T`` (BM25's idf, binary term frequency)::

    idf(t)   = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))
    score(a) = sum_{t in T, t in tags(a) in t's field} idf(t) * w(field match)
               / sum_{t in T} idf(t)                               in [0, 1]

with ``w = 1`` when the term is found in its own field and ``0.5`` when found only in the other field.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from smoa.errors import InvalidInputError

DOMAIN, SKILL, BOTH = 1, 2, 3
CROSS_FIELD_WEIGHT = 0.5
MATCH_TEXT_CHARS = 512  # query words looked up among the tags: the head of a long text is enough
DOMAIN_KEYS = frozenset({"domain", "domains", "specialty", "speciality", "field", "area", "topic", "subject"})
SKILL_KEYS = frozenset({"task", "tasks", "skill", "skills", "capability", "intent"})
BOTH_KEYS = frozenset({"tag", "tags"})

_SUFFIXES = ("ings", "ing", "ions", "ion", "ies", "ers", "er", "es", "ed", "s", "e")
STOPWORDS = frozenset(
    "a an the and or of to in on for with by at from is are was be this that these those it its my me i you your"
    " we our do does did can could would should will what how why when where which who please".split()
)


def stem(word: str) -> str:
    """Crude suffix stripping: ``"translation"``/``"translate"``/``"translating"`` -> ``"translat"``."""
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 3:
            return word[: -len(suf)]
    return word


def terms_of(text: str) -> list[str]:
    """Stemmed words of ``text``, in order, deduplicated: :func:`smoa.adapter.tags.terms` (NFKC + casefold, any
    script, ``c++`` / ``c#`` kept apart), stop words dropped, pure ASCII-letter words stemmed. The same function
    tokenises tags, metadata values and query text, so both sides always agree."""
    from smoa.adapter.tags import terms

    seen: dict[str, None] = {}
    for w in terms(text):
        if w not in STOPWORDS:
            seen[sys.intern(stem(w) if w.isascii() and w.isalpha() else w)] = None
    return list(seen)


@functools.lru_cache(maxsize=65_536)
def _tag_terms(tag: str) -> tuple[str, ...]:
    """:func:`terms_of` of one tag, memoised: libraries reuse a small vocabulary of tags across many adapters."""
    return tuple(terms_of(tag))


MAX_METADATA_VALUE_CHARS = 16_384
MAX_METADATA_VALUES = 64


def query_terms_from_metadata(metadata: Mapping[str, object]) -> list[tuple[str, int]]:
    """``(term, field)`` pairs from recognised metadata keys. Unknown keys are ignored whatever their value, and
    ``None`` (or a ``None`` item of a list) means "no value".

    Raises:
        InvalidInputError: a recognised key's value is not a string / list of strings, or is too long; names the key.
    """
    from smoa.adapter.tags import normalize_text

    out: dict[str, int] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidInputError(f"metadata keys must be strings, got {key!r:.100}")
        k = normalize_text(key)
        field = DOMAIN if k in DOMAIN_KEYS else SKILL if k in SKILL_KEYS else BOTH if k in BOTH_KEYS else 0
        if not field or value is None:
            continue
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not all(v is None or isinstance(v, str) for v in values):
            raise InvalidInputError(
                f"metadata value of `{key}` must be a string (or a list of strings), got {value!r:.100} "
                f"({type(value).__name__})"
            )
        if len(values) > MAX_METADATA_VALUES or any(v is not None and len(v) > MAX_METADATA_VALUE_CHARS for v in values):
            raise InvalidInputError(
                f"metadata value of `{key}` is too long: at most {MAX_METADATA_VALUES} strings of at most "
                f"{MAX_METADATA_VALUE_CHARS:,} characters each"
            )
        for v in values:
            if v is None:
                continue
            for t in terms_of(v):
                out[t] = out.get(t, 0) | field
    return list(out.items())


class TagIndex:
    """Inverted index ``term -> {key: field bits}`` with idf-weighted overlap scoring (module docstring)."""

    def __init__(self) -> None:
        self._postings: dict[str, dict[int, int]] = {}
        self._entries: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(self._postings)

    def add(self, key: int, domain_tags: Sequence[str], skill_tags: Sequence[str]) -> None:
        """Insert or replace adapter ``key`` with its tags (the raw tags are kept for :meth:`tags_of`)."""
        key = int(key)
        if key in self._entries:
            self.remove(key)
        self._entries[key] = (tuple(domain_tags), tuple(skill_tags))
        for tags, field in ((domain_tags, DOMAIN), (skill_tags, SKILL)):
            for tag in tags:
                for t in _tag_terms(tag):
                    posting = self._postings.setdefault(t, {})
                    posting[key] = posting.get(key, 0) | field

    def add_many(self, rows: Iterable[tuple[int, Sequence[str], Sequence[str]]]) -> None:
        for key, d, s in rows:
            self.add(key, d, s)

    def remove(self, key: int) -> bool:
        """Remove adapter ``key``; returns whether it was there."""
        entry = self._entries.pop(int(key), None)
        if entry is None:
            return False
        for tags in entry:
            for tag in tags:
                for t in _tag_terms(tag):
                    posting = self._postings.get(t)
                    if posting is not None:
                        posting.pop(int(key), None)
                        if not posting:
                            del self._postings[t]
        return True

    def tags_of(self, key: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """``(domain_tags, skill_tags)`` of ``key`` as added, or ``None``."""
        return self._entries.get(int(key))

    def keys(self) -> list[int]:
        return list(self._entries)

    def idf(self, term: str) -> float:
        n, df = len(self._entries), len(self._postings.get(term, ()))
        return math.log1p((n - df + 0.5) / (df + 0.5))

    def posting_total(self, terms: Sequence[tuple[str, int]]) -> int:
        """Sum of the posting lengths of ``terms`` (the cost of :meth:`score`)."""
        return sum(len(self._postings.get(t, ())) for t, _ in terms)

    def match_text(self, text: str) -> list[tuple[str, int]]:
        """Query words found in the tag vocabulary, as ``(term, BOTH)`` pairs."""
        return [(t, BOTH) for t in terms_of(text[:MATCH_TEXT_CHARS]) if t in self._postings]

    def score(self, terms: Sequence[tuple[str, int]], limit: int | None = None) -> dict[int, float]:
        """Scores in ``[0, 1]`` of every adapter matching at least one term (``limit``: keep the best).

        Cost: O(sum of the terms' posting lengths).
        """
        if not terms:
            return {}
        idfs = [self.idf(t) for t, _ in terms]
        total = sum(idfs) or 1.0
        acc: dict[int, float] = {}
        for (t, want), w in zip(terms, idfs):
            for key, have in self._postings.get(t, {}).items():
                gain = w if have & want else w * CROSS_FIELD_WEIGHT
                acc[key] = acc.get(key, 0.0) + gain / total
        if limit is not None and len(acc) > limit:
            keys = np.fromiter(acc.keys(), np.int64, len(acc))
            vals = np.fromiter(acc.values(), np.float64, len(acc))
            best = np.lexsort((keys, -vals))[:limit]  # best score first, ties by key
            return {int(keys[i]): float(vals[i]) for i in best}
        return acc

    def score_keys(self, terms: Sequence[tuple[str, int]], keys: Iterable[int]) -> dict[int, float]:
        """Scores of the given ``keys`` only (0 for a key matching nothing).

        Cost: one set intersection of ``keys`` with each term's posting (O(min of the two sizes)).
        """
        out = dict.fromkeys(map(int, keys), 0.0)
        if not terms or not out:
            return out
        idfs = [self.idf(t) for t, _ in terms]
        total = sum(idfs) or 1.0
        for (t, want), w in zip(terms, idfs):
            posting = self._postings.get(t)
            if not posting:
                continue
            for key in out.keys() & posting.keys():
                out[key] += (w if posting[key] & want else w * CROSS_FIELD_WEIGHT) / total
        return out

    def memory_bytes(self) -> int:
        """Rough size of the Python structures (dict entries and tuples; shared interned strings not counted)."""
        post = sum(sys.getsizeof(p) for p in self._postings.values()) + sys.getsizeof(self._postings)
        ent = sys.getsizeof(self._entries) + sum(sys.getsizeof(d) + sys.getsizeof(s) for d, s in self._entries.values())
        return int(post + ent + 28 * len(self._entries))

    def to_json(self) -> dict[str, list]:
        """Plain form: ``{"keys": [...], "domain": [[...]], "skill": [[...]]}``."""
        keys = list(self._entries)
        return {
            "keys": keys,
            "domain": [list(self._entries[k][0]) for k in keys],
            "skill": [list(self._entries[k][1]) for k in keys],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, list]) -> TagIndex:
        out = cls()
        for key, d, s in zip(data["keys"], data["domain"], data["skill"], strict=True):
            out.add(int(key), d, s)
        return out
