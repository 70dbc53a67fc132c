"""The pure scoring helpers of :mod:`smoa.routing.strategies`, against plain references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from smoa.routing import strategies


def resolve(keys: list[int]) -> list[str]:
    return [f"a{key:05d}" for key in keys]


def reference_top(scores: dict[int, float], k: int, threshold: float) -> list[tuple[str, float]]:
    """Every finite score >= threshold, sorted best first, ties by id."""
    kept = [(f"a{key:05d}", float(s)) for key, s in scores.items() if math.isfinite(s) and s >= threshold]
    return sorted(kept, key=lambda t: (-t[1], t[0]))[:k]


def test_select_top_is_a_full_sort_cut_at_k() -> None:
    """Ties at the cut, NaN, +-inf, numpy floats, thresholds over every score: the k best by a full sort."""
    rng = np.random.default_rng(0)
    for trial in range(500):
        n = int(rng.integers(0, 40))
        vals = np.round(rng.uniform(-1, 1, n), 1)  # rounded: many ties
        scores: dict[int, float] = {int(key): float(v) for key, v in zip(rng.choice(10_000, n, replace=False), vals)}
        for key in list(scores)[: int(rng.integers(0, 3))]:
            scores[key] = float(rng.choice([np.nan, np.inf, -np.inf]))
        if trial % 3 == 0:
            scores = {key: np.float32(v) for key, v in scores.items()}  # type: ignore[misc]
        k = int(rng.integers(1, 8))
        for threshold in (-math.inf, -0.5, 0.0, 0.6, 2.0):
            assert strategies.select_top(scores, k, threshold, resolve) == reference_top(scores, k, threshold)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.1, 0.3, 0.5, 0.9])
def test_contenders_keep_every_candidate_that_could_be_among_the_k_best_fused(lam: float) -> None:
    """Against fusing every candidate: the same k best at any threshold, with ties, tag scores of exactly 0 and 1,
    and the free gate's drops; something is set aside at the tag weights smoa uses."""
    rng = np.random.default_rng(int(lam * 100))
    pruned = 0
    for trial in range(300):
        n = int(rng.integers(1, 60))
        cos_vals = np.round(rng.uniform(-0.2, 0.9, n), 2)  # rounded: many ties
        cos = {int(key): float(c) for key, c in zip(rng.choice(10_000, n, replace=False), cos_vals)}
        if trial % 5 == 0:  # not finite: never kept by select_top, and must not move the bound
            for key in list(cos)[: int(rng.integers(1, 4))]:
                cos[key] = float(rng.choice([np.nan, np.inf, -np.inf]))
        tag = {key: float(rng.choice([0.0, 1.0, rng.uniform()])) for key in cos}
        drop = {key for key in cos if rng.uniform() < 0.2} if trial % 2 else set()
        k = int(rng.integers(1, 8))
        keep = strategies.contenders(cos, k, lam, drop)
        alive = [key for key in cos if key not in drop]
        if keep is None:
            assert sum(math.isfinite(cos[key]) for key in alive) <= k or lam >= 1.0
            continue
        assert set(keep) <= set(alive)
        pruned += len(alive) - len(keep)
        for threshold in (-np.inf, 0.1, 0.4):
            full = strategies.fuse({key: cos[key] for key in alive}, {key: tag[key] for key in alive}, lam)
            part = strategies.fuse({key: cos[key] for key in keep}, {key: tag[key] for key in keep}, lam)
            assert reference_top(part, k, threshold) == reference_top(full, k, threshold)
    assert pruned > 0 or lam > 0.3  # at 0.9 a cosine 9 behind is still in reach: none set aside here
    assert strategies.contenders({1: 0.5, 2: 0.1}, 1, 1.0) is None  # tags alone decide: no bound
    assert strategies.contenders({1: 0.5, 2: float("nan"), 3: 0.4}, 2, 0.1) is None  # two finite cosines for k = 2
    # a NaN among the candidates does not hide the k-th best finite cosine (0.7 here)
    assert 7 in strategies.contenders({1: 0.9, 2: 0.8, 3: float("nan"), 7: 0.7, 9: 0.0}, 3, 0.1)  # type: ignore[operator]
