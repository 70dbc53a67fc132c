"""Shared pieces of the core tests: a tiny profile, seeded weights, a core opener on the fast hash encoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from smoa.adapter.profile import BaseProfile
from smoa.adapter.weights import LoraWeights
from smoa.config import SMoAConfig
from smoa.core import LibraryCore

TINY = BaseProfile("tiny-core", tuple((f"layers.{i}.{n}", 16, o) for i in range(2) for n, o in (("q", 16), ("v", 8))))
MODULES = ("layers.0.q", "layers.1.v")


def weights(seed: int, rank: int = 2, scale: float = 0.1, like: LoraWeights | None = None, noise: float = 0.0) -> LoraWeights:
    """Seeded factors on :data:`MODULES` (``like`` + ``noise``: a near-duplicate of ``like``)."""
    g = torch.Generator().manual_seed(seed)
    f = {}
    for m in MODULES:
        d_in, d_out = TINY.shape(m)
        if like is None:
            f[m] = (scale * torch.randn(rank, d_in, generator=g), scale * torch.randn(d_out, rank, generator=g))
        else:
            a, b = like.factors[m]
            f[m] = (a + noise * torch.randn(a.shape, generator=g), b + noise * torch.randn(b.shape, generator=g))
    return LoraWeights(f, 2.0 * rank, rank)


def config(path: Path | None, **kw: Any) -> SMoAConfig:
    kw.setdefault("encoder", "hash")
    kw.setdefault("seed", 0)
    kw.setdefault("base_profile", TINY)
    return SMoAConfig(storage_path=path, **kw)


def open_core(path: Path | None, **kw: Any) -> LibraryCore:
    return LibraryCore(config(path, **kw), TINY)


@pytest.fixture
def core(tmp_path: Path):
    c = open_core(tmp_path / "lib")
    yield c
    c.close()
