"""Near-duplicate search on a planted set, checked against exact all-pairs cosines of the dense updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smoa.adapter.profile import BaseProfile
from smoa.compose.similarity import LoraStack, batched_cosine, sketch_batch
from smoa.optimize.dedup import candidate_pairs, find_near_duplicates, union_find_groups

PROFILE = BaseProfile("toy", (("m0", 24, 16), ("m1", 40, 8)))
THRESHOLD = 0.98


def _planted(n: int, n_dup: int, n_hard: int, seed: int = 0) -> tuple[LoraStack, np.ndarray]:
    """Random rank-2 adapters; the last ``n_dup`` rows perturb earlier ones (cos ~ 0.998), the ``n_hard`` rows
    before them mix two earlier ones 0.75/0.25 (cos ~ 0.95: similar, not duplicates). Returns (stack, sources)."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    base = n - n_dup - n_hard
    factors = {}
    src = rng.choice(base, size=n_dup + n_hard, replace=False)
    other = rng.choice(base, size=n_hard)
    for m, d_in, d_out in PROFILE.modules:
        a = torch.randn(n, 2, d_in, generator=g)
        b = torch.randn(n, d_out, 2, generator=g)
        hard = slice(base, base + n_hard)
        a[hard] = a[src[:n_hard]]  # same A, B mixed: update = B_mix A
        b[hard] = 0.75 * b[src[:n_hard]] + 0.25 * b[other]
        dup = slice(base + n_hard, n)
        a[dup] = a[src[n_hard:]] + 0.04 * torch.randn(n_dup, 2, d_in, generator=g)
        b[dup] = b[src[n_hard:]] + 0.04 * torch.randn(n_dup, d_out, 2, generator=g)
        factors[m] = (a, b)
    return LoraStack(factors, torch.full((n,), 2.0, dtype=torch.float64)), src


def _dense_cosines(stack: LoraStack) -> np.ndarray:
    vecs = torch.cat([(b.double() @ a.double()).reshape(len(stack), -1) for a, b in stack.factors.values()], dim=1)
    vecs = vecs / vecs.norm(dim=1, keepdim=True)
    return (vecs @ vecs.T).numpy()


def _pairs(p: np.ndarray) -> set[tuple[int, int]]:
    return {(int(i), int(j)) for i, j in p}


@pytest.fixture(scope="module")
def planted() -> tuple[LoraStack, set[tuple[int, int]]]:
    stack, _ = _planted(2000, 100, 100)
    cos = _dense_cosines(stack)
    i, j = np.nonzero(np.triu(cos >= THRESHOLD, k=1))
    return stack, _pairs(np.stack([i, j], 1))


def _scorer(stack: LoraStack):
    return lambda i, j: batched_cosine(stack.select(i), stack.select(j)).numpy()


@pytest.mark.parametrize("flat_max", [10_000, 500])  # exact flat search, then the IVF path
def test_precision_and_recall_against_exact_all_pairs(planted, flat_max: int) -> None:
    stack, truth = planted
    assert len(truth) == 100  # every planted duplicate, and no hard negative (those sit at cos 0.88-0.97)
    sk = sketch_batch(stack, PROFILE, dim=64)
    result = find_near_duplicates(sk, _scorer(stack), THRESHOLD, flat_max=flat_max, neighbours=8)
    found = _pairs(result.pairs)
    recall = len(found & truth) / len(truth)
    precision = len(found & truth) / max(len(found), 1)
    assert recall >= 0.95 and precision >= 0.99, (recall, precision)
    assert result.candidates < 20 * len(truth)  # far from N^2 / 2 = 2M pairs
    assert all(g.size >= 2 for g in result.groups) and set(result.timings) == {"search", "verify", "group"}


def test_partitions_are_never_paired(planted) -> None:
    stack, truth = planted
    sk = sketch_batch(stack, PROFILE)
    labels = np.arange(len(stack)) % 2  # splits most planted pairs across partitions
    result = find_near_duplicates(sk, _scorer(stack), THRESHOLD, partition=labels)
    assert all(labels[i] == labels[j] for i, j in result.pairs)
    same = {p for p in truth if labels[p[0]] == labels[p[1]]}
    assert len(_pairs(result.pairs) & same) >= 0.95 * len(same)


def test_zero_sketches_are_ignored() -> None:
    sk = np.zeros((5, 8), np.float32)
    sk[0, 0] = sk[1, 0] = 1.0
    pairs, cos = candidate_pairs(sk, neighbours=4, min_cosine=0.5)
    assert _pairs(pairs) == {(0, 1)} and cos[0] == pytest.approx(1.0)


def _bfs_components(n: int, pairs: list[tuple[int, int]]) -> list[list[int]]:
    adj: dict[int, set[int]] = {}
    for i, j in pairs:
        adj.setdefault(i, set()).add(j)
        adj.setdefault(j, set()).add(i)
    seen: set[int] = set()
    comps = []
    for s in sorted(adj):
        if s in seen:
            continue
        comp, todo = [], [s]
        seen.add(s)
        while todo:
            v = todo.pop()
            comp.append(v)
            for w in adj[v] - seen:
                seen.add(w)
                todo.append(w)
        comps.append(sorted(comp))
    return comps


def test_union_find_matches_bfs_components() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = 60
        pairs = rng.integers(0, n, size=(rng.integers(0, 50), 2))
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        got = sorted(g.tolist() for g in union_find_groups(n, pairs))
        assert got == sorted(_bfs_components(n, [tuple(p) for p in pairs.tolist()]))
