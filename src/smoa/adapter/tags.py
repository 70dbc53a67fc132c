"""Tag normalisation: the one rule by which stored tags and query words are compared.

A tag is compared by its *normal form*::

    normalize_tag(t) = collapse_whitespace(drop_format_chars(NFKC(casefold(NFKC(t)))))

* NFKC folds compatibility forms: full-width ``"ＭＥＤ"`` -> ``"med"``, ligatures, the ideographic space;
* casefold is Unicode lower-casing (``"Straße"`` -> ``"strasse"``);
* format characters (Unicode category ``Cf``: zero-width space, BOM, bidi marks ...) are invisible and dropped;
* runs of spaces (any Unicode space separator) become one ASCII space; the ends are stripped.

Punctuation is kept, so ``"c++"``, ``"c#"`` and ``"c"`` stay three tags, and scripts without letter case
(``"医学"``) pass through unchanged. A tag whose normal form is empty (only spaces or format characters), or which
holds a control character (NUL, tab, newline, ESC ...) or a lone surrogate, is refused.

:func:`terms` splits a normalised text into the words the routing tag index compares (same rule for tags and query
text, see ``/docs`` and ``notes/tags_contract.md``): word characters of any script, a trailing run of ``+``/``#``
kept (``c++``, ``c#``, ``f#``), and scripts written without spaces (Han, Hiragana, Katakana, Hangul, Thai ...)
emitted as single characters *and* adjacent pairs, so the tag ``"医学"`` meets the query ``"我需要医学帮助"``.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence

from smoa.errors import InvalidInputError

MAX_TAG_CHARS = 256
MAX_TAGS = 64

# A word: letters, marks and digits of any script (Unicode categories L*, M*, N*), then an optional run of
# ``+``/``#`` (c++, c#). Marks are word characters so that Devanagari or Arabic words are not cut at vowel signs.
_WORD_CATEGORIES = ("L", "M", "N")
_ASCII_WORD = re.compile(r"[a-z0-9]+[+#]*")  # _words on ASCII text: letters and digits, then a run of + and #
# Scripts written without spaces between words: one regex class, matched per character.
_UNSPACED = re.compile(
    "["
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u1000-\u109f"  # Myanmar
    "\u1780-\u17ff"  # Khmer
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3100-\u312f"  # Bopomofo
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\uac00-\ud7af"  # Hangul syllables
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\U00020000-\U0003134f"  # CJK extensions B-G
    "]"
)


def _check_chars(text: str, field: str, value: str) -> None:
    """Refuse lone surrogates and control characters (tab and newline included)."""
    for ch in text:
        cat = unicodedata.category(ch)
        if cat == "Cs":
            raise InvalidInputError(f"`{field}` value {value[:80]!r} holds a lone surrogate {ch!r}")
        if cat == "Cc":  # NUL, BEL, ESC, and also tab/newline: a tag is one line of text
            raise InvalidInputError(f"`{field}` value {value[:80]!r} holds a control character {ch!r}")


def normalize_tag(text: str, field: str = "tag") -> str:
    """The normal form of one tag (module docstring); may be ``""`` for an invisible tag.

    Args:
        text: the tag as given.
        field: the argument name used in error messages.

    Raises:
        InvalidInputError: ``text`` is not a string, or holds a lone surrogate or a control character.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"`{field}` must be a string, got {text!r:.100} ({type(text).__name__})")
    if text.isascii() and text.isprintable():  # the common case: NFKC is the identity, casefold is lower()
        return " ".join(text.lower().split())
    _check_chars(text, field, text)
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
    visible = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")
    return " ".join(visible.split())


def normalize_tags(tags: Sequence[str], field: str = "tags") -> list[str]:
    """Normalise a list of tags: each through :func:`normalize_tag`, duplicates (after normalisation) dropped.

    Order is kept (first occurrence wins).

    Args:
        tags: a list or tuple of strings (a bare string is refused: it is almost always a mistake).
        field: the argument name used in error messages (``"domain_tags"``, ``"skill_tags"``).

    Raises:
        InvalidInputError: not a list of strings, more than :data:`MAX_TAGS` tags, a tag longer than
            :data:`MAX_TAG_CHARS`, a tag that is empty or invisible (only spaces, format or control characters),
            or one holding a lone surrogate / control character. The message names ``field`` and the value.
    """
    if isinstance(tags, (str, bytes)) or not isinstance(tags, (list, tuple)):
        raise InvalidInputError(f"`{field}` must be a list of strings, got {tags!r:.200}")
    if len(tags) > MAX_TAGS:
        raise InvalidInputError(f"`{field}` holds {len(tags)} tags; at most {MAX_TAGS} are allowed")
    out: dict[str, None] = {}
    for tag in tags:
        if not isinstance(tag, str):
            raise InvalidInputError(f"`{field}` must hold only strings, got {tag!r:.100} ({type(tag).__name__})")
        norm = normalize_tag(tag, field)
        if not norm:
            raise InvalidInputError(f"`{field}` tag {tag[:80]!r} is empty or invisible (only spaces/format characters)")
        if len(norm) > MAX_TAG_CHARS:
            raise InvalidInputError(f"`{field}` tag {tag[:80]!r}... is {len(norm)} characters; at most {MAX_TAG_CHARS}")
        out[norm] = None
    return list(out)


def normalize_text(text: str) -> str:
    """Query text in the same normal form as tags (lone surrogates/control characters are replaced by spaces).

    Unlike :func:`normalize_tag` this never raises: query validation (:func:`smoa.textcheck.validate_query_text`)
    happens where queries enter; here anything unexpected just separates words.
    """
    cleaned = "".join(
        " " if (unicodedata.category(ch) in ("Cs", "Cc") and not ch.isspace()) else ch for ch in text
    )
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", cleaned).casefold())
    visible = "".join(ch for ch in folded if unicodedata.category(ch) != "Cf")
    return " ".join(visible.split())


def _split_unspaced(word: str) -> Iterable[str]:
    """Words of ``word``: runs of unspaced-script characters become unigrams + bigrams, the rest stays whole."""
    start = 0
    pos = 0
    n = len(word)
    while pos < n:
        if _UNSPACED.match(word[pos]):
            if pos > start:
                yield word[start:pos]
            run_start = pos
            while pos < n and _UNSPACED.match(word[pos]):
                pos += 1
            run = word[run_start:pos]
            yield from run
            yield from (run[i : i + 2] for i in range(len(run) - 1))
            start = pos
        else:
            pos += 1
    if start < n:
        yield word[start:]


def terms(text: str) -> list[str]:
    """Words of ``text`` after :func:`normalize_text`, in order, deduplicated (module docstring).

    >>> terms("C++ and ＣＵＤＡ; 医学")
    ['c++', 'and', 'cuda', '医', '学', '医学']
    """
    if text.isascii():  # the common case, in one regex: NFKC is the identity there and casefold is lower()
        return list(dict.fromkeys(_ASCII_WORD.findall(text.lower())))
    seen: dict[str, None] = {}
    for word in _words(normalize_text(text)):
        for t in _split_unspaced(word):
            seen[t] = None
    return list(seen)


def _words(text: str) -> Iterable[str]:
    """Maximal runs of word characters (L*, M*, N*), each followed by its run of ``+``/``#``."""
    buf: list[str] = []
    in_suffix = False
    for ch in text:
        if unicodedata.category(ch)[0] in _WORD_CATEGORIES and not in_suffix:
            buf.append(ch)
        elif ch in "+#" and buf:
            buf.append(ch)
            in_suffix = True
        else:
            if buf:
                yield "".join(buf)
            buf, in_suffix = [], False
            if unicodedata.category(ch)[0] in _WORD_CATEGORIES:
                buf.append(ch)
    if buf:
        yield "".join(buf)


__all__ = ["MAX_TAGS", "MAX_TAG_CHARS", "normalize_tag", "normalize_tags", "normalize_text", "terms"]
