"""Small pure helpers for text data: hash-based held-out membership, passages, token-window heads."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from smoa.errors import InvalidInputError


def is_held_out(name: str, folds: int = 5) -> bool:
    """Whether the item called ``name`` is in the held-out split: ``int(sha256(name)[:8], 16) % folds == 0``.

    Membership depends only on the name, so adding or removing other items never moves an item between splits.
    """
    if folds < 2:
        raise InvalidInputError(f"`folds` must be >= 2, got {folds!r}")
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % folds == 0


def passages(text: str, max_chars: int = 600, min_chars: int = 80) -> list[str]:
    """Split ``text`` into passages of whole paragraphs, each at most ``max_chars`` characters where possible.

    Paragraphs are separated by blank lines (or single newlines); consecutive paragraphs are joined with a
    newline until adding the next would pass ``max_chars``; a single longer paragraph stays whole. Passages
    shorter than ``min_chars`` are dropped (headlines on their own, bylines).
    """
    if max_chars < 1:
        raise InvalidInputError(f"`max_chars` must be >= 1, got {max_chars!r}")
    paragraphs = [" ".join(p.split()) for p in text.replace("\r", "").split("\n")]
    paragraphs = [p for p in paragraphs if p]
    out: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        if current and size + 1 + len(p) > max_chars:
            out.append("\n".join(current))
            current, size = [], 0
        current.append(p)
        size += len(p) + (1 if size else 0)
    if current:
        out.append("\n".join(current))
    return [x for x in out if len(x) >= min_chars]


def head_tokens(texts: Sequence[str], tokenizer: Any, max_tokens: int) -> list[str]:
    """Each text cut to its first ``max_tokens`` tokens (decoded back to text), for fixed-size evaluation windows."""
    out = []
    for t in texts:
        ids = tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]
        out.append(tokenizer.decode(ids, skip_special_tokens=True))
    return out
