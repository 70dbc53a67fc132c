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
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from smoa.errors import InvalidInputError
from smoa.routing.index.keymap import MISSING, KeyMap, fits32

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
        t = _term(w) if len(w) <= MEMO_WORD_CHARS else _term.__wrapped__(w)
        if t is not None:
            seen[t] = None
    return list(seen)


MEMO_WORD_CHARS = 32  # words up to this long are memoised (a hostile query's long words must not fill the memo)


@functools.lru_cache(maxsize=65_536)
def _term(word: str) -> str | None:
    """The index term of one word of :func:`smoa.adapter.tags.terms` (``None``: a stop word), memoised: words
    recur across queries, and each stem is up to 11 suffix tests in Python."""
    if word in STOPWORDS:
        return None
    return sys.intern(stem(word) if word.isascii() and word.isalpha() else word)


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


Combo = tuple[tuple[str, ...], tuple[str, ...]]
Posting = tuple[np.ndarray, np.ndarray]  # (keys sorted, fields)


class TagIndex:
    """Inverted index ``term -> sorted keys + field bits`` with idf-weighted overlap scoring (module docstring).

    Layout (numpy, no Python object per adapter)::

        combos      distinct (domain tags, skill tags) tuples, interned -> combo id (most adapters share a few)
        combo_of    KeyMap: adapter key -> combo id                         8 B / adapter
        postings    term -> (keys int32 [df] sorted, fields uint8 [df])     5 B / (adapter, term)

    Keys are stored as int32 while every key fits one (int64 from the first that does not).
    """

    def __init__(self) -> None:
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._combo_of = KeyMap()
        self._combo_id: dict[Combo, int] = {}
        self._combos: list[Combo | None] = []
        self._combo_terms: list[tuple[tuple[str, int], ...]] = []
        self._combo_refs: list[int] = []
        self._free: list[int] = []
        self._dtype: type = np.int32

    def __len__(self) -> int:
        return len(self._combo_of)

    def _fit(self, keys: np.ndarray) -> None:
        """Widen every posting to int64 the first time a key does not fit an int32."""
        if self._dtype is np.int32 and not fits32(keys):
            self._dtype = np.int64
            self._postings = {t: (k.astype(np.int64), f) for t, (k, f) in self._postings.items()}

    @property
    def vocabulary(self) -> frozenset[str]:
        return frozenset(self._postings)

    # ------------------------------------------------------------------ combos
    def _intern(self, domain_tags: Sequence[str], skill_tags: Sequence[str]) -> int:
        combo = (tuple(domain_tags), tuple(skill_tags))
        cid = self._combo_id.get(combo)
        if cid is None:
            bits = _combo_terms(combo)
            combo = (tuple(sys.intern(t) for t in combo[0]), tuple(sys.intern(t) for t in combo[1]))
            if self._free:
                cid = self._free.pop()
                self._combos[cid], self._combo_terms[cid], self._combo_refs[cid] = combo, bits, 0
            else:
                cid = len(self._combos)
                self._combos.append(combo)
                self._combo_terms.append(bits)
                self._combo_refs.append(0)
            self._combo_id[combo] = cid
        return cid

    def _unref(self, cid: int, n: int = 1) -> None:
        self._combo_refs[cid] -= n
        if self._combo_refs[cid] <= 0:
            combo = self._combos[cid]
            del self._combo_id[combo]  # type: ignore[arg-type]
            self._combos[cid], self._combo_terms[cid], self._combo_refs[cid] = None, (), 0
            self._free.append(cid)

    # ------------------------------------------------------------------ updates
    def add(self, key: int, domain_tags: Sequence[str], skill_tags: Sequence[str]) -> None:
        """Insert or replace adapter ``key`` with its tags (the raw tags are kept for :meth:`tags_of`)."""
        key = int(key)
        self.remove(key)
        self._fit(np.array([key], np.int64))
        cid = self._intern(domain_tags, skill_tags)
        self._combo_refs[cid] += 1
        self._combo_of.set(key, cid)
        for t, field in self._combo_terms[cid]:
            keys, fields = self._postings.get(t, (np.zeros(0, self._dtype), _NO_FIELDS))
            i = int(np.searchsorted(keys, keys.dtype.type(key)))  # same dtype: no copy of the posting
            self._postings[t] = (np.insert(keys, i, key), np.insert(fields, i, field))

    def plan_add(self, rows: Iterable[tuple[int, Sequence[str], Sequence[str]]]) -> TagPlan | None:
        """:meth:`add_many`'s posting merges worked out ahead, off the owner's lock: only reads the postings (each
        write replaces a term's posting tuple, never changes it). :meth:`add_many` given the plan takes each merged
        posting whose term's posting is still the one it was merged from, and merges again the others. ``None``
        (nothing planned) for a key twice or a key past int32 while the postings are int32."""
        rows = rows if isinstance(rows, list) else list(rows)
        keys = np.fromiter((int(r[0]) for r in rows), np.int64, len(rows))
        if len(np.unique(keys)) != len(keys) or (self._dtype is np.int32 and not fits32(keys)):
            return None
        local: dict[Combo, int] = {}  # combination -> its number here (no Python object per row kept: RSS)
        lid = np.fromiter((local.setdefault((tuple(d), tuple(sk)), len(local)) for _, d, sk in rows), np.int64,
                          len(rows))  # fmt: skip
        order = np.argsort(lid, kind="stable")
        _, starts, counts = np.unique(lid[order], return_index=True, return_counts=True)
        parts: dict[str, list[tuple[np.ndarray, int]]] = {}
        for combo, s, c in zip(local, starts.tolist(), counts.tolist()):
            members = keys[order[s : s + c]]
            for t, field in _combo_terms(combo):
                parts.setdefault(t, []).append((members, field))
        dtype, postings = self._dtype, self._postings
        merged = {}
        for t, p in parts.items():
            old = postings.get(t, _EMPTY)
            merged[t] = (old, _merge(old, p, dtype), p)
        return TagPlan(keys, merged)

    def add_many(self, rows: Iterable[tuple[int, Sequence[str], Sequence[str]]], plan: TagPlan | None = None) -> None:
        """Bulk :meth:`add` (a repeated key: the last row wins): one merge per term instead of one per row, or
        none for the terms ``plan`` (:meth:`plan_add` of the same rows) merged already."""
        rows = rows if isinstance(rows, list) else list(rows)
        keys = np.fromiter((int(r[0]) for r in rows), np.int64, len(rows))
        if plan is not None and not np.array_equal(plan.keys, keys):
            plan = None  # planned for other rows
        if len(np.unique(keys)) != len(keys):  # keep each key's last row (no per-row dict otherwise: RSS)
            last = {int(k): (d, s) for k, d, s in rows}
            rows = [(k, d, s) for k, (d, s) in last.items()]
            keys = np.fromiter(last.keys(), np.int64, len(last))
        if not len(rows):
            return
        self.remove_many(keys)
        self._fit(keys)
        cids = np.fromiter((self._intern(r[1], r[2]) for r in rows), np.int32, len(rows))
        self._combo_of.set_new(keys, cids)
        order = np.argsort(cids, kind="stable")
        ucids, starts, counts = np.unique(cids[order], return_index=True, return_counts=True)
        new: dict[str, list[tuple[np.ndarray, int]]] = {}
        for cid, s, c in zip(ucids.tolist(), starts.tolist(), counts.tolist()):
            self._combo_refs[cid] += c
            if plan is None:
                members = keys[order[s : s + c]]
                for t, field in self._combo_terms[cid]:
                    new.setdefault(t, []).append((members, field))
        if plan is not None:
            for t, (old, done, parts) in plan.merged.items():
                now = self._postings.get(t, _EMPTY)
                self._postings[t] = done if now is old else _merge(now, parts, self._dtype)
            return
        for t, parts in new.items():
            self._postings[t] = _merge(self._postings.get(t, _EMPTY), parts, self._dtype)

    def remove(self, key: int) -> bool:
        """Remove adapter ``key``; returns whether it was there."""
        key = int(key)
        cid = self._combo_of.pop(key)
        if cid == MISSING:
            return False
        for t, _ in self._combo_terms[cid]:
            keys, fields = self._postings[t]
            i = int(np.searchsorted(keys, keys.dtype.type(key)))
            if len(keys) == 1:
                del self._postings[t]
            else:
                self._postings[t] = (np.delete(keys, i), np.delete(fields, i))
        self._unref(cid)
        return True

    def remove_many(self, keys: np.ndarray) -> int:
        """Remove ``keys`` (absent ones ignored) with one pass per touched term; returns how many were removed."""
        keys = np.unique(np.asarray(keys, np.int64).reshape(-1))
        cids = self._combo_of.get_many(keys)
        keys, cids = keys[cids != MISSING], cids[cids != MISSING]
        if len(keys) <= 8:
            return sum(self.remove(int(k)) for k in keys)
        self._combo_of.pop_many(keys)
        gone: dict[str, list[np.ndarray]] = {}
        order = np.argsort(cids, kind="stable")
        ucids, starts, counts = np.unique(cids[order], return_index=True, return_counts=True)
        for cid, s, c in zip(ucids.tolist(), starts.tolist(), counts.tolist()):
            members = keys[order[s : s + c]]
            for t, _ in self._combo_terms[cid]:
                gone.setdefault(t, []).append(members)
            self._unref(cid, c)
        self._delete_postings(gone)
        return len(keys)

    def _delete_postings(self, gone: dict[str, list[np.ndarray]]) -> None:
        """Take each term's ``gone`` keys (present, distinct) out of its posting, found by binary search (``np.isin``
        before 2026-12-07: ~25 us of set-up per posting, ``benchmarks/bench_tag_updates.py``)."""
        for t, parts in gone.items():
            k, f = self._postings[t]
            drop = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if len(drop) >= len(k):
                del self._postings[t]
                continue
            at = np.searchsorted(k, drop.astype(k.dtype))
            self._postings[t] = (np.delete(k, at), np.delete(f, at))

    # ------------------------------------------------------------------ reads
    def tags_of(self, key: int) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """``(domain_tags, skill_tags)`` of ``key`` as added, or ``None``."""
        cid = self._combo_of.get(int(key))
        return None if cid == MISSING else self._combos[cid]

    def tags_of_many(self, keys: np.ndarray) -> list[Combo | None]:
        """:meth:`tags_of` of each of ``keys`` ``[m]`` (one vectorised lookup)."""
        return [None if c == MISSING else self._combos[c] for c in self._combo_of.get_many(keys).tolist()]

    def carrying(self, keys: Sequence[int], names: set[str]) -> list[bool]:
        """Whether each of ``keys`` carries one of ``names`` among its domain or skill tags (absent keys: ``False``);
        one vectorised lookup, then one test per distinct tag combination (few), not per key."""
        cids = self._combo_of.get_many(np.asarray(keys, np.int64)).tolist()
        hit: dict[int, bool] = {MISSING: False}
        out = []
        for cid in cids:
            got = hit.get(cid)
            if got is None:
                dom, skill = self._combos[cid]
                got = hit[cid] = not (names.isdisjoint(dom) and names.isdisjoint(skill))
            out.append(got)
        return out

    def keys(self) -> list[int]:
        return self._combo_of.items()[0].tolist()

    def idf(self, term: str) -> float:
        n, df = len(self), len(self._postings.get(term, _EMPTY)[0])
        return math.log1p((n - df + 0.5) / (df + 0.5))

    def posting_total(self, terms: Sequence[tuple[str, int]]) -> int:
        """Sum of the posting lengths of ``terms`` (the cost of :meth:`score`)."""
        return sum(len(self._postings.get(t, _EMPTY)[0]) for t, _ in terms)

    def match_text(self, text: str) -> list[tuple[str, int]]:
        """Query words found in the tag vocabulary, as ``(term, BOTH)`` pairs."""
        return [(t, BOTH) for t in terms_of(text[:MATCH_TEXT_CHARS]) if t in self._postings]

    def _weights(self, terms: Sequence[tuple[str, int]]) -> tuple[list[float], float]:
        idfs = [self.idf(t) for t, _ in terms]
        return idfs, sum(idfs) or 1.0

    def score(self, terms: Sequence[tuple[str, int]], limit: int | None = None) -> dict[int, float]:
        """Scores in ``[0, 1]`` of every adapter matching at least one term (``limit``: keep the best, best first,
        ties by key).

        Cost: O(sum of the terms' posting lengths), in numpy.
        """
        if not terms:
            return {}
        idfs, total = self._weights(terms)
        ks, ws, lens, fields_of = [], [], [], []
        for (t, want), w in zip(terms, idfs):
            keys, fields = self._postings.get(t, _EMPTY)
            if len(keys):
                ks.append(keys)
                ws.append(w / total)
                lens.append(len(keys))
                # a term asked in both fields is found in its own field wherever it is (every posting has a field)
                fields_of.append(None if want == BOTH else (fields, want, w * CROSS_FIELD_WEIGHT / total))
        if not ks:
            return {}
        gains = np.repeat(np.asarray(ws), lens)  # each term's weight, then its cross-field weight where due
        if any(f is not None for f in fields_of):
            at = 0
            for n, f in zip(lens, fields_of):
                if f is not None:
                    fields, want, cross = f
                    gains[at : at + n][(fields & want) == 0] = cross
                at += n
        if len(ks) == 1:
            keys, vals = ks[0], gains
        else:
            keys, inverse = np.unique(np.concatenate(ks), return_inverse=True)
            vals = np.bincount(inverse, gains, len(keys))  # per key, summed in term order
        if limit is not None and len(keys) > limit:
            best = np.lexsort((keys, -vals))[:limit]  # best score first, ties by key
            keys, vals = keys[best], vals[best]
        return dict(zip(keys.tolist(), vals.tolist()))

    def score_keys(self, terms: Sequence[tuple[str, int]], keys: Iterable[int]) -> dict[int, float]:
        """Scores of the given ``keys`` only (0 for a key matching nothing): :meth:`score`'s, float for float.

        Cost: one lookup of the keys' tag combinations, then the terms of each distinct combination (a few) against
        the query's; independent of the posting lengths (a binary search of every posting the query names cost
        ~60 us per route at 300K adapters, where a long query names 10-20 terms with postings of 100K keys).
        """
        karr = np.fromiter(keys, np.int64) if not isinstance(keys, np.ndarray) else keys.astype(np.int64).reshape(-1)
        if not terms or not len(karr):
            return dict.fromkeys(karr.tolist(), 0.0)
        idfs, total = self._weights(terms)
        asked: dict[str, list[tuple[int, int, float]]] = {}  # term -> [(position in terms, field wanted, idf)]
        for pos, ((t, want), w) in enumerate(zip(terms, idfs)):
            asked.setdefault(t, []).append((pos, want, w))
        memo: dict[int, float] = {}
        out = []
        for cid in self._combo_of.get_many(karr).tolist():
            score = memo.get(cid)
            if score is None:
                hits = []
                if cid != MISSING:
                    for t, bits in self._combo_terms[cid]:
                        for pos, want, w in asked.get(t, ()):
                            hits.append((pos, (w if bits & want else w * CROSS_FIELD_WEIGHT) / total))
                hits.sort()  # summed in the order of ``terms``, as :meth:`score` does
                score = 0.0
                for _, gain in hits:
                    score += gain
                memo[cid] = score
            out.append(score)
        return dict(zip(karr.tolist(), out))

    # ------------------------------------------------------------------ accounting and persistence
    def memory_bytes(self) -> int:
        """Bytes held: the arrays, ~230 B per term (two array headers and a dict slot), ~300 B per combo."""
        post = sum(k.nbytes + f.nbytes + 230 for k, f in self._postings.values())
        return int(post + self._combo_of.nbytes() + 300 * len(self._combo_id))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (``np.savez``-able without pickle): keys, their combo ids, the combos as JSON."""
        keys, cids = self._combo_of.items()
        used = np.unique(cids)
        remap = np.full(len(self._combos), -1, np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        combos = [[list(self._combos[c][0]), list(self._combos[c][1])] for c in used.tolist()]  # type: ignore[index]
        return {"tag_keys": keys, "tag_combos": remap[cids], "tag_combo_json": np.array(json.dumps(combos))}

    @classmethod
    def from_arrays(cls, data: Mapping[str, np.ndarray]) -> TagIndex:
        """Inverse of :meth:`to_arrays` (raises ``ValueError``/``KeyError`` on inconsistent data)."""
        combos = json.loads(str(data["tag_combo_json"]))
        keys, cids = np.asarray(data["tag_keys"], np.int64), np.asarray(data["tag_combos"], np.int64)
        if len(keys) != len(cids) or (len(cids) and (cids.min() < 0 or cids.max() >= len(combos))):
            raise ValueError("tag index arrays disagree")
        out = cls()
        out.add_many((k, combos[c][0], combos[c][1]) for k, c in zip(keys.tolist(), cids.tolist()))
        return out

    def to_json(self) -> dict[str, list]:
        """Plain form: ``{"keys": [...], "domain": [[...]], "skill": [[...]]}``."""
        keys, cids = self._combo_of.items()
        combos = [self._combos[c] for c in cids.tolist()]
        return {"keys": keys.tolist(), "domain": [list(c[0]) for c in combos], "skill": [list(c[1]) for c in combos]}  # type: ignore[index]

    @classmethod
    def from_json(cls, data: Mapping[str, list]) -> TagIndex:
        out = cls()
        out.add_many(zip(data["keys"], data["domain"], data["skill"], strict=True))
        return out


_NO_KEYS = np.zeros(0, np.int32)
_NO_FIELDS = np.zeros(0, np.uint8)
_EMPTY = (_NO_KEYS, _NO_FIELDS)


@dataclass(frozen=True)
class TagPlan:
    """:meth:`TagIndex.plan_add`: the planned rows' ``keys`` (in order), and per term ``(the posting it was merged
    from, the merged posting, the rows' parts: (keys, field))``."""

    keys: np.ndarray
    merged: dict[str, tuple[Posting, Posting, list[tuple[np.ndarray, int]]]]


def _combo_terms(combo: Combo) -> tuple[tuple[str, int], ...]:
    """The index terms of a ``(domain tags, skill tags)`` combination, each with its field bits."""
    bits: dict[str, int] = {}
    for tags, field in ((combo[0], DOMAIN), (combo[1], SKILL)):
        for tag in tags:
            for t in _tag_terms(tag):
                bits[t] = bits.get(t, 0) | field
    return tuple(bits.items())


def _merge(old: Posting, parts: list[tuple[np.ndarray, int]], dtype: type) -> Posting:
    """Posting ``old`` with the keys of ``parts`` (absent from it) merged in, each with its field, sorted by key."""
    k = np.concatenate([old[0].astype(np.int64), *(m for m, _ in parts)])
    f = np.concatenate([old[1], *(np.full(len(m), fl, np.uint8) for m, fl in parts)])
    srt = np.argsort(k, kind="stable")
    return k[srt].astype(dtype), f[srt]
