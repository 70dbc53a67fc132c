"""Checks for text that enters smoa from a caller: queries, prompts, forward inputs.

One rule, applied where text enters (the router's ``route``, the facade's ``forward``/``generate``, the HTTP
layer): the value must be a ``str`` that can be encoded as UTF-8 — a lone surrogate such as ``"\\ud800"`` cannot
reach a tokenizer, SQLite or JSON, so it is refused with :class:`~smoa.errors.InvalidInputError` naming the field
and showing the bad value (finding 11 of issue 10). Length is *not* refused here: each consumer cuts text to its
own context (the router to ``MAX_QUERY_CHARS``, the engine to the model's context).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smoa.errors import InvalidInputError


def validate_query_text(text: Any, field: str = "query") -> str:
    """Return ``text`` unchanged if it is a UTF-8-encodable string.

    Args:
        text: the caller's value.
        field: the argument name for the error message (``"query"``, ``"texts[3]"``, ``"prompt"`` ...).

    Raises:
        InvalidInputError: not a string, or holds a lone surrogate (the message shows its position).
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"`{field}` must be a string, got {text!r:.100} ({type(text).__name__})")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInputError(
            f"`{field}` holds a lone surrogate {text[exc.start]!r} at position {exc.start} "
            f"(not valid Unicode text): {text[:80]!r}"
        ) from None
    return text


def validate_texts(texts: Any, field: str = "texts") -> list[str]:
    """A list of texts, each checked by :func:`validate_query_text` (``field[i]`` named on error).

    Raises:
        InvalidInputError: not a list/tuple of strings, or one of them is invalid.
    """
    if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise InvalidInputError(f"`{field}` must be a list of strings, got {texts!r:.100}")
    return [validate_query_text(t, f"{field}[{i}]") for i, t in enumerate(texts)]


__all__ = ["validate_query_text", "validate_texts"]
