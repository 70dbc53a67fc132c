"""The array-backed tag index, groups and key map against plain dict references, on random operations."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from smoa.routing.index.groups import GroupIndex
from smoa.routing.index.keymap import MISSING, KeyMap
from smoa.routing.index.tags import BOTH, CROSS_FIELD_WEIGHT, DOMAIN, SKILL, TagIndex, _tag_terms

DOMAINS = ["medical", "legal", "finance", "cooking", "travel", ""]
SKILLS = ["diagnosis", "review", "translation", "summarise", "prediction", "booking flights"]


class RefTags:
    """The formula of :mod:`smoa.routing.index.tags` over a plain dict ``key -> (domain, skill)``."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[tuple[str, ...], tuple[str, ...]]] = {}

    def bits(self, key: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for tags, field in zip(self.entries[key], (DOMAIN, SKILL)):
            for tag in tags:
                for t in _tag_terms(tag):
                    out[t] = out.get(t, 0) | field
        return out

    def df(self, term: str) -> int:
        return sum(term in self.bits(k) for k in self.entries)

    def score(self, terms: list[tuple[str, int]], keys: list[int] | None = None) -> dict[int, float]:
        n = len(self.entries)
        idfs = [math.log1p((n - self.df(t) + 0.5) / (self.df(t) + 0.5)) for t, _ in terms]
        total = sum(idfs) or 1.0
        out: dict[int, float] = {}
        for k in self.entries if keys is None else keys:
            b = self.bits(k) if k in self.entries else {}
            s = sum(w * (1.0 if b[t] & want else CROSS_FIELD_WEIGHT) for (t, want), w in zip(terms, idfs) if t in b)
            if keys is not None or any(t in b for t, _ in terms):
                out[k] = s / total
        return out


def random_tags(rng: np.random.Generator) -> tuple[list[str], list[str]]:
    d = [x for x in rng.choice(DOMAINS, rng.integers(0, 3), replace=False).tolist() if x]
    s = rng.choice(SKILLS, rng.integers(0, 3), replace=False).tolist()
    return d, s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tag_index_matches_reference_under_random_changes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    idx, ref = TagIndex(), RefTags()
    for step in range(300):
        op = rng.random()
        if op < 0.4:
            k, (d, s) = int(rng.integers(0, 80)), random_tags(rng)
            idx.add(k, d, s)
            ref.entries[k] = (tuple(d), tuple(s))
        elif op < 0.6:
            rows = [(int(rng.integers(0, 80)), *random_tags(rng)) for _ in range(int(rng.integers(1, 30)))]
            idx.add_many(rows)
            for k, d, s in rows:
                ref.entries[k] = (tuple(d), tuple(s))
        elif op < 0.8:
            k = int(rng.integers(0, 80))
            assert idx.remove(k) == (ref.entries.pop(k, None) is not None)
        else:
            ks = rng.integers(0, 80, int(rng.integers(1, 20)))
            want = sum(ref.entries.pop(int(k), None) is not None for k in np.unique(ks))
            assert idx.remove_many(ks) == want
        if step % 10 == 0 or step == 299:
            assert len(idx) == len(ref.entries) and sorted(idx.keys()) == sorted(ref.entries)
            for k, v in ref.entries.items():
                assert idx.tags_of(k) == v
            vocab = {t for k in ref.entries for t in ref.bits(k)}
            assert idx.vocabulary == vocab
            terms = [(t, int(rng.choice([DOMAIN, SKILL, BOTH]))) for t in sorted(vocab)[:3]] + [("zzz", BOTH)]
            assert idx.score(terms) == pytest.approx(ref.score(terms))
            probe = rng.integers(0, 90, 12).tolist()
            assert idx.score_keys(terms, probe) == pytest.approx(ref.score(terms, probe))
            every = idx.score(terms)  # score_keys reads the combinations, score the postings: the same floats
            assert idx.score_keys(terms, probe) == {k: every.get(k, 0.0) for k in probe}
            full = ref.score(terms)
            best = sorted(full, key=lambda k: (-full[k], k))[:5]
            assert list(idx.score(terms, limit=5)) == (best if len(full) > 5 else list(idx.score(terms)))
    back = TagIndex.from_arrays(_roundtrip(idx.to_arrays()))
    assert {k: back.tags_of(k) for k in back.keys()} == ref.entries
    assert TagIndex.from_json(idx.to_json()).score(terms) == idx.score(terms)


def _roundtrip(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as data:
        return dict(data)


class RefGroups:
    def __init__(self) -> None:
        self.members: dict[str, set[int]] = {}
        self.sums: dict[str, np.ndarray] = {}
        self.of: dict[int, str] = {}


@pytest.mark.parametrize("seed", [0, 1])
def test_groups_match_reference_under_random_changes(seed: int) -> None:
    """Tagged adapters (the untagged ones' clustering is covered in test_router) through add / add_many /
    remove, against sets and sums; then the CSR round trip."""
    rng = np.random.default_rng(seed)
    dim = 8
    g, ref = GroupIndex(dim), RefGroups()
    vec = {k: rng.standard_normal(dim) for k in range(60)}

    def ref_add(k: int, name: str) -> None:
        if k in ref.of:
            ref_remove(k, vec[k])
        ref.members.setdefault(name, set()).add(k)
        ref.sums[name] = ref.sums.get(name, np.zeros(dim)) + vec[k]
        ref.of[k] = name

    def ref_remove(k: int, v: np.ndarray | None) -> None:
        name = ref.of.pop(k, None)
        if name is None:
            return
        ref.members[name].discard(k)
        if not ref.members[name]:
            del ref.members[name], ref.sums[name]
        elif v is not None:
            ref.sums[name] = ref.sums[name] - v

    for _ in range(300):
        op = rng.random()
        if op < 0.4:
            k, name = int(rng.integers(0, 60)), str(rng.choice(DOMAINS[:-1]))
            g.add(k, vec[k], [name.upper()])
            ref_add(k, name)
        elif op < 0.6:
            ks = np.unique(rng.integers(0, 60, int(rng.integers(1, 15))))
            names = [str(rng.choice(DOMAINS[:-1])) for _ in ks]
            g.add_many(ks, np.stack([vec[int(k)] for k in ks]), [[n] for n in names])
            for k, n in zip(ks.tolist(), names):
                ref_add(k, n)
        else:
            k = int(rng.integers(0, 60))
            g.remove(k, vec[k])
            ref_remove(k, vec[k])
        assert len(g) == len(ref.members)
        for k in range(60):
            assert g.group_of(k) == ref.of.get(k)
    names, cents = g.centroids()
    assert names == sorted(ref.members)
    for n, c in zip(names, cents):
        assert g.members(n).tolist() == sorted(ref.members[n]) and g.size(n) == len(ref.members[n])
        s = ref.sums[n]
        np.testing.assert_allclose(c, s / max(np.linalg.norm(s), 1e-12), atol=1e-5)
    back = GroupIndex.from_arrays(dim, _roundtrip(g.to_arrays()))
    q = rng.standard_normal(dim)
    assert back.top_groups(q, 3) == g.top_groups(q, 3)
    assert all(back.group_of(k) == ref.of.get(k) for k in range(60))
    assert all(back.members(n).tolist() == sorted(ref.members[n]) for n in names)


@pytest.mark.parametrize("stride", [1, 3, 1000])
def test_keymap_matches_dict(stride: int) -> None:
    """Against a dict under random changes; ``stride`` spreads the keys: at 1 the base moves between dense and
    sorted as the live keys thin out and fill in, at 3 and 1000 it stays sorted."""
    rng = np.random.default_rng(stride)
    km, ref = KeyMap(), {}
    dense_seen = sorted_seen = False
    for step in range(20_000):
        op, k = rng.random(), int(rng.integers(0, 6000)) * stride
        if op < 0.5:
            v = int(rng.integers(0, 100))
            km.set(k, v)
            ref[k] = v
        elif op < 0.8:
            assert km.pop(k) == ref.pop(k, MISSING)
        elif op < 0.81:
            new = np.setdiff1d(rng.integers(6000, 9000, 50) * stride, np.fromiter(ref, np.int64))
            new = np.unique(new)
            km.set_new(new, np.arange(len(new)))
            ref.update(zip(new.tolist(), range(len(new))))
        elif op < 0.82:
            gone = rng.integers(0, 9000, 40) * stride
            km.pop_many(gone)
            for g in gone.tolist():
                ref.pop(g, None)
        else:
            assert km.get(k) == ref.get(k, MISSING)
        if step % 500 == 0:
            probe = np.concatenate([rng.integers(0, 9000, 300) * stride, [-5, 10**12]])
            assert km.get_many(probe).tolist() == [ref.get(int(p), MISSING) for p in probe]
            assert len(km) == len(ref)
            dense_seen |= km._dense is not None
            sorted_seen |= km._dense is None and km._base_n > 0
    keys, vals = km.items()
    assert dict(zip(keys.tolist(), vals.tolist())) == ref
    assert keys.tolist() == sorted(ref)
    assert sorted_seen and dense_seen == (stride == 1)  # stride 1: the base went dense and back as keys came and went


def test_dense_keys_are_read_directly_and_cost_no_more_than_sorted() -> None:
    """Catalog-like keys (1..n, a few gaps) make the base one values-by-key array: 4 B per possible key, never
    more than the sorted layout's 8 B per key; negative or sparse keys keep the sorted layout."""
    km = KeyMap()
    keys = np.setdiff1d(np.arange(1, 100_001), np.arange(7, 100_001, 10))  # 90 % of 1..100K
    km.set_new(keys, keys % 1000)
    assert km._dense is not None and km.nbytes() <= 8 * len(keys)
    probe = np.array([1, 7, 8, 100_000, 100_001, -3])
    assert km.get_many(probe).tolist() == [1, MISSING, 8, 0, MISSING, MISSING]
    assert km.get(17) == MISSING and km.get(18) == 18
    for odd in (np.array([-1, 0, 1]), np.array([5, 10**7])):
        other = KeyMap()
        other.set_new(odd, np.arange(len(odd)))
        assert other._dense is None and other.get_many(odd).tolist() == list(range(len(odd)))


@pytest.mark.parametrize("space", [10**6, 2**40], ids=["int32-postings", "int64-postings"])
def test_bulk_tag_inserts_and_removals_give_the_postings_of_one_row_at_a_time(space: int) -> None:
    """``TagIndex.add_many`` and ``remove_many`` (which finds the gone keys in each posting by binary search): batch
    after batch (new keys, replaced keys, single rows, removals), every posting equals the one built row by row
    (keys sorted and distinct, fields aligned, the same dtype)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(60)]

    def rows(keys: np.ndarray) -> list[tuple[int, list[str], list[str]]]:
        pick = lambda: [str(w) for w in rng.choice(words, int(rng.integers(0, 3)), replace=False)]  # noqa: E731
        return [(int(k), pick(), pick()) for k in keys]

    bulk, one = TagIndex(), TagIndex()
    base = rows(rng.choice(space, 3000, replace=False))
    bulk.add_many(base)
    for r in base:
        one.add(*r)
    for _ in range(5):
        batch = rows(np.concatenate([rng.choice(space, 400, replace=False), [base[int(i)][0] for i in rng.integers(0, 3000, 50)]]))
        bulk.add_many(batch)
        for r in batch:
            one.add(*r)
        for r in rows(rng.choice(space, 20, replace=False)):  # one row at a time: one new key per posting
            bulk.add_many([r])
            one.add(*r)
        gone = np.unique([batch[int(i)][0] for i in rng.choice(len(batch), 150, replace=False)])
        assert bulk.remove_many(gone) == len(gone)
        for g in gone.tolist():
            one.remove(g)
    assert bulk._postings.keys() == one._postings.keys() and bulk._dtype is one._dtype
    for t, (k, f) in bulk._postings.items():
        assert k.dtype == one._postings[t][0].dtype and np.array_equal(k, one._postings[t][0]), t
        assert np.array_equal(f, one._postings[t][1]) and bool(np.all(np.diff(k.astype(np.int64)) > 0)), t


def test_arrays_are_compact_at_scale() -> None:
    """100K adapters sharing a few hundred tag combinations: well under 100 B each for tags + groups."""
    rng = np.random.default_rng(0)
    n, dim = 100_000, 16
    doms = [f"domain{i}" for i in range(20)]
    skills = [f"skill{i}" for i in range(300)]
    rows = [(k, [doms[k % 20]], [skills[int(rng.integers(0, 300))]]) for k in range(n)]
    tags = TagIndex()
    tags.add_many(rows)
    groups = GroupIndex(dim)
    groups.add_many(np.arange(n), rng.standard_normal((n, dim)).astype(np.float32), [d for _, d, _ in rows])
    assert tags.memory_bytes() / n < 50 and groups.memory_bytes() / n < 40
    assert tags.score([("domain3", DOMAIN)], limit=3) == {3: 1.0, 23: 1.0, 43: 1.0}


def test_router_reopens_persisted_arrays_and_catches_up(tmp_path) -> None:
    """Save at generation 2, change (retag, remove, add) at 3 and 4, reopen: load() gives 2, the same change
    sets applied give the live router's tags, groups and routes; nothing is decoded or rebuilt."""
    from smoa.config import SMoAConfig
    from smoa.routing.router import KeyEntry, Router

    rng = np.random.default_rng(0)
    dim, n = 384, 300
    vecs = rng.standard_normal((n + 20, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = lambda ks: [f"ad_{k:04d}" for k in ks]  # noqa: E731
    tag = lambda k: ([DOMAINS[k % 5]], [SKILLS[k % 6]])  # noqa: E731
    live = Router(SMoAConfig(encoder="hash"), tmp_path, ids)
    live.add(np.arange(n), vecs[:n], [tag(k) for k in range(n)], generation=2)
    live.save()
    changes = [
        ([KeyEntry(k, vecs[k][None], ["travel"], ["booking flights"]) for k in range(0, 40, 3)], list(range(100, 130)), 3),
        ([KeyEntry(k, vecs[k][None], *tag(k)) for k in range(n, n + 20)], [5, 7, 11], 4),
    ]
    for up, rm, gen in changes:
        live.apply(up, rm, gen)
    again = Router(SMoAConfig(encoder="hash"), tmp_path, ids)
    assert again.load(max_generation=4) == 2
    assert again._groups.to_arrays()["group_offsets"][-1] == n
    for up, rm, gen in changes:
        again.apply(up, rm, gen)
    assert again.generation == live.generation == 4
    assert sorted(again._tags.keys()) == sorted(live._tags.keys())
    assert all(again._tags.tags_of(k) == live._tags.tags_of(k) for k in live._tags.keys())
    names, _ = live._groups.centroids()
    assert again._groups.centroids()[0] == names
    assert all(again._groups.members(g).tolist() == live._groups.members(g).tolist() for g in names)
    for q in vecs[rng.choice(n + 20, 10)]:
        text = "travel booking flights"
        live.encoder.prime([text], q[None])
        again.encoder.prime([text], q[None])
        for strategy in ("semantic", "hybrid", "hierarchical", "task_based"):
            a = live.route(text, strategy=strategy, k=3)
            b = again.route(text, strategy=strategy, k=3)
            assert a.adapter_ids == b.adapter_ids, strategy


def test_keys_past_int32_widen_the_arrays() -> None:
    """Keys are int32 while they fit; one that does not widens the arrays, and lookups stay exact."""
    big = 2**40 + 7
    km = KeyMap()
    km.set_new(np.array([1, 5, 9]), np.array([0, 1, 2]))
    assert km.get(big) == MISSING and km.get_many(np.array([5, big])).tolist() == [1, MISSING]
    km.set_new(np.array([big]), np.array([3]))
    assert km.get(big) == 3 and km.get_many(np.array([9, big])).tolist() == [2, 3]
    t = TagIndex()
    t.add_many([(1, ["medical"], []), (2, ["medical"], ["review"])])
    assert t.score_keys([("medical", DOMAIN)], [1, big]) == {1: pytest.approx(1.0), big: 0.0}
    t.add(big, ["medical"], [])
    assert set(t.score([("medical", DOMAIN)])) == {1, 2, big} and t.tags_of(big) == (("medical",), ())
    assert t.remove(big) and set(t.score([("medical", DOMAIN)])) == {1, 2}
    g = GroupIndex(4)
    g.add_many(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2], [["a"], ["a"]])
    g.add(big, np.ones(4, np.float32), ["a"])
    assert g.members("a").tolist() == [1, 2, big] and g.group_of(big) == "a"
    g.remove(big)
    assert g.members("a").tolist() == [1, 2]



def _postings(t: TagIndex) -> dict[str, tuple[list[int], list[int]]]:
    return {term: (k.tolist(), f.tolist()) for term, (k, f) in t._postings.items()}


def test_planned_tag_inserts_take_what_is_current_and_merge_the_rest_again() -> None:
    """``TagIndex.plan_add`` (off the owner's lock) then changes to some of its terms (an insert, a removal, a
    replaced key) before ``add_many(rows, plan)``: every posting equals that of the same changes without a plan;
    the terms nothing touched meanwhile take the planned posting as it is (no merge in the hold)."""
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(40)]

    def rows(keys) -> list[tuple[int, list[str], list[str]]]:
        pick = lambda: [str(w) for w in rng.choice(words, int(rng.integers(1, 3)), replace=False)]  # noqa: E731
        return [(int(k), pick(), pick()) for k in keys]

    base = rows(range(0, 2000))
    batch = rows(range(5000, 5300)) + [(7, ["w1"], ["w2"])]  # new keys, and one replaced
    between = rows(range(9000, 9010))  # lands between the plan and its hold
    planned, plain = TagIndex(), TagIndex()
    for t in (planned, plain):
        t.add_many(base)
    plan = planned.plan_add(batch)
    for t in (planned, plain):
        t.add_many(between)
        t.remove_many(np.array([11, 12, 13]))
    moved = {term for _, d, s in between for tag in d + s for term in _tag_terms(tag)}
    moved |= {term for k in (7, 11, 12, 13) for tags in planned.tags_of(k) or ((), ()) for tag in tags
              for term in _tag_terms(tag)}  # fmt: skip
    moved |= {term for _, d, s in base[11:14] for tag in d + s for term in _tag_terms(tag)}
    planned.add_many(batch, plan)
    plain.add_many(batch)
    assert _postings(planned) == _postings(plain)
    assert [planned.tags_of(k) for k in (7, 5000, 9000)] == [plain.tags_of(k) for k in (7, 5000, 9000)]
    untouched = [t for t in plan.merged if t not in moved]
    assert untouched and all(planned._postings[t] is plan.merged[t][1] for t in untouched)
    other = TagIndex()
    other.add_many(base)
    other.add_many(batch[:10], plan)  # planned for other rows: ignored
    ref = TagIndex()
    ref.add_many(base)
    ref.add_many(batch[:10])
    assert _postings(other) == _postings(ref)


def test_planned_group_sums_are_taken_only_when_no_planned_key_is_in_a_group() -> None:
    """``GroupIndex.plan_add`` then ``add_many(..., plan)``: the planned sums are taken while none of the rows is in
    a group (shown by a plan made from other vectors, which the sums then carry); once one of them is, the hold
    works the sums out again and the groups equal those built without a plan."""
    rng = np.random.default_rng(4)
    dim = 6
    keys = np.arange(100, 140)
    vecs = rng.standard_normal((len(keys), dim)).astype(np.float32)
    tags = [[str(rng.choice(DOMAINS[:-1]))] for _ in keys]
    tags[3] = []  # untagged: clustered row by row, never planned

    def fresh() -> GroupIndex:
        g = GroupIndex(dim)
        g.add_many(np.arange(10), np.eye(10, dim, dtype=np.float32), [[d] for d in DOMAINS[:5] * 2])
        return g

    plain, planned = fresh(), fresh()
    plain.add_many(keys, vecs, tags)
    planned.add_many(keys, vecs, tags, planned.plan_add(keys, vecs, tags))
    for n in plain.centroids()[0]:
        assert planned.members(n).tolist() == plain.members(n).tolist()
        np.testing.assert_array_equal(planned._sums[planned._gid[n]], plain._sums[plain._gid[n]])
    marked = fresh()
    marked.add_many(keys, vecs, tags, marked.plan_add(keys, 2 * vecs, tags))
    name = tags[0][0]
    assert not np.allclose(marked._sums[marked._gid[name]], plain._sums[plain._gid[name]])  # the plan was taken
    late, ref = fresh(), fresh()
    plan = late.plan_add(keys, 2 * vecs, tags)
    for g in (late, ref):
        g.add(int(keys[0]), vecs[0], tags[0])  # one planned key is in a group before the hold
        g.add_many(keys, vecs, tags, plan if g is late else None)
    for n in ref.centroids()[0]:
        assert late.members(n).tolist() == ref.members(n).tolist()
        np.testing.assert_allclose(late._sums[late._gid[n]], ref._sums[ref._gid[n]], atol=1e-6)


@pytest.mark.parametrize("block", [7, 8192])
def test_row_sums_in_blocks_equal_one_scatter_add(monkeypatch, block: int) -> None:
    """``row_sums`` gathers the rows a block at a time (runs of one index cross the blocks' edges): the float64
    sums of ``np.add.at``, and with ``unit`` those of the rows scaled to unit norm first; the input is not changed."""
    from smoa.routing.index import groups as groups_mod

    monkeypatch.setattr(groups_mod, "ROW_SUM_BLOCK", block)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    idx = rng.integers(0, 9, len(x))
    keep = x.copy()
    want = np.zeros((12, 16))
    np.add.at(want, idx, x.astype(np.float64))
    np.testing.assert_allclose(groups_mod.row_sums(x, idx, 12), want, rtol=1e-12, atol=1e-12)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    want = np.zeros((12, 16))
    np.add.at(want, idx, unit.astype(np.float64))
    np.testing.assert_allclose(groups_mod.row_sums(x, idx, 12, unit=True), want, atol=1e-5)
    assert np.array_equal(x, keep)
