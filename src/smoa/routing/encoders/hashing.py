"""Signed feature hashing of lower-cased words and word bigrams. For tests only: never the default.

It needs no model, is deterministic across processes (crc32, not Python's salted ``hash``) and gives texts that
share words a positive cosine, which is all the unit tests of indexes and strategies need.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


class HashEncoder:
    """Hashing encoder of dimension ``dim``."""

    name = "hash"
    cpu_bound = True

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def _one(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        feats = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        vec = np.zeros(self.dim, dtype=np.float32)
        for f in feats:
            h = zlib.crc32(f.encode())
            vec[h % self.dim] += 1.0 if (h >> 31) & 1 else -1.0
        if not vec.any():
            vec[0] = 1.0  # the empty text (or features that cancel): a fixed unit vector
        return vec

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` ``[n]`` -> float32 ``[n, dim]``, unit norm."""
        from smoa.routing.encoders import l2_normalize

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalize(np.stack([self._one(t) for t in texts]))
