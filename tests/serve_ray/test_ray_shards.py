"""The sharded routing index: fan-out over Ray actors + top-k merge equals one index over all keys."""

from __future__ import annotations

import numpy as np
import pytest

from smoa.errors import InvalidInputError
from smoa.routing.index.vector import IndexParams, VectorIndex
from smoa.serve.ray_shards import ShardedIndex, merge_topk


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_merge_topk_keeps_the_best_across_lists_and_pads() -> None:
    a = (np.array([[0.9, 0.5]], np.float32), np.array([[1, 2]]))
    b = (np.array([[0.7, -np.inf]], np.float32), np.array([[3, -1]]))
    scores, keys = merge_topk([a, b], 3)
    assert keys.tolist() == [[1, 3, 2]]
    assert scores[0].tolist() == pytest.approx([0.9, 0.7, 0.5])
    scores, keys = merge_topk([b], 3)
    assert keys.tolist() == [[3, -1, -1]] and np.isneginf(scores[0, 1:]).all()


def test_merge_topk_refuses_no_parts() -> None:
    with pytest.raises(InvalidInputError, match="parts"):
        merge_topk([], 3)


def test_sharded_search_equals_one_exact_index(local_ray: None) -> None:
    rng = np.random.default_rng(0)
    n, d, k = 3000, 32, 5
    keys = rng.permutation(10 * n)[:n].astype(np.int64)
    vectors = _unit(rng, n, d)
    params = IndexParams(exact_threshold=10 * n)  # flat shards: exact answers, so the merge must be exact too
    reference = VectorIndex.build(d, keys, vectors, params)
    sharded = ShardedIndex(d, num_shards=3, params=params)
    try:
        counts = sharded.build(keys, vectors)
        assert sum(counts) == n and min(counts) > 0
        queries = _unit(rng, 20, d)
        want_s, want_k = reference.search(queries, k)
        got_s, got_k = sharded.search(queries, k)
        assert np.array_equal(got_k, want_k)
        np.testing.assert_allclose(got_s, want_s, rtol=1e-5)
        # removals and additions reach the right shard
        gone = want_k[:, 0]
        assert sharded.remove(gone) == len(np.unique(gone))
        reference.remove(gone)
        extra_keys = np.arange(10 * n, 10 * n + 50, dtype=np.int64)
        extra = _unit(rng, 50, d)
        sharded.add(extra_keys, extra)
        reference.add(extra_keys, extra)
        assert np.array_equal(sharded.search(queries, k)[1], reference.search(queries, k)[1])
        assert sum(s["keys"] for s in sharded.stats()) == len(reference)
        with pytest.raises(InvalidInputError, match="queries"):
            sharded.search(np.zeros((1, d + 1), np.float32), k)
    finally:
        sharded.close()


def test_an_hnsw_shard_past_a_quarter_dead_is_compacted_beside_its_searches(local_ray: None) -> None:
    """Removing over a quarter of an HNSW shard's keys leaves its dead positions to a compaction on a copy, by a
    background thread of the actor: searches answer the same before and after it, and afterwards no shard holds a
    dead position."""
    import time

    rng = np.random.default_rng(2)
    n, d, k = 3000, 32, 5
    keys = np.arange(n, dtype=np.int64)
    vectors = _unit(rng, n, d)
    params = IndexParams(exact_threshold=100, ef_search=512)  # HNSW shards of 1,000 keys, a beam wide enough
    sharded = ShardedIndex(d, num_shards=3, params=params)
    try:
        sharded.build(keys, vectors)
        assert {s["kind"] for s in sharded.stats()} == {"hnsw-sq8"}
        gone = keys[: int(0.4 * n)]
        assert sharded.remove(gone) == len(gone)
        kept = keys[len(gone) :]
        reference = VectorIndex.build(d, kept, vectors[kept], IndexParams(exact_threshold=10 * n))
        queries = _unit(rng, 20, d)
        want = reference.search(queries, k)[1]
        before = sharded.search(queries, k)[1]
        deadline = time.monotonic() + 60
        while any(s["dead"] for s in sharded.stats()) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = sharded.stats()
        assert all(s["dead"] == 0 for s in stats) and sum(s["keys"] for s in stats) == len(kept)
        assert np.array_equal(sharded.search(queries, k)[1], before)  # the same codes, a beam over every key
        assert np.array_equal(before[:, 0], want[:, 0])  # (8-bit codes may swap near ties further down)
    finally:
        sharded.close()
