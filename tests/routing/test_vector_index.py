"""Vector index: exact below the threshold, HNSW-SQ8 recall against brute force, updates, persistence."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from smoa.routing.encoders import l2_normalize
from smoa.routing.index import IndexParams, VectorIndex


def clustered(n: int, dim: int = 64, centers: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = l2_normalize(rng.standard_normal((centers, dim)))
    return l2_normalize(c[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 3)


def brute(x: np.ndarray, keys: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    sims = q @ x.T
    return keys[np.argsort(-sims, axis=1, kind="stable")[:, :k]]


def test_flat_is_exact() -> None:
    x = clustered(500)
    keys = np.arange(1000, 1500)
    idx = VectorIndex.build(64, keys, x)
    assert idx.kind == "flat" and len(idx) == 500
    q = clustered(20, seed=1)
    scores, got = idx.search(q, 5)
    np.testing.assert_array_equal(got, brute(x, keys, q, 5))
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :5], rtol=1e-5)


def test_hnsw_recall_against_brute_force() -> None:
    x = clustered(4000)
    keys = np.arange(4000) * 3
    idx = VectorIndex.build(64, keys, x, IndexParams(exact_threshold=1000))
    assert idx.kind == "hnsw-sq8"
    q = clustered(200, seed=2)
    ref = brute(x, keys, q, 5)
    recalls = []
    for ef in (16, 256):  # this data is hard for HNSW (wide clusters, many near ties): recall grows with ef
        _, got = idx.search(q, 5, ef_search=ef)
        recalls.append(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got, ref)]))
    assert recalls[0] < recalls[1] and recalls[1] >= 0.95, recalls


@pytest.mark.parametrize("threshold", [10_000, 100])
def test_add_remove_replace(threshold: int) -> None:
    x = clustered(600)
    idx = VectorIndex.build(64, np.arange(300), x[:300], IndexParams(exact_threshold=threshold))
    idx.add(np.arange(300, 600), x[300:])
    assert len(idx) == 600
    assert idx.remove(np.array([0, 1, 2, 9999])) == 3
    assert len(idx) == 597
    q = x[:3]
    _, got = idx.search(q, 10)
    assert not set(got.ravel()) & {0, 1, 2}
    # replacing key 5 with the vector of key 400: a query for that vector finds both, 5 at the top score
    idx.add(np.array([5]), x[400:401])
    assert len(idx) == 597
    scores, got = idx.search(x[400:401], 2)
    assert set(got[0]) == {5, 400}
    # remove enough to trigger compaction: no dead positions left
    idx.remove(np.arange(100, 400))
    assert len(idx) == 297 and idx._dead == 0
    _, got = idx.search(x[450:451], 1)
    assert got[0, 0] == 450


def test_grows_from_flat_to_hnsw() -> None:
    x = clustered(700)
    idx = VectorIndex.build(64, np.arange(400), x[:400], IndexParams(exact_threshold=500))
    assert idx.kind == "flat"
    idx.add(np.arange(400, 700), x[400:])
    assert idx.kind == "hnsw-sq8" and len(idx) == 700
    _, got = idx.search(x[650:651], 1)
    assert got[0, 0] == 650


def test_allowed_restricts_search() -> None:
    x = clustered(300)
    for params in (IndexParams(), IndexParams(exact_threshold=100)):
        idx = VectorIndex.build(64, np.arange(300), x, params)
        allowed = np.arange(0, 300, 7)
        _, got = idx.search(x[:5], 3, allowed=allowed)
        assert set(got.ravel()) <= set(allowed)


def test_empty_index_search_pads() -> None:
    scores, keys = VectorIndex(16).search(np.ones((1, 16), np.float32) / 4, 3)
    assert keys.tolist() == [[-1, -1, -1]] and np.isneginf(scores).all()


def test_save_load_roundtrip(tmp_path: Path) -> None:
    x = clustered(2000)
    for params in (IndexParams(), IndexParams(exact_threshold=500)):
        idx = VectorIndex.build(64, np.arange(2000), x, params)
        idx.remove(np.array([3, 4]))
        idx.save(tmp_path)
        back = VectorIndex.load(tmp_path, 64, params)
        assert back.kind == idx.kind and len(back) == len(idx)
        q = clustered(10, seed=5)
        np.testing.assert_array_equal(back.search(q, 5)[1], idx.search(q, 5)[1])


def test_memory_per_vector_hnsw() -> None:
    dim = 384
    x = clustered(3000, dim=dim)
    idx = VectorIndex.build(dim, np.arange(3000), x, IndexParams(exact_threshold=100))
    per = idx.memory_bytes() / len(idx)
    assert per < 600, per


def test_auto_ef_search_widens_with_size() -> None:
    from smoa.routing.index.vector import auto_ef_search

    efs = [auto_ef_search(n) for n in (1_000, 10_000, 100_000, 1_000_000, 10**9)]
    assert efs == sorted(efs) and efs[1] == 48 and efs[2] == 96 and efs[3] == 192 and efs[-1] == 256
    idx = VectorIndex.build(64, np.arange(3000), clustered(3000), IndexParams(exact_threshold=100))
    assert idx.ef_search == 48
    assert VectorIndex(64, IndexParams(ef_search=20)).ef_search == 20


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "never"
    return text[text.index("[") + 1 : text.index("]")]


def _huge_kb_of(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that holds ``address``."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    inside = False
    for line in lines:
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(h, 16) for h in head.split("-"))
            inside = lo <= address < hi
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_large_hnsw_arrays_are_backed_by_huge_pages_and_search_the_same(monkeypatch) -> None:
    """The HNSW codes and links are advised onto 2 MB pages (when the kernel allows transparent huge pages) as the
    index is built, grows and is loaded; the advice changes no result."""
    import smoa.routing.index.vector as vector_mod

    # THP off: refused. On: usually taken, but MADV_COLLAPSE may fail at that moment (no free 2 MB pages: EAGAIN;
    # a page the collapse scan could not take: EINVAL, seen once each in the full suite), so three fresh buffers
    for _ in range(3):
        buf = np.ones(64 << 20, np.uint8)  # a plain 64 MB buffer: the advice itself
        took = vector_mod._advise_huge(buf.ctypes.data, buf.nbytes)
        if took:
            break
    assert not took or _thp_mode() != "never"
    if not took and _thp_mode() != "never":  # refused three times: the kernel must refuse a direct call too
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes, libc.madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        start = (buf.ctypes.data + 4095) & ~4095
        assert libc.madvise(start, 32 << 20, vector_mod.MADV_COLLAPSE) != 0, "the kernel took what _advise_huge refused"
    if took:
        assert _huge_kb_of(buf.ctypes.data + (32 << 20)) >= 2048
    assert not vector_mod._advise_huge(buf.ctypes.data, 1 << 20)  # small arrays are left alone

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = VectorIndex.build(32, np.arange(3000), x[:3000], IndexParams(exact_threshold=1000, ef_search=64))
    q = x[3000:3020]
    before = index.search(q, 5)
    monkeypatch.setattr(vector_mod, "HUGE_PAGE_MIN_BYTES", 0)
    index._advise()
    assert set(index._advised) == {"codes", "links"} and index._advised["codes"][1] == 3000 * 32
    for a, b in zip(before, index.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    first = dict(index._advised)
    index.add(np.arange(3000, 4000), x[3000:])  # grew by a third: advised again
    assert index._advised["codes"][1] == 4000 * 32 and index._advised != first


def test_a_loaded_hnsw_index_is_advised_too(tmp_path: Path, monkeypatch) -> None:
    import smoa.routing.index.vector as vector_mod

    monkeypatch.setattr(vector_mod, "HUGE_PAGE_MIN_BYTES", 0)
    x = clustered(3000, dim=32)
    index = VectorIndex.build(32, np.arange(3000), x, IndexParams(exact_threshold=1000))
    index.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, 32, IndexParams(exact_threshold=1000))
    assert loaded.kind == "hnsw-sq8" and set(loaded._advised) == {"codes", "links"}
    assert loaded._advised["codes"][1] == 3000 * 32


def test_hnsw_walks_byte_codes_and_scores_the_float_query_on_their_decoded_vectors() -> None:
    """The graph is walked on one affine 8-bit code of every dimension (query coded too); the scores returned are
    the float query's inner products with the decoded keys, which faiss' own exact search over those decoded keys
    (an independent reference) ranks the same way at a wide beam."""
    import faiss

    from smoa.routing.index.vector import ByteCodec

    x = clustered(3000)
    idx = VectorIndex.build(64, np.arange(3000) * 2, x, IndexParams(exact_threshold=1000))
    assert idx.kind == "hnsw-sq8" and isinstance(idx._codec, ByteCodec)
    keys, decoded = idx.items()
    assert idx._codec.lo == x.min() and idx._codec.lo + 255 / idx._codec.scale == pytest.approx(x.max())
    assert np.abs(decoded - x).max() <= 0.5 / idx._codec.scale + 1e-6  # half a step of the shared range
    np.testing.assert_array_equal(idx._codec.encode(decoded), idx._codec.encode(x))
    ref = faiss.IndexFlatIP(64)
    ref.add(decoded)
    q = clustered(100, seed=7)
    want_s, want_p = ref.search(q, 5)
    got_s, got_k = idx.search(q, 5, ef_search=512)
    hit = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(got_k, keys[want_p])])
    assert hit >= 0.95, hit  # the query is coded too: 0.968 here (the per-dimension codes: 0.982 against x)
    same = got_k == keys[want_p]
    np.testing.assert_allclose(got_s[same], want_s[same], rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(got_s, axis=1) <= 0)  # best first
    for row in range(3):  # every returned score is the inner product with that key's decoded vector
        np.testing.assert_allclose(got_s[row], decoded[got_k[row] // 2] @ q[row], rtol=1e-5, atol=1e-6)


def test_compaction_keeps_the_byte_codes() -> None:
    x = clustered(3000)
    idx = VectorIndex.build(64, np.arange(3000), x, IndexParams(exact_threshold=1000))
    codec = idx._codec
    _, before = idx.vectors_of(np.arange(1000, 3000))
    idx.remove(np.arange(1000))  # a third dead: compacted
    assert idx._dead == 0 and idx._codec == codec
    keys, after = idx.items()
    assert keys.tolist() == list(range(1000, 3000))
    np.testing.assert_array_equal(after, before)


def test_an_index_saved_with_per_dimension_codes_still_loads_and_searches_as_before(tmp_path: Path) -> None:
    """Files written before the byte codes (faiss QT_8bit, inner product, no codec.npy) are searched as they were."""
    import faiss

    x = clustered(2000)
    old = faiss.IndexHNSWSQ(64, faiss.ScalarQuantizer.QT_8bit, 16, faiss.METRIC_INNER_PRODUCT)
    old.hnsw.efConstruction = 128
    old.train(x)
    old.add(x)
    faiss.write_index(old, str(tmp_path / "vectors.faiss"))
    np.save(tmp_path / "ids.npy", np.arange(2000, dtype=np.int64) + 7)
    np.save(tmp_path / "alive.npy", np.ones(2000, bool))
    idx = VectorIndex.load(tmp_path, 64, IndexParams(exact_threshold=500, ef_search=64))
    assert idx.kind == "hnsw-sq8" and idx._codec is None
    q = clustered(20, seed=3)
    want_s, want_p = old.search(q, 5, params=faiss.SearchParametersHNSW(efSearch=64))
    got_s, got_k = idx.search(q, 5)
    np.testing.assert_array_equal(got_k, want_p + 7)
    np.testing.assert_array_equal(got_s, want_s)
    idx.compact()  # its next rebuild moves it to byte codes
    assert idx._codec is not None and len(idx) == 2000


def test_a_byte_coded_index_without_its_codec_is_refused(tmp_path: Path) -> None:
    from smoa.routing.index.vector import CODEC_FILE

    idx = VectorIndex.build(64, np.arange(1500), clustered(1500), IndexParams(exact_threshold=500))
    assert CODEC_FILE in idx.save(tmp_path)
    np.save(tmp_path / CODEC_FILE, np.array([0.0, -1.0]))
    with pytest.raises(ValueError, match="scale=-1.0"):
        VectorIndex.load(tmp_path, 64, IndexParams(exact_threshold=500))
    (tmp_path / CODEC_FILE).unlink()
    with pytest.raises(OSError):
        VectorIndex.load(tmp_path, 64, IndexParams(exact_threshold=500))


@pytest.mark.parametrize("threshold", [10_000, 500])
def test_scores_of_is_the_inner_product_with_the_stored_vectors(threshold: int) -> None:
    x = clustered(1500)
    idx = VectorIndex.build(64, np.arange(1500) * 5, x, IndexParams(exact_threshold=threshold))
    q = clustered(1, seed=9)[0]
    ask = np.array([10, 25, 7, 995, 1_000_000])  # 7 and 1,000,000 are not keys
    found, sims = idx.scores_of(ask, q)
    want_keys, vecs = idx.vectors_of(ask)
    np.testing.assert_array_equal(found, want_keys)
    assert sorted(found.tolist()) == [10, 25, 995]
    np.testing.assert_allclose(sims, vecs @ q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threshold", [10_000, 500])
def test_scores_of_gives_a_key_the_same_bits_whatever_else_is_asked(threshold: int) -> None:
    """A route's serial path and its side-thread path ask the tag side's candidates in different batches, and their
    fused scores must agree float for float; BLAS sums a row in another order by where it falls in its blocks."""
    x = clustered(1500)
    idx = VectorIndex.build(64, np.arange(1500), x, IndexParams(exact_threshold=threshold))
    q = clustered(1, seed=9)[0]
    alone = dict(zip(*idx.scores_of(np.arange(1500), q)))
    rng = np.random.default_rng(3)
    for m in [*range(1, 40), 63, 64, 65, 127, 200]:
        found, sims = idx.scores_of(rng.choice(1500, m, replace=False), q)
        assert [alone[k] for k in found.tolist()] == sims.tolist(), m


def test_the_byte_codes_view_follows_the_codes_as_the_index_grows() -> None:
    """Searches read faiss' code array in place; an insert may move that array, and the scores after it must still
    be those of the stored vectors (a stale view would read freed memory)."""
    x = clustered(12_000)
    idx = VectorIndex.build(64, np.arange(2000), x[:2000], IndexParams(exact_threshold=500))
    q = x[100:101]
    idx.search(q, 5)
    view = idx._codes()
    for start in range(2000, 12_000, 2500):  # grows the faiss vector several times over
        idx.add(np.arange(start, start + 2500), x[start : start + 2500])
        scores, keys = idx.search(q, 8, ef_search=128)
        found, vecs = idx.vectors_of(keys[0])  # in position order
        want = dict(zip(found.tolist(), (vecs @ q[0]).tolist()))
        np.testing.assert_allclose(scores[0], [want[k] for k in keys[0].tolist()], rtol=1e-5, atol=1e-6)
        assert keys[0, 0] == 100
    assert idx._codes().shape == (12_000, 64) and idx._codes() is not view


def test_a_non_finite_vector_is_refused_before_anything_changes() -> None:
    x = clustered(1500)
    idx = VectorIndex.build(64, np.arange(1500), x, IndexParams(exact_threshold=500))
    bad = x[:2].copy()
    bad[1, 7] = np.nan
    with pytest.raises(ValueError, match="row 1, column 7"):
        idx.add(np.array([3, 5000]), bad)  # key 3 exists: it must not be dropped by the refused replacement
    assert len(idx) == 1500 and idx.search(x[3:4], 1)[1][0, 0] == 3
    with pytest.raises(ValueError, match="finite"):
        VectorIndex.build(64, np.arange(2), np.full((2, 64), np.inf, np.float32))


def _single_threaded_build(x: np.ndarray, keys: np.ndarray, params: IndexParams) -> VectorIndex:
    """faiss inserts into its HNSW graph from several threads (the graph then depends on the schedule); one thread
    builds the same graph every time."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return VectorIndex.build(x.shape[1], keys, x, params)
    finally:
        faiss.omp_set_num_threads(threads)


def test_the_locality_layout_changes_where_keys_sit_not_what_a_search_finds(tmp_path: Path) -> None:
    """A big HNSW build lays its keys out by k-means clusters (near keys near each other in memory); the graph is
    the same, so every search finds the same keys with the same scores as in build order, also after updates, a
    compaction and a reload."""
    x = clustered(3000, dim=32, centers=40)
    keys = np.arange(3000) * 2 + 7
    plain = _single_threaded_build(x, keys, IndexParams(exact_threshold=1000, layout_min_keys=10**9, ef_search=48))
    laid = _single_threaded_build(x, keys, IndexParams(exact_threshold=1000, layout_min_keys=1000, ef_search=48))
    assert plain.kind == laid.kind == "hnsw-sq8"
    np.testing.assert_array_equal(plain._ids[: plain._n], keys)  # build order
    perm = np.searchsorted(keys, laid._ids[: laid._n])  # position -> row of x
    np.testing.assert_array_equal(np.sort(perm), np.arange(3000))  # a permutation
    assert not np.array_equal(perm, np.arange(3000))  # moved
    # near keys sit near each other: a key's nearest neighbour is a few hundred positions away, not ~n/3
    pos_of = np.empty(3000, np.int64)
    pos_of[perm] = np.arange(3000)
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    nn = sims.argmax(1)
    assert np.median(np.abs(pos_of - pos_of[nn])) < 3000 / 20
    assert np.median(np.abs(np.arange(3000) - nn)) > 3000 / 5

    q = clustered(100, dim=32, centers=40, seed=5)

    def same(a: VectorIndex, b: VectorIndex) -> None:
        for x1, x2 in zip(a.search(q, 8), b.search(q, 8)):
            np.testing.assert_array_equal(x1, x2)

    same(plain, laid)
    for index in (plain, laid):
        assert index.remove(keys[:100]) == 100
        index.add(np.arange(10_000, 10_050), clustered(50, dim=32, centers=40, seed=6))
        index.add(keys[100:110], x[:10])  # replaced
    same(plain, laid)
    found, vecs = laid.vectors_of(keys[100:110])
    order = np.argsort(found)
    np.testing.assert_array_equal(found[order], keys[100:110])
    np.testing.assert_allclose(vecs[order], x[:10], atol=0.02)  # the replacing vectors, through their byte codes
    laid.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, 32, IndexParams(exact_threshold=1000, ef_search=48))
    same(laid, loaded)


def test_a_compaction_lays_the_keys_out_again() -> None:
    x = clustered(2400, dim=32, centers=30)
    index = VectorIndex.build(32, np.arange(2400), x, IndexParams(exact_threshold=1000, layout_min_keys=1000))
    assert index.remove(np.arange(0, 2400, 2)) == 1200  # past a quarter dead: compacted
    assert index._dead == 0 and len(index) == 1200 and index.kind == "hnsw-sq8"
    kept = np.arange(1, 2400, 2)
    live = index.live_ids()
    assert sorted(live.tolist()) == kept.tolist() and not np.array_equal(live, kept)  # laid out, not in key order
    _, got = index.search(x[kept[:50]], 1, ef_search=64)
    assert np.mean(got[:, 0] == kept[:50]) >= 0.95


def test_an_index_grown_a_few_keys_at_a_time_is_laid_out_from_a_snapshot(tmp_path: Path) -> None:
    """Keys appended after the last build are laid out by :meth:`VectorIndex.laid_out` once they make over a quarter
    of the index: a new index from a copy, the same graph, so the same results; the count persists."""
    x = clustered(2000, dim=32, centers=40)
    params = IndexParams(exact_threshold=500, layout_min_keys=1000, ef_search=48)
    index = VectorIndex.build(32, np.arange(600), x[:600], params)  # HNSW, too small for a layout
    assert index.kind == "hnsw-sq8" and index._laid == 0 and not index.layout_due()
    for s in range(600, 2000, 100):
        index.add(np.arange(s, s + 100), x[s : s + 100])
    assert index.remove(np.arange(0, 40)) == 40
    assert index.layout_due()
    q = clustered(60, dim=32, centers=40, seed=7)
    before = index.search(q, 8)
    snapshot = index.layout_snapshot()
    index_before = (index._ids[: index._n].copy(), index.version)
    laid = index.laid_out(snapshot)
    np.testing.assert_array_equal(index._ids[: index._n], index_before[0])  # the original is untouched
    assert index.version == index_before[1]
    assert laid is not index and laid._laid == laid._n == 2000 and len(laid) == 1960 and not laid.layout_due()
    assert sorted(laid.live_ids().tolist()) == list(range(40, 2000))
    assert not np.array_equal(laid.live_ids(), np.arange(40, 2000))  # moved
    for a, b in zip(before, laid.search(q, 8)):
        np.testing.assert_array_equal(a, b)
    back = laid.permuted(laid.layout_snapshot(), np.argsort(laid._ids[: laid._n]))  # key order again
    assert back._sorted and back._laid == 0 and back.layout_due() and not laid._sorted
    np.testing.assert_array_equal(back.live_ids(), np.arange(40, 2000))
    for a, b in zip(before, back.search(q, 8)):
        np.testing.assert_array_equal(a, b)
    laid.add(np.arange(5000, 5100), clustered(100, dim=32, centers=40, seed=8))
    assert not laid.layout_due()  # 100 of 2,100 appended since
    laid.save(tmp_path)
    loaded = VectorIndex.load(tmp_path, 32, params)
    assert loaded._laid == 2000
    for a, b in zip(laid.search(q, 8), loaded.search(q, 8)):
        np.testing.assert_array_equal(a, b)
    np.save(tmp_path / "layout.npy", np.array([5000], np.int64))
    with pytest.raises(ValueError, match="layout.npy"):
        VectorIndex.load(tmp_path, 32, params)
    (tmp_path / "layout.npy").unlink()  # saved before the layout existed: none laid out
    assert VectorIndex.load(tmp_path, 32, params)._laid == 0


@pytest.mark.parametrize("threshold", [10_000, 500])
def test_staged_keys_stay_hidden_until_revealed_then_search_as_added_ones(threshold: int) -> None:
    """Keys staged (what an adaptation's swap inserts ahead of its one hold of the router's lock) are not searched,
    looked up or counted; revealed, they replace their ids' keys and the ``replaced`` ones in one step, and the
    index searches as one where they were added (flat: exactly; HNSW: the same graph, so the same results)."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # one thread: two graphs built from the same inserts are the same graph
    try:
        x = clustered(1200)
        params = IndexParams(exact_threshold=threshold)
        staged, added = (VectorIndex.build(64, np.arange(800), x[:800], params) for _ in range(2))
        new = np.arange(100, 300)  # replaces keys 100..299; keys 300..349 are replaced by none (``replaced``)
        gen = staged.staged_generation
        pos = staged.stage(new, x[800:1000])
        assert len(staged) == 800 and list(pos) == list(range(800, 1000))
        q = x[800:1000:10]
        before, _ = VectorIndex.build(64, np.arange(800), x[:800], params).search(q, 5)
        scores, got = staged.search(q, 5)
        np.testing.assert_array_equal(scores, before)  # the old keys, as if nothing were staged
        np.testing.assert_array_equal(staged.vectors_of(np.array([150]))[1], staged._reconstruct_positions(
            np.array([150])))  # fmt: skip
        assert staged.live_ids().tolist() == list(range(800))

        assert staged.reveal(gen, pos, np.arange(300, 350))
        added.add(new, x[800:1000])
        added.remove(np.arange(300, 350))
        assert len(staged) == len(added) == 750 and not staged.reveal(gen, pos, [])  # revealed once only
        assert sorted(staged.live_ids().tolist()) == sorted(added.live_ids().tolist())
        for a, b in zip(staged.search(x[::7], 5), added.search(x[::7], 5)):
            np.testing.assert_array_equal(a, b)
        if staged.kind == "flat":
            keep = np.r_[0:100, 300:800]
            ref_x, ref_keys = np.concatenate([x[keep], x[800:1000]]), np.r_[keep, new]
            ref_x, ref_keys = ref_x[~np.isin(ref_keys, np.arange(300, 350))], ref_keys[~np.isin(ref_keys,
                                                                                              np.arange(300, 350))]
            np.testing.assert_array_equal(staged.search(x[::7], 5)[1], brute(ref_x, ref_keys, x[::7], 5))
        staged.settle()  # 250 dead of 1,000 positions: not yet a quarter
        assert staged._dead == 250
    finally:
        faiss.omp_set_num_threads(threads)


@pytest.mark.parametrize("threshold", [10_000, 100])
@pytest.mark.parametrize("removed", [0, 40])
def test_staging_hides_its_keys_and_keeps_the_dead_positions_selector(threshold: int, removed: int) -> None:
    """Staged keys lie past the dead positions' bitmap, which faiss reads as outside it: an index that already had
    dead positions keeps its selector (routes between two staging holds do not pack the bitmap again), one that had
    none builds it; either way no search returns a staged key, not even the query's own copy."""
    x = clustered(700)
    idx = VectorIndex.build(64, np.arange(500), x[:500], IndexParams(exact_threshold=threshold))
    idx.remove(np.arange(removed))
    q = x[500:560]
    live = np.arange(removed, 500)
    idx.search(q, 5)
    selector = idx._selector(None)
    assert (selector is None) == (removed == 0)
    for lo in range(500, 560, 20):  # three holds' worth, each staging the queries' own vectors
        idx.stage(np.arange(lo, lo + 20) + 1000, x[lo : lo + 20])
        if removed:
            assert idx._selector(None) is selector
        scores, got = idx.search(q, 5)
        assert np.isin(got, live).all() and (scores < 0.999).all()
        if idx.kind == "flat":
            np.testing.assert_array_equal(got, brute(x[live], live, q, 5))
    assert idx._selector(None) is not None and idx._dead == removed + 60


def test_a_copy_made_beside_changes_catches_up_through_the_journal() -> None:
    """What ``Router.compact_index`` does with an index: ``remove(compact=False)`` leaves an HNSW index past a quarter
    of dead positions as it is (a flat one is still compacted in place); a copy of its live rows, taken in blocks
    while keys are added, replaced, removed and staged then revealed, then compacted and replayed with the journal,
    holds exactly what the index holds, with no dead position but those the journal removed; a rebuild in place
    meanwhile makes the journal unusable."""
    x = clustered(1400)
    params = IndexParams(exact_threshold=100, ef_search=512)
    idx = VectorIndex.build(64, np.arange(1000), x[:1000], params)
    idx.remove(np.arange(300), compact=False)
    assert idx.kind != "flat" and idx.compact_due() and idx._dead == 300
    flat = VectorIndex.build(64, np.arange(50), x[:50], IndexParams(exact_threshold=100))
    flat.remove(np.arange(20), compact=False)
    assert flat._dead == 0 and len(flat) == 30

    n0 = idx.begin_copy()
    k1, v1 = idx.copy_rows(0, 500)
    idx.add(np.arange(1000, 1100), x[1000:1100])  # new
    idx.add(np.arange(500, 520), x[1100:1120])  # replaced, in the part not copied yet
    idx.add(np.arange(300, 310), x[1120:1130])  # replaced, in the part copied
    idx.remove(np.arange(600, 650), compact=False)
    gen, pos = idx.staged_generation, idx.stage(np.arange(2000, 2040), x[1130:1170])
    assert idx.reveal(gen, pos, np.arange(700, 705))
    k2, v2 = idx.copy_rows(500, n0)
    copy = VectorIndex.compacted(idx, np.concatenate([k1, k2]), np.concatenate([v1, v2]))
    assert copy._codec is idx._codec and copy._dead == 0
    journal = idx.take_journal()
    assert copy.replay(journal) == 100 + 20 + 10 + 40 and idx.take_journal() == []
    idx.remove(np.arange(800, 810), compact=False)  # after the first round: the next one
    copy.replay(idx.take_journal())
    assert sorted(copy.live_ids().tolist()) == sorted(idx.live_ids().tolist())
    keys = idx.live_ids()
    np.testing.assert_array_equal(copy.vectors_of(keys)[1], idx.vectors_of(keys)[1])
    assert copy._dead == 10 + 10  # keys 300..309 replaced, 800..809 removed after their rows were copied
    for a, b in zip(copy.search(x[::9], 5), idx.search(x[::9], 5)):
        np.testing.assert_array_equal(a, b)
    idx.end_copy()
    assert idx._journal is None
    idx.add(np.arange(3000, 3001), x[:1])
    assert idx.take_journal() is None  # not recording

    idx.begin_copy()
    idx.compact()  # positions renumbered
    assert idx.take_journal() is None
    idx.end_copy()


def test_a_rebuild_drops_staged_keys_and_their_reveal_changes_nothing() -> None:
    x = clustered(700)
    idx = VectorIndex.build(64, np.arange(500), x[:500], IndexParams(exact_threshold=100))
    gen = idx.staged_generation
    pos = idx.stage(np.arange(50), x[500:550])
    idx.compact()  # a rebuild: what was staged is gone
    assert idx.staged_generation != gen and len(idx) == 500 and idx._n == 500
    assert not idx.reveal(gen, pos, np.arange(50, 100))
    np.testing.assert_array_equal(idx.search(x[:20], 1)[1][:, 0], np.arange(20))  # nothing changed
    assert len(idx) == 500

    # revealed past the flat threshold: settle() rebuilds it as HNSW
    flat = VectorIndex.build(64, np.arange(90), x[:90], IndexParams(exact_threshold=100))
    gen, pos = flat.staged_generation, flat.stage(np.arange(90, 120), x[90:120])
    assert flat.reveal(gen, pos, []) and flat.kind == "flat" and len(flat) == 120
    flat.settle()
    assert flat.kind == "hnsw-sq8" and len(flat) == 120 and flat._dead == 0


def test_positions_of_keys_are_the_live_positions_holding_them() -> None:
    """The lookup from keys to live positions (``vectors_of`` / ``scores_of`` / the rare-term candidates) against a
    scan of every position, on an index whose positions are not in key order: keys replaced (a dead copy and a live
    one), removed, staged hidden, appended past the sorted view, asked twice or absent."""
    rng = np.random.default_rng(0)
    x = clustered(4000, dim=32)
    keys = rng.permutation(np.arange(10, 4010) * 3)  # not in position order: the sorted view is used
    idx = VectorIndex.build(32, keys[:3000], x[:3000], IndexParams(exact_threshold=100))
    assert idx.kind != "flat" and not idx._sorted
    idx.add(keys[:20], x[3100:3120])  # replaced: a dead copy and a live one
    idx._view = None
    idx._positions_of(keys[:5])  # the sorted view, built again: both copies in it; what is added next is its tail
    assert (np.isin(idx._view[2], keys[:20])).sum() == 40
    idx.add(keys[3000:3100], x[3000:3100])
    idx.add(keys[20:40], x[3120:3140])  # replaced: the dead copy in the view, the live one in its tail
    idx.remove(keys[40:60])
    idx.stage(keys[3100:3110], x[3140:3150])  # hidden: not live
    ids, alive = idx._ids[: idx._n], idx._alive[: idx._n]
    assert idx._n - idx._view[1] > 0  # an unsorted tail past the view
    for ask in (keys[:40], keys[40:70], keys[2990:3030], keys[3095:3110], np.array([1, 2, keys[7], keys[7], 10**9]),
                rng.choice(keys, 40), np.zeros(0, np.int64)):  # fmt: skip
        ask = np.asarray(ask, np.int64)
        assert len(ask) * 64 < idx._n  # the sorted-view path
        want = np.flatnonzero(np.isin(ids, ask) & alive)
        np.testing.assert_array_equal(idx._positions_of(ask), want)
